"""The C++ runtime (runtime/cpp): built with CMake, its GoogleTest suite run against values the
Python runtime computes here, then driven through its C ABI (version 2) with ctypes: one callback
executor runs the exported fp32 graphs (denoiser and decoder) in ONNX Runtime, and the loops must
reproduce the official and diffusers golden loops and the Python runtime; the images and PNGs must
be the Python runtime's. A second build with AddressSanitizer + UndefinedBehaviorSanitizer runs
the whole C++ test set, a fuzz of mutated manifests and the differential test of the two manifest
readers.

Builds live in runtime/cpp/build/pytest-{release,sanitize} (ignored by git) and are reused
incrementally: a clean clone builds both from scratch once (~2-3 min on 2 cores).

On a machine without the C++ toolchain or its headers (nlohmann-json, GoogleTest, libpng) these
tests skip, saying what to install; with DITRT_REQUIRE_CPP=1 (set by .ci/run) they fail instead.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN_DIR, ROOT, max_rel_err, read_npz
from cpp_abi import (ARTIFACT_ERROR, BUFFER_TOO_SMALL, BUSY, CANCELLED, CPP, EXECUTOR_ERROR, HEADERS, I64,
                     INVALID_ARGUMENT, OK, PROGRESS, SANITIZER_ENV, SCHEDULE_ERROR, STEP_ERROR, UNAVAILABLE, VP, CppPipeline,
                     _f32, _run, _tools_or_skip, library)

def test_missing_headers_skip_with_the_reason_unless_ci_requires_them(monkeypatch):
    """A fresh machine without the Debian packages skips these tests, saying what to install;
    .ci/run exports DITRT_REQUIRE_CPP=1, which makes the same situation a failure."""
    monkeypatch.setitem(HEADERS, "ditrt-no-such-header.h", "libditrt-nothing-dev")
    monkeypatch.delenv("DITRT_REQUIRE_CPP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="ditrt-no-such-header.h \\(libditrt-nothing-dev\\).*apt-get install"):
        _tools_or_skip()
    monkeypatch.setenv("DITRT_REQUIRE_CPP", "1")
    with pytest.raises(pytest.fail.Exception, match="DITRT_REQUIRE_CPP=1 but"):
        _tools_or_skip()

# ---- the C++ unit tests against Python's values ---------------------------------------------------------

def _python_values() -> dict:
    """Values the Python runtime computes, which the GoogleTest suite reads (DITRT_TEST_VALUES)."""
    from ditrt.runtime.sampling import dpm_solver, samplers, schedule
    from ditrt.runtime.core import images
    from ditrt.runtime.spec.config import Diffusion
    from ditrt.runtime.execution.trt import compat as trt_plan

    def diffusion(variance="learned_range"):  # the official training process, as the manifest states it
        return Diffusion(1000, "linear", 1e-4, 0.02, variance)

    respacing = []
    for n, spec in [(1000, s) for s in ("250", "ddim50", "10,20,30", "10", "1000", "ddim1000", "7", "ddim3", " 0010 ",
                                        "1,2,3,4,5", "100,1", " 25 ", "1_0", "ddim 10", "+5", "3,0", "0", "-1", "12345678",
                                        "ddim300", "1001", "", "x", "10,,20", "2.5", "999", "333,333,334",
                                        # issue 30: only blanks are stripped (C accepted these)
                                        "25\n", "\n25", "\r25", "25\v", "\f25", " 25\t", "ddim10\n", "10,\n20")] + \
                    [(6, "5"), (4, "3"), (10, "4"), (7, "3,3"), (3, "1,1,1,1")]:
        try:
            respacing.append({"n": n, "spec": spec, "steps": schedule.space_timesteps(n, spec)})
        except schedule.ScheduleError as e:
            respacing.append({"n": n, "spec": spec, "error": str(e)})

    names = [f for f in schedule.Schedule.__dataclass_fields__ if f not in ("timesteps", "variance")]
    schedules = {}
    for spec in ("250", "ddim50", "10,20,30", "10"):
        s = schedule.respaced_schedule(diffusion(), spec)
        schedules[spec] = {"timesteps": s.timesteps.tolist(), **{k: getattr(s, k).tolist() for k in names}}

    rng = np.random.default_rng(123)
    steps, guides = [], []
    for name, sampler, spec, i, eta, out_channels, variance in [
            ("ddpm learned mid", "ddpm", "250", 120, 0.0, 8, "learned_range"),
            ("ddpm learned first", "ddpm", "250", 249, 0.0, 8, "learned_range"),
            ("ddpm last", "ddpm", "10", 0, 0.0, 8, "learned_range"),
            ("ddpm fixed large, no v channels", "ddpm", "10,20,30", 17, 0.0, 4, "fixed_large"),
            ("ddpm fixed large ignores v", "ddpm", "10,20,30", 17, 0.0, 8, "fixed_large"),
            ("ddim eta 0", "ddim", "ddim50", 30, 0.0, 8, "learned_range"),
            ("ddim eta 0.7", "ddim", "ddim50", 30, 0.7, 8, "learned_range"),
            ("ddim eta 1 last", "ddim", "ddim50", 0, 1.0, 8, "learned_range")]:
        x = rng.standard_normal((2, 4, 3, 3), dtype=np.float32)
        mo = rng.standard_normal((2, out_channels, 3, 3), dtype=np.float32)
        noise = rng.standard_normal((2, 4, 3, 3), dtype=np.float32)
        sched = schedule.respaced_schedule(diffusion(variance), spec)
        got = (samplers.ddim_step(x, mo, sched, i, noise, eta=eta) if sampler == "ddim"
               else samplers.ddpm_step(x, mo, sched, i, noise))
        steps.append({"name": name, "sampler": sampler, "spec": spec, "i": i, "eta": eta, "shape": list(x.shape),
                      "out_channels": out_channels, "learned": variance == "learned_range", "x": x.ravel().tolist(),
                      "model_output": mo.ravel().tolist(), "noise": noise.ravel().tolist(),
                      "expected": got.astype(np.float32).ravel().tolist()})
    for scale, channels in ((4.0, 3), (1.5, 4), (0.3, 2)):
        cond = rng.standard_normal((2, 8, 2, 2), dtype=np.float32)
        uncond = rng.standard_normal((2, 8, 2, 2), dtype=np.float32)
        guides.append({"cond": cond.ravel().tolist(), "uncond": uncond.ravel().tolist(), "scale": scale,
                       "guided_channels": channels, "shape": [2, 8, 4],
                       "expected": samplers.guide(cond, uncond, scale, channels).ravel().tolist()})

    dpm = []  # DPM-Solver++(2M): the schedule and one call, first order, second order and the last
    for count, k in ((10, 0), (10, 4), (25, 24), (1, 0), (25, 1)):
        sched = dpm_solver.dpm_schedule(diffusion().alphas_cumprod(), count)
        x = rng.standard_normal((2, 4, 3, 3), dtype=np.float32)
        mo = rng.standard_normal((2, 8, 3, 3), dtype=np.float32)
        state = rng.standard_normal((2, 4, 3, 3), dtype=np.float32)
        x_next, x0 = dpm_solver.dpmpp_2m_step(x, mo, sched, k, state=state if k else None)
        dpm.append({"steps": count, "k": k, "timesteps": sched.model_timesteps.tolist(), "orders": sched.orders.tolist(),
                    "shape": list(x.shape), "x": x.ravel().tolist(), "model_output": mo.ravel().tolist(),
                    "state": state.ravel().tolist(), "expected_x": x_next.ravel().tolist(),
                    "expected_x0": x0.ravel().tolist()})

    image_cases = []  # grids of 1 to 9 images (images.grid is checked against torchvision in test_images.py)
    for n in range(1, 10):
        batch = (rng.standard_normal((n, 3, 5, 6)) * 0.9).astype(np.float32)
        batch[0, 0, 0, :3] = [-1.0, 1.0, 0.0]
        g = images.grid(batch)
        image_cases.append({"n": n, "h": 5, "w": 6, "images": batch.ravel().tolist(),
                            "uint8": images.to_uint8(batch).ravel().tolist(), "grid_shape": list(g.shape[:2]),
                            "grid": g.ravel().tolist()})

    return {"respacing": respacing, "schedules": schedules, "steps": steps, "guide": guides, "dpm": dpm,
            "images": image_cases, "flow": _flow_cases(), "sit_runs": _sit_pipeline_cases(),
            "portable": _portable_cases(), **_compat_cases(trt_plan)}


def _flow_cases() -> dict:
    """SiT's grids and each flow loop (runtime/sampling/flow.py, through the sampler registry) driven by an
    elementwise velocity a x + t b (the same float32 operations in C++): the sample, the model
    times and, for dopri5, its accepted and rejected steps. Expected bit for bit."""
    from ditrt.runtime.sampling import flow
    from ditrt.runtime.sampling.samplers import get_sampler
    grids = [{"n": n, "ode": flow.ode_grid(n).t.tolist(), "sde": flow.sde_grid(n).t.tolist()}
             for n in (2, 3, 7, 10, 50, 250, 1001)]
    rng = np.random.default_rng(321)
    shape = (2, 4, 2, 2)
    b = rng.standard_normal(shape, dtype=np.float32)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    loops = []
    # heun2 also on a grid where t0 + (t1 - t0) != t1 (its second time is t0 + dt as computed)
    uneven = np.array([0.0, 0.1, 0.23, 1.0], np.float32)
    for name, steps, options, stiffness, custom in [
            ("ode-euler", 7, {}, 1, None), ("ode-heun2", 7, {}, 1, None), ("ode-heun2", 4, {}, 1, uneven),
            ("ode-dopri5", 6, {}, 1, None), ("ode-dopri5", 6, {"atol": 1e-8, "rtol": 1e-6}, 40, None),
            ("sde-euler", 7, {}, 1, None), ("sde-heun", 7, {}, 1, None)]:
        sampler = get_sampler(name)
        grid = sampler.schedule(None, steps) if custom is None else flow.OdeGrid(custom)
        a = (-rng.uniform(0.2, 2.0, shape) * stiffness).astype(np.float32)
        draws = rng.standard_normal((sampler.noise_draws(grid), *shape), dtype=np.float32)
        stats, times = flow.Dopri5Stats(), []
        extra = {"stats": stats} if name == "ode-dopri5" else {}
        loop = sampler.loop(x0, grid, (lambda k: draws[k]) if sampler.uses_noise else None, **sampler.bind(**options),
                            **extra)
        x_eval, t = next(loop)
        while True:
            times.append(t)
            try:
                x_eval, t = loop.send(a * x_eval + np.float32(t) * b)
            except StopIteration as done:
                sample = done.value
                break
        loops.append({"sampler": name, "steps": steps, "options": {k: str(v) for k, v in options.items()},
                      "grid": None if custom is None else custom.tolist(),
                      "shape": list(shape), "a": a.ravel().tolist(), "b": b.ravel().tolist(), "x": x0.ravel().tolist(),
                      "draws": draws.ravel().tolist(), "times": times, "expected": sample.ravel().tolist(),
                      "stats": [stats.function_evals, stats.accepted_steps, stats.rejected_steps]})
    return {"grids": grids, "loops": loops}


# The toy DiT of the C++ unit tests (runtime/cpp/tests/test_util.hpp minimal_manifest()): 2x2 latents of 4 channels,
# 10 classes.
TOY_DIT_MANIFEST = json.loads((ROOT / "tests" / "data" / "toy_dit_manifest.json").read_text())


def _sit_pipeline_cases() -> dict:
    """Whole SiT runs of the Python Pipeline over FakeBackend (tests/fake_networks.c's denoiser) on
    a toy SiT manifest: the C++ test (test_flow.cpp) runs ditrt_sample with the same function as a
    callback executor, also under ASan + UBSan, and expects these latents bit for bit."""
    import tempfile

    import manifest_mutants
    from ditrt.runtime.artifact.manifest import Manifest
    from ditrt.runtime.execution.pipeline import Pipeline
    data = manifest_mutants.sit_from_dit(TOY_DIT_MANIFEST)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Manifest(data, Path(tmp))
    pipe = Pipeline(FakeBackend(manifest.network("denoiser")), manifest)
    runs = []
    for sampler in ("ode-euler", "ode-heun2", "ode-dopri5", "sde-euler", "sde-heun"):
        for cfg, guidance in ((1.0, "official"), (3.0, "official"), (3.0, "standard")):
            latents = pipe.sample([1, 4], num_steps=6, sampler=sampler, cfg_scale=cfg, guidance=guidance, seed=11,
                                  progress=False)
            runs.append({"sampler": sampler, "cfg_scale": cfg, "guidance": guidance, "labels": [1, 4], "steps": 6,
                         "seed": 11, "calls": pipe.last_stats.steps, "rows": pipe.last_stats.model_rows,
                         "expected": latents.view(np.uint32).ravel().tolist()})
    return {"manifest": data, "runs": runs}


def _portable_cases() -> dict:
    """runtime/core/portable.py's exp_float32 (as uint32 bits) and pairwise_sum."""
    from ditrt.runtime.core import portable
    rng = np.random.default_rng(99)
    x = np.concatenate([rng.uniform(-30, 5, 2000), [0.0, -0.0, 1e-8, -1e-8, 88.7, -87.3, -103.0, -104.5, -150.0, -250.0,
                                                     0.5 * np.log(0.02), -0.34657359, 0.34657359]]).astype(np.float32)
    sums = [rng.standard_normal(n).tolist() for n in (0, 1, 2, 3, 5, 8, 13, 100, 1001)]
    return {"exp_in": x.view(np.uint32).tolist(), "exp_out": portable.exp_float32(x).view(np.uint32).tolist(),
            "sums": [{"values": v, "expected": float(portable.pairwise_sum(np.array(v)))} for v in sums]}


def _compat_cases(trt_plan) -> dict:
    """check_engine_compat / choose_engine verdicts over a grid of plans and machines."""
    def entry(file, version, cc, hw="none", vc=False, built="2026-01-01T00:00:00"):
        return {"network": "denoiser", "file": file, "sha256": "00", "tensorrt": {"version": version},
                "gpu": {"name": "NVIDIA H100", "compute_capability": cc},
                "build": {"opt_level": 3, "hardware_compat": hw, "version_compatible": vc},
                "profile": {"min": 1, "opt": 16, "max": 64}, "built_utc": built}
    plans = [entry(f"p{k}", v, cc, hw, vc) for k, (v, cc, hw, vc) in enumerate(
        [(v, cc, hw, vc) for v in ("10.9.0.34", "11.4.0.106") for cc in ("8.6", "9.0")
         for hw in ("none", "ampere+", "same-cc") for vc in (False, True)])]
    machines = [(v, cc) for v in ("8.6.1", "10.9.0.34", "11.4.0.106", "11.5.0.1", "12.0") for cc in ("7.5", "8.6", "9.0", "12.0")]
    compat = [{"entry": e, "trt_version": v, "compute_capability": cc,
               "ok": trt_plan.check_engine_compat(e, v, cc).ok} for e in plans for v, cc in machines]
    broken = entry("broken", "11.4", "9.0")
    del broken["profile"]
    compat.append({"entry": broken, "trt_version": "11.4", "compute_capability": "9.0",
                   "ok": trt_plan.check_engine_compat(broken, "11.4", "9.0").ok})
    choose = []
    for k, (v, cc) in enumerate(machines):
        entries = [dict(e, built_utc=f"2026-0{1 + (j * 7 + k) % 9}") for j, e in enumerate(plans)]
        existing = [e["file"] for j, e in enumerate(entries) if (j + k) % 3]
        chosen, _ = trt_plan.choose_engine(entries, v, cc, None, existing.__contains__)
        choose.append({"entries": entries, "existing": existing, "trt_version": v, "compute_capability": cc,
                       "chosen": chosen["file"] if chosen else None})
    return {"compat": compat, "choose": choose}


@pytest.fixture(scope="session")
def python_values_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cpp-values") / "python_values.json"
    path.write_text(json.dumps(_python_values()))
    return path


def _ctest(build: Path, values: Path, extra_env: dict | None = None) -> str:
    env = {**os.environ, "DITRT_TEST_VALUES": str(values), **(extra_env or {})}
    proc = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure", "-j2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    return proc.stdout


def test_cpp_unit_tests_against_python_values(release_build, python_values_file):
    out = _ctest(release_build, python_values_file)
    assert "tests passed" in out and "Skipped" not in out, out[-3000:]  # the Python-value tests ran


def test_cpp_tests_clean_under_address_and_undefined_sanitizers(sanitize_build, python_values_file):
    out = _ctest(sanitize_build, python_values_file, SANITIZER_ENV)
    assert "100% tests passed" in out, out[-3000:]


def test_the_sanitizer_build_is_instrumented(sanitize_build):
    """Guards the sanitizer tests themselves: the binaries they run really carry ASan and UBSan."""
    for binary in (sanitize_build / "tests" / "ditrt_unit_tests", sanitize_build / "tests" / "ditrt_manifest_check",
                   library(sanitize_build)):
        symbols = subprocess.run(["nm", "-D", str(binary)], capture_output=True, text=True).stdout
        assert "__asan_init" in symbols or "__asan_report_load8" in symbols, binary
        assert "__ubsan_handle" in symbols, binary


def test_a_c_file_including_only_ditrt_h_compiles_as_pedantic_c99(tmp_path):
    _tools_or_skip()
    source = tmp_path / "only_header.c"
    source.write_text('#include "ditrt/ditrt.h"\n'
                      "int main(void) {\n"
                      "    ditrt_tensor t = {0};\n"
                      "    ditrt_status s = DITRT_OK;\n"
                      "    return (int)s + t.rank + (DITRT_ABI_VERSION == 2 ? 0 : 1) + (int)sizeof(ditrt_run_fn);\n"
                      "}\n")
    _run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c", str(source), "-I", str(CPP / "include"),
          "-o", str(tmp_path / "only_header.o")], "C99 compile of ditrt.h")

# ---- the C ABI through ctypes (tests/cpp_abi.py) ------------------------------------------------------------

def test_abi_version_at_run_time(lib):
    assert lib.lib.ditrt_abi_version() == 2
    assert lib.lib.ditrt_status_name(CANCELLED) == b"DITRT_CANCELLED"
    header = (CPP / "include" / "ditrt" / "ditrt.h").read_text()
    assert "#define DITRT_ABI_VERSION 2" in header


LOOPS = [("ddpm", "10", "ddpm_samples"), ("ddim", "ddim10", "ddim_samples")]


@pytest.mark.parametrize("sampler,spec,key", LOOPS)
def test_cpp_reproduces_the_official_golden_loops(cpp_pipe, golden, sampler, spec, key):
    noise = (golden["ddpm_initial_noise"], golden["ddpm_step_noise"])
    status, out = cpp_pipe.sample([3, 7], noise=noise, steps=spec, sampler=sampler, cfg_scale=4.0, guidance="official")
    assert status == OK, cpp_pipe.lib.error()
    err = max_rel_err(out, golden[key])
    print(f"C++ {sampler} 10-step loop vs official golden: max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.fixture(scope="session")
def dpm_golden() -> tuple[dict, dict]:
    return read_npz(GOLDEN_DIR / "dpm_vectors.npz"), json.loads((GOLDEN_DIR / "dpm_vectors.json").read_text())


@pytest.mark.parametrize("run", range(6))
def test_cpp_reproduces_the_golden_dpm_runs(cpp_pipe, dpm_golden, run):
    """diffusers' DPMSolverMultistepScheduler runs (tests/golden/dpm_vectors.*) through the C ABI:
    the initial noise injected, no step noise (the 2M solver draws none)."""
    vectors, meta = dpm_golden
    r = meta["runs"][run]
    assert cpp_pipe.num_steps(sampler="dpm++2m", steps=r["steps"]) == r["steps"]
    status, out = cpp_pipe.sample(meta["labels"], noise=(vectors["initial_noise"], None), sampler="dpm++2m",
                                  steps=r["steps"], cfg_scale=r["cfg_scale"], guidance=r["guidance"])
    assert status == OK, cpp_pipe.lib.error()
    err = max_rel_err(out, vectors[r["key"]])
    print(f"C++ dpm++2m {r['key']} vs the diffusers golden: max rel err {err:.2e}")
    assert err <= 1e-5


SAMPLERS = [("ddpm", "10", None), ("ddim", "ddim10", 0.5), ("dpm++2m", "10", None)]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("guidance", ["official", "standard"])
@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS)
def test_cpp_equals_python_latents_decoder_and_pngs(cpp_pipe, python_pipe, lib, tmp_path, sampler, steps, eta, guidance, cfg):
    """For every sampler x guidance convention x scale: the latents (injected noise) within 1e-6 of
    the Python runtime's, relative to the largest; the decoder on the same latents within 1e-6;
    and the PNGs C++ writes from the same images decode (Pillow) to exactly the pixels of the
    PNGs the Python runtime writes (the bytes themselves are not canonical)."""
    from PIL import Image

    from ditrt.runtime.core import images
    labels = [3, 7, 0]
    k = cpp_pipe.num_steps(sampler=sampler, steps=steps)
    rng = np.random.default_rng(zlib.crc32(f"{sampler} {guidance} {cfg}".encode()))
    noise = (rng.standard_normal((3, 4, 8, 8), dtype=np.float32), rng.standard_normal((k, 3, 4, 8, 8), dtype=np.float32))
    python = python_pipe.sample(labels, num_steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg, guidance=guidance,
                                noise=noise, progress=False)
    status, out = cpp_pipe.sample(labels, noise=noise, sampler=sampler, steps=steps, eta=eta, cfg_scale=cfg, guidance=guidance)
    assert status == OK, lib.error()
    latent_err = max_rel_err(out, python)

    python_images = python_pipe.decode(python)
    status, cpp_images = cpp_pipe.decode(python)
    assert status == OK, lib.error()
    decoder_err = max_rel_err(cpp_images, python_images)
    print(f"C++ vs Python ({sampler} {steps} {guidance} cfg {cfg}): latents {latent_err:.2e}, decoder {decoder_err:.2e}")
    assert latent_err <= 1e-6 and decoder_err <= 1e-6

    status, grid = lib.grid(python_images)
    assert status == OK
    status, each = lib.images_to_uint8(python_images)
    assert status == OK
    np.testing.assert_array_equal(grid, images.grid(python_images))  # byte-identical arrays
    np.testing.assert_array_equal(each, images.to_uint8(python_images))
    assert lib.png_write(tmp_path / "cpp_grid.png", grid) == OK, lib.error()
    images.write_png(tmp_path / "py_grid.png", images.grid(python_images))
    for j, image in enumerate(each):
        assert lib.png_write(tmp_path / f"cpp_{j}.png", image) == OK
    images.write_per_image(tmp_path / "py", images.to_uint8(python_images))
    decoded = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    np.testing.assert_array_equal(decoded(tmp_path / "cpp_grid.png"), decoded(tmp_path / "py_grid.png"))
    for j in range(len(labels)):
        np.testing.assert_array_equal(decoded(tmp_path / f"cpp_{j}.png"), decoded(tmp_path / "py" / images.per_image_name(j)))


@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS)
def test_the_same_seed_gives_the_same_latents_in_python_and_cpp(cpp_pipe, python_pipe, sampler, steps, eta):
    """Seeded, not injected: the noise is the same stream in both languages (initial noise and
    every step's), so what remains is float32 arithmetic, the bound of the injected-noise test."""
    labels = [3, 7, 1]
    seed = 2**40 + 9
    python = python_pipe.sample(labels, num_steps=steps, sampler=sampler, eta=eta, cfg_scale=4.0, seed=seed, progress=False)
    status, out = cpp_pipe.sample(labels, sampler=sampler, steps=steps, eta=eta, cfg_scale=4.0, seed=seed)
    assert status == OK, cpp_pipe.lib.error()
    rel = max_rel_err(out, python)
    print(f"C++ vs Python runtime, seeded ({sampler} {steps}): max rel err {rel:.2e}")
    assert rel <= 1e-6
    _, other = cpp_pipe.sample(labels, sampler=sampler, steps=steps, eta=eta, cfg_scale=4.0, seed=seed + 1)
    assert max_rel_err(other, python) > 1e-2  # the seed matters
    _, shard = cpp_pipe.sample(labels[1:], sampler=sampler, steps=steps, eta=eta, cfg_scale=4.0, seed=seed, image_offset=1)
    np.testing.assert_allclose(shard, out[1:], atol=1e-5)  # image 1 of the job is image 1 in any shard


def test_an_executor_declaring_max_batch_1_only_gets_1_row_calls(lib, cpp_artifact, cpp_pipe):
    """The mutation `max_batch() > 0` -> `> 1` sends this executor 6-row calls: caught here."""
    single = CppPipeline(lib, cpp_artifact, max_batch=1)
    try:
        status, a = single.sample([1, 2, 5], sampler="ddim", steps="ddim4", seed=7)
        assert status == OK, lib.error()
        status, images = single.decode(a)
        assert status == OK, lib.error()
        assert single.executor_callback.rows("denoiser") == [1] * (6 * 4)  # 6 guided rows per step, one by one
        assert single.executor_callback.rows("decoder") == [1] * 3
    finally:
        single.close()
    chunked = CppPipeline(lib, cpp_artifact, max_batch=4)
    try:
        chunked.sample([1, 2, 5], sampler="ddim", steps="ddim4", seed=7)
        assert chunked.executor_callback.rows("denoiser") == [4, 2] * 4
    finally:
        chunked.close()
    status, b = cpp_pipe.sample([1, 2, 5], sampler="ddim", steps="ddim4", seed=7)
    assert status == OK
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # ORT's kernels may differ by batch size


def test_a_cancel_callback_stops_the_loop_within_one_step(lib, cpp_artifact):
    pipe = CppPipeline(lib, cpp_artifact)
    seen = []

    def progress(user, done, total, timestep):
        seen.append((done, total, timestep))
        return 1 if done == 3 else 0
    callback = PROGRESS(progress)
    try:
        status, out = pipe.sample([1, 2], progress=callback, sampler="ddpm", steps="10")
        assert status == CANCELLED and "after step 3/10" in lib.error()
        assert len(pipe.executor_callback.rows()) == 3  # no model call after the cancel
        assert [s[:2] for s in seen] == [(1, 10), (2, 10), (3, 10)]
        assert [s[2] for s in seen] == [999.0, 888.0, 777.0]
        assert np.isnan(out).all()  # nothing written
    finally:
        pipe.close()


def test_the_error_of_the_outer_call_survives_a_failing_call_in_its_callback(lib, cpp_pipe):
    """ditrt.h, Errors: a progress callback whose own ditrt call fails (an unknown option key)
    leaves the outer ditrt_sample's message (the cancel's when it cancels, "" when it succeeds);
    inside the callback the message is the callback's call's, never the application's last one."""
    scratch, seen, cancel_at = VP(), [], [2]
    assert lib.lib.ditrt_options_create(ctypes.byref(scratch)) == OK

    def progress(user, done, total, timestep):
        on_entry = lib.error()
        status = lib.lib.ditrt_options_set(scratch, b"no_such_key", b"1")
        seen.append((on_entry, status, lib.error()))
        return 1 if done == cancel_at[0] else 0
    callback = PROGRESS(progress)
    options = cpp_pipe.options(progress=callback, sampler="ddim", steps="ddim5")
    labels, out = np.array([1], np.int64), np.full((1, *cpp_pipe.shape), np.nan, np.float32)

    def sample() -> int:
        # the application's last call before the sample fails: its message must stay at its level
        assert lib.lib.ditrt_options_set(options, b"stale_key", b"1") == INVALID_ARGUMENT
        seen.clear()
        return lib.lib.ditrt_sample(cpp_pipe.pipe, labels.ctypes.data_as(ctypes.POINTER(I64)), 1, options, _f32(out),
                                    out.size)
    try:
        assert sample() == CANCELLED
        assert lib.error() == "cancelled by the progress callback after step 2/5; the output was not written"
        nested = "unknown option key 'no_such_key'"
        assert [status for _, status, _ in seen] == [INVALID_ARGUMENT] * 2
        assert all(error.startswith(nested) for _, _, error in seen)
        assert seen[0][0] == "" and seen[1][0].startswith(nested)  # not "unknown option key 'stale_key'"
        cancel_at[0] = 0
        assert sample() == OK
        assert lib.error() == ""  # the outer call's success, not its callback's failures
        assert len(seen) == 5 and seen[-1][1] == INVALID_ARGUMENT
    finally:
        lib.lib.ditrt_options_release(options)
        lib.lib.ditrt_options_release(scratch)


def test_defaults_come_from_the_manifest(cpp_pipe, cpp_artifact):
    defaults = json.loads((cpp_artifact / "manifest.json").read_text())["defaults"]
    assert cpp_pipe.num_steps() == defaults["steps"]
    status, a = cpp_pipe.sample([2], steps="ddim3", seed=1)
    assert status == OK, cpp_pipe.lib.error()
    _, b = cpp_pipe.sample([2], steps="ddim3", sampler=defaults["sampler"], cfg_scale=defaults["cfg_scale"],
                           guidance=defaults["guidance"], seed=1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("labels,settings,status,message", [
    ([10], {}, INVALID_ARGUMENT, "class labels [10] out of range: this model has classes 0..9"),
    ([-1, 3], {}, INVALID_ARGUMENT, "class labels [-1] out of range"),
    ([], {}, INVALID_ARGUMENT, "num_labels must be at least 1"),
    ([1], {"steps": "0"}, SCHEDULE_ERROR, "must be positive"),
    ([1], {"steps": "ddim300"}, SCHEDULE_ERROR, "no integer stride"),
    ([1], {"steps": "1001"}, SCHEDULE_ERROR, "cannot take 1001 steps"),
    ([1], {"steps": "ten"}, SCHEDULE_ERROR, "is not 'N', 'ddimN'"),
    ([1], {"sampler": "dpm++2m", "steps": "ddim25"}, SCHEDULE_ERROR, "'ddim25' is a DDPM/DDIM respacing spec"),
    ([1], {"sampler": "dpm++2m", "steps": "1000"}, SCHEDULE_ERROR, "from 1 to 999; got 1000"),
    ([1], {"sampler": "euler"}, INVALID_ARGUMENT, "unknown sampler 'euler' for a dit model"),
    ([1], {"sampler": "ode-dopri5"}, INVALID_ARGUMENT, "(ode-dopri5 samples sit models)"),
    ([1], {"guidance": "all"}, INVALID_ARGUMENT, "unknown guidance 'all'"),
    ([1], {"sampler": "ddim", "eta": 2.0}, INVALID_ARGUMENT, "eta must be a number in [0, 1]"),
    ([1], {"sampler": "dpm++2m", "eta": 0.5}, INVALID_ARGUMENT, "eta applies to ddim only; dpm++2m takes no eta"),
    ([1], {"cfg_scale": "inf"}, INVALID_ARGUMENT, "cfg_scale must be a finite float32 number"),
    ([1, 2], {"capacity": 2 * 256 - 1}, BUFFER_TOO_SMALL, "latents need 512"),
])
def test_bad_sample_arguments_return_a_status_and_message(cpp_pipe, labels, settings, status, message):
    before = len(cpp_pipe.executor_callback.calls)
    got, out = cpp_pipe.sample(labels, **settings)
    assert (got, message in cpp_pipe.lib.error()) == (status, True), cpp_pipe.lib.error()
    assert len(cpp_pipe.executor_callback.calls) == before  # refused before any model call
    assert np.isnan(out).all()  # and nothing written


@pytest.mark.parametrize("key, value", [("cache", "taylorseer"), ("cache", "first-block"), ("cache_interval", "4"),
                                        ("threshold", "0.05"), ("max_order", "2")])
def test_cache_options_are_refused_until_the_cpp_runtime_implements_them(lib, key, value):
    handle = VP()
    assert lib.lib.ditrt_options_create(ctypes.byref(handle)) == OK
    try:
        assert lib.lib.ditrt_options_set(handle, b"cache", b"none") == OK  # uncached: as without the key
        assert lib.lib.ditrt_options_set(handle, key.encode(), value.encode()) == INVALID_ARGUMENT
        assert "feature caching (first-block, taylorseer) is not implemented in the C++ runtime" in lib.error()
    finally:
        lib.lib.ditrt_options_release(handle)


def test_an_artifact_with_segments_opens_and_samples(cpp_pipe, cpp_artifact):
    names = json.loads((cpp_artifact / "manifest.json").read_text())["networks"]
    assert {"embed", "blocks_0_1", "final"} <= set(names)  # what export writes, accepted by the C++ reader
    status, out = cpp_pipe.sample([1], steps="ddim3")
    assert status == OK and np.isfinite(out).all()


def test_a_failing_callback_is_an_executor_error(lib, cpp_artifact):
    broken = CppPipeline(lib, cpp_artifact)
    try:
        broken.executor_callback.sessions["denoiser"] = None  # its session.run raises inside the callback
        status, _ = broken.sample([1], steps="5")
        assert status == EXECUTOR_ERROR and "the denoiser callback failed" in lib.error()
        assert isinstance(broken.executor_callback.failure, AttributeError)
    finally:
        broken.close()


def _open_status(lib, executor, directory: Path, flags: int = 0) -> tuple[int, str]:
    pipe = VP()
    status = lib.lib.ditrt_open(str(directory).encode(), executor, flags, ctypes.byref(pipe))
    message = lib.error()
    assert (status == OK) == bool(pipe.value)
    lib.lib.ditrt_close(pipe)
    return status, message


def test_bad_artifacts_are_refused_with_the_reason(lib, cpp_pipe, cpp_artifact, tmp_path):
    assert _open_status(lib, cpp_pipe.executor, tmp_path / "none") == (ARTIFACT_ERROR, f"artifact directory not found: {tmp_path / 'none'}")
    status, message = _open_status(lib, cpp_pipe.executor, tmp_path)
    assert status == ARTIFACT_ERROR and "no manifest.json" in message
    good = json.loads((cpp_artifact / "manifest.json").read_text())
    cases = [("{not json", "not valid JSON"),
             (json.dumps({**good, "schema_version": 4}), "this ditrt reads versions 1 to 3"),
             (json.dumps({**good, "schema_version": True}), "manifest schema version True"),
             (json.dumps({**good, "schema": "other"}), "not a ditrt manifest"),
             (json.dumps({**good, "model": {**good["model"], "num_classes": 1000}}), "networks.denoiser inputs/outputs"),
             (json.dumps({**good, "diffusion": {**good["diffusion"], "clip_denoised": True}}), "diffusion.clip_denoised"),
             (json.dumps({**good, "diffusion": {**good["diffusion"], "beta_schedule": "cosine"}}), "diffusion.beta_schedule"),
             (json.dumps({k: v for k, v in good.items() if k != "guidance"}), "manifest field guidance is missing")]
    for text, expected in cases:
        (tmp_path / "manifest.json").write_text(text)
        status, message = _open_status(lib, cpp_pipe.executor, tmp_path)
        assert status == ARTIFACT_ERROR and expected in message, (expected, message)


def test_a_sit_manifest_opens_and_bad_transports_are_refused(lib, cpp_pipe, cpp_artifact, tmp_path):
    """Both readers take SiT manifests (model.family "sit", the transport section) and refuse the
    transports that are not implemented, naming the field; a SiT manifest never reads a diffusion."""
    import manifest_mutants
    from ditrt.runtime.core.errors import ArtifactError
    from ditrt.runtime.artifact.manifest import load_manifest
    good = manifest_mutants.sit_from_dit(json.loads((cpp_artifact / "manifest.json").read_text()))
    cases = [(good, None), ({**good, "diffusion": "not read"}, None),
             ({**good, "transport": {**good["transport"], "path_type": "GVP"}}, "transport.path_type is 'GVP'"),
             ({**good, "transport": {**good["transport"], "prediction": "noise"}}, "transport.prediction is 'noise'"),
             ({**good, "transport": {**good["transport"], "sample_eps": 1e-3}}, "transport.sample_eps"),
             ({k: v for k, v in good.items() if k != "transport"}, "manifest field transport is missing"),
             ({**good, "defaults": {"sampler": "ddpm"}}, "defaults.sampler"),
             ({**good, "defaults": {"sampler": "sde-euler", "eta": 0.5}}, "defaults.eta"),
             ({**good, "model": {**good["model"], "out_channels": 8}}, "model.out_channels")]
    for data, expected in cases:
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        status, message = _open_status(lib, cpp_pipe.executor, tmp_path, flags=1)
        if expected is None:
            assert status == OK and load_manifest(tmp_path).family.name == "sit", message
        else:
            assert status == ARTIFACT_ERROR and expected in message, (expected, message)
            with pytest.raises(ArtifactError, match=expected.split(" ")[-1].strip("'")):
                load_manifest(tmp_path)


def _copy_with_a_flipped_bit(artifact: Path, art: Path, name: str) -> Path:
    """A copy of the artifact at `art` whose file `name` has one bit flipped in its middle."""
    shutil.copytree(artifact, art)
    data = bytearray((art / name).read_bytes())
    data[len(data) // 2] ^= 1
    (art / name).write_bytes(bytes(data))
    return art


def test_corrupt_graph_is_caught_by_sha256_unless_opted_out(lib, cpp_pipe, cpp_artifact, tmp_path):
    art = _copy_with_a_flipped_bit(cpp_artifact, tmp_path / "art", "denoiser.fp32.onnx")
    pipe = VP()
    assert lib.lib.ditrt_open(str(art).encode(), cpp_pipe.executor, 0, ctypes.byref(pipe)) == OK
    path = ctypes.create_string_buffer(4096)
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"fp32", path, 4096) == ARTIFACT_ERROR
    assert "does not match its sha256" in lib.error()
    lib.lib.ditrt_close(pipe)
    assert lib.lib.ditrt_open(str(art).encode(), cpp_pipe.executor, 1, ctypes.byref(pipe)) == OK  # DITRT_OPEN_NO_VERIFY
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"fp32", path, 4096) == OK
    lib.lib.ditrt_close(pipe)


def test_the_int8_graph_file_is_handed_out_checked_and_its_recipe_required(lib, cpp_pipe, quant_artifact, tmp_path):
    """Issue 27: a callback executor gets the denoiser's int8 QDQ graph by precision; the file is
    checked against its sha256 and a quantized graph without its recipe is refused at open."""
    pipe = VP()
    assert lib.lib.ditrt_open(str(quant_artifact).encode(), cpp_pipe.executor, 0, ctypes.byref(pipe)) == OK, lib.error()
    path = ctypes.create_string_buffer(4096)
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"int8", path, 4096) == OK, lib.error()
    assert Path(path.value.decode()) == quant_artifact / "denoiser.int8.onnx"
    assert lib.lib.ditrt_graph_file(pipe, b"decoder", b"int8", path, 4096) == ARTIFACT_ERROR
    assert "no int8 decoder graph" in lib.error()
    lib.lib.ditrt_close(pipe)
    art = _copy_with_a_flipped_bit(quant_artifact, tmp_path / "art", "denoiser.int8.onnx")
    assert lib.lib.ditrt_open(str(art).encode(), cpp_pipe.executor, 0, ctypes.byref(pipe)) == OK
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"int8", path, 4096) == ARTIFACT_ERROR
    assert "does not match its sha256" in lib.error()
    lib.lib.ditrt_close(pipe)
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["networks"]["denoiser"]["graphs"]["int8"]["quantization"]["excluded_layers"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    status, message = _open_status(lib, cpp_pipe.executor, art)
    assert status == ARTIFACT_ERROR and "networks.denoiser.graphs.int8.quantization.excluded_layers" in message, message


# ---- the issue 22 cases: the C++ runtime refuses what Python refuses ------------------------------------------

def _edited_artifact(cpp_artifact: Path, tmp_path: Path, edit) -> Path:
    m = json.loads((cpp_artifact / "manifest.json").read_text())
    edit(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return tmp_path


def _both_refuse(lib, executor, directory: Path, field: str) -> str:
    """Python's reader and the C++ one refuse the manifest, naming the field; returns C++'s message."""
    from ditrt.runtime.core.errors import ArtifactError
    from ditrt.runtime.artifact.manifest import load_manifest
    with pytest.raises(ArtifactError, match=field):
        load_manifest(directory)
    start = time.perf_counter()
    status, message = _open_status(lib, executor, directory)
    assert status == ARTIFACT_ERROR and field in message, message
    assert time.perf_counter() - start < 1.0
    return message


def _set_input_size(m, size):
    m["model"]["input_size"] = size
    for name in ("denoiser", "decoder"):
        m["networks"][name]["inputs"][0]["shape"][2:] = [size, size]
    m["networks"]["denoiser"]["outputs"][0]["shape"][2:] = [size, size]


@pytest.mark.parametrize("factor, accepted", [(1000, True), (1000.0, True), (1e-300, True), (1000.0001, False),
                                              (0, False), (-0.0, False), ("0.18215", False)])
def test_decoder_scaling_factor_bounds_are_one_rule(lib, cpp_pipe, cpp_artifact, tmp_path, factor, accepted):
    """Both readers take networks.decoder.scaling_factor in (0, 1000] (C++ once refused 1000)."""
    def edit(m):
        m["networks"]["decoder"]["scaling_factor"] = factor
    directory = _edited_artifact(cpp_artifact, tmp_path, edit)
    if accepted:
        from ditrt.runtime.artifact.manifest import load_manifest
        load_manifest(directory)
        assert _open_status(lib, cpp_pipe.executor, directory)[0] == OK
    else:
        message = _both_refuse(lib, cpp_pipe.executor, directory, "networks.decoder.scaling_factor")
        assert "must be a number in (0, 1000]" in message


@pytest.mark.parametrize("size", [2**31, 2**32], ids=["2^31", "2^32"])
def test_input_size_2_31_and_2_32_are_refused(lib, cpp_pipe, cpp_artifact, tmp_path, size):
    """Issue 22: the buffer sizes overflowed and ditrt_sample returned OK without writing."""
    directory = _edited_artifact(cpp_artifact, tmp_path, lambda m: _set_input_size(m, size))
    message = _both_refuse(lib, cpp_pipe.executor, directory, "model.input_size")
    assert "from 1 to 1048576" in message


def test_the_largest_accepted_shapes_are_sized_without_overflow(lib, cpp_pipe, cpp_artifact, tmp_path):
    """input_size 2^16 (the largest a tensor spec allows) opens, reports its true shape, and a
    sample whose buffers would exceed 2^32 values is refused with a status before any call."""
    def edit(m):  # the decoder and the segments (feature caching) take the old latents: dropped
        _set_input_size(m, 2**16)
        m["networks"] = {k: v for k, v in m["networks"].items() if k != "decoder" and "segment_of" not in v}
    directory = _edited_artifact(cpp_artifact, tmp_path, edit)
    pipe = VP()
    assert lib.lib.ditrt_open(str(directory).encode(), cpp_pipe.executor, 1, ctypes.byref(pipe)) == OK, lib.error()
    try:
        shape = (I64 * 3)()
        assert lib.lib.ditrt_latent_shape(pipe, shape) == OK and tuple(shape) == (4, 2**16, 2**16)
        labels, out = np.array([1], np.int64), np.zeros(1, np.float32)
        before = len(cpp_pipe.executor_callback.calls)
        status = lib.lib.ditrt_sample(pipe, labels.ctypes.data_as(ctypes.POINTER(I64)), 1, None, _f32(out), 1)
        assert status == INVALID_ARGUMENT and "more than 2^32 values" in lib.error(), lib.error()
        assert len(cpp_pipe.executor_callback.calls) == before
    finally:
        lib.lib.ditrt_close(pipe)


@pytest.mark.parametrize("value", [1_000_000, 1e6, 10**15, 1e15], ids=["1000000", "1e6", "10^15", "1e15"])
def test_num_train_timesteps_1e6_and_1e15_are_refused_quickly(lib, cpp_pipe, cpp_artifact, tmp_path, value):
    """Issue 22: 1e6 sampled NaN latents; 1e15 with default steps ddim3 never returned."""
    def edit(m):
        m["diffusion"]["num_train_timesteps"] = value
        m["defaults"]["steps"] = "ddim3"
    directory = _edited_artifact(cpp_artifact, tmp_path, edit)
    _both_refuse(lib, cpp_pipe.executor, directory, "diffusion.num_train_timesteps")


def _open_in_thread(lib, executor, directory: Path, timeout: float = 5.0) -> tuple[int, str]:
    """ditrt_open in a thread (ctypes releases the GIL): a hang fails the test instead of blocking it."""
    result = {}

    def target():
        pipe = VP()
        result["status"] = lib.lib.ditrt_open(str(directory).encode(), executor, 0, ctypes.byref(pipe))
        result["message"] = lib.error()
        lib.lib.ditrt_close(pipe)
    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"ditrt_open did not return within {timeout} s"
    assert time.perf_counter() - start < 1.0
    return result["status"], result["message"]


def test_manifest_json_as_a_fifo_is_refused_at_once(lib, cpp_pipe, tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    status, message = _open_in_thread(lib, cpp_pipe.executor, tmp_path)
    assert status == ARTIFACT_ERROR and "not a regular file" in message


def test_manifest_json_as_a_symlink_to_dev_zero_is_refused_at_once(lib, cpp_pipe, tmp_path):
    (tmp_path / "manifest.json").symlink_to("/dev/zero")
    status, message = _open_in_thread(lib, cpp_pipe.executor, tmp_path)
    assert status == ARTIFACT_ERROR and "not a regular file" in message


def test_a_huge_manifest_json_is_refused_before_reading(lib, cpp_pipe, tmp_path):
    with open(tmp_path / "manifest.json", "wb") as f:
        f.truncate((16 << 20) + 1)  # sparse
    status, message = _open_in_thread(lib, cpp_pipe.executor, tmp_path)
    assert status == ARTIFACT_ERROR and "above the 16 MiB a manifest can have" in message


def test_a_callback_writing_nan_is_refused_with_a_status(lib, cpp_artifact):
    pipe = CppPipeline(lib, cpp_artifact)
    try:
        pipe.executor_callback.poison = np.nan
        status, out = pipe.sample([1, 2], sampler="ddim", steps="ddim10")
        assert status == STEP_ERROR, lib.error()
        assert lib.error().startswith("sampling produced NaN or inf at step 1/10 (timestep 900) on callback executor")
        assert len(pipe.executor_callback.rows()) == 1 and np.isnan(out).all()
    finally:
        pipe.close()


def test_injected_nan_noise_is_refused_with_a_status(cpp_pipe):
    initial = np.zeros((1, 4, 8, 8), np.float32)
    steps = np.zeros((5, 1, 4, 8, 8), np.float32)
    steps[2, 0, 1, 2, 3] = np.nan
    status, _ = cpp_pipe.sample([1], noise=(initial, steps), steps="5")
    assert status == INVALID_ARGUMENT and "injected step noise contains NaN or inf" in cpp_pipe.lib.error()
    initial[0, 0, 0, 0] = np.inf
    status, _ = cpp_pipe.sample([1], noise=(initial, None), sampler="dpm++2m", steps="5")
    assert status == INVALID_ARGUMENT and "injected initial noise contains NaN or inf" in cpp_pipe.lib.error()


def test_cfg_scale_1e39_is_refused_with_a_status(lib, cpp_pipe, cpp_artifact, tmp_path):
    """1e39 is a finite double and inf in float32: refused as an option and as a manifest default."""
    status, _ = cpp_pipe.sample([1], cfg_scale="1e39", steps="5")
    assert status == INVALID_ARGUMENT and "cfg_scale must be a finite float32 number, got 1e39" in lib.error()
    directory = _edited_artifact(cpp_artifact, tmp_path, lambda m: m["defaults"].update(cfg_scale=1e39))
    _both_refuse(lib, cpp_pipe.executor, directory, "defaults.cfg_scale")


def test_a_reentrant_sample_from_inside_a_callback_returns_a_status(lib, cpp_artifact):
    """Issue 22: this deadlocked. Now the nested call returns DITRT_BUSY at once (ditrt.h, Threads)."""
    pipe = CppPipeline(lib, cpp_artifact)
    nested = []

    def inside():
        if not nested:
            labels, out = np.array([1], np.int64), np.zeros((1, 4, 8, 8), np.float32)
            nested.append(lib.lib.ditrt_sample(pipe.pipe, labels.ctypes.data_as(ctypes.POINTER(I64)), 1, None, _f32(out),
                                               out.size))
            nested.append(lib.error())
    pipe.executor_callback.inside = inside
    try:
        status, _ = _run_with_timeout(lambda: pipe.sample([2], steps="3"))
        assert status == OK, lib.error()
        assert nested[0] == BUSY and "re-entrant" in nested[1]
    finally:
        pipe.close()


def _run_with_timeout(fn, timeout=30.0):
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call did not return (deadlock?)"
    return result["value"]


# ---- class names: ditrt_label_of -------------------------------------------------------------------------------

LABELS_ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "great white shark, white shark",
                   "3": "crane", "5": "crane, derrick", "9": " umbrella ,, "}


def _label_of(lib, pipe, name: str) -> tuple[int, int, str]:
    label = I64(-1)
    status = lib.lib.ditrt_label_of(pipe, name.encode(), ctypes.byref(label))
    return status, label.value, lib.error()


def test_ditrt_label_of_resolves_names_as_dit_pipeline_get_label_ids(lib, cpp_artifact, tmp_path):
    """Each id2label entry's comma-separated synonyms, spaces stripped, name its class (expected
    labels written out by hand from the entries above); numbers pass; an unknown name, a name of
    two classes, a number out of range and an artifact without names are refused, as Python does."""
    from ditrt.runtime.artifact.manifest import load_manifest
    art = tmp_path / "named"
    shutil.copytree(cpp_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["id2label"] = LABELS_ID2LABEL
    (art / "manifest.json").write_text(json.dumps(data))
    pipe = CppPipeline(lib, art)
    try:
        for name, want in [("tench", 0), ("Tinca tinca", 0), ("  goldfish ", 1), ("Carassius auratus", 1),
                           ("white shark", 2), ("great white shark", 2), ("derrick", 5), ("umbrella", 9), ("7", 7),
                           ("0", 0)]:
            assert _label_of(lib, pipe.pipe, name)[:2] == (OK, want), name
            assert load_manifest(art).labels.label_of(name) == want  # the Python reader agrees
        for name, message in [("tenhc", "unknown class name 'tenhc'"),
                              ("crane", "class name 'crane' is ambiguous: it names classes 3 ('crane'); 5 ('crane, derrick')"),
                              ("10", "class label 10 out of range: this model has classes 0..9"),
                              ("-1", "out of range"), ("", "unknown class name ''")]:
            status, _, error = _label_of(lib, pipe.pipe, name)
            assert status == INVALID_ARGUMENT and message in error, (name, error)
        label = I64(-1)
        assert lib.lib.ditrt_label_of(pipe.pipe, None, ctypes.byref(label)) == INVALID_ARGUMENT
    finally:
        pipe.close()
    plain = CppPipeline(lib, cpp_artifact)
    try:
        status, _, error = _label_of(lib, plain.pipe, "tench")
        assert status == INVALID_ARGUMENT and "has no class names" in error
        assert _label_of(lib, plain.pipe, "3")[:2] == (OK, 3)
    finally:
        plain.close()


# ---- the manifest readers: fuzz under ASan + UBSan, and Python vs C++ ------------------------------------------

FUZZ_COUNT = 10_000


@pytest.fixture(scope="session")
def mutants(cpp_artifact) -> list[bytes]:
    import manifest_mutants
    schema3_decoder = json.loads((cpp_artifact / "manifest.json").read_text())
    schema3 = json.loads((cpp_artifact / "manifest.json").read_text())
    schema3["networks"].pop("decoder")
    schema1 = json.loads((ROOT / "tests" / "data" / "manifest_schema1.json").read_text())
    return manifest_mutants.mutants(manifest_mutants.bases(schema3, schema3_decoder, schema1), FUZZ_COUNT)


def _cpp_reader_verdicts(build: Path, mutants: list[bytes], work: Path, env: dict) -> list[tuple[int, str]]:
    """The C++ reader's (status, message) per manifest, all in one process (tests/manifest_check.cpp)."""
    records = b"".join(struct.pack("<Q", len(m)) + m for m in mutants)
    (work / "mutants.bin").write_bytes(records)
    (work / "artifact").mkdir()
    start = time.perf_counter()
    proc = subprocess.run([str(build / "tests" / "ditrt_manifest_check"), str(work / "mutants.bin"),
                           str(work / "artifact")], capture_output=True, env=env, timeout=600)
    print(f"C++ reader ({build.name}): {len(mutants)} manifests in {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-6000:]
    lines = proc.stdout.decode(errors="replace").split("\n")[:-1]
    assert len(lines) == len(mutants)
    return [(int(status), message) for status, message in (line.split("\t", 1) for line in lines)]


def _python_reader_verdicts(mutants: list[bytes], work: Path) -> list[tuple[bool, str, str]]:
    """The Python reader's (accepted, exception type or family, message) per manifest."""
    from ditrt.runtime.artifact.manifest import load_manifest
    verdicts = []
    start = time.perf_counter()
    for text in mutants:
        (work / "manifest.json").write_bytes(text)
        try:
            verdicts.append((True, load_manifest(work).family.name, ""))
        except Exception as e:  # noqa: BLE001 - every refusal counts; its type is reported
            verdicts.append((False, type(e).__name__, str(e)))
    print(f"Python reader: {len(mutants)} manifests in {time.perf_counter() - start:.1f} s")
    return verdicts


def _disagreements(mutants, cpp, python) -> list[tuple]:
    """Where the readers differ: in the verdict, or, refusing, in the field the message names first."""
    import manifest_mutants
    out = []
    for i, ((status, message), (accepted, _, py_message)) in enumerate(zip(cpp, python)):
        if accepted != (status == OK) or (
                not accepted and manifest_mutants.named_field(message) != manifest_mutants.named_field(py_message)):
            out.append((i, accepted, py_message[:300], status, message[:300], mutants[i][:200]))
    return out


@pytest.fixture(scope="session")
def cpp_verdicts(sanitize_build, mutants, tmp_path_factory) -> list[tuple[int, str]]:
    """The sanitized C++ reader's (status, message) per mutant, all in one process."""
    return _cpp_reader_verdicts(sanitize_build, mutants, tmp_path_factory.mktemp("cpp-mutants"),
                                {**os.environ, **SANITIZER_ENV})


@pytest.fixture(scope="session")
def python_verdicts(mutants, tmp_path_factory) -> list[tuple[bool, str, str]]:
    return _python_reader_verdicts(mutants, tmp_path_factory.mktemp("py-mutants"))


def test_the_cpp_reader_survives_10000_mutated_manifests_under_asan_and_ubsan(mutants, cpp_verdicts):
    """Every mutant ends in a status: OK, or DITRT_ARTIFACT_ERROR with a message; no crash, no
    sanitizer report (the driver would have exited non-zero)."""
    assert len(mutants) >= 10_000
    statuses = [status for status, _ in cpp_verdicts]
    assert set(statuses) <= {OK, ARTIFACT_ERROR}, sorted(set(statuses))
    assert all(message for status, message in cpp_verdicts if status != OK)
    accepted = statuses.count(OK)
    print(f"fuzz: {len(mutants)} mutants, {accepted} accepted, {len(mutants) - accepted} refused with a message")
    assert 0.05 < accepted / len(mutants) < 0.95  # the mutants exercise both sides


def test_python_and_cpp_readers_agree_on_every_mutated_manifest(mutants, cpp_verdicts, python_verdicts):
    """One contract, two readers: the same >= 5,000 mutants (here all 10,000, of both families)
    accepted or refused by both, SiT's included, a refusal naming the same field first. Refusals
    that reach Python as exceptions other than ArtifactError are listed (they are Python-side
    findings, not disagreements)."""
    assert len(mutants) >= 5000
    disagreements = _disagreements(mutants, cpp_verdicts, python_verdicts)
    sit = sum(accepted and what == "sit" for accepted, what, _ in python_verdicts)
    odd = {}
    for accepted, what, _ in python_verdicts:
        if not accepted and what != "ArtifactError":
            odd[what] = odd.get(what, 0) + 1
    accepted = sum(a for a, _, _ in python_verdicts)
    print(f"differential: {len(mutants)} mutants, both accept {accepted} ({sit} SiT), both refuse "
          f"{len(mutants) - accepted - len(disagreements)}, disagreements {len(disagreements)}; "
          f"Python refusals that were not ArtifactError: {odd or 'none'}")
    assert not disagreements, disagreements[:5]
    assert sit > 500  # the SiT bases are exercised (3 of the 11 bases)


def test_both_readers_agree_on_the_schema_mutants(release_build, cpp_artifact, tmp_path):
    """Mutants made from runtime/spec/manifest_schema.json: every field of every schema object in every
    base, of the wrong type, at and one past each bound, each choice and refused value, null,
    removed, and an unknown key beside it. Both readers give the same verdict and name the same
    field; every object of the schema is probed and both verdicts occur."""
    import manifest_mutants
    from ditrt.runtime.spec.schema import rules
    schema3_decoder = json.loads((cpp_artifact / "manifest.json").read_text())
    schema3 = json.loads((cpp_artifact / "manifest.json").read_text())
    schema3["networks"].pop("decoder")
    schema1 = json.loads((ROOT / "tests" / "data" / "manifest_schema1.json").read_text())
    edits = manifest_mutants.schema_mutants(manifest_mutants.bases(schema3, schema3_decoder, schema1), rules())
    texts = [text for text, _, _ in edits]
    (tmp_path / "cpp").mkdir()
    (tmp_path / "py").mkdir()
    cpp = _cpp_reader_verdicts(release_build, texts, tmp_path / "cpp", dict(os.environ))
    python = _python_reader_verdicts(texts, tmp_path / "py")
    disagreements = [(edits[i][2], *rest) for i, *rest in _disagreements(texts, cpp, python)]
    accepted = sum(a for a, _, _ in python)
    print(f"schema mutants: {len(texts)}, both accept {accepted}, disagreements {len(disagreements)}")
    assert not disagreements, disagreements[:5]
    assert len(texts) >= 3000 and 0.05 < accepted / len(texts) < 0.5
    # every object of the schema is probed, and refused somewhere naming one of its own fields
    objects = rules()["objects"]
    refused = {name for (_, name, _), (a, _, message) in zip(edits, python)
               if not a and (manifest_mutants.named_field(message) or "").split(".")[-1] in objects[name]["fields"]}
    assert refused == set(objects), set(objects) - refused


# ---- ditrt-sample, images, noise ------------------------------------------------------------------------------

class FakeBackend:
    """tests/fake_networks.c in numpy, the same float32 operations in the same order: the denoiser
    0.1 latent[e mod CHW] + 1e-4 t - 0.01 label, the decoder 0.5 latent[e mod CHW] - 0.1."""
    min_batch, max_batch, precision = 1, None, "fp32"

    def __init__(self, network):
        self.network, self.name = network, "fake-fp32"

    def __call__(self, feeds):
        x = feeds["latent"]
        n, out = len(x), self.network.output
        flat = x.reshape(n, -1)
        per_out = int(np.prod(out.concrete(1)[1:]))
        spread = flat[:, np.arange(per_out) % flat.shape[1]]
        if self.network.name == "denoiser":
            t, y = feeds["timestep"][:, None], feeds["class_label"].astype(np.float32)[:, None]
            result = np.float32(0.1) * spread + np.float32(1e-4) * t - np.float32(0.01) * y
        else:
            result = np.float32(0.5) * spread - np.float32(0.1)
        return {out.name: result.reshape(out.concrete(n)).astype(np.float32)}


def test_ditrt_sample_writes_the_grid_and_per_image_pngs(release_build, cpp_artifact, tmp_path):
    """The example program through an executor plugin (fixed networks): its grid PNG, its per-image
    PNGs and its latents are the Python runtime's for the same networks, seed and options."""
    from PIL import Image

    from ditrt.runtime.core import images
    from ditrt.runtime.artifact.manifest import load_manifest
    from ditrt.runtime.execution.pipeline import Pipeline
    labels = [1, 2, 3, 4, 5]
    proc = subprocess.run([str(release_build / "ditrt-sample"), str(cpp_artifact), "--labels", ",".join(map(str, labels)),
                           "--sampler", "ddim", "--steps", "ddim5", "--seed", "3", "--cfg-scale", "4",
                           "--executor", str(release_build / "tests" / "ditrt_fake_networks.so"),
                           "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"),
                           "--latents", str(tmp_path / "latents.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(cpp_artifact)
    pipe = Pipeline(FakeBackend(manifest.network("denoiser")), manifest, FakeBackend(manifest.network("decoder")))
    latents = pipe.sample(labels, num_steps="ddim5", sampler="ddim", seed=3, cfg_scale=4.0, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "latents.npy"), latents)
    decoded = pipe.decode(latents)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), images.grid(decoded))
    for j, image in enumerate(images.to_uint8(decoded)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "each" / images.per_image_name(j))), image)
    proc = subprocess.run([str(release_build / "ditrt-sample"), str(cpp_artifact), "--labels", "1"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "no TensorRT executor" in proc.stderr  # the default executor, not built here


def test_png_write_refuses_what_is_not_a_regular_file(lib, tmp_path):
    pixels = np.zeros((2, 2, 3), np.uint8)
    (tmp_path / "dir.png").mkdir()
    assert lib.png_write(tmp_path / "dir.png", pixels) == INVALID_ARGUMENT
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere.png")
    assert lib.png_write(tmp_path / "link.png", pixels) == INVALID_ARGUMENT and not (tmp_path / "elsewhere.png").exists()
    assert lib.png_write(tmp_path / "ok.png", pixels) == OK
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_cpp_noise_is_the_python_noise_bit_for_bit(lib):
    """ditrt_noise_normal against ditrt.runtime.sampling.noise.normal over 1.05e6 values: seeds, images and
    draws with both 32-bit halves in use, counts that are not multiples of 4."""
    from ditrt.runtime.sampling import noise
    assert lib.lib.ditrt_noise_version().decode() == noise.NOISE_VERSION
    cases = [(0, 0, 0, 262_147), (2 ** 64 - 1, 2 ** 64 - 1, 2 ** 32 - 1, 262_145), (0x1234_5678_9ABC_DEF0, 2 ** 32 + 3, 251, 262_143),
             (7, 123_456_789, 2 ** 31, 262_146)]
    total = 0
    for seed, image, draw, count in cases:
        out = np.full(count, np.nan, np.float32)
        assert lib.lib.ditrt_noise_normal(seed, image, draw, _f32(out), count) == OK, lib.error()
        python = noise.normal(seed, [image], draw, (count,))[0]
        mismatches = int((out.view(np.uint32) != python.view(np.uint32)).sum())
        assert mismatches == 0, f"seed {seed} image {image} draw {draw}: {mismatches} of {count} values differ"
        total += count
    assert total >= 10 ** 6


def test_tensorrt_executor_is_unavailable_without_tensorrt(lib):
    if lib.lib.ditrt_has_tensorrt():
        pytest.skip("built with TensorRT")
    executor = VP()
    assert lib.lib.ditrt_executor_create_tensorrt(0, 0, ctypes.byref(executor)) == UNAVAILABLE
    assert "built without TensorRT" in lib.error() and not executor.value


def test_library_exports_only_the_c_abi(release_build):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library(release_build))], capture_output=True,
                             text=True, check=True).stdout.split("\n")
    exported = {line.split()[-1] for line in symbols if line.strip() and line.split()[1] in "TtDdBb"}
    assert exported and all(name.startswith("ditrt_") for name in exported), sorted(exported)
    header = (CPP / "include" / "ditrt" / "ditrt.h").read_text()
    assert all(f" {name}(" in header for name in exported)  # every export is declared in the header
    soname = subprocess.run(["objdump", "-p", str(library(release_build))], capture_output=True, text=True).stdout
    assert "SONAME               libditrt.so.2" in soname
    print(f"libditrt.so: {library(release_build).resolve().stat().st_size} bytes, {len(exported)} exported symbols")


# ---- the TensorRT executor: what it uses, checked against TensorRT 11.4's API -------------------------------

TRT_SOURCE = CPP / "src" / "trt_executor.cpp"
DATA = ROOT / "tests" / "data"

# C++ API name -> (Python class, Python name) in TensorRT 11.4's bindings. camelCase maps to
# snake_case one to one except where listed in EXCEPTIONS.
TRT_METHODS = {
    "createInferRuntime": ("", "Runtime"),
    "deserializeCudaEngine": ("Runtime", "deserialize_cuda_engine"),
    "setEngineHostCodeAllowed": ("Runtime", "engine_host_code_allowed"),
    "createExecutionContext": ("ICudaEngine", "create_execution_context"),
    "getNbIOTensors": ("ICudaEngine", "num_io_tensors"),
    "getIOTensorName": ("ICudaEngine", "get_tensor_name"),
    "getTensorIOMode": ("ICudaEngine", "get_tensor_mode"),
    "getTensorDataType": ("ICudaEngine", "get_tensor_dtype"),
    "getProfileShape": ("ICudaEngine", "get_tensor_profile_shape"),
    "getDeviceMemorySizeV2": ("ICudaEngine", "device_memory_size_v2"),
    "getTensorShape": ("IExecutionContext", "get_tensor_shape"),
    "setDeviceMemoryV2": ("IExecutionContext", "set_device_memory"),
    "setInputShape": ("IExecutionContext", "set_input_shape"),
    "setTensorAddress": ("IExecutionContext", "set_tensor_address"),
    "enqueueV3": ("IExecutionContext", "execute_async_v3"),
    "log": ("ILogger", "log"),
}
# The names that do not follow the camelCase -> snake_case rule (C++ getters become properties,
# enqueueV3 is execute_async_v3, createInferRuntime is the Runtime constructor).
EXCEPTIONS = {"createInferRuntime", "setEngineHostCodeAllowed", "getNbIOTensors", "getIOTensorName", "getTensorIOMode",
              "getTensorDataType", "getProfileShape", "getDeviceMemorySizeV2", "setDeviceMemoryV2", "enqueueV3"}
TRT_ENUMS = {  # nvinfer1 enum constant -> (Python enum class, member)
    "DataType::kFLOAT": ("DataType", "FLOAT"),
    "DataType::kHALF": ("DataType", "HALF"),
    "DataType::kINT32": ("DataType", "INT32"),
    "DataType::kINT64": ("DataType", "INT64"),
    "TensorIOMode::kINPUT": ("TensorIOMode", "INPUT"),
    "ExecutionContextAllocationStrategy::kUSER_MANAGED": ("ExecutionContextAllocationStrategy", "USER_MANAGED"),
    "OptProfileSelector::kMIN": ("", "MIN"), "OptProfileSelector::kMAX": ("", "MAX"),
    "Severity::kERROR": ("ILogger.Severity", "ERROR"), "Severity::kINTERNAL_ERROR": ("ILogger.Severity", "INTERNAL_ERROR"),
    "Severity::kWARNING": ("ILogger.Severity", "WARNING"),
}
TRT_TYPES = {"IRuntime", "ICudaEngine", "IExecutionContext", "ILogger", "Dims", "DataType", "TensorIOMode",
             "ExecutionContextAllocationStrategy", "OptProfileSelector", "AsciiChar"}
CUDA_RUNTIME = {"cudaSetDevice", "cudaGetDeviceProperties", "cudaStreamCreateWithFlags",
                "cudaStreamNonBlocking", "cudaStreamDestroy", "cudaStreamSynchronize", "cudaMalloc", "cudaFree",
                "cudaMallocHost", "cudaFreeHost", "cudaMemcpyAsync", "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost",
                "cudaStreamBeginCapture", "cudaStreamCaptureModeThreadLocal", "cudaStreamEndCapture", "cudaGraphInstantiate",
                "cudaGraphLaunch", "cudaGraphDestroy", "cudaGraphExecDestroy", "cudaGetLastError", "cudaGetErrorName",
                "cudaGetErrorString", "cudaSuccess", "cudaError_t", "cudaStream_t", "cudaGraph_t", "cudaGraphExec_t",
                "cudaDeviceProp"}


def _snake(name: str) -> str:
    import re
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _python_names() -> set[str]:
    lines = (DATA / "tensorrt-11.4-python-names.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _in_names(name: str, names: set[str]) -> bool:
    """Listed, or the tail of a listed string at an identifier boundary: the list was extracted as
    strings from the compiled bindings, whose linker stores a string that ends another inside it
    ('INPUT' lives in 'SHAPE_INPUT'-like strings, 'Logger' in 'ILogger'); see tests/test_trt_logic.py."""
    return name in names or any(len(s) > len(name) and s.endswith(name) and (s[-len(name) - 1] == "_" or name[0].isupper())
                                for s in names)


def test_tensorrt_executor_uses_only_listed_symbols():
    """Every TensorRT call, enum and type and every CUDA runtime symbol in trt_executor.cpp is in
    the tables above (so the tables are the complete list of what it uses)."""
    import re
    code = re.sub(r"//[^\n]*", "", TRT_SOURCE.read_text())
    calls = set(re.findall(r"(?:->|\.)\s*([a-z]\w*)\s*\(", code))
    ours = {"get", "reset", "release", "data", "size", "push_back", "emplace", "find", "end", "begin", "c_str", "count",
            "empty", "what", "clear", "back", "insert", "erase", "emplace_back", "at", "str", "front", "resize",
            "assign", "append", "substr", "attach", "run", "max_batch", "slot", "capture", "rdbuf", "read", "seekg",
            "tellg", "good", "lock", "unlock", "second", "first", "seconds", "errors", "check", "make", "path",
            "pop_back", "push_front", "splice", "file_path", "per_row", "graph"}
    assert calls - ours - set(TRT_METHODS) == set(), "calls missing from TRT_METHODS"
    assert set(TRT_METHODS) - {"createInferRuntime", "log"} <= calls, "listed methods no longer used"
    assert "createInferRuntime" in code and "void log(" in code
    enums = set(re.findall(r"\b((?:DataType|TensorIOMode|ExecutionContextAllocationStrategy|OptProfileSelector|Severity)::k\w+)", code))
    assert enums == set(TRT_ENUMS), enums ^ set(TRT_ENUMS)
    types = set(re.findall(r"nvinfer1::(\w+)", code))
    assert types <= TRT_TYPES | {"createInferRuntime"}, types - TRT_TYPES
    cuda = set(re.findall(r"\b(cuda[A-Z]\w*)", code))  # the CUDA runtime API is cudaCamelCase
    assert cuda == CUDA_RUNTIME, f"unlisted: {cuda - CUDA_RUNTIME}, listed but unused: {CUDA_RUNTIME - cuda}"
    print("TensorRT C++ methods:", sorted(TRT_METHODS))
    print("CUDA runtime symbols:", sorted(cuda))


def test_tensorrt_symbols_exist_in_tensorrt_11_4():
    names = _python_names()
    lean = json.loads((DATA / "tensorrt-11.4-lean-api.json").read_text())["classes"]
    for cpp, (cls, py) in TRT_METHODS.items():
        if cpp not in EXCEPTIONS:
            assert _snake(cpp) == py, f"{cpp} maps to {_snake(cpp)} by rule, not {py}: add it to EXCEPTIONS"
        assert _in_names(py, names), f"{cpp} -> {py} not in TensorRT 11.4's names"
        if cls:
            assert py in lean[cls], f"{cpp} -> {cls}.{py} is not in TensorRT 11.4's lean runtime API"
    for cpp, (cls, member) in TRT_ENUMS.items():
        assert _in_names(member, names), cpp
        if cls:
            assert member in lean[cls], f"{cpp} -> {cls}.{member}"
    for t in TRT_TYPES - {"AsciiChar", "IRuntime", "OptProfileSelector"}:  # C++-only types
        assert _in_names(t, names), t


def test_tensorrt_executor_is_not_compiled_without_the_option(release_build):
    cache = (release_build / "CMakeCache.txt").read_text()
    assert "DITRT_WITH_TENSORRT:BOOL=OFF" in cache
    assert not (release_build / "CMakeFiles" / "ditrt_core.dir" / "src" / "trt_executor.cpp.o").exists()
