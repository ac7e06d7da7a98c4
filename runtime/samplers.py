"""Samplers: each step a short pure function over float32 arrays and a schedule (official math),
and one registry (`SAMPLERS`) from which the runtime, the CLI choices and the parity cases come.

Each step takes x_t (N, C, H, W), the guided model output for those rows (N, out_channels, H, W),
the chain index i and the noise for this step, and returns x_{t-1}. Every table entry is cast to
float32 before use and the operations keep the official order, so results match the official
float32 code to the last bits the backend allows.

A registry entry adapts a step to one calling convention for every sampler,
`step(x, model_output, schedule, k, noise, state, **options) -> (x_next, state)`: k counts model
calls from the noisiest, and `state` is whatever a multistep method carries from one call to the
next (None for single-step samplers; the previous data prediction for DPM-Solver++), so the loop
keeps each request's history in one explicit value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import Diffusion
from .dpm_solver import dpm_schedule, dpmpp_2m_step
from .errors import InputError
from .schedule import Schedule, respaced_schedule


def _f32(table: np.ndarray, i: int) -> np.float32:
    return np.float32(table[i])


def predict_x0(x: np.ndarray, eps: np.ndarray, sched: Schedule, i: int) -> np.ndarray:
    # No clipping: sample.py uses clip_denoised=False.
    return _f32(sched.sqrt_recip_alphas_cumprod, i) * x - _f32(sched.sqrt_recipm1_alphas_cumprod, i) * eps


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
    frac = (v + np.float32(1)) / np.float32(2)
    return frac * max_log + (np.float32(1) - frac) * min_log


def ddpm_step(x: np.ndarray, model_output: np.ndarray, sched: Schedule, i: int, noise: np.ndarray) -> np.ndarray:
    """The official p_sample: posterior mean plus exp(0.5 log_var) * noise, no noise at i = 0."""
    eps, v = split_output(model_output, x.shape[1])
    if sched.variance == "fixed_large":
        v = None  # the diffusion says fixed large: any variance channels are not used
    x0 = predict_x0(x, eps, sched, i)
    mean = _f32(sched.posterior_mean_coef1, i) * x0 + _f32(sched.posterior_mean_coef2, i) * x
    if i == 0:
        return mean
    return mean + np.exp(np.float32(0.5) * log_variance(v, sched, i, x.shape)) * noise


def ddim_step(x: np.ndarray, model_output: np.ndarray, sched: Schedule, i: int, noise: np.ndarray,
              eta: float = 0.0) -> np.ndarray:
    """The official ddim_sample: eps re-derived from x0, sigma from eta, no noise at i = 0."""
    eps, _ = split_output(model_output, x.shape[1])
    x0 = predict_x0(x, eps, sched, i)
    eps = (_f32(sched.sqrt_recip_alphas_cumprod, i) * x - x0) / _f32(sched.sqrt_recipm1_alphas_cumprod, i)
    alpha_bar = _f32(sched.alphas_cumprod, i)
    alpha_bar_prev = _f32(sched.alphas_cumprod_prev, i)
    sigma = np.float32(eta) * np.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * np.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean = x0 * np.sqrt(alpha_bar_prev) + np.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    if i == 0 or sigma == 0:
        return mean
    return mean + sigma * noise



def guide(cond: np.ndarray, uncond: np.ndarray, scale: float, guided_channels: int) -> np.ndarray:
    """Classifier-free guidance on the first `guided_channels` channels (official: 3, standard: all
    latent channels); the rest (channel 3 under official guidance, the variance) stay conditional."""
    out = cond.copy()
    c, u = cond[:, :guided_channels], uncond[:, :guided_channels]
    out[:, :guided_channels] = u + np.float32(scale) * (c - u)
    return out


# ---- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    name: str
    summary: str
    schedule: Callable[[Diffusion, Any], Any]  # (diffusion, steps) -> a schedule with model_timesteps, len()
    step: Callable[..., tuple[np.ndarray, Any]]  # (x, model_output, schedule, k, noise, state, **options)
    steps_help: str  # the accepted step forms, for --help and errors
    parity_steps: Callable[[int], Any]  # the step spec of this sampler's parity loop for n model calls
    options: dict = field(default_factory=dict)  # option name -> default (None: the option is not taken)
    uses_noise: bool = True  # draws fresh noise at every step

    def bind(self, **given) -> dict:
        """The options for one run: defaults filled in, values checked; an option this sampler
        does not take is refused (never silently ignored)."""
        for name, value in given.items():
            if value is not None and name not in self.options:
                takers = [s.name for s in SAMPLERS.values() if name in s.options]
                raise InputError(f"{name} applies to {' and '.join(takers) or 'no sampler'} only; "
                                 f"{self.name} takes no {name}")
        options = {name: given.get(name) if given.get(name) is not None else default
                   for name, default in self.options.items()}
        if "eta" in options:
            eta = options["eta"]
            if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not 0.0 <= eta <= 1.0:
                raise InputError(f"eta must be a number in [0, 1], got {eta!r}")
            options["eta"] = float(eta)
        return options


def _respaced(diffusion: Diffusion, steps) -> Schedule:
    return respaced_schedule(diffusion, steps)


def _ddpm(x, model_output, sched, k, noise, state):
    return ddpm_step(x, model_output, sched, len(sched) - 1 - k, noise), state


def _ddim(x, model_output, sched, k, noise, state, eta):
    return ddim_step(x, model_output, sched, len(sched) - 1 - k, noise, eta), state


RESPACING_HELP = "N (N evenly spaced steps), ddimN (integer stride) or section counts a,b,c"
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> None:
    SAMPLERS[sampler.name] = sampler


register_sampler(Sampler("ddpm", "the official DDPM loop (learned-range or fixed-large variance)", _respaced, _ddpm,
                         RESPACING_HELP, parity_steps=str))
register_sampler(Sampler("ddim", "the official DDIM loop (eta 0 deterministic)", _respaced, _ddim, RESPACING_HELP,
                         parity_steps=lambda n: f"ddim{n}", options={"eta": 0.0}))


def _dpm_schedule(diffusion: Diffusion, steps):
    return dpm_schedule(diffusion.alphas_cumprod(), steps)


register_sampler(Sampler("dpm++2m", "DPM-Solver++(2M), data prediction, midpoint: diffusers' DPMSolverMultistepScheduler "
                         "defaults (linspace timesteps, lower-order final, final sigma 0)", _dpm_schedule, dpmpp_2m_step,
                         "the number of model calls, e.g. 25", parity_steps=int, uses_noise=False))


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; use {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
