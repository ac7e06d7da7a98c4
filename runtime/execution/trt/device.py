"""This machine's TensorRT and GPU: importing tensorrt and cuda-python (lazily: every CPU path works
without them), CUDA runtime calls that raise on error, and the GPU / driver / TensorRT versions a
plan is matched against."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...core.errors import BackendError, TensorRTUnavailable
from ...artifact.versions import sm_name

def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: bindings present, libnvinfer missing
        raise TensorRTUnavailable(f"TensorRT is not installed (import tensorrt: {e})") from None
    return trt

def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8 (the cuda-bindings package)
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TensorRTUnavailable(f"cuda-python is not installed (import cuda.bindings.runtime: {e})") from None
    return cudart

class CudaError(BackendError):
    pass

class Cuda:
    """cuda-python's runtime calls return (error, *values): this raises on error instead."""

    def __init__(self):
        self.rt = import_cudart()

    def __call__(self, function: str, *args):
        error, *values = getattr(self.rt, function)(*args)
        if int(error) != 0:
            raise CudaError(f"{function} failed: {self.error_name(error)}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def error_name(self, error) -> str:
        name = self.rt.cudaGetErrorName(error)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    driver_version: str | None  # the NVIDIA driver, e.g. "580.65.06" (Linux: /proc/driver/nvidia/version)
    cuda_driver_version: str  # newest CUDA the driver supports, e.g. "13.0"
    cuda_runtime_version: str  # the CUDA runtime cuda-python links, e.g. "13.0"

    @property
    def sm(self) -> str:
        return sm_name(self.compute_capability)

def gpu_info() -> GpuInfo:
    """The current CUDA device; TensorRTUnavailable when cuda-python or a usable GPU is missing."""
    cuda = Cuda()
    try:
        count = cuda("cudaGetDeviceCount")
    except CudaError as e:
        raise TensorRTUnavailable(f"no usable NVIDIA GPU ({e})") from None
    if not count:
        raise TensorRTUnavailable("no NVIDIA GPU found")
    prop = cuda("cudaGetDeviceProperties", cuda("cudaGetDevice"))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.rstrip("\0").strip(), (int(prop.major), int(prop.minor)), _nvidia_driver_version(),
                   _cuda_version(cuda("cudaDriverGetVersion")), _cuda_version(cuda("cudaRuntimeGetVersion")))

def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA encodes 13.0 as 13000

def _nvidia_driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  <date>"
    return next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)

@dataclass(frozen=True)
class Environment:
    trt_version: str
    gpu: GpuInfo

def environment() -> Environment:
    """TensorRT's version and the GPU; TensorRTUnavailable (with the install hint) otherwise."""
    trt = import_tensorrt()
    return Environment(trt.__version__, gpu_info())
