"""Sampler steps as short pure functions over float32 arrays and a Schedule (official math).

Each step takes x_t (N, C, H, W), the model output for the kept rows (N, out_channels, H, W), the
chain index i and the noise for this step, and returns x_{t-1}. Every table entry is cast to
float32 before use and the operations keep the official order, so results match the official
float32 code to the last bits the backend allows.
"""
from __future__ import annotations

import numpy as np

from .schedule import Schedule


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


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step}


def guide(cond: np.ndarray, uncond: np.ndarray, scale: float, guided_channels: int) -> np.ndarray:
    """Classifier-free guidance on the first `guided_channels` channels (official: 3, standard: all
    latent channels); the rest (channel 3 under official guidance, the variance) stay conditional."""
    out = cond.copy()
    c, u = cond[:, :guided_channels], uncond[:, :guided_channels]
    out[:, :guided_channels] = u + np.float32(scale) * (c - u)
    return out
