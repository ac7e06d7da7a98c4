"""Diffusion schedules as plain numpy, exactly as the official DiT `diffusion/` package builds them.

Tables are float64; the samplers cast each coefficient to float32 when they apply it, as the
official `_extract_into_tensor` does. Index i runs over the (respaced) chain; `timesteps[i]` is
the original-scale timestep the model is called with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec.config import Diffusion
from ..core.errors import ScheduleError
from ..core.validate import check_int, parse_count, shown


MAX_DIGITS = 7  # a step count below 10^7 (num_train_timesteps is checked against it when respacing)
MAX_SPEC_CHARS = 10_000  # section counts a,b,c of up to ~1000 sections


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """The official `space_timesteps`: "N" (N evenly spaced steps, 0 and the last included),
    "ddimN" (smallest integer stride giving N steps) or "a,b,c" (sections of equal length)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        spec = str(check_int(spec, "step count", 0, 10**MAX_DIGITS - 1, ScheduleError))
    elif isinstance(spec, str) and (count := parse_count(spec, "step spec", ScheduleError, MAX_DIGITS)) is not None:
        spec = str(count)
    if not isinstance(spec, str) or not spec.strip():
        raise ScheduleError(f"step spec must be an int or a string like '250', 'ddim50' or '10,20,30'; got {shown(spec)}")
    if len(spec) > MAX_SPEC_CHARS:
        raise ScheduleError(f"step spec of {len(spec)} characters; a spec is 'N', 'ddimN' or section counts a,b,c "
                            f"(at most {MAX_SPEC_CHARS} characters)")
    spec = spec.strip(" \t")
    if spec.startswith("ddim"):
        count = _parse_count(spec[4:], spec)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ScheduleError(f"'{spec}': no integer stride gives exactly {count} of {num_timesteps} steps")
    sections = [_parse_count(part, spec) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(sections))
    start, steps = 0, []
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ScheduleError(f"'{spec}': cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not multiplied: the official rounding
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _parse_count(text: str, spec: str) -> int:
    count = parse_count(text, f"step spec {shown(spec)}", ScheduleError, MAX_DIGITS)
    if count is None:
        raise ScheduleError(f"step spec {shown(spec)} is not 'N', 'ddimN' or comma-separated section counts")
    if count < 1:
        raise ScheduleError(f"step spec '{spec}': step counts must be positive")
    return count


@dataclass(frozen=True)
class Schedule:
    """A (respaced) chain. All arrays have one entry per step, float64."""
    timesteps: np.ndarray  # original-scale timesteps, int64, ascending
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    fixed_large_log_variance: np.ndarray  # the variance when learn_sigma is off
    variance: str = "learned_range"  # the diffusion's variance type: learned_range or fixed_large

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def model_timesteps(self) -> np.ndarray:
        """The timesteps the model is called with, in call order (noisiest first)."""
        return self.timesteps[::-1]


def schedule_from_betas(betas: np.ndarray, timesteps: np.ndarray, variance: str = "learned_range") -> Schedule:
    """The official GaussianDiffusion tables for a beta sequence."""
    betas = np.asarray(betas, dtype=np.float64)
    if len(betas) < 2:
        raise ScheduleError("the official sampler needs at least 2 steps (its clipped posterior variance "
                            "is taken from step 1)")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return Schedule(
        timesteps=np.asarray(timesteps, dtype=np.int64),
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        fixed_large_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
        variance=variance,
    )


def respaced_schedule(diffusion: Diffusion, spec: str | int) -> Schedule:
    """The official SpacedDiffusion over the manifest's training process: keep the chosen
    timesteps, beta_i = 1 - ac[t_i] / ac[t_{i-1}], then rebuild every table on that chain."""
    n = diffusion.num_train_timesteps
    keep = space_timesteps(n, spec)
    if keep[-1] >= n:
        raise ScheduleError(f"step spec {spec!r} asks for timesteps beyond the {n} training steps")
    base_ac = diffusion.alphas_cumprod()
    betas, last = [], 1.0
    for t in keep:
        betas.append(1 - base_ac[t] / last)
        last = base_ac[t]
    return schedule_from_betas(np.array(betas), np.array(keep), diffusion.variance)
