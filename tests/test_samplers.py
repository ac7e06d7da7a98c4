"""Sampler steps against a float64 transcription of the official gaussian_diffusion.py formulas,
for the paths the golden loops do not cover: DDIM with eta > 0, fixed-large variance (learn_sigma
off), and the masking at the last step."""
import numpy as np
import pytest

from ditrt.runtime.sampling.samplers import ddim_step, ddpm_step, guide
from ditrt.runtime.spec.config import Diffusion
from ditrt.runtime.sampling.schedule import respaced_schedule

OFFICIAL = Diffusion()

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
EPS = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
V = RNG.uniform(-1, 1, (2, 4, 4, 4)).astype(np.float32)
NOISE = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)


def official_tables(spec):
    """Written out again from docs/official-semantics.md (SpacedDiffusion + GaussianDiffusion)."""
    from ditrt.runtime.sampling.schedule import space_timesteps
    base_ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    keep = space_timesteps(1000, spec)
    ac = base_ac[keep]
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1 - ac / ac_prev
    pv = betas * (1 - ac_prev) / (1 - ac)
    return dict(ac=ac, ac_prev=ac_prev, betas=betas, pv=pv, log_pv_clipped=np.log(np.append(pv[1], pv[1:])),
                fixed_large=np.log(np.append(pv[1], betas[1:])))


def x0_of(T, i, x, eps):
    return np.sqrt(1 / T["ac"][i]) * x - np.sqrt(1 / T["ac"][i] - 1) * eps


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("i", [0, 1, 24, 49])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_step(i, learn_sigma):
    T = official_tables("50")
    x, eps = X.astype(np.float64), EPS.astype(np.float64)
    x0 = x0_of(T, i, x, eps)
    mean = (T["betas"][i] * np.sqrt(T["ac_prev"][i]) / (1 - T["ac"][i])) * x0 \
        + ((1 - T["ac_prev"][i]) * np.sqrt(1 - T["betas"][i]) / (1 - T["ac"][i])) * x
    if learn_sigma:
        frac = (V + 1) / 2
        log_var = frac * np.log(T["betas"][i]) + (1 - frac) * T["log_pv_clipped"][i]
    else:
        log_var = T["fixed_large"][i]
    want = mean + (i != 0) * np.exp(0.5 * log_var) * NOISE
    out = np.concatenate([EPS, V], axis=1) if learn_sigma else EPS
    got = ddpm_step(X, out, respaced_schedule(OFFICIAL, "50"), i, NOISE)
    assert got.dtype == np.float32 and rel(got, want) < 1e-5


@pytest.mark.parametrize("i", [0, 1, 24, 49])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step(i, eta):
    T = official_tables("ddim50")
    x = X.astype(np.float64)
    x0 = x0_of(T, i, x, EPS.astype(np.float64))
    eps = (np.sqrt(1 / T["ac"][i]) * x - x0) / np.sqrt(1 / T["ac"][i] - 1)
    a, a_prev = T["ac"][i], T["ac_prev"][i]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    want = x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sigma**2) * eps + (i != 0) * sigma * NOISE
    got = ddim_step(X, np.concatenate([EPS, V], axis=1), respaced_schedule(OFFICIAL, "ddim50"), i, NOISE, eta)
    assert got.dtype == np.float32 and rel(got, want) < 1e-5
    if eta > 0 and i > 0:  # the noise really enters
        assert rel(ddim_step(X, EPS, respaced_schedule(OFFICIAL, "ddim50"), i, NOISE * 0, eta), want) > 1e-4


def test_guide_channels():
    cond, uncond = RNG.standard_normal((2, 8, 2, 2)).astype(np.float32), RNG.standard_normal((2, 8, 2, 2)).astype(np.float32)
    g = guide(cond, uncond, 4.0, 3)
    np.testing.assert_array_equal(g[:, :3], uncond[:, :3] + np.float32(4.0) * (cond[:, :3] - uncond[:, :3]))
    np.testing.assert_array_equal(g[:, 3:], cond[:, 3:])
