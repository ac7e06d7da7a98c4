"""Backends run one network: `backend(feeds) -> outputs`, named numpy tensors in and out (the
network's spec says which). One registry, `BACKENDS`, names them for `runtime.load`, `ditrt
parity`, the CLI and the benches: `<kind>-<precision>`, e.g. `onnxruntime-fp32`,
`onnxruntime-fp16`, `tensorrt-fp16`, `torch-fp32` (a kind alone takes its default precision).

The protocol and the one chunker (`run_chunked`) live in chunking.py.

Backend kinds that live outside the runtime register through the `ditrt.backends` entry-point
group (the exporter's `torch` kind does: the runtime never imports the exporter); they are loaded
the first time the registry is read.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .chunking import Backend, BackendBase, check_max_batch
from ..core.errors import ArtifactError, BackendError, InputError
from ..artifact.manifest import PRECISIONS
from ..spec.networks import NetworkSpec
from ..core.validate import check_int


# ---- ONNX Runtime -------------------------------------------------------------------------------

class _Bound:
    """One row count's IOBinding with its OrtValues, allocated once on the device and reused by
    every call of that size: the inputs are copied into them in place, the outputs written there."""

    def __init__(self, ort, session, network: NetworkSpec, rows: int, device: str, device_id: int,
                 graph_id: int | None = None):
        self.binding = session.io_binding()
        self.run_options = None
        if graph_id is not None:  # ONNX Runtime captures one CUDA graph per id, replayed on these buffers
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.inputs, self.outputs = {}, []
        for spec in network.inputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(spec.concrete(rows), spec.numpy_dtype, device, device_id)
            self.binding.bind_ortvalue_input(spec.name, value)
            self.inputs[spec.name] = value
        for spec in network.outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(spec.concrete(rows), spec.numpy_dtype, device, device_id)
            self.binding.bind_ortvalue_output(spec.name, value)
            self.outputs.append(value)


class OnnxRuntimeBackend(BackendBase):
    """ONNX Runtime on the CPU EP, or the CUDA EP with IOBinding where onnxruntime-gpu is installed
    (it replaces the onnxruntime package; never install both). With IOBinding (`io_binding`, on by
    default for CUDA), each row count's device buffers are allocated once and reused by every call
    of that size (`_Bound`): a call copies its inputs in and its outputs out, nothing else."""

    def __init__(self, model_path: str | Path, network: NetworkSpec, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, max_batch: int | None = None, device_id: int = 0,
                 io_binding: bool | None = None, cuda_graph: bool = False):
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise InputError(f"unknown ONNX Runtime device {device!r}; use cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("ONNX Runtime has no CUDA execution provider here: install onnxruntime-gpu "
                               "(pip uninstall onnxruntime && pip install 'ditrt[gpu]')")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = check_threads(threads)
        if cuda_graph and device != "cuda":
            raise InputError("cuda_graph needs the CUDA EP (device 'cuda', onnxruntime-gpu)")
        providers = ([("CUDAExecutionProvider", cuda_provider_options(device_id, cuda_graph)), "CPUExecutionProvider"]
                     if device == "cuda" else ["CPUExecutionProvider"])
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # ORT's own exception types (Fail, InvalidGraph, ...) carry the reason
            raise ArtifactError(f"ONNX Runtime cannot load {model_path}: {_ort_reason(e)}") from None
        super().__init__(network, "onnxruntime", precision, max_batch)
        self.path = Path(model_path)
        self.device, self.device_id = device, device_id
        self._ort = ort
        self.io_binding = device == "cuda" if io_binding is None else bool(io_binding)
        if cuda_graph and not self.io_binding:
            raise InputError("cuda_graph replays fixed device buffers: it needs io_binding")
        self.cuda_graph = cuda_graph
        self._bound: dict[int, _Bound] = {}
        self._bound_lock = threading.Lock()  # one call at a time uses a row count's buffers

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if not self.io_binding:
                return dict(zip(self.network.output_names, self.session.run(list(self.network.output_names), feeds)))
            return self._run_bound(feeds)
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed running {self.path.name}: {_ort_reason(e)}") from None

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(feeds.values())))
        with self._bound_lock:
            bound = self._bound.get(rows)
            if bound is None:
                graph_id = len(self._bound) if self.cuda_graph else None  # one graph per row count
                bound = self._bound[rows] = _Bound(self._ort, self.session, self.network, rows, self.device,
                                                   self.device_id, graph_id)
            for name, value in bound.inputs.items():
                value.update_inplace(np.ascontiguousarray(feeds[name]))
            self.session.run_with_iobinding(bound.binding, bound.run_options)
            # a CPU OrtValue's numpy() is a view of the buffer the next call overwrites: copy it out
            return {name: np.array(value.numpy(), copy=True) if self.device == "cpu" else value.numpy()
                    for name, value in zip(self.network.output_names, bound.outputs)}


def cuda_provider_options(device_id: int, cuda_graph: bool = False) -> dict:
    """The CUDA EP's options: TF32 off (fp32 parity is the point of the fp32 graph); with
    cuda_graph, ONNX Runtime's CUDA graphs (captured on the first run of each gpu_graph_id)."""
    options = {"use_tf32": 0, "device_id": device_id}
    if cuda_graph:
        options["enable_cuda_graph"] = 1
    return options


def _ort_reason(e: Exception) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def onnxruntime_device() -> str:
    """cuda when onnxruntime-gpu with a usable CUDA EP is installed, else cpu."""
    import onnxruntime as ort
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def check_threads(threads) -> int:
    cores = os.cpu_count() or 1
    return check_int(threads, "threads", 1, 4 * cores, unit=f" (this machine has {cores} cores)")


# ---- the registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendKind:
    name: str
    summary: str
    precisions: tuple[str, ...]
    default_precision: str
    # (manifest, network, precision, options) -> backend; options: threads, max_batch, checkpoint ...
    create: Callable[..., Backend]
    # does a usable engine of this kind exist for this network here (cheap, never raises)?
    available: Callable[..., bool] = lambda manifest, network, precision: True
    # does it read the network's ONNX graph files (those `verify` hashes)? TensorRT reads its plan instead
    reads_graph: bool = False


# ModelOpt writes fp8 QDQ as TensorRT's own ops (trt::TRT_FP8QuantizeLinear): ONNX Runtime cannot load them.
ONNXRUNTIME_REFUSED = {"fp8": "fp8 graphs are for TensorRT (ditrt build --precision fp8): they use TensorRT's "
                              "TRT_FP8QuantizeLinear / TRT_FP8DequantizeLinear ops, which ONNX Runtime does not have; "
                              "use --precision int8 on ONNX Runtime"}


def _onnxruntime(manifest, network: str, precision: str, threads=None, max_batch=None, verify=True, **_) -> Backend:
    if precision in ONNXRUNTIME_REFUSED:
        manifest.graph(network, precision)  # a missing graph is said first
        raise InputError(ONNXRUNTIME_REFUSED[precision])
    path = manifest.graph_path(network, precision)
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    # every file the session reads is listed (graph and external data); with verify, hashed too
    manifest.verify_files(network, precision, hashes=verify)
    return OnnxRuntimeBackend(path, manifest.network(network), precision, onnxruntime_device(), threads, max_batch)


def _tensorrt(manifest, network: str, precision: str, max_batch=None, allow_plan_host_code=False, verify=True,
              **_) -> Backend:
    from .trt.backend import TensorRTBackend
    return TensorRTBackend.from_manifest(manifest, network=network, precision=precision, max_batch=max_batch,
                                         allow_host_code=allow_plan_host_code, verify=verify)


def _tensorrt_available(manifest, network: str, precision: str) -> bool:
    from .trt.compat import compatible_engine
    return compatible_engine(manifest, network, precision) is not None


class _Registry(Mapping):
    """BACKENDS: the built-in kinds, plus the `ditrt.backends` entry points, loaded on first read."""

    def __init__(self):
        self._kinds: dict[str, BackendKind] = {}
        self._plugins_loaded = False

    def register(self, kind: BackendKind) -> None:
        self._kinds[kind.name] = kind

    def _all(self) -> dict[str, BackendKind]:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            from importlib.metadata import entry_points
            for point in entry_points(group="ditrt.backends"):
                if point.name not in self._kinds:
                    try:
                        self.register(point.load())
                    except Exception as e:  # a broken plugin must not take the runtime down
                        import logging
                        logging.getLogger("ditrt").warning("backend plugin %s failed to load: %s", point.name, e)
        return self._kinds

    def __getitem__(self, name: str) -> BackendKind:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


BACKENDS: Mapping[str, BackendKind] = _Registry()


def register_backend(kind: BackendKind) -> None:
    BACKENDS.register(kind)


register_backend(BackendKind("onnxruntime", "ONNX Runtime (CUDA EP with onnxruntime-gpu, else CPU)",
                             ("fp32", "fp16", "int8", "fp8"), "fp32", _onnxruntime, reads_graph=True))
register_backend(BackendKind("tensorrt", "TensorRT plans built by ditrt build", ("fp16", "fp32", "int8", "fp8"), "fp16",
                             _tensorrt, _tensorrt_available))


def parse_backend(text: str) -> tuple[BackendKind, str | None]:
    """'onnxruntime-fp16' -> (onnxruntime, 'fp16'); 'tensorrt' -> (tensorrt, None)."""
    name, _, precision = str(text).strip().partition("-")
    if name not in BACKENDS:
        raise InputError(f"unknown backend {text!r}; use auto or one of {', '.join(backend_ids())}")
    kind = BACKENDS[name]
    if precision and precision not in kind.precisions:
        raise InputError(f"backend {name} runs {', '.join(kind.precisions)} graphs, not {precision!r}")
    return kind, precision or None


def backend_ids() -> list[str]:
    return [f"{k.name}-{p}" for k in BACKENDS.values() for p in k.precisions]


def create_backend(manifest, backend: str = "auto", precision: str | None = None, network: str = "denoiser",
                   **options) -> Backend:
    """One backend for one network of an artifact. backend "auto": TensorRT when a plan compatible
    with this GPU and TensorRT exists for the network, else ONNX Runtime (fp32 unless asked)."""
    kind, precision = resolve_backend(manifest, backend, precision, network)
    if options.get("allow_plan_host_code") and backend != "auto" and kind.name != "tensorrt":
        raise InputError(f"allow_plan_host_code (--allow-plan-host-code) applies to TensorRT plans; backend {backend} "
                         "runs none (use --backend tensorrt or auto)")
    return kind.create(manifest, network, precision, **options)


def resolve_backend(manifest, backend: str = "auto", precision: str | None = None,
                    network: str = "denoiser") -> tuple[BackendKind, str]:
    """The kind and precision create_backend opens for these arguments, without opening it."""
    manifest.network(network)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if backend == "auto":
        trt = BACKENDS["tensorrt"]
        use_trt = trt.available(manifest, network, precision or trt.default_precision)
        kind, chosen = (trt if use_trt else BACKENDS["onnxruntime"]), None
    else:
        kind, chosen = parse_backend(backend)
    if chosen and precision and chosen != precision:
        raise InputError(f"backend {backend} and precision {precision} disagree")
    if not (chosen or precision):  # the kind's default, or what the artifact has (an fp16-only export)
        have = manifest.precisions(network)
        precision = kind.default_precision if kind.default_precision in have or not have else have[0]
    precision = chosen or precision
    if precision not in kind.precisions:
        raise InputError(f"backend {kind.name} runs {', '.join(kind.precisions)} graphs, not {precision}")
    return kind, precision
