"""DPM-Solver++(2M) as plain numpy, stepping exactly as diffusers' DPMSolverMultistepScheduler does
with algorithm_type="dpmsolver++", solver_order=2 and its defaults (timestep_spacing="linspace",
midpoint solver, lower_order_final=True, final_sigmas_type="zero").

In the VP parametrisation x_t = alpha_t x0 + sigma_t eps, with lambda = log(alpha_t / sigma_t), one
call k goes from lambda_k to lambda_{k+1} (h = lambda_{k+1} - lambda_k) using the data prediction
D (Lu et al. 2022, arXiv:2211.01095, Alg. 2):

    x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} (exp(-h) - 1) D
    D = x0_k                                          first order (the first and the last call)
    D = x0_k + (x0_k - x0_{k-1}) / (2 r),  r = h_{k-1} / h    second order (midpoint), in between

The last call lands on sigma = 0 (alpha = 1), so it returns x0 itself. The history is the previous
x0, passed in and returned explicitly (`state`). Tables are float64; each coefficient is cast to
float32 when applied, as in samplers.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from .schedule import ScheduleError

NAME = "dpm++2m"


@dataclass(frozen=True)
class DpmSchedule:
    """K model calls. Per-call arrays have K entries; the noise-level arrays have K + 1 (entry k is
    where call k starts, entry K = 0 noise is where the last call lands). All read-only, float64."""
    model_timesteps: np.ndarray  # int64 (K,), noisiest first: the timestep the model gets at call k
    sigmas: np.ndarray  # (K + 1,) diffusers' sigma = sqrt((1 - ac) / ac) = sigma_t / alpha_t, last 0
    alpha_t: np.ndarray  # (K + 1,) sqrt(ac) = 1 / sqrt(1 + sigma^2), last 1
    sigma_t: np.ndarray  # (K + 1,) sqrt(1 - ac) = sigma * alpha_t, last 0
    lambdas: np.ndarray  # (K + 1,) log(alpha_t / sigma_t) = -log(sigma), last +inf
    orders: np.ndarray  # int64 (K,): 1 at the first and the last call, 2 in between

    def __len__(self) -> int:
        return len(self.model_timesteps)


def parse_steps(steps, num_timesteps: int) -> int:
    """The number of model calls: an int or a string of digits, 1 .. num_timesteps - 1."""
    accepted = (f"{NAME} takes the number of model calls as an int (e.g. 25) or a string of digits "
                f"(e.g. '25'), from 1 to {num_timesteps - 1}")
    if isinstance(steps, str) and re.fullmatch(r"[ \t]*[0-9]+[ \t]*", steps):
        steps = int(steps)
    elif isinstance(steps, str):
        respacing = re.fullmatch(r"[ \t]*(ddim)?[0-9]+([ \t]*,[ \t]*[0-9]+)*[ \t]*", steps)
        raise ScheduleError(f"{accepted}; {steps!r} is " + ("a DDPM/DDIM respacing spec" if respacing else "not one"))
    elif isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ScheduleError(f"{accepted}; got {steps!r} ({type(steps).__name__})")
    if not 1 <= steps < num_timesteps:
        # At num_timesteps calls the linspace spacing repeats a timestep: h = 0, and the next
        # second-order step divides by it (diffusers returns NaN there).
        raise ScheduleError(f"{accepted}; got {steps}")
    return int(steps)


def dpm_schedule(alphas_cumprod: np.ndarray, steps: int | str) -> DpmSchedule:
    """diffusers' set_timesteps: timesteps = linspace(0, T - 1, steps + 1) rounded, reversed, the
    final 0 dropped; sigma at each (integer) timestep read from the table (diffusers' np.interp at
    the knots), then sigma = 0 for the end point."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or not np.all((ac > 0) & (ac < 1)):
        raise ScheduleError(f"alphas_cumprod must be a 1-D table of values in (0, 1), got shape {ac.shape}")
    count = parse_steps(steps, len(ac))
    timesteps = np.linspace(0, len(ac) - 1, count + 1).round()[::-1][:-1].astype(np.int64)
    sigmas = np.append(np.sqrt((1 - ac[timesteps]) / ac[timesteps]), 0.0)
    alpha_t = 1 / np.sqrt(1 + sigmas**2)
    with np.errstate(divide="ignore"):
        lambdas = -np.log(sigmas)
    orders = np.where((np.arange(count) == 0) | (np.arange(count) == count - 1), 1, 2)
    arrays = dict(model_timesteps=timesteps, sigmas=sigmas, alpha_t=alpha_t, sigma_t=sigmas * alpha_t,
                  lambdas=lambdas, orders=orders.astype(np.int64))
    for a in arrays.values():
        a.setflags(write=False)
    return DpmSchedule(**arrays)


def dpmpp_2m_step(x: np.ndarray, model_output: np.ndarray, sched: DpmSchedule, k: int,
                  noise: np.ndarray | None = None, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Call k (0 = noisiest): (x after the call, the new state = this call's x0). `model_output` is
    the guided output; only its first x.shape[1] channels (eps) are used. `noise` is ignored (the
    2M solver is deterministic); `state` is the x0 returned by call k - 1 (None at k = 0)."""
    if k > 0 and state is None:
        raise InputError(f"{NAME} call {k} needs the state returned by call {k - 1}")
    eps = model_output[:, :x.shape[1]]
    x0 = (x - np.float32(sched.sigma_t[k]) * eps) / np.float32(sched.alpha_t[k])
    h = sched.lambdas[k + 1] - sched.lambdas[k]
    d = x0
    if sched.orders[k] == 2:
        r = (sched.lambdas[k] - sched.lambdas[k - 1]) / h
        d = x0 + np.float32(0.5 / r) * (x0 - state)
    ratio, phi = sched.sigma_t[k + 1] / sched.sigma_t[k], sched.alpha_t[k + 1] * np.expm1(-h)
    x_next = np.float32(ratio) * x - np.float32(phi) * d
    return x_next, x0
