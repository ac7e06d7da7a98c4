"""Samplers: each a short loop over float32 arrays and a schedule (the official math), and one
registry (`SAMPLERS`) from which the runtime, the CLI choices and the parity cases come.

A sampler's loop is a generator, k-diffusion style, with its history in plain variables:

    loop(x, schedule, noise, **options) -> Generator[(x_eval, t), model_output, x_final]

It yields the state at which the model must be evaluated next and the model time t for that call
(the value the family's time input takes: DiT's original-scale timestep, SiT's t in [0, 1]); it is
sent the guided model output for x_eval and finally returns the sample. `noise(k)` is the k-th
stochastic draw (random access: a retried step gets the same noise). The pipeline drives loops one
model call at a time, so a batching scheduler can step many requests through one backend call,
each at its own t, and adaptive solvers take as many calls as they need.

DiT's samplers are fixed-step: `fixed_step_loop(step)` turns a step function
`step(x, model_output, schedule, k, noise, state, **options) -> (x_next, state)` into a loop (k
counts model calls from the noisiest; `state` carries a multistep method's history).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np

from . import flow
from ..spec.config import Diffusion
from .dpm_solver import dpm_schedule, dpmpp_2m_step
from ..core.errors import InputError
from ..core.portable import exp_float32
from .schedule import Schedule, respaced_schedule
from ..core.validate import check_number

Loop = Generator[tuple[np.ndarray, float], np.ndarray, np.ndarray]


def _f32(table: np.ndarray, i: int) -> np.float32:
    return np.float32(table[i])


def predict_x0(x: np.ndarray, eps: np.ndarray, sched: Schedule, i: int) -> np.ndarray:
    # No clipping: sample.py uses clip_denoised=False. In place: a * x - b * eps, the same roundings.
    x0 = np.multiply(x, _f32(sched.sqrt_recip_alphas_cumprod, i))
    x0 -= np.multiply(eps, _f32(sched.sqrt_recipm1_alphas_cumprod, i))
    return x0


def split_output(model_output: np.ndarray, in_channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(eps, variance values v) for learn_sigma models, (eps, None) otherwise."""
    if model_output.shape[1] == 2 * in_channels:
        return model_output[:, :in_channels], model_output[:, in_channels:]
    return model_output, None


def log_variance(v: np.ndarray | None, sched: Schedule, i: int, shape: tuple[int, ...]) -> np.ndarray:
    """Learned-range interpolation between log(beta) and the clipped posterior log-variance
    (frac = (v + 1) / 2, no clamp); fixed-large when the model learns no variance."""
    if v is None:
        return np.full(shape, _f32(sched.fixed_large_log_variance, i), dtype=np.float32)
    min_log = _f32(sched.posterior_log_variance_clipped, i)
    max_log = _f32(sched.log_betas, i)
    frac = np.add(v, np.float32(1))
    frac /= np.float32(2)
    rest = np.subtract(np.float32(1), frac)
    rest *= min_log
    frac *= max_log
    frac += rest  # frac * max_log + (1 - frac) * min_log, in place
    return frac


def ddpm_step(x: np.ndarray, model_output: np.ndarray, sched: Schedule, i: int, noise: np.ndarray) -> np.ndarray:
    """The official p_sample: posterior mean plus exp(0.5 log_var) * noise, no noise at i = 0."""
    eps, v = split_output(model_output, x.shape[1])
    if sched.variance == "fixed_large":
        v = None  # the diffusion says fixed large: any variance channels are not used
    mean = predict_x0(x, eps, sched, i)
    mean *= _f32(sched.posterior_mean_coef1, i)
    mean += np.multiply(x, _f32(sched.posterior_mean_coef2, i))
    if i == 0:
        return mean
    # exp_float32, not np.exp: numpy's float32 exp and the C++ runtime's expf differ in the last bit.
    # In place, the same roundings: mean + exp(0.5 log_var) * noise (a + b is b + a to the bit).
    half_log_var = log_variance(v, sched, i, x.shape)
    half_log_var *= np.float32(0.5)
    out = exp_float32(half_log_var)
    out *= noise
    out += mean
    return out


def ddim_step(x: np.ndarray, model_output: np.ndarray, sched: Schedule, i: int, noise: np.ndarray,
              eta: float = 0.0) -> np.ndarray:
    """The official ddim_sample: eps re-derived from x0, sigma from eta, no noise at i = 0."""
    eps, _ = split_output(model_output, x.shape[1])
    x0 = predict_x0(x, eps, sched, i)
    # In place, the same roundings: eps = (a x - x0) / b, mean = x0 sqrt(abar_prev) + c eps.
    eps = np.multiply(x, _f32(sched.sqrt_recip_alphas_cumprod, i))
    eps -= x0
    eps /= _f32(sched.sqrt_recipm1_alphas_cumprod, i)
    alpha_bar = _f32(sched.alphas_cumprod, i)
    alpha_bar_prev = _f32(sched.alphas_cumprod_prev, i)
    # eta 0: sigma is exactly 0 (never 0 * NaN), so the loop, which draws no noise then, never needs any.
    sigma = np.float32(0) if eta == 0 else (np.float32(eta) * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) *
                                            np.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean = x0
    mean *= np.sqrt(alpha_bar_prev)
    eps *= np.sqrt(1 - alpha_bar_prev - sigma**2)
    mean += eps
    if i == 0 or sigma == 0:
        return mean
    if noise is None:
        raise ValueError(f"ddim_step: sigma is {sigma} at index {i} (eta {eta}), which needs noise; got None")
    mean += np.multiply(noise, sigma)  # the draw is the stream's: never written
    return mean


def guide(cond: np.ndarray, uncond: np.ndarray, scale: float, guided_channels: int) -> np.ndarray:
    """Classifier-free guidance on the first `guided_channels` channels (official: 3, standard: all
    latent channels); the rest (channel 3 under official guidance, the variance) stay conditional.
    u + s (c - u), written in place into the one output array (the same roundings)."""
    out = np.empty_like(cond)
    out[:, guided_channels:] = cond[:, guided_channels:]
    guided = out[:, :guided_channels]
    np.subtract(cond[:, :guided_channels], uncond[:, :guided_channels], out=guided)
    guided *= np.float32(scale)
    guided += uncond[:, :guided_channels]
    return out


def fixed_step_loop(step: Callable[..., tuple[np.ndarray, Any]],
                    draws: Callable[..., bool] = lambda sched, k, **options: True) -> Callable[..., Loop]:
    """A loop over every model timestep of a schedule, one step function call per model call.
    `draws(sched, k, **options)` False: step k adds no noise, so none is drawn (the step gets None)."""
    def loop(x: np.ndarray, sched, noise: Callable[[int], np.ndarray] | None, **options) -> Loop:
        state = None
        for k, t in enumerate(sched.model_timesteps):
            out = yield x, float(t)
            w = noise(k) if noise is not None and draws(sched, k, **options) else None
            x, state = step(x, out, sched, k, w, state, **options)
        return x
    return loop


# ---- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    name: str
    family: str  # the model family it samples (runtime.spec.config.FAMILIES)
    summary: str
    schedule: Callable[[Any, Any], Any]  # (the family's process, steps) -> a schedule
    loop: Callable[..., Loop]  # (x, schedule, noise, **options) -> the loop
    steps_help: str  # the accepted step forms, for --help and errors
    parity_steps: Callable[[int], Any]  # the step spec of this sampler's parity loop for about n model calls
    noise_draws: Callable[[Any], int]  # schedule -> stochastic draws (the leading axis of injected step noise)
    model_calls: Callable[[Any], int | None]  # schedule -> model calls, None when adaptive
    options: dict = field(default_factory=dict)  # option name -> default (a name not here is refused)
    check_options: Callable[[dict], dict] = lambda options: options
    uses_noise: bool = True  # False: noise(k) is never called (injected step noise is accepted, unused)
    integrates_null_half: bool = False  # the loop integrates the whole guided batch [x; x] (see pipeline)
    # (schedule, options) -> n: the loop takes step draws 0 .. n - 1, in order (the noise prefetch
    # computes none past them); None: noise_draws(schedule)
    drawn: Callable[..., int] | None = None
    adaptive: bool = False  # it decides its own model calls (model_calls None): a call budget applies

    def step_draws(self, schedule, options: dict) -> int:
        if not self.uses_noise:
            return 0
        return self.drawn(schedule, **options) if self.drawn is not None else self.noise_draws(schedule)

    def bind(self, **given) -> dict:
        """The options for one run: defaults filled in, values checked; an option this sampler
        does not take is refused (never silently ignored)."""
        for name, value in given.items():
            if value is not None and name not in self.options:
                takers = [s.name for s in SAMPLERS.values() if name in s.options]
                raise InputError(f"{name} applies to {' and '.join(takers) or 'no sampler'} only; "
                                 f"{self.name} takes no {name}")
        return self.check_options({name: given[name] if given.get(name) is not None else default
                                   for name, default in self.options.items()})


def _check_eta(options: dict) -> dict:
    return {**options, "eta": check_number(options["eta"], "eta", 0.0, 1.0)}


def _ddpm(x, model_output, sched, k, noise, state):
    return ddpm_step(x, model_output, sched, len(sched) - 1 - k, noise), state


def _ddim(x, model_output, sched, k, noise, state, eta):
    return ddim_step(x, model_output, sched, len(sched) - 1 - k, noise, eta), state


def _not_last(sched, k, **options) -> bool:
    """The official loops add no noise at the last call (i = 0)."""
    return k != len(sched) - 1


def _ddim_draws(sched, k, eta) -> bool:
    return eta != 0 and _not_last(sched, k)  # eta 0: sigma is 0 at every step


RESPACING_HELP = "N (N evenly spaced steps), ddimN (integer stride) or section counts a,b,c"
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> None:
    SAMPLERS[sampler.name] = sampler


def _dpm_schedule(diffusion: Diffusion, steps):
    return dpm_schedule(diffusion.alphas_cumprod(), steps)


register_sampler(Sampler("ddpm", "dit", "the official DDPM loop (learned-range or fixed-large variance)",
                         respaced_schedule, fixed_step_loop(_ddpm, _not_last), RESPACING_HELP, parity_steps=str,
                         noise_draws=len, model_calls=len, drawn=lambda sched: len(sched) - 1))
register_sampler(Sampler("ddim", "dit", "the official DDIM loop (eta 0 deterministic)", respaced_schedule,
                         fixed_step_loop(_ddim, _ddim_draws), RESPACING_HELP, parity_steps=lambda n: f"ddim{n}",
                         noise_draws=len, model_calls=len, options={"eta": 0.0}, check_options=_check_eta,
                         drawn=lambda sched, eta: len(sched) - 1 if eta != 0 else 0))
# The 2M solver draws no noise; injected noise keeps DiT's (initial, steps (K, ...)) form, steps unused.
register_sampler(Sampler("dpm++2m", "dit", "DPM-Solver++(2M), data prediction, midpoint: diffusers' "
                         "DPMSolverMultistepScheduler defaults (linspace timesteps, lower-order final, final sigma 0)",
                         _dpm_schedule, fixed_step_loop(dpmpp_2m_step), "the number of model calls, e.g. 25",
                         parity_steps=int, noise_draws=len, model_calls=len, uses_noise=False))


# ---- SiT (runtime/sampling/flow.py): the Linear-path velocity model's ODE and SDE loops ----------------------

def _ode_schedule(transport, steps):
    return flow.ode_grid(flow.parse_num_steps(steps))


def _sde_schedule(transport, steps):
    return flow.sde_grid(flow.parse_num_steps(steps))


SIT_STEPS_HELP = "SiT's --num-sampling-steps: an int >= 2 (ODE: linspace(0, 1, N); SDE: linspace(0, 0.96, N))"
_SDE_OPTIONS = {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
_intervals = lambda grid: len(grid.t) - 1  # noqa: E731
for _sampler in (
    Sampler("ode-euler", "sit", "torchdiffeq euler over linspace(0, 1, num_steps)", _ode_schedule, flow.ode_euler,
            SIT_STEPS_HELP, int, noise_draws=lambda g: 0, model_calls=_intervals, uses_noise=False),
    Sampler("ode-heun2", "sit", "torchdiffeq heun2 over linspace(0, 1, num_steps)", _ode_schedule, flow.ode_heun2,
            SIT_STEPS_HELP, lambda n: n // 2 + 1, noise_draws=lambda g: 0, model_calls=lambda g: 2 * _intervals(g),
            uses_noise=False),
    Sampler("ode-dopri5", "sit", "torchdiffeq dopri5 from t=0 to 1 (SiT's default ODE sampler; num_steps only sets "
            "the output grid; the error norm covers the whole guided batch)", _ode_schedule, flow.ode_dopri5,
            SIT_STEPS_HELP, lambda n: n, noise_draws=lambda g: 0, model_calls=lambda g: None,
            options={"atol": 1e-6, "rtol": 1e-3}, check_options=flow.check_dopri5_options, uses_noise=False,
            integrates_null_half=True, adaptive=True),
    Sampler("sde-euler", "sit", "SiT's Euler-Maruyama over linspace(0, 0.96, num_steps), then a Mean step of 0.04 "
            "(diffusion 'sigma', norm 1)", _sde_schedule, flow.sde_euler, SIT_STEPS_HELP, lambda n: n,
            noise_draws=_intervals, model_calls=lambda g: _intervals(g) + 1, options=_SDE_OPTIONS,
            check_options=flow.check_sde_options),
    Sampler("sde-heun", "sit", "SiT's stochastic Heun over linspace(0, 0.96, num_steps), then a Mean step of 0.04 "
            "(diffusion 'sigma', norm 1)", _sde_schedule, flow.sde_heun, SIT_STEPS_HELP, lambda n: n // 2 + 1,
            noise_draws=_intervals, model_calls=lambda g: 2 * _intervals(g) + 1, options=_SDE_OPTIONS,
            check_options=flow.check_sde_options),
):
    register_sampler(_sampler)


def samplers_of(family: str | None) -> dict[str, Sampler]:
    """The registry entries that sample `family`'s models (None: every entry), in registry order."""
    return {name: entry for name, entry in SAMPLERS.items() if family is None or entry.family == family}


def option_names(samplers=None, exclude=()) -> list[str]:
    """The sorted option names the given registry entries take (None: the whole registry, as it is
    now: a sampler registered later counts), less `exclude`."""
    entries = SAMPLERS.values() if samplers is None else samplers
    return sorted({name for entry in entries for name in entry.options} - set(exclude))


def get_sampler(name, family: str | None = None) -> Sampler:
    """The registry entry; with `family`, only that family's samplers are accepted."""
    choices = list(samplers_of(family))
    if not isinstance(name, str) or name not in choices:
        where = f" for a {family} model" if family else ""
        other = (f" ({name} samples {SAMPLERS[name].family} models)"
                 if isinstance(name, str) and name in SAMPLERS else "")
        raise InputError(f"unknown sampler {name!r}{where}{other}; use {', '.join(choices)}")
    return SAMPLERS[name]


def parse_options(items) -> dict:
    """Sampler options given as NAME=VALUE strings (the CLI's --option): numbers become floats."""
    options = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip().isidentifier():
            raise InputError(f"a sampler option is NAME=VALUE (e.g. atol=1e-6), got {item!r}")
        if name.strip() in options:  # the last one would silently win
            raise InputError(f"sampler option {name.strip()} is given twice (--option {name.strip()}=...); give it once")
        try:
            options[name.strip()] = float(value)
        except ValueError:
            options[name.strip()] = value.strip()
    return options
