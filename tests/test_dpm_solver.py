"""DPM-Solver++(2M) (runtime/sampling/dpm_solver.py): each step kind against a float64 transcription of the
DPM-Solver++ formulas, the timesteps and the full loops against the golden diffusers runs
(tests/golden/dpm_vectors.*, copied from shared/golden/dpm/), and the step-spec errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import max_rel_err, read_npz
from ditrt.runtime.sampling.dpm_solver import dpm_schedule, dpmpp_2m_step
from ditrt.runtime.sampling.samplers import guide
from ditrt.runtime.sampling.schedule import ScheduleError

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
AC = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # DiT's training schedule, float64
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
X0_PREV = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
OUT = RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)  # eps + learned-variance channels


@pytest.fixture(scope="module")
def dpm_golden():
    return read_npz(GOLDEN_DIR / "dpm_vectors.npz")


DPM_META = json.loads((GOLDEN_DIR / "dpm_vectors.json").read_text())


# --- float64 transcription of DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095, Alg. 2) -------------
# written from alpha-bar (not from the module's sigma tables): alpha = sqrt(ac), sigma = sqrt(1 - ac),
# lambda = log(alpha / sigma); the end point after the last timestep is alpha = 1, sigma = 0.

def _noise_level(timesteps, j):
    if j == len(timesteps):
        return 1.0, 0.0, np.inf
    a, s = np.sqrt(AC[timesteps[j]]), np.sqrt(1 - AC[timesteps[j]])
    return a, s, np.log(a / s)


def reference_step(timesteps, k, x, eps, x0_prev=None):
    """float64 x_{k+1} and x0_k; second order (multistep midpoint) when x0_prev is given."""
    x, eps = x.astype(np.float64), eps.astype(np.float64)
    a_s, s_s, lam_s = _noise_level(timesteps, k)
    a_t, s_t, lam_t = _noise_level(timesteps, k + 1)
    x0 = (x - s_s * eps) / a_s
    if s_t == 0:
        return x0, x0  # sigma_t / sigma_s = 0 and alpha_t (exp(-inf) - 1) = -1
    h = lam_t - lam_s
    D = x0
    if x0_prev is not None:
        r = (lam_s - _noise_level(timesteps, k - 1)[2]) / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev.astype(np.float64)
    return s_t / s_s * x - a_t * (np.exp(-h) - 1) * D, x0


# --- the step kinds ----------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 10, 25])
def test_first_order_start(steps):
    sched = dpm_schedule(AC, steps)
    x_next, state = dpmpp_2m_step(X, OUT, sched, 0, None, None)
    ref, ref_x0 = reference_step(sched.model_timesteps, 0, X, OUT[:, :4])
    assert x_next.dtype == np.float32 and state.dtype == np.float32
    assert max_rel_err(x_next, ref) <= 1e-5
    assert max_rel_err(state, ref_x0) <= 1e-5


@pytest.mark.parametrize("steps,k", [(3, 1), (10, 1), (10, 5), (10, 8), (25, 1), (25, 12), (25, 23), (250, 100)])
def test_second_order_middle(steps, k):
    sched = dpm_schedule(AC, steps)
    x_next, state = dpmpp_2m_step(X, OUT, sched, k, None, X0_PREV)
    ref, ref_x0 = reference_step(sched.model_timesteps, k, X, OUT[:, :4], X0_PREV)
    assert max_rel_err(x_next, ref) <= 1e-5
    assert max_rel_err(state, ref_x0) <= 1e-5
    first_order, _ = reference_step(sched.model_timesteps, k, X, OUT[:, :4])
    assert max_rel_err(first_order, ref) > 1e-3  # the correction is not negligible here


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_lower_order_final(steps):
    """The last call is first order onto sigma = 0 whatever the history: x_final = x0."""
    sched = dpm_schedule(AC, steps)
    k = steps - 1
    x_next, state = dpmpp_2m_step(X, OUT, sched, k, None, None if k == 0 else X0_PREV)
    ref, ref_x0 = reference_step(sched.model_timesteps, k, X, OUT[:, :4])
    assert np.isfinite(x_next).all()
    assert max_rel_err(x_next, ref) <= 1e-5
    np.testing.assert_array_equal(x_next, state)


@pytest.mark.parametrize("steps,orders", [(1, [1]), (2, [1, 1]), (3, [1, 2, 1]), (5, [1, 2, 2, 2, 1])])
def test_orders_per_call(steps, orders):
    assert list(dpm_schedule(AC, steps).orders) == orders


def test_variance_channels_and_noise_are_ignored():
    sched = dpm_schedule(AC, 10)
    other = OUT.copy()
    other[:, 4:] = 123.0
    a = dpmpp_2m_step(X, OUT, sched, 3, None, X0_PREV)
    b = dpmpp_2m_step(X, other, sched, 3, RNG.standard_normal(X.shape).astype(np.float32), X0_PREV)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = dpmpp_2m_step(X, OUT[:, :4], sched, 3, None, X0_PREV)  # a model without learned variance
    np.testing.assert_array_equal(a[0], c[0])


def test_state_is_required_after_the_first_call():
    with pytest.raises(ValueError, match="state"):
        dpmpp_2m_step(X, OUT, dpm_schedule(AC, 10), 1, None, None)


def test_schedule_tables():
    sched = dpm_schedule(AC, 25)
    assert len(sched) == 25 and sched.model_timesteps.dtype == np.int64
    assert len(sched.sigmas) == len(sched.alpha_t) == len(sched.sigma_t) == len(sched.lambdas) == 26
    assert sched.sigmas[-1] == 0 and sched.alpha_t[-1] == 1 and sched.lambdas[-1] == np.inf
    t = sched.model_timesteps
    np.testing.assert_allclose(sched.alpha_t[:-1], np.sqrt(AC[t]), rtol=1e-12)
    np.testing.assert_allclose(sched.sigma_t[:-1], np.sqrt(1 - AC[t]), rtol=1e-12)
    with pytest.raises(ValueError):
        sched.sigmas[0] = 1.0  # read-only: a cached schedule cannot be corrupted


# --- timesteps and the golden loops ---------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 25])
def test_timesteps_match_the_golden_exactly(dpm_golden, steps):
    got = dpm_schedule(AC, steps).model_timesteps
    for key in (k for k in dpm_golden if k.startswith(f"dpm{steps}_") and k.endswith("_timesteps")):
        assert got.tolist() == dpm_golden[key].tolist(), key


def _loop_via_functions(session, sched, initial, labels, cfg_scale, guided_channels, null_class):
    """The class-conditional DPM-Solver++(2M) loop over an ONNX Runtime session, through the pure
    functions (the pipeline-level loop is the integrator's)."""
    n, x, state = len(labels), initial.copy(), None
    guided = cfg_scale > 1.0  # no unconditional rows at scale <= 1, as the pipeline
    label_in = np.concatenate([labels, np.full(n, null_class)]).astype(np.int64) if guided else labels.astype(np.int64)
    for k, t in enumerate(sched.model_timesteps):
        latent_in = np.concatenate([x, x]) if guided else x
        feeds = {"latent": latent_in, "timestep": np.full(len(latent_in), t, np.float32), "class_label": label_in}
        out = session.run(["model_output"], feeds)[0]
        model_out = guide(out[:n], out[n:], cfg_scale, guided_channels) if guided else out
        x, state = dpmpp_2m_step(x, model_out, sched, k, None, state)
    return x


@pytest.fixture(scope="module")
def session(tiny_artifact):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(tiny_artifact / "denoiser.fp32.onnx"), options, providers=["CPUExecutionProvider"])


def _golden_run(session, dpm_golden, run):
    return _loop_via_functions(session, dpm_schedule(AC, run["steps"]), dpm_golden["initial_noise"],
                               np.array(DPM_META["labels"]), run["cfg_scale"], run["guided_channels"],
                               DPM_META["null_class"])


@pytest.mark.parametrize("run", DPM_META["runs"], ids=[r["key"] for r in DPM_META["runs"]])
def test_onnxruntime_fp32_reproduces_the_golden_dpm_runs(session, dpm_golden, run):
    err = max_rel_err(_golden_run(session, dpm_golden, run), dpm_golden[run["key"]])
    print(f"{run['key']}: max rel err {err:.2e}")
    assert err <= 1e-5  # measured <= 1.3e-6


def test_official_guidance_at_cfg1_is_the_unguided_run(session, dpm_golden):
    """The golden stores no dpm*_official_cfg1: at scale 1 there are no unconditional rows, so the
    guided-channel count cannot matter."""
    run = dict(steps=10, cfg_scale=1.0, guided_channels=3)
    np.testing.assert_array_equal(_golden_run(session, dpm_golden, run),
                                  _golden_run(session, dpm_golden, dict(run, guided_channels=4)))


# --- step specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ddim50", "10,20,30", "250x", "", 0, -3, "0", 1000, True, 25.0, None, [25]])
def test_bad_step_specs(spec):
    with pytest.raises(ScheduleError, match=r"number of model calls as an int \(e\.g\. 25\)") as info:
        dpm_schedule(AC, spec)
    assert "1 to 999" in str(info.value)
    if spec in ("ddim50", "10,20,30"):
        assert "DDPM/DDIM respacing spec" in str(info.value)


@pytest.mark.parametrize("spec,count", [(25, 25), ("25", 25), (" 7 ", 7), (np.int64(10), 10), (1, 1), (999, 999)])
def test_good_step_specs(spec, count):
    assert len(dpm_schedule(AC, spec)) == count


def test_bad_alphas_cumprod():
    with pytest.raises(ScheduleError, match="alphas_cumprod"):
        dpm_schedule(np.append(AC, 1.0), 10)


# --- extra cross-check against diffusers itself (skipped where it is not installed) ----------------

def _diffusers_scheduler(steps):
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DPMSolverMultistepScheduler(**{k: v for k, v in DPM_META["scheduler_config"].items()
                                                 if not k.startswith("_")})
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 14, 15, 25, 50, 100, 250, 500, 999])
def test_timesteps_and_sigmas_match_diffusers(steps):
    s = _diffusers_scheduler(steps)
    sched = dpm_schedule(AC, steps)
    assert sched.model_timesteps.tolist() == s.timesteps.tolist()
    # diffusers' table is a float32 cumprod of float32 betas: up to ~4e-6 apart at t >= 40, more near t = 0
    np.testing.assert_allclose(sched.sigmas, s.sigmas.double().numpy(), rtol=1e-4, atol=0)


def test_loop_matches_diffusers_stepping_the_same_model(session, dpm_golden):
    """The same ONNX model outputs stepped by diffusers' scheduler: isolates the solver numerics from
    the model's (the golden's residual is mostly the torch-vs-ORT forward)."""
    import torch
    run = DPM_META["runs"][3]  # 25 steps, standard guidance, cfg 4
    s = _diffusers_scheduler(run["steps"])
    x, labels, n = dpm_golden["initial_noise"].copy(), np.array(DPM_META["labels"]), 2
    label_in = np.concatenate([labels, np.full(n, DPM_META["null_class"])]).astype(np.int64)
    for t in s.timesteps:
        feeds = {"latent": np.concatenate([x, x]), "timestep": np.full(2 * n, int(t), np.float32), "class_label": label_in}
        out = session.run(["model_output"], feeds)[0]
        eps = guide(out[:n], out[n:], run["cfg_scale"], run["guided_channels"])[:, :4]
        x = s.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
    err = max_rel_err(_golden_run(session, dpm_golden, run), x)
    print(f"25 steps vs diffusers on the same model: max rel err {err:.2e}")
    assert err <= 2e-6


# ---- through the runtime: sampler="dpm++2m" -----------------------------------------------------

@pytest.mark.parametrize("run", DPM_META["runs"], ids=[r["key"] for r in DPM_META["runs"]])
def test_pipeline_reproduces_the_golden_dpm_runs(tiny_artifact, dpm_golden, run):
    """The same runs through runtime.load(...).sample(sampler="dpm++2m"), with the initial noise
    injected (the step noise is accepted and unused: the solver adds none)."""
    from ditrt import runtime
    pipe = runtime.load(tiny_artifact, backend="onnxruntime", precision="fp32")
    initial = dpm_golden["initial_noise"]
    unused = np.zeros((run["steps"], *initial.shape), np.float32)
    out = pipe.sample([3, 7], num_steps=run["steps"], sampler="dpm++2m", cfg_scale=run["cfg_scale"],
                      guidance=run["guidance"], noise=(initial, unused), progress=False)
    assert max_rel_err(out, dpm_golden[run["key"]]) <= 1e-5
    assert pipe.last_stats.steps == run["steps"]


def test_pipeline_rejects_eta_and_respacing_for_dpm(tiny_artifact):
    from ditrt import runtime
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    with pytest.raises(runtime.InputError, match="eta applies to ddim only; dpm\\+\\+2m takes no eta"):
        pipe.sample([1], num_steps=10, sampler="dpm++2m", eta=0.5, progress=False)
    with pytest.raises(ScheduleError, match="'ddim50' is a DDPM/DDIM respacing spec"):
        pipe.sample([1], num_steps="ddim50", sampler="dpm++2m", progress=False)
