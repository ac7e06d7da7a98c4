"""The C++ runtime runs the whole family (issue 32): SiT artifacts from `ditrt export --family sit`
through the C ABI (ctypes, the exported fp32 graph in ONNX Runtime as in tests/test_cpp_runtime.py):
the seven official SiT golden loops within the Python bounds; C++ `ditrt_sample` equal to the
Python runtime's `Pipeline.sample` bit for bit for every sampler of both families, at batch 1 and
4, with and without guidance; SiT's options, noise shapes, call counts and progress; and the
example program writing a SiT PNG."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT, max_rel_err, read_npz
from ditrt.runtime.sampling import flow
from cpp_abi import CANCELLED, INVALID_ARGUMENT, OK, PROGRESS, SCHEDULE_ERROR, opened_pipeline, python_fp32
from test_cpp_runtime import FakeBackend

SIT_DIR = ROOT / "tests" / "golden" / "sit"
META = json.loads((SIT_DIR / "sit_vectors.json").read_text())
SAMPLER_OF = {("ODE", "euler"): "ode-euler", ("ODE", "heun2"): "ode-heun2", ("ODE", "dopri5"): "ode-dopri5",
              ("SDE", "Euler"): "sde-euler", ("SDE", "Heun"): "sde-heun"}
SIT_SAMPLERS = ["ode-euler", "ode-heun2", "ode-dopri5", "sde-euler", "sde-heun"]
BOUND = {"ode-dopri5": 5e-4}  # the Python runtime's bounds (tests/test_sit.py)


@pytest.fixture(scope="module")
def sit_artifact(tmp_path_factory):
    """The golden SiT and the golden small VAE, exported by the CLI (fp32 graphs)."""
    out = tmp_path_factory.mktemp("sit-cpp") / "art"
    r = subprocess.run(["python", "-m", "ditrt.cli", "export", str(SIT_DIR / "sit_official_layout.pt"), "--family", "sit",
                        "--num-heads", "4", "--precision", "fp32", "--vae", str(ROOT / "tests" / "golden" / "vae" / "vae"),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def sit_cpp(lib, sit_artifact):
    yield from opened_pipeline(lib, sit_artifact)


@pytest.fixture(scope="module")
def sit_py(sit_artifact):
    return python_fp32(sit_artifact)


@pytest.fixture(scope="module")
def dit_cpp(lib, cpp_artifact):
    yield from opened_pipeline(lib, cpp_artifact)


@pytest.fixture(scope="module")
def sit_golden():
    return read_npz(SIT_DIR / "sit_vectors.npz")


# ---- the official SiT goldens through the C ABI -----------------------------------------------------------

@pytest.mark.parametrize("key", sorted(run["key"] for run in META["runs"]))
def test_cpp_reproduces_the_sit_golden_loops(sit_cpp, sit_golden, key):
    run = next(r for r in META["runs"] if r["key"] == key)
    sampler = SAMPLER_OF[run["mode"], run["method"]]
    steps = sit_golden.get(f"{key}_step_noise")  # SDE: (num_steps - 1, N, C, H, W); ODE: none
    before = len(sit_cpp.executor_callback.rows())
    status, out = sit_cpp.sample(META["labels"], noise=(sit_golden["initial_noise"], steps), sampler=sampler,
                                 steps=run["num_steps"], cfg_scale=run["cfg_scale"], guidance="official")
    assert status == OK, sit_cpp.lib.error()
    err = max_rel_err(out, sit_golden[f"{key}_samples"])
    calls = len(sit_cpp.executor_callback.rows()) - before
    print(f"C++ {key} {sampler} cfg {run['cfg_scale']}: max rel err {err:.2e} vs the official golden, {calls} model calls")
    assert err <= BOUND.get(sampler, 1e-5)
    # One model call per drift (the official SDE code calls twice); dopri5's count is the official one.
    assert calls == (run["model_calls"] // 2 if run["mode"] == "SDE" else run["model_calls"])
    rows = 2 * len(META["labels"]) if run["cfg_scale"] > 1 else len(META["labels"])
    assert set(sit_cpp.executor_callback.rows()[before:]) == {rows}


# ---- bit for bit: C++ ditrt_sample == Python Pipeline.sample, both families -------------------------------

BITWISE = [("sit", s, 12, {}) for s in SIT_SAMPLERS] + \
          [("dit", "ddpm", "25", {}), ("dit", "ddim", "ddim10", {"eta": 0.5}), ("dit", "dpm++2m", "10", {})]


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("family,sampler,steps,options", BITWISE, ids=[f"{f}-{s}" for f, s, _, _ in BITWISE])
def test_cpp_equals_python_bit_for_bit(sit_cpp, sit_py, dit_cpp, python_pipe, family, sampler, steps, options, n, cfg):
    """Seeded (the same stream in both languages, docs/noise.md): every sampler, batch 1 and 4,
    cfg 1 (no unconditional rows) and 2.5. The DDPM case is issue 32's: learned sigma, 4 images,
    25 steps, cfg 2.5, seed 1234567 (3.7e-7 apart before exp became portable.exp_float32)."""
    cpp, py = (sit_cpp, sit_py) if family == "sit" else (dit_cpp, python_pipe)
    labels = [3, 7, 0, 9][:n]
    python = py.sample(labels, num_steps=steps, sampler=sampler, cfg_scale=cfg, guidance="official", seed=1234567,
                       progress=False, **options)
    status, out = cpp.sample(labels, sampler=sampler, steps=steps, cfg_scale=cfg, guidance="official", seed=1234567,
                             **options)
    assert status == OK, cpp.lib.error()
    assert out.dtype == python.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), python.view(np.uint32))


def test_dopri5_options_and_call_count_match_python(sit_cpp, sit_py):
    """atol / rtol through ditrt_options_set: the same adaptive run as Python's (same bits, same
    number of model calls); a tighter rtol takes more calls."""
    calls = {}
    for rtol in ("1e-3", "1e-5"):
        before = len(sit_cpp.executor_callback.rows())
        status, out = sit_cpp.sample([1, 2], sampler="ode-dopri5", steps=5, cfg_scale=4.0, seed=5, atol="1e-7", rtol=rtol)
        assert status == OK, sit_cpp.lib.error()
        python = sit_py.sample([1, 2], num_steps=5, sampler="ode-dopri5", cfg_scale=4.0, seed=5, atol=1e-7,
                               rtol=float(rtol), progress=False)
        np.testing.assert_array_equal(out, python)
        calls[rtol] = len(sit_cpp.executor_callback.rows()) - before
        assert calls[rtol] == sit_py.last_stats.steps
    assert calls["1e-5"] > calls["1e-3"]


def test_sde_noise_draws_follow_docs_noise_md(sit_cpp, sit_py, sit_golden):
    """Seeded: draw 0 is z, draw k + 1 the k-th stochastic step's (num_steps - 1 of them). Injected
    noise built from the stream's draws gives the seeded run's bits."""
    from ditrt.runtime.sampling.noise import normal
    labels, steps = [4, 1], 6
    status, seeded = sit_cpp.sample(labels, sampler="sde-heun", steps=steps, cfg_scale=2.0, seed=77)
    assert status == OK, sit_cpp.lib.error()
    shape = (4, 8, 8)
    initial = normal(77, [0, 1], 0, shape)
    draws = np.stack([normal(77, [0, 1], k + 1, shape) for k in range(steps - 1)])
    status, injected = sit_cpp.sample(labels, noise=(initial, draws), sampler="sde-heun", steps=steps, cfg_scale=2.0)
    assert status == OK, sit_cpp.lib.error()
    np.testing.assert_array_equal(seeded, injected)
    np.testing.assert_array_equal(seeded, sit_py.sample(labels, num_steps=steps, sampler="sde-heun", cfg_scale=2.0, seed=77,
                                                        progress=False))
    status, _ = sit_cpp.sample(labels, noise=(initial, draws[:-1]), sampler="sde-heun", steps=steps, cfg_scale=2.0)
    assert status == INVALID_ARGUMENT and "expected (draws, images, C, H, W) = (5, 2" in sit_cpp.lib.error()
    status, _ = sit_cpp.sample(labels, noise=(initial, draws), sampler="ode-euler", steps=steps)
    assert status == INVALID_ARGUMENT and "ode-euler draws no noise" in sit_cpp.lib.error()
    _, shard = sit_cpp.sample(labels[1:], sampler="sde-heun", steps=steps, cfg_scale=2.0, seed=77, image_offset=1)
    np.testing.assert_array_equal(shard[0], seeded[1])  # image 1's noise is its own, whatever the batch


def test_num_steps_counts_model_calls_and_progress_reports_them(sit_cpp):
    """ditrt_num_steps: the model calls (dopri5: 0, known only after the run); progress gets
    (calls done, that total, the call's t in [0, 1])."""
    assert [sit_cpp.num_steps(sampler=s, steps=12) for s in SIT_SAMPLERS] == [11, 22, 0, 12, 23]
    assert sit_cpp.num_steps() == 250  # the manifest's default: sde-euler, 250 steps
    for sampler in ("sde-euler", "ode-dopri5"):
        seen = []
        callback = PROGRESS(lambda user, done, total, t: seen.append((done, total, t)) or 0)
        before = len(sit_cpp.executor_callback.rows())
        status, _ = sit_cpp.sample([1], progress=callback, sampler=sampler, steps=12, seed=1)
        assert status == OK, sit_cpp.lib.error()
        calls = len(sit_cpp.executor_callback.rows()) - before
        total = sit_cpp.num_steps(sampler=sampler, steps=12)
        assert [s[:2] for s in seen] == [(k + 1, total) for k in range(calls)]
        if sampler == "sde-euler":  # the model times: the grid, then the last step at 1 - 0.04
            assert [s[2] for s in seen] == [float(t) for t in np.append(flow.sde_grid(12).t[:-1], np.float32(0.96))]
    seen = []
    cancel = PROGRESS(lambda user, done, total, t: seen.append(done) or (1 if done == 4 else 0))
    status, out = sit_cpp.sample([1], progress=cancel, sampler="ode-dopri5", steps=12, seed=1)
    assert status == CANCELLED and "after model call 4;" in sit_cpp.lib.error() and np.isnan(out).all()
    assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize("settings,status,message", [
    ({"sampler": "ddpm"}, INVALID_ARGUMENT, "unknown sampler 'ddpm' for a sit model (ddpm samples dit models)"),
    ({"sampler": "ode-euler", "atol": "1e-3"}, INVALID_ARGUMENT, "atol applies to ode-dopri5 only; ode-euler takes no atol"),
    ({"sampler": "ode-dopri5", "rtol": "0"}, INVALID_ARGUMENT, "rtol must be a number in (0, 1]"),
    ({"sampler": "ode-dopri5", "atol": "2"}, INVALID_ARGUMENT, "atol must be a number in (0, 1]"),
    ({"sampler": "sde-euler", "diffusion_form": "SBDM"}, INVALID_ARGUMENT, "diffusion_form='SBDM' is not supported"),
    ({"sampler": "sde-heun", "last_step_size": "0.05"}, INVALID_ARGUMENT, "last_step_size='0.05' is not supported"),
    ({"sampler": "ode-heun2", "last_step": "Mean"}, INVALID_ARGUMENT,
     "last_step applies to sde-euler and sde-heun only; ode-heun2 takes no last_step"),
    ({"sampler": "sde-euler", "eta": "0.5"}, INVALID_ARGUMENT, "eta applies to ddim only; sde-euler takes no eta"),
    ({"sampler": "sde-euler", "steps": "1"}, SCHEDULE_ERROR, "must be an int in [2, 100000]"),
    ({"sampler": "ode-euler", "steps": "ddim10"}, SCHEDULE_ERROR, "must be an int in [2, 100000]"),
    ({"guidance": "all"}, INVALID_ARGUMENT, "unknown guidance 'all'"),
])
def test_bad_sit_options_are_refused_before_any_model_call(sit_cpp, settings, status, message):
    before = len(sit_cpp.executor_callback.calls)
    got, out = sit_cpp.sample([1], **{"steps": "5", **settings})
    assert (got, message in sit_cpp.lib.error()) == (status, True), sit_cpp.lib.error()
    assert len(sit_cpp.executor_callback.calls) == before and np.isnan(out).all()


def test_sde_defaults_spelt_out_are_accepted_and_sit_options_refused_on_dit(sit_cpp, dit_cpp):
    status, a = sit_cpp.sample([2], sampler="sde-euler", steps=4, seed=3)
    assert status == OK
    _, b = sit_cpp.sample([2], sampler="sde-euler", steps=4, seed=3, diffusion_form="sigma", diffusion_norm="1.0",
                          last_step="Mean", last_step_size="0.04")
    np.testing.assert_array_equal(a, b)
    status, _ = dit_cpp.sample([2], sampler="ddpm", steps="5", atol="1e-6")
    assert status == INVALID_ARGUMENT and "atol applies to ode-dopri5 only; ddpm takes no atol" in dit_cpp.lib.error()


# ---- the example program ------------------------------------------------------------------------------------

def test_ditrt_sample_writes_a_sit_png(release_build, sit_artifact, tmp_path):
    """ditrt-sample on a SiT artifact through the test executor plugin: its latents and PNG are
    the Python runtime's for the same networks, sampler, seed and options."""
    from PIL import Image

    from ditrt.runtime.core import images
    from ditrt.runtime.artifact.manifest import load_manifest
    from ditrt.runtime.execution.pipeline import Pipeline
    labels = [1, 2, 3]
    proc = subprocess.run([str(release_build / "ditrt-sample"), str(sit_artifact), "--labels", "1,2,3",
                           "--sampler", "ode-dopri5", "--steps", "10", "--rtol", "1e-4", "--seed", "3", "--cfg-scale", "4",
                           "--executor", str(release_build / "tests" / "ditrt_fake_networks.so"),
                           "--out", str(tmp_path / "grid.png"), "--latents", str(tmp_path / "latents.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(sit_artifact)
    pipe = Pipeline(FakeBackend(manifest.network("denoiser")), manifest, FakeBackend(manifest.network("decoder")))
    latents = pipe.sample(labels, num_steps=10, sampler="ode-dopri5", seed=3, cfg_scale=4.0, rtol=1e-4, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "latents.npy"), latents)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), images.grid(pipe.decode(latents)))
