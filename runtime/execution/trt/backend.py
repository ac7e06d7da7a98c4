"""The TensorRT backend: plans built by `ditrt build`, run with static device buffers,
`execute_async_v3` on the backend's own stream and a CUDA graph per static batch size.

tensorrt and cuda-python (its CUDA runtime bindings) are imported when a backend is made (device.py):
`import ditrt.runtime` and every CPU path work without them.

TensorRT objects are held in names the API check in tests/test_trt_logic.py knows (`engine`,
`context`, `trt_runtime`, optionally with a leading underscore, as a name or an attribute), and the
module is always called `trt`: the check verifies every attribute used on them against TRT 11.4.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..chunking import BackendBase, check_max_batch, run_chunked
from ...core.errors import ArtifactError, BackendError, InputError, TensorRTUnavailable
from ...core.files import artifact_path, sha256_file
from ...artifact.manifest import Manifest
from ...spec.networks import NetworkSpec
from . import compat, device
from .settings import BuildFlags, EngineProfile, build_command, default_profile

log = logging.getLogger("ditrt.tensorrt")
MAX_CACHED_BATCHES = 4  # static batch sizes kept (buffers + CUDA graph); a sampling run uses 1 or 2

def _capturing_logger(trt):
    """A trt.ILogger that keeps errors (a null engine comes with no other explanation) and passes
    everything to Python logging."""

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()

@dataclass
class _Slot:
    """One static batch size: its execution context, pinned host and device buffers, and CUDA graph."""
    rows: int
    context: Any
    host: dict[str, np.ndarray] = field(default_factory=dict)
    host_ptr: dict[str, int] = field(default_factory=dict)
    device_ptr: dict[str, int] = field(default_factory=dict)
    graph: Any = None
    graph_exec: Any = None
    runs: int = 0

class TensorRTBackend(BackendBase):
    """The runtime's backend protocol (named numpy tensors in and out) over a TensorRT plan of one
    network. `entry` is the plan's manifest entry: its sha256 is checked before deserialising."""

    def __init__(self, plan: str | Path, network: NetworkSpec, entry: dict | None = None,
                 max_batch: int | None = None, cuda_graphs: bool = True, artifact: str | None = None,
                 allow_host_code: bool = False, verify: bool = True):
        plan = Path(plan)
        view = compat.read_entry(entry) if entry else None
        self.network = network
        self.rebuild_hint = (build_command(artifact or str(plan.parent), view.profile, view.flags, view.network,
                                           view.precision) if view
                             else f"ditrt build {artifact or plan.parent} --network {network.name}")
        trt = self._trt = device.import_tensorrt()
        self._cuda = device.Cuda()
        self.gpu = device.gpu_info()  # before trt.Runtime: a Runtime made without a usable driver crashes on first use
        try:
            verified = bool(entry) and verify and sha256_file(plan) == entry.get("sha256")
            if entry and verify and not verified:
                raise ArtifactError(f"{plan} does not match its sha256 in the manifest (corrupt or replaced); "
                                    f"rebuild it with: {self.rebuild_hint}")
            data = plan.read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read TensorRT plan {plan}: {e}; rebuild it with: {self.rebuild_hint}") from None
        self._trt_logger = _capturing_logger(trt)
        self._trt_runtime = trt.Runtime(self._trt_logger)
        if self._trt_logger.errors:
            raise TensorRTUnavailable("TensorRT cannot start on this GPU: " + "; ".join(self._trt_logger.errors))
        if view and view.flags.version_compatible:
            # The plan embeds TensorRT's lean runtime (host code that runs in this process): only for
            # a plan whose sha256 matched its entry (above), and only when the caller trusts it.
            if not (allow_host_code and verified):
                raise ArtifactError(f"{plan} is a version-compatible plan: running it executes host code embedded in "
                                    "the plan. Allow it explicitly for plans you built or trust "
                                    "(allow_host_code=True, --allow-plan-host-code; only with sha256 verification "
                                    "on), or rebuild without --version-compatible")
            self._trt_runtime.engine_host_code_allowed = True
        self._engine = self._trt_runtime.deserialize_cuda_engine(data)
        del data
        if self._engine is None:
            raise ArtifactError(compat.null_engine_message(str(plan), self._trt_logger.errors, self.rebuild_hint))
        self._dtypes, self._dims = self._read_io(plan)
        bounds = self._engine.get_tensor_profile_shape(network.input_names[0], 0)  # [min, opt, max] of profile 0
        self.profile = EngineProfile(int(bounds[0][0]), int(bounds[1][0]), int(bounds[2][0]))
        super().__init__(network, "tensorrt", view.precision if view else "fp16", self._max_batch(max_batch),
                         self.profile.min_rows)
        self.cuda_graphs = cuda_graphs
        self.graph_failures: dict[int, str] = {}  # batch rows -> why capture failed (those run without a graph)
        self.plan, self.entry = plan, entry
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._stream = self._cuda("cudaStreamCreateWithFlags", self._cuda.rt.cudaStreamNonBlocking)
        # One scratch allocation shared by the per-batch contexts: calls are serialised on one stream.
        self._scratch_bytes = max(int(self._engine.device_memory_size_v2), 256)
        self._scratch = self._cuda("cudaMalloc", self._scratch_bytes)

    @classmethod
    def from_manifest(cls, manifest: Manifest, network: str = "denoiser", precision: str = "fp16",
                      max_batch: int | None = None, **kwargs) -> "TensorRTBackend":
        spec = manifest.network(network)
        env = device.environment()
        entry, reasons = compat.choose_for(manifest, env, network, precision)
        if entry is None:
            default = build_command(str(manifest.directory), default_profile(spec), BuildFlags(), network, precision)
            raise ArtifactError(compat.no_engine_message(str(manifest.directory), manifest.engines_for(network), reasons,
                                                  env.trt_version, env.gpu.compute_capability, env.gpu.name, default))
        plan = artifact_path(manifest.directory, entry["file"], "engines[].file")
        return cls(plan, spec, entry, max_batch=max_batch, artifact=str(manifest.directory), **kwargs)

    # ---- set-up -----------------------------------------------------------------------------------

    def _read_io(self, plan: Path) -> tuple[dict[str, np.dtype], dict[str, tuple[int, ...]]]:
        trt, engine = self._trt, self._engine
        numpy_of = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16,
                    trt.DataType.INT64: np.int64, trt.DataType.INT32: np.int32}
        dtypes, dims, inputs = {}, {}, set()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.add(name)
            dtype = engine.get_tensor_dtype(name)
            if dtype not in numpy_of:
                raise ArtifactError(f"{plan}: tensor {name} has unsupported type {dtype}; rebuild it with: {self.rebuild_hint}")
            dtypes[name] = np.dtype(numpy_of[dtype])
            dims[name] = tuple(int(d) for d in engine.get_tensor_shape(name))[1:]  # batch axis first, dynamic
        spec = self.network
        if inputs != set(spec.input_names) or set(dtypes) != {*spec.input_names, *spec.output_names}:
            raise ArtifactError(f"{plan} has inputs {sorted(inputs)} and tensors {sorted(dtypes)}; the {spec.name} "
                                f"takes {list(spec.input_names)} and returns {list(spec.output_names)}: rebuild it "
                                f"with: {self.rebuild_hint}")
        return dtypes, dims

    def _max_batch(self, requested: int | None) -> int:
        requested = check_max_batch(requested)
        if requested is None:
            return self.profile.max_rows
        if requested < self.profile.min_rows:
            raise InputError(f"max_batch {requested} is below the engine profile's minimum of {self.profile.min_rows} "
                             f"rows; rebuild with a smaller --min-batch")
        if requested > self.profile.max_rows:
            log.info("max_batch %d capped to the engine profile's maximum %d rows", requested, self.profile.max_rows)
        return min(int(requested), self.profile.max_rows)

    def _slot(self, rows: int) -> _Slot:
        slot = self._slots.get(rows)
        if slot is not None:
            self._slots.move_to_end(rows)
            return slot
        while len(self._slots) >= MAX_CACHED_BATCHES:
            self._free_slot(self._slots.popitem(last=False)[1])
        trt = self._trt
        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context: {self._errors()}")
        slot = _Slot(rows, context)
        try:
            self._bind(slot)
        except BaseException:
            self._free_slot(slot)
            raise
        self._slots[rows] = slot
        return slot

    def _bind(self, slot: _Slot) -> None:
        """Scratch memory, input shapes, and a pinned host + a device buffer per tensor."""
        context, rows = slot.context, slot.rows
        # Every context shares this one scratch buffer. That is safe only because calls are serialised:
        # one lock, one stream, and a synchronize at the end of each _run. Overlapping calls would
        # need a scratch buffer (and a stream) per context.
        context.set_device_memory(self._scratch, self._scratch_bytes)
        for name in self.network.input_names:
            if not context.set_input_shape(name, (rows, *self._dims[name])):
                raise BackendError(f"TensorRT rejected shape {(rows, *self._dims[name])} for {name}: {self._errors()}")
        for name in (*self.network.input_names, *self.network.output_names):
            shape = ((rows, *self._dims[name]) if name in self.network.input_names
                     else tuple(context.get_tensor_shape(name)))
            nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
            slot.host_ptr[name] = self._cuda("cudaMallocHost", nbytes)  # pinned: truly async copies
            slot.device_ptr[name] = self._cuda("cudaMalloc", nbytes)
            slot.host[name] = np.frombuffer((ctypes.c_char * nbytes).from_address(slot.host_ptr[name]),
                                            dtype=self._dtypes[name]).reshape(shape)
            if not context.set_tensor_address(name, slot.device_ptr[name]):
                raise BackendError(f"TensorRT rejected the address of {name}: {self._errors()}")

    def _errors(self) -> str:
        """TensorRT's latest logged errors, for messages."""
        return "; ".join(self._trt_logger.errors[-5:]) or "TensorRT logged no error"

    def _capture(self, slot: _Slot) -> None:
        """Record the slot's execute_async_v3 into a CUDA graph. TensorRT needs one plain enqueue
        after a shape change before capture: the slot's first run is that one."""
        rt = self._cuda.rt
        self._cuda("cudaStreamBeginCapture", self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueued = slot.context.execute_async_v3(int(self._stream))
        except Exception as e:
            enqueued = f"False ({e})"
        error, graph = rt.cudaStreamEndCapture(self._stream)  # always end capture, also after a failure
        if enqueued is not True or int(error) != 0:
            if graph is not None and int(error) == 0:
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()  # capture errors are not sticky: clear it
            raise device.CudaError(f"capture failed ({self._cuda.error_name(error)}, enqueue ok: {enqueued})")
        try:
            slot.graph_exec = self._cuda("cudaGraphInstantiate", graph, 0)
        except device.CudaError:
            rt.cudaGraphDestroy(graph)
            raise
        slot.graph = graph

    # ---- running ----------------------------------------------------------------------------------

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Against the engine's own dimensions (what it was built for)."""
        n = len(next(iter(feeds.values())))
        for name in self.network.input_names:
            want = (n, *self._dims[name])
            if name not in feeds or np.shape(feeds[name]) != want:
                raise InputError(f"{name} has shape {np.shape(feeds.get(name))}; this engine takes {want}")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(feeds.values())))
        if not self.min_batch <= n <= self.max_batch:
            return run_chunked(self, feeds)  # the one chunker: calls back with in-profile batches
        with self._lock:
            return self._run(feeds, n)

    def _run(self, feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        if self._engine is None:
            raise BackendError("this TensorRT backend is closed")
        slot = self._slot(rows)
        h2d, d2h = self._cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.network.input_names:
            host = slot.host[name]
            np.copyto(host, feeds[name], casting="unsafe")  # e.g. float64 timesteps -> the engine's float32
            self._cuda("cudaMemcpyAsync", slot.device_ptr[name], slot.host_ptr[name], host.nbytes, h2d, self._stream)
        if slot.graph_exec is not None:
            self._cuda("cudaGraphLaunch", slot.graph_exec, self._stream)
        elif not slot.context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT execution failed: {self._errors()}")
        results = {}
        for name in self.network.output_names:
            out = slot.host[name]
            self._cuda("cudaMemcpyAsync", slot.host_ptr[name], slot.device_ptr[name], out.nbytes, d2h, self._stream)
        self._cuda("cudaStreamSynchronize", self._stream)
        for name in self.network.output_names:  # pinned buffers are reused: never hand them out
            results[name] = slot.host[name].astype(np.float32, copy=True)
        slot.runs += 1
        if slot.runs == 1 and self.cuda_graphs:
            try:
                self._capture(slot)
            except Exception as e:  # some engines are not capturable: run those without a graph
                self.graph_failures[rows] = str(e)
                log.warning("CUDA graph capture failed at %d rows (%s); running without a graph", rows, e)
        return results

    # ---- teardown ---------------------------------------------------------------------------------

    def _free_slot(self, slot: _Slot) -> None:
        rt = self._cuda.rt
        if slot.graph_exec is not None:
            rt.cudaGraphExecDestroy(slot.graph_exec)
        if slot.graph is not None:
            rt.cudaGraphDestroy(slot.graph)
        slot.graph = slot.graph_exec = None
        slot.context = None  # before its buffers: the context must not outlive them
        for ptr in slot.host_ptr.values():
            rt.cudaFreeHost(ptr)
        for ptr in slot.device_ptr.values():
            rt.cudaFree(ptr)
        slot.host.clear()
        slot.host_ptr.clear()
        slot.device_ptr.clear()

    def close(self) -> None:
        """Free device memory now (also done when the backend is garbage-collected). Safe on a
        half-initialised backend: the engine is always released before its runtime."""
        with getattr(self, "_lock", None) or contextlib.nullcontext():
            stream = getattr(self, "_stream", None)
            if stream is not None:
                self._cuda.rt.cudaStreamSynchronize(stream)  # nothing may still be using the buffers
            slots = getattr(self, "_slots", {})
            while slots:
                self._free_slot(slots.popitem()[1])
            if getattr(self, "_scratch", None) is not None:
                self._cuda.rt.cudaFree(self._scratch)
                self._scratch = None
            if stream is not None:
                self._cuda.rt.cudaStreamDestroy(stream)
                self._stream = None
            self._engine = None  # contexts (above), then the engine, then its runtime
            self._trt_runtime = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
