"""The C ABI through ctypes, shared by the C++ runtime's tests (test_cpp_runtime.py,
test_cpp_sit.py, test_cpp_hardening.py): building runtime/cpp with CMake (or skipping, saying what
to install), the prototypes of include/ditrt/ditrt.h, the ONNX Runtime callback executor and a
pipeline wrapper. The fixtures over them are in conftest.py."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

CPP = ROOT / "runtime" / "cpp"
BUILD_ROOT = CPP / "build"
SANITIZE_FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
SANITIZE_CXX = f"-O1 -g1 {SANITIZE_FLAGS}"  # line tables only; -O1 (ASan's advice) halves the fuzz run (tests stay -O0)
HEADERS = {"nlohmann/json.hpp": "nlohmann-json3-dev", "gtest/gtest.h": "libgtest-dev", "png.h": "libpng-dev",
           "openssl/evp.h": "libssl-dev"}
APT = "apt-get install -y cmake g++ nlohmann-json3-dev libgtest-dev libpng-dev libssl-dev"


# ---- building ---------------------------------------------------------------------------------------

def _missing_or_none() -> str | None:
    """What the C++ build lacks on this machine (tools, headers), or None."""
    missing = [tool for tool in ("cmake", "g++", "gcc") if shutil.which(tool) is None]
    include_dirs = [Path("/usr/include"), Path("/usr/local/include"),
                    *(Path(p) for p in os.environ.get("CPATH", "").split(":") if p)]
    missing += [f"{header} ({package})" for header, package in HEADERS.items()
                if not any((d / header).is_file() for d in include_dirs)]
    return ", ".join(missing) or None


def _tools_or_skip() -> None:
    missing = _missing_or_none()
    if missing:
        message = f"the C++ runtime's tests need {missing}: {APT} (.ci/run installs them)"
        if os.environ.get("DITRT_REQUIRE_CPP") == "1":
            pytest.fail(f"DITRT_REQUIRE_CPP=1 but {message}")
        pytest.skip(message)


def build_cpp(kind: str, extra: list[str], targets: list[str] | None = None) -> Path:
    """Configure (once) and build into runtime/cpp/build/pytest-<kind>; returns the build dir."""
    _tools_or_skip()
    build = BUILD_ROOT / f"pytest-{kind}"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", str(CPP), "-B", str(build), *generator, *extra], "configure")
    _run(["cmake", "--build", str(build), "-j2", *(["--target", *targets] if targets else [])], "build", timeout=900)
    return build


def _run(cmd: list[str], what: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"C++ {what} failed ({' '.join(cmd)}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


def library(build: Path) -> Path:
    return build / "libditrt.so"




# ---- the C ABI through ctypes --------------------------------------------------------------------------------

class Tensor(ctypes.Structure):
    """ditrt_tensor: name, dtype, rank, shape[8], data (88 bytes)."""
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 8), ("data", ctypes.c_void_p)]


RUN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Tensor), ctypes.c_int64,
                       ctypes.POINTER(Tensor), ctypes.c_int64)
PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double)
DTYPES = {1: np.float32, 2: np.float16, 3: np.int64, 4: np.int32}
VP, I64, U8P = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint8)
OK, INVALID_ARGUMENT, ARTIFACT_ERROR, SCHEDULE_ERROR, BUFFER_TOO_SMALL, EXECUTOR_ERROR = 0, 1, 2, 3, 4, 5
UNAVAILABLE, CANCELLED, STEP_ERROR, BUSY = 6, 8, 9, 10


def tensor_array(t: Tensor) -> np.ndarray:
    """A writable numpy view of a ditrt_tensor's host buffer."""
    shape = tuple(t.shape[:t.rank])
    dtype = np.dtype(DTYPES[t.dtype])
    size = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(t.data), dtype).reshape(shape)


class Lib:
    """ctypes prototypes of include/ditrt/ditrt.h (ABI 2)."""

    def __init__(self, path: Path):
        lib = self.lib = ctypes.CDLL(str(path))
        i64p, cp = ctypes.POINTER(I64), ctypes.c_char_p
        f32p = ctypes.POINTER(ctypes.c_float)
        protos = {
            "ditrt_abi_version": (ctypes.c_uint32, []), "ditrt_last_error": (cp, []),
            "ditrt_status_name": (cp, [ctypes.c_int]), "ditrt_version": (cp, []), "ditrt_has_tensorrt": (ctypes.c_int, []),
            "ditrt_executor_create_callback": (ctypes.c_int, [RUN, VP, I64, ctypes.POINTER(VP)]),
            "ditrt_executor_create_tensorrt": (ctypes.c_int, [ctypes.c_int32, I64, ctypes.POINTER(VP)]),
            "ditrt_executor_release": (None, [VP]),
            "ditrt_options_create": (ctypes.c_int, [ctypes.POINTER(VP)]), "ditrt_options_release": (None, [VP]),
            "ditrt_options_set": (ctypes.c_int, [VP, cp, cp]),
            "ditrt_options_set_noise": (ctypes.c_int, [VP, f32p, I64, f32p, I64]),
            "ditrt_options_set_progress": (ctypes.c_int, [VP, PROGRESS, VP]),
            "ditrt_open": (ctypes.c_int, [cp, VP, ctypes.c_uint32, ctypes.POINTER(VP)]), "ditrt_close": (None, [VP]),
            "ditrt_latent_shape": (ctypes.c_int, [VP, i64p]), "ditrt_num_classes": (ctypes.c_int, [VP, i64p]),
            "ditrt_num_steps": (ctypes.c_int, [VP, VP, i64p]), "ditrt_has_network": (ctypes.c_int, [VP, cp]),
            "ditrt_label_of": (ctypes.c_int, [VP, cp, i64p]),
            "ditrt_image_shape": (ctypes.c_int, [VP, i64p]),
            "ditrt_graph_file": (ctypes.c_int, [VP, cp, cp, cp, ctypes.c_size_t]),
            "ditrt_sample": (ctypes.c_int, [VP, i64p, I64, VP, f32p, I64]),
            "ditrt_decode": (ctypes.c_int, [VP, f32p, I64, f32p, I64]),
            "ditrt_images_to_uint8": (ctypes.c_int, [f32p, I64, I64, I64, U8P, I64]),
            "ditrt_grid_shape": (ctypes.c_int, [I64, I64, I64, I64, I64, i64p]),
            "ditrt_images_grid": (ctypes.c_int, [f32p, I64, I64, I64, I64, I64, U8P, I64]),
            "ditrt_png_encode": (ctypes.c_int, [U8P, I64, I64, I64, ctypes.POINTER(U8P), i64p]),
            "ditrt_png_write": (ctypes.c_int, [cp, U8P, I64, I64, I64]), "ditrt_free": (None, [VP]),
            "ditrt_noise_version": (cp, []), "ditrt_noise_normal": (ctypes.c_int, [ctypes.c_uint64, ctypes.c_uint64,
                                                                                  ctypes.c_uint64, f32p, I64]),
        }
        for name, (res, args) in protos.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def error(self) -> str:
        return self.lib.ditrt_last_error().decode()

    def images_to_uint8(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        images = np.ascontiguousarray(images, np.float32)
        n, _, h, w = images.shape
        out = np.zeros((n, h, w, 3), np.uint8)
        status = self.lib.ditrt_images_to_uint8(_f32(images), n, h, w, out.ctypes.data_as(U8P), out.size)
        return status, out

    def grid(self, images: np.ndarray) -> tuple[int, np.ndarray]:
        images = np.ascontiguousarray(images, np.float32)
        n, _, h, w = images.shape
        hw = (I64 * 2)()
        assert self.lib.ditrt_grid_shape(n, h, w, 4, 2, hw) == OK, self.error()
        out = np.zeros((hw[0], hw[1], 3), np.uint8)
        status = self.lib.ditrt_images_grid(_f32(images), n, h, w, 4, 2, out.ctypes.data_as(U8P), out.size)
        return status, out

    def png_write(self, path: Path, pixels: np.ndarray) -> int:
        pixels = np.ascontiguousarray(pixels, np.uint8)
        return self.lib.ditrt_png_write(str(path).encode(), pixels.ctypes.data_as(U8P), pixels.shape[0], pixels.shape[1],
                                        pixels.shape[2] if pixels.ndim == 3 else 1)


def _f32(a: np.ndarray | None):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if a is not None else None


class OrtExecutor:
    """The one callback: every network of the artifact, its exported fp32 graph in ONNX Runtime, on
    the host tensors ditrt passes by name. Exceptions must not escape into C (ctypes would print
    them and return 0), so they become status 1."""

    def __init__(self):
        self.sessions, self.calls, self.failure = {}, [], None
        self.poison = None  # a value written into the denoiser's output (NaN tests)
        self.inside = None  # a function run inside the callback (re-entrancy tests)
        self.c_function = RUN(self._call)

    def _call(self, user, network, inputs, num_inputs, outputs, num_outputs):
        try:
            network = network.decode()
            feeds = {inputs[i].name.decode(): tensor_array(inputs[i]) for i in range(num_inputs)}
            names = [outputs[i].name.decode() for i in range(num_outputs)]
            results = self.sessions[network].run(names, feeds)
            for i in range(num_outputs):
                tensor_array(outputs[i])[...] = results[i]
                if self.poison is not None and network == "denoiser":
                    tensor_array(outputs[i])[0, 0, 0, 0] = self.poison
            self.calls.append((network, int(inputs[0].shape[0])))
            if self.inside:
                self.inside()
            return 0
        except BaseException as e:  # noqa: BLE001 - reported by the test, never across the ABI
            self.failure = e
            return 1

    def rows(self, network="denoiser") -> list[int]:
        return [rows for net, rows in self.calls if net == network]


class CppPipeline:
    def __init__(self, lib: Lib, artifact: Path, max_batch: int = 0, flags: int = 0):
        import onnxruntime as ort
        self.lib, self.artifact = lib, artifact
        self.executor_callback = OrtExecutor()
        self.executor, self.pipe = VP(), VP()
        assert lib.lib.ditrt_executor_create_callback(self.executor_callback.c_function, None, max_batch,
                                                      ctypes.byref(self.executor)) == OK, lib.error()
        assert lib.lib.ditrt_open(str(artifact).encode(), self.executor, flags, ctypes.byref(self.pipe)) == OK, lib.error()
        shape = (I64 * 3)()
        assert lib.lib.ditrt_latent_shape(self.pipe, shape) == OK
        self.shape = tuple(shape)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        for network in ("denoiser", "decoder"):
            if lib.lib.ditrt_has_network(self.pipe, network.encode()):
                path = ctypes.create_string_buffer(4096)
                # The graph path comes from C++, checked against the manifest's sha256 there.
                assert lib.lib.ditrt_graph_file(self.pipe, network.encode(), b"fp32", path, 4096) == OK, lib.error()
                self.executor_callback.sessions[network] = ort.InferenceSession(path.value.decode(), options,
                                                                               providers=["CPUExecutionProvider"])

    def options(self, noise=None, progress=None, **settings):
        """A ditrt_options handle (the caller releases it) with these keys (None: unset)."""
        handle = VP()
        assert self.lib.lib.ditrt_options_create(ctypes.byref(handle)) == OK
        for key, value in settings.items():
            if value is not None:
                status = self.lib.lib.ditrt_options_set(handle, key.encode(), str(value).encode())
                assert status == OK, (key, value, self.lib.error())
        if noise is not None:
            initial, step = noise
            assert self.lib.lib.ditrt_options_set_noise(handle, _f32(initial), initial.size, _f32(step),
                                                        0 if step is None else step.size) == OK, self.lib.error()
        if progress is not None:
            assert self.lib.lib.ditrt_options_set_progress(handle, progress, None) == OK
        return handle

    def sample(self, labels, noise=None, progress=None, capacity=None, **settings):
        """(status, latents): latents NaN-filled where not written."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if noise is not None:
            noise = tuple(None if a is None else np.ascontiguousarray(a, dtype=np.float32) for a in noise)
        out = np.full((max(len(labels), 1), *self.shape), np.nan, np.float32)
        options = self.options(noise, progress, **settings)
        try:
            status = self.lib.lib.ditrt_sample(self.pipe, labels.ctypes.data_as(ctypes.POINTER(I64)), len(labels), options,
                                               _f32(out), out.size if capacity is None else capacity)
        finally:
            self.lib.lib.ditrt_options_release(options)
        return status, out

    def num_steps(self, **settings) -> int:
        options, k = self.options(**settings), I64()
        try:
            assert self.lib.lib.ditrt_num_steps(self.pipe, options, ctypes.byref(k)) == OK, self.lib.error()
        finally:
            self.lib.lib.ditrt_options_release(options)
        return k.value

    def decode(self, latents: np.ndarray) -> tuple[int, np.ndarray]:
        latents = np.ascontiguousarray(latents, np.float32)
        shape = (I64 * 3)()
        assert self.lib.lib.ditrt_image_shape(self.pipe, shape) == OK, self.lib.error()
        images = np.full((len(latents), *shape), np.nan, np.float32)
        return self.lib.lib.ditrt_decode(self.pipe, _f32(latents), len(latents), _f32(images), images.size), images

    def close(self):
        self.lib.lib.ditrt_close(self.pipe)
        self.lib.lib.ditrt_executor_release(self.executor)


def opened_pipeline(lib: Lib, artifact: Path, **kwargs):
    """A fixture's body: a CppPipeline over the artifact, closed after its last test."""
    pipe = CppPipeline(lib, artifact, **kwargs)
    yield pipe
    pipe.close()


def python_fp32(artifact: Path):
    """The Python runtime over the artifact's fp32 graphs in ONNX Runtime (what the C++ loops must equal)."""
    from ditrt import runtime
    return runtime.load(artifact, backend="onnxruntime", precision="fp32", decoder_precision="fp32")
