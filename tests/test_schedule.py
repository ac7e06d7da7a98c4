"""Schedules against values computed here from the official formulas (docs/official-semantics.md)."""
import numpy as np
import pytest

from ditrt.runtime.spec.config import Diffusion
from ditrt.runtime.sampling.schedule import ScheduleError, respaced_schedule, space_timesteps

OFFICIAL = Diffusion()

BASE_AC = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def expected_timesteps(spec: str) -> list[int]:
    if spec.startswith("ddim"):
        n = int(spec[4:])
        stride = next(s for s in range(1, 1000) if len(range(0, 1000, s)) == n)
        return list(range(0, 1000, stride))
    counts = [int(c) for c in spec.split(",")]
    sizes = [1000 // len(counts) + (1 if i < 1000 % len(counts) else 0) for i in range(len(counts))]
    steps, start = [], 0
    for size, count in zip(sizes, counts):
        steps += [start + int(v) for v in np.linspace(0, size - 1, count).round()]
        start += size
    return steps


@pytest.mark.parametrize("spec", ["250", "100", "50", "10", "ddim50", "ddim25", "ddim10", "10,20,30"])
def test_timesteps_match_the_formula(spec):
    assert space_timesteps(1000, spec) == expected_timesteps(spec)


def test_known_edges():
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(1000, "ddim50")[-1] == 980
    assert space_timesteps(1000, "10,20,30")[:2] == [0, 37] and space_timesteps(1000, "10,20,30")[-1] == 999


@pytest.mark.parametrize("spec", ["250", "100", "50", "ddim50", "ddim25", "10,20,30"])
def test_respaced_tables_match_the_formulas(spec):
    sched = respaced_schedule(OFFICIAL, spec)
    t = np.array(expected_timesteps(spec))
    assert list(sched.timesteps) == list(t)
    # Respacing keeps alphas_cumprod at the kept timesteps exactly (up to float64 rounding).
    np.testing.assert_allclose(sched.alphas_cumprod, BASE_AC[t], rtol=1e-12)
    betas = 1 - BASE_AC[t] / np.append(1.0, BASE_AC[t][:-1])
    np.testing.assert_allclose(sched.betas, betas, rtol=1e-12)
    assert sched.betas[0] == pytest.approx(1e-4, rel=1e-12)  # first step: 1 - ac[0] = beta_0
    ac, ac_prev = BASE_AC[t], np.append(1.0, BASE_AC[t][:-1])
    pv = betas * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(sched.posterior_log_variance_clipped, np.log(np.append(pv[1], pv[1:])), rtol=1e-12)
    np.testing.assert_allclose(sched.posterior_mean_coef1, betas * np.sqrt(ac_prev) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(sched.posterior_mean_coef2, (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_recip_alphas_cumprod, np.sqrt(1 / ac), rtol=1e-12)
    np.testing.assert_allclose(sched.fixed_large_log_variance, np.log(np.append(pv[1], betas[1:])), rtol=1e-12)


def test_sqrt_recip_at_t999_on_the_250_step_chain():
    assert respaced_schedule(OFFICIAL, "250").sqrt_recip_alphas_cumprod[-1] == pytest.approx(157.41, abs=0.01)


def test_linear_betas():
    b = OFFICIAL.betas()
    assert b.dtype == np.float64 and len(b) == 1000 and b[0] == 1e-4 and b[-1] == 0.02


@pytest.mark.parametrize("spec,message", [
    ("0", "must be positive"), ("1001", "cannot take 1001 steps"), ("ddim300", "no integer stride"),
    ("abc", "is not 'N', 'ddimN'"), ("1", "at least 2 steps"), ("", "must be an int or a string"),
    ("10,,5", "is not 'N', 'ddimN'"), ("ddim", "is not 'N', 'ddimN'"),
])
def test_impossible_specs_are_named(spec, message):
    with pytest.raises(ScheduleError, match=message):
        respaced_schedule(OFFICIAL, spec)
