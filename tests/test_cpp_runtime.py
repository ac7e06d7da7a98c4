"""The C++ runtime (runtime/cpp): built with CMake, its GoogleTest suite run against values the
Python runtime computes here, then driven through its C ABI with ctypes: a callback executor runs
the exported fp32 graph in ONNX Runtime, and the loops must reproduce the official golden loops and
the Python runtime. A second build with AddressSanitizer + UndefinedBehaviorSanitizer runs the
whole C++ test set (unit tests and the C driver).

Builds live in runtime/cpp/build/pytest-{release,sanitize} (ignored by git) and are reused
incrementally: a clean clone builds both from scratch once (~60 s on 2 cores).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, max_rel_err

CPP = ROOT / "runtime" / "cpp"
BUILD_ROOT = CPP / "build"
SANITIZE_FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
SANITIZE_CXX = f"-O0 -g1 {SANITIZE_FLAGS}"  # -O0 and line tables only: the quickest instrumented build


# ---- building ---------------------------------------------------------------------------------------

def _tools_or_skip() -> None:
    missing = [tool for tool in ("cmake", "g++", "gcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ runtime needs {', '.join(missing)}: apt-get install -y cmake g++ nlohmann-json3-dev "
                    "libgtest-dev (.ci/run installs them)")


def _build(kind: str, extra: list[str], targets: list[str] | None = None) -> Path:
    """Configure (once) and build into runtime/cpp/build/pytest-<kind>; returns the build dir."""
    _tools_or_skip()
    build = BUILD_ROOT / f"pytest-{kind}"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", str(CPP), "-B", str(build), *generator, *extra], "configure")
    _run(["cmake", "--build", str(build), "-j2", *(["--target", *targets] if targets else [])], "build")
    return build


def _run(cmd: list[str], what: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"C++ {what} failed ({' '.join(cmd)}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def release_build() -> Path:
    return _build("release", ["-DCMAKE_BUILD_TYPE=Release"])


@pytest.fixture(scope="session")
def sanitize_build() -> Path:
    return _build("sanitize", ["-DCMAKE_BUILD_TYPE=Sanitize", f"-DCMAKE_CXX_FLAGS={SANITIZE_CXX}", f"-DCMAKE_C_FLAGS={SANITIZE_CXX}",
                               f"-DCMAKE_EXE_LINKER_FLAGS={SANITIZE_FLAGS}", f"-DCMAKE_SHARED_LINKER_FLAGS={SANITIZE_FLAGS}",
                               "-DDITRT_BUILD_EXAMPLES=OFF"])


def _library(build: Path) -> Path:
    return build / "libditrt.so"


# ---- the artifact -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cpp_artifact(tiny_artifact) -> Path:
    """The tiny golden artifact (manifest schema 2, as the exporter writes it)."""
    assert json.loads((tiny_artifact / "manifest.json").read_text())["schema_version"] == 2
    return tiny_artifact


# ---- the C++ unit tests against Python's values ---------------------------------------------------------

def _python_values() -> dict:
    """Values the Python runtime computes, which the GoogleTest suite reads (DITRT_TEST_VALUES)."""
    from ditrt.runtime import samplers, schedule
    from ditrt.runtime.trt import compat as trt_plan
    from ditrt.runtime.config import Diffusion

    def diffusion(variance="learned_range"):  # the official training process, as the manifest states it
        return Diffusion(1000, "linear", 1e-4, 0.02, variance, 10, {"official": 3, "standard": 4})

    respacing = []
    for n, spec in [(1000, s) for s in ("250", "ddim50", "10,20,30", "10", "1000", "ddim1000", "7", "ddim3",
                                        "1,2,3,4,5", "100,1", " 25 ", "1_0", "ddim 10", "+5", "3,0", "0", "-1",
                                        "ddim300", "1001", "", "x", "10,,20", "2.5", "999", "333,333,334")] + \
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

    return {"respacing": respacing, "schedules": schedules, "steps": steps, "guide": guides,
            **_compat_cases(trt_plan)}


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
    out = _ctest(sanitize_build, python_values_file,
                 {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
                  "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"})
    assert "100% tests passed" in out, out[-3000:]


def test_the_sanitizer_build_is_instrumented(sanitize_build):
    """Guards the sanitizer test itself: the binaries it runs really carry ASan and UBSan."""
    symbols = subprocess.run(["nm", "-D", str(sanitize_build / "tests" / "ditrt_unit_tests")], capture_output=True,
                             text=True).stdout
    assert "__asan_init" in symbols or "__asan_report_load8" in symbols
    assert "__ubsan_handle" in symbols


# ---- the C ABI through ctypes ------------------------------------------------------------------------------

DENOISER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float),
                            ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.POINTER(ctypes.c_float))
F32P = ctypes.POINTER(ctypes.c_float)


class Lib:
    """ctypes prototypes of include/ditrt/ditrt.h."""

    def __init__(self, path: Path):
        lib = self.lib = ctypes.CDLL(str(path))
        vp, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
        protos = {
            "ditrt_last_error": (ctypes.c_char_p, []), "ditrt_status_name": (ctypes.c_char_p, [ctypes.c_int]),
            "ditrt_version": (ctypes.c_char_p, []), "ditrt_has_tensorrt": (ctypes.c_int, []),
            "ditrt_executor_create_callback": (ctypes.c_int, [DENOISER, vp, i64, ctypes.POINTER(vp)]),
            "ditrt_executor_create_tensorrt": (ctypes.c_int, [ctypes.c_int, i64, ctypes.POINTER(vp)]),
            "ditrt_executor_release": (None, [vp]),
            "ditrt_open": (ctypes.c_int, [ctypes.c_char_p, vp, ctypes.c_uint32, ctypes.POINTER(vp)]),
            "ditrt_close": (None, [vp]),
            "ditrt_latent_shape": (ctypes.c_int, [vp, i64p]),
            "ditrt_num_steps": (ctypes.c_int, [vp, ctypes.c_char_p, i64p]),
            "ditrt_graph_file": (ctypes.c_int, [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
            "ditrt_sample": (ctypes.c_int, [vp, i64p, i64, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_double,
                                            ctypes.c_double, ctypes.c_char_p, ctypes.c_uint64, F32P, F32P, F32P, i64]),
            "ditrt_noise_version": (ctypes.c_char_p, []),
            "ditrt_noise_normal": (ctypes.c_int, [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, F32P, i64]),
        }
        for name, (res, args) in protos.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def error(self) -> str:
        return self.lib.ditrt_last_error().decode()


class OrtCallback:
    """The denoiser callback: the exported fp32 graph in ONNX Runtime on host buffers. Exceptions
    must not escape into C (ctypes would print them and return 0), so they become status 1."""

    def __init__(self, out_channels: int, latent_shape: tuple[int, int, int]):
        self.session, self.out_channels, self.latent_shape = None, out_channels, latent_shape
        self.calls, self.failure = [], None
        self.c_function = DENOISER(self._call)

    def _call(self, user, latent, timestep, label, rows, out):
        try:
            c, h, w = self.latent_shape
            x = np.ctypeslib.as_array(latent, (rows, c, h, w))
            t = np.ctypeslib.as_array(timestep, (rows,))
            y = np.ctypeslib.as_array(label, (rows,))
            result = self.session.run(["model_output"], {"latent": x, "timestep": t, "class_label": y})[0]
            np.ctypeslib.as_array(out, (rows, self.out_channels, h, w))[...] = result
            self.calls.append(int(rows))
            return 0
        except BaseException as e:  # noqa: BLE001 - reported by the test, never across the ABI
            self.failure = e
            return 1


class CppPipeline:
    def __init__(self, lib: Lib, artifact: Path, max_batch: int = 0, flags: int = 0):
        import onnxruntime as ort
        self.lib = lib
        manifest = json.loads((artifact / "manifest.json").read_text())
        m = manifest["model"]
        self.shape = (m["in_channels"], m["input_size"], m["input_size"])
        self.callback = OrtCallback(m["out_channels"], self.shape)
        self.executor, self.pipe = ctypes.c_void_p(), ctypes.c_void_p()
        assert lib.lib.ditrt_executor_create_callback(self.callback.c_function, None, max_batch,
                                                      ctypes.byref(self.executor)) == 0, lib.error()
        status = lib.lib.ditrt_open(str(artifact).encode(), self.executor, flags, ctypes.byref(self.pipe))
        assert status == 0, lib.error()
        path = ctypes.create_string_buffer(4096)
        # The graph path comes from C++, checked against the manifest's sha256 there.
        assert lib.lib.ditrt_graph_file(self.pipe, b"denoiser", b"fp32", path, 4096) == 0, lib.error()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.callback.session = ort.InferenceSession(path.value.decode(), options, providers=["CPUExecutionProvider"])

    def sample(self, labels, steps="10", sampler="ddpm", eta=0.0, cfg_scale=4.0, guidance="official", seed=0,
               noise=None, capacity=None, out=None):
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        n = len(labels)
        out = np.full((max(n, 1), *self.shape), np.nan, np.float32) if out is None else out
        initial = step = None
        if noise is not None:
            initial, step = (np.ascontiguousarray(a, dtype=np.float32) for a in noise)
        ptr = lambda a: a.ctypes.data_as(F32P) if a is not None else None  # noqa: E731
        status = self.lib.lib.ditrt_sample(
            self.pipe, labels.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), n,
            steps.encode() if steps is not None else None, sampler.encode() if sampler is not None else None,
            eta, cfg_scale, guidance.encode() if guidance is not None else None, seed, ptr(initial), ptr(step),
            ptr(out), out.size if capacity is None else capacity)
        return status, out

    def close(self):
        self.lib.lib.ditrt_close(self.pipe)
        self.lib.lib.ditrt_executor_release(self.executor)


@pytest.fixture(scope="session")
def lib(release_build) -> Lib:
    return Lib(_library(release_build))


@pytest.fixture(scope="session")
def cpp_pipe(lib, cpp_artifact):
    pipe = CppPipeline(lib, cpp_artifact)
    yield pipe
    pipe.close()


LOOPS = [("ddpm", "10", "ddpm_samples"), ("ddim", "ddim10", "ddim_samples")]


@pytest.mark.parametrize("sampler,spec,key", LOOPS)
def test_cpp_reproduces_the_official_golden_loops(cpp_pipe, golden, sampler, spec, key):
    noise = (golden["ddpm_initial_noise"], golden["ddpm_step_noise"])
    status, out = cpp_pipe.sample([3, 7], steps=spec, sampler=sampler, cfg_scale=4.0, guidance="official", noise=noise)
    assert status == 0, cpp_pipe.lib.error()
    err = max_rel_err(out, golden[key])
    print(f"C++ {sampler} 10-step loop vs official golden: max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("sampler,spec,eta,cfg,guidance,labels", [
    ("ddpm", "10", 0.0, 4.0, "official", [3, 7]), ("ddim", "ddim10", 0.0, 4.0, "official", [3, 7]),
    ("ddim", "ddim5", 0.6, 1.5, "standard", [0, 9, 4]), ("ddpm", "3,4", 0.0, 1.0, "official", [5])])
def test_cpp_equals_the_python_runtime(cpp_pipe, tiny_artifact, sampler, spec, eta, cfg, guidance, labels):
    from ditrt import runtime
    k = len(runtime.schedule.space_timesteps(1000, spec))
    rng = np.random.default_rng(11)
    noise = (rng.standard_normal((len(labels), 4, 8, 8), dtype=np.float32),
             rng.standard_normal((k, len(labels), 4, 8, 8), dtype=np.float32))
    python = runtime.load(tiny_artifact, backend="onnxruntime").sample(
        labels, num_steps=spec, sampler=sampler, eta=eta if sampler == "ddim" else None, cfg_scale=cfg, guidance=guidance, noise=noise, progress=False)
    status, out = cpp_pipe.sample(labels, steps=spec, sampler=sampler, eta=eta, cfg_scale=cfg, guidance=guidance, noise=noise)
    assert status == 0, cpp_pipe.lib.error()
    diff, rel = float(np.abs(out - python).max()), max_rel_err(out, python)
    print(f"C++ vs Python runtime ({sampler} {spec} eta {eta} cfg {cfg} {guidance}): max abs diff {diff:.2e}, "
          f"relative to the largest latent {rel:.2e}")
    # Same float32 operations in the same order; what remains is exp's last bit (numpy's SIMD expf
    # vs glibc's), grown over the loop. Measured: 0 for 2 steps, ~1.7e-7 relative for 10.
    assert rel <= 1e-6


def test_chunking_by_max_batch_and_seeded_noise(lib, cpp_artifact, cpp_pipe):
    chunked = CppPipeline(lib, cpp_artifact, max_batch=3)
    try:
        status, a = chunked.sample([1, 2, 5], steps="ddim4", sampler="ddim", seed=7)
        assert status == 0, lib.error()
        assert chunked.callback.calls == [3, 3] * 4  # 6 guided rows per step, in chunks of 3
    finally:
        chunked.close()
    status, b = cpp_pipe.sample([1, 2, 5], steps="ddim4", sampler="ddim", seed=7)
    assert status == 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # ORT's kernels may differ by batch size
    _, alone = cpp_pipe.sample([1], steps="ddim4", sampler="ddim", seed=7)
    np.testing.assert_allclose(alone[0], b[0], atol=1e-5)  # an image's noise does not depend on its batch
    _, other = cpp_pipe.sample([1, 2, 5], steps="ddim4", sampler="ddim", seed=8)
    assert not np.allclose(other, b)


def test_cpp_noise_is_the_python_noise_bit_for_bit(lib):
    """ditrt_noise_normal against ditrt.runtime.noise.normal over 1.05e6 values: seeds, images and
    draws with both 32-bit halves in use, counts that are not multiples of 4."""
    from ditrt.runtime import noise
    assert lib.lib.ditrt_noise_version().decode() == noise.NOISE_VERSION
    cases = [(0, 0, 0, 262_147), (2 ** 64 - 1, 2 ** 64 - 1, 2 ** 32 - 1, 262_145), (0x1234_5678_9ABC_DEF0, 2 ** 32 + 3, 251, 262_143),
             (7, 123_456_789, 2 ** 31, 262_146)]
    total = 0
    for seed, image, draw, count in cases:
        out = np.full(count, np.nan, np.float32)
        assert lib.lib.ditrt_noise_normal(seed, image, draw, out.ctypes.data_as(F32P), count) == 0, lib.error()
        python = noise.normal(seed, [image], draw, (count,))[0]
        mismatches = int((out.view(np.uint32) != python.view(np.uint32)).sum())
        assert mismatches == 0, f"seed {seed} image {image} draw {draw}: {mismatches} of {count} values differ"
        total += count
    assert total >= 10 ** 6


@pytest.mark.parametrize("sampler,spec,eta", [("ddpm", "10", 0.0), ("ddim", "ddim5", 0.8)])
def test_cpp_seeded_sampling_equals_python(cpp_pipe, tiny_artifact, sampler, spec, eta):
    """Same seed, same latents: the noise is the same stream in both languages (initial noise and
    every step's), so what remains is float32 arithmetic, the bound of the injected-noise test."""
    from ditrt import runtime
    labels = [3, 7, 1]
    python = runtime.load(tiny_artifact, backend="onnxruntime").sample(
        labels, num_steps=spec, sampler=sampler, eta=eta if sampler == "ddim" else None, cfg_scale=4.0, seed=2 ** 40 + 9,
        progress=False)
    status, out = cpp_pipe.sample(labels, steps=spec, sampler=sampler, eta=eta, cfg_scale=4.0, seed=2 ** 40 + 9)
    assert status == 0, cpp_pipe.lib.error()
    rel = max_rel_err(out, python)
    print(f"C++ vs Python runtime, seeded ({sampler} {spec}): max rel err {rel:.2e}")
    assert rel <= 1e-6
    _, other = cpp_pipe.sample(labels, steps=spec, sampler=sampler, eta=eta, cfg_scale=4.0, seed=2 ** 40 + 10)
    assert max_rel_err(other, python) > 1e-2  # the seed matters


def test_defaults_come_from_the_manifest(cpp_pipe, cpp_artifact):
    k = ctypes.c_int64()
    assert cpp_pipe.lib.lib.ditrt_num_steps(cpp_pipe.pipe, None, ctypes.byref(k)) == 0
    assert k.value == json.loads((cpp_artifact / "manifest.json").read_text())["defaults"]["steps"]
    status, a = cpp_pipe.sample([2], steps="ddim3", sampler=None, cfg_scale=math.nan, guidance=None, seed=1)
    assert status == 0, cpp_pipe.lib.error()
    _, b = cpp_pipe.sample([2], steps="ddim3", sampler="ddpm", cfg_scale=4.0, guidance="official", seed=1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,status,message", [
    (dict(labels=[10]), 1, "class label 10 out of range: this model has classes 0..9"),
    (dict(labels=[-1, 3]), 1, "class label -1 out of range"),
    (dict(labels=[]), 1, "num_labels must be at least 1"),
    (dict(labels=[1], steps="0"), 3, "must be positive"),
    (dict(labels=[1], steps="ddim300"), 3, "no integer stride"),
    (dict(labels=[1], steps="1001"), 3, "cannot take 1001 steps"),
    (dict(labels=[1], steps="ten"), 3, "is not 'N', 'ddimN'"),
    (dict(labels=[1], sampler="euler"), 1, 'unknown sampler "euler"'),
    (dict(labels=[1], guidance="all"), 1, 'unknown guidance "all"'),
    (dict(labels=[1], sampler="ddim", eta=2.0), 1, "eta must be in [0, 1]"),
    (dict(labels=[1], cfg_scale=math.inf), 1, "cfg_scale must be finite"),
    (dict(labels=[1, 2], capacity=2 * 256 - 1), 4, "latents need 512"),
])
def test_bad_sample_arguments_return_a_status_and_message(cpp_pipe, kwargs, status, message):
    before = len(cpp_pipe.callback.calls)
    got, out = cpp_pipe.sample(**kwargs)
    assert (got, message in cpp_pipe.lib.error()) == (status, True), cpp_pipe.lib.error()
    assert len(cpp_pipe.callback.calls) == before  # refused before any model call
    assert np.isnan(out).all()  # and nothing written


def test_null_pointers_and_failing_callbacks(lib, cpp_artifact, cpp_pipe):
    L = lib.lib
    out = np.zeros(256, np.float32)
    labels = np.array([1], np.int64)
    lp = labels.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
    assert L.ditrt_sample(None, lp, 1, b"5", b"ddpm", 0, 4, b"official", 0, None, None, out.ctypes.data_as(F32P), 256) == 1
    assert "pipeline must not be NULL" in lib.error()
    assert L.ditrt_sample(cpp_pipe.pipe, lp, 1, b"5", b"ddpm", 0, 4, b"official", 0, None, None, None, 256) == 1
    assert "out must not be NULL" in lib.error()
    assert L.ditrt_sample(cpp_pipe.pipe, lp, 1, b"5", b"ddpm", 0, 4, b"official", 0, out.ctypes.data_as(F32P), None,
                          out.ctypes.data_as(F32P), 256) == 1
    assert "both initial_noise and step_noise" in lib.error()
    pipe = ctypes.c_void_p()
    assert L.ditrt_open(None, cpp_pipe.executor, 0, ctypes.byref(pipe)) == 1 and not pipe.value
    assert L.ditrt_open(str(cpp_artifact).encode(), None, 0, ctypes.byref(pipe)) == 1
    assert L.ditrt_open(str(cpp_artifact).encode(), cpp_pipe.executor, 0, None) == 1
    # A callback that fails: an executor error, reported, no crash.
    broken = CppPipeline(lib, cpp_artifact)
    try:
        broken.callback.session = None  # its session.run raises inside the callback
        status, _ = broken.sample([1], steps="5")
        assert status == 5 and "denoiser callback failed" in lib.error()
        assert isinstance(broken.callback.failure, AttributeError)
    finally:
        broken.close()
    assert L.ditrt_status_name(4) == b"DITRT_BUFFER_TOO_SMALL"


def _open_status(lib, cpp_pipe, directory: Path, flags: int = 0) -> tuple[int, str]:
    pipe = ctypes.c_void_p()
    status = lib.lib.ditrt_open(str(directory).encode(), cpp_pipe.executor, flags, ctypes.byref(pipe))
    message = lib.error()
    if status == 0:
        lib.lib.ditrt_close(pipe)
    return status, message


def test_bad_artifacts_are_refused_with_the_reason(lib, cpp_pipe, cpp_artifact, tmp_path):
    assert _open_status(lib, cpp_pipe, tmp_path / "none") == (2, f"artifact directory not found: {tmp_path / 'none'}")
    status, message = _open_status(lib, cpp_pipe, tmp_path)
    assert status == 2 and "no manifest.json" in message
    good = json.loads((cpp_artifact / "manifest.json").read_text())
    cases = [("{not json", "not valid JSON"),
             (json.dumps({**good, "schema_version": 1}), "schema_version is 1"),
             (json.dumps({**good, "schema_version": True}), "schema_version is true"),
             (json.dumps({**good, "schema": "other"}), 'schema must be "ditrt.manifest"'),
             (json.dumps({**good, "model": {**good["model"], "num_classes": 1000}}), "diffusion.null_class (10) must equal"),
             (json.dumps({**good, "diffusion": {**good["diffusion"], "clip_denoised": True}}), "diffusion.clip_denoised"),
             (json.dumps({**good, "diffusion": {**good["diffusion"], "beta_schedule": "cosine"}}), "diffusion.beta_schedule"),
             (json.dumps({k: v for k, v in good.items() if k != "defaults"}), "missing field defaults.sampler")]
    for text, expected in cases:
        (tmp_path / "manifest.json").write_text(text)
        status, message = _open_status(lib, cpp_pipe, tmp_path)
        assert status == 2 and expected in message, (expected, message)


def test_corrupt_graph_is_caught_by_sha256_unless_opted_out(lib, cpp_pipe, cpp_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(cpp_artifact, art)
    graph = art / "denoiser.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    pipe = ctypes.c_void_p()
    assert lib.lib.ditrt_open(str(art).encode(), cpp_pipe.executor, 0, ctypes.byref(pipe)) == 0
    path = ctypes.create_string_buffer(4096)
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"fp32", path, 4096) == 2
    assert "does not match its sha256" in lib.error()
    lib.lib.ditrt_close(pipe)
    assert lib.lib.ditrt_open(str(art).encode(), cpp_pipe.executor, 1, ctypes.byref(pipe)) == 0  # DITRT_OPEN_NO_VERIFY
    assert lib.lib.ditrt_graph_file(pipe, b"denoiser", b"fp32", path, 4096) == 0
    lib.lib.ditrt_close(pipe)


def test_tensorrt_executor_is_unavailable_without_tensorrt(lib):
    if lib.lib.ditrt_has_tensorrt():
        pytest.skip("built with TensorRT")
    executor = ctypes.c_void_p()
    assert lib.lib.ditrt_executor_create_tensorrt(0, 0, ctypes.byref(executor)) == 6
    assert "built without TensorRT" in lib.error() and not executor.value


def test_library_exports_only_the_c_abi(release_build):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(_library(release_build))], capture_output=True,
                             text=True, check=True).stdout.split("\n")
    exported = {line.split()[-1] for line in symbols if line.strip() and line.split()[1] in "TtDdBb"}
    assert exported and all(name.startswith("ditrt_") for name in exported), sorted(exported)
    print(f"libditrt.so: {_library(release_build).stat().st_size} bytes, {len(exported)} exported symbols")


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
            "pop_back", "push_front", "splice"}
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
