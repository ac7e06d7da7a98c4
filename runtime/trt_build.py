"""`ditrt build`: an fp16 TensorRT plan from the artifact's fp16 ONNX graph.

TensorRT 11 has no fp16 builder flag: every network is strongly typed, precision comes from the
graph's tensor types. So the plan is built from `denoiser.fp16.onnx` (fp16 weights and
activations, the timestep sinusoid and LayerNormalization statistics in fp32) with a
STRONGLY_TYPED network, through Polygraphy: one optimisation profile over the batch axis (engine
rows, see runtime/trt_plan.py), a persistent timing cache, optional portability flags. Right
after the build the plan is run through the runtime's own TensorRT backend and compared with
ONNX Runtime on the fp32 graph; only a plan that passes is renamed into place and recorded in
the manifest's `engines`.

No torch here (the build runs where only the runtime is installed); tensorrt and polygraphy are
imported inside the functions that use them.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__ as _version
from .backends import OnnxRuntimeBackend, onnxruntime_device
from .manifest import Manifest, ModelSpec, load_manifest
from .parity import compare
from .trt_plan import (FP16_PARITY_BOUND, BuildFlags, EngineProfile, TensorRTUnavailable, engine_entry,
                              parity_batches, plan_filename, timing_cache_filename)

__all__ = ["BuildError", "TensorRTUnavailable", "build_engine", "config_kwargs", "engine_loader", "require_toolchain"]


class BuildError(RuntimeError):
    """TensorRT could not build the plan, or the plan failed its parity check: nothing was recorded."""


def require_toolchain():
    """The tensorrt module, after checking that Polygraphy and cuda-python import too;
    TensorRTUnavailable (with the install hint) otherwise."""
    from .tensorrt import import_cudart, import_tensorrt
    trt = import_tensorrt()
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailable(f"Polygraphy is not installed (import polygraphy.backend.trt: {e})") from None
    import_cudart()
    return trt


def config_kwargs(profile: EngineProfile, flags: BuildFlags, model: ModelSpec, timing_cache: str | Path, trt) -> dict:
    """Keyword arguments for polygraphy's CreateConfig. `trt` supplies the enums (the tensorrt
    module; unit tests pass a stand-in). No precision flag: the strongly typed network decides."""
    from polygraphy.backend.trt import Profile
    shapes = Profile()
    for name, (low, opt, high) in profile.shapes(model.in_channels, model.input_size).items():
        shapes.add(name, min=low, opt=opt, max=high)
    levels = {"none": None,  # TensorRT's default: the plan runs on the GPU type that built it
              "ampere+": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
              "same-cc": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}
    kwargs = {"profiles": [shapes], "builder_optimization_level": flags.opt_level,
              "load_timing_cache": str(timing_cache), "hardware_compatibility_level": levels[flags.hardware_compat],
              "version_compatible": flags.version_compatible}
    if flags.workspace_bytes is not None:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: flags.workspace_bytes}
    return kwargs


def engine_loader(onnx_path: str | Path, profile: EngineProfile, flags: BuildFlags, model: ModelSpec,
                  timing_cache: str | Path, trt):
    """Polygraphy's lazy loader chain, ONNX file -> strongly typed network -> serialised plan;
    calling it builds (and merges the new timings into the timing cache file)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(**config_kwargs(profile, flags, model, timing_cache, trt))
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))


def build_engine(artifact_dir: str | Path, profile: EngineProfile = EngineProfile(), flags: BuildFlags = BuildFlags(),
                 log: Callable[[str], None] = print) -> dict:
    """Build, parity-check and record one plan; returns its manifest entry. Raises ArtifactError
    (bad artifact), TensorRTUnavailable (no TensorRT / GPU) or BuildError."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    graph = manifest.graph("fp16")  # ArtifactError naming the re-export when the artifact has no fp16 graph
    manifest.verify_files("fp16")
    trt = require_toolchain()
    from .tensorrt import environment
    env = environment()
    name = plan_filename(env.gpu.sm, env.trt_version, flags.hardware_compat, flags.version_compatible)
    timing_cache = Path(flags.timing_cache) if flags.timing_cache else artifact_dir / timing_cache_filename(env.gpu.sm, env.trt_version)
    log(f"building {name} from {graph['file']} (strongly typed) on {env.gpu.name} (compute capability "
        f"{env.gpu.compute_capability[0]}.{env.gpu.compute_capability[1]}), TensorRT {env.trt_version}: engine rows "
        f"{profile.min_rows}/{profile.opt_rows}/{profile.max_rows} ({profile.images_per_call(True)} guided images per "
        f"call), opt level {flags.opt_level}, timing cache {timing_cache}")
    loader = engine_loader(manifest.graph_path("fp16"), profile, flags, manifest.model, timing_cache, trt)
    start = time.perf_counter()
    try:
        plan = loader()
    except Exception as e:  # Polygraphy raises after TensorRT logged the real cause
        raise BuildError(f"TensorRT could not build {name} from {graph['file']}: {e} (TensorRT's log above has "
                         "the cause)") from e
    seconds = time.perf_counter() - start
    log(f"built in {seconds:.1f} s")

    tmp = _write_temp(artifact_dir, name, plan)
    try:
        import polygraphy
        entry = engine_entry(
            file=name, sha256=hashlib.sha256(memoryview(plan)).hexdigest(), size=tmp.stat().st_size,
            trt_version=env.trt_version, gpu_name=env.gpu.name, compute_capability=env.gpu.compute_capability,
            driver_version=env.gpu.driver_version, cuda_driver_version=env.gpu.cuda_driver_version,
            cuda_runtime_version=env.gpu.cuda_runtime_version, profile=profile,
            flags=replace(flags, timing_cache=str(timing_cache)),
            in_channels=manifest.model.in_channels, input_size=manifest.model.input_size, graph=graph,
            build_seconds=seconds, built_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions={"ditrt": _version, "polygraphy": polygraphy.__version__})
        del plan
        entry["parity"] = parity_check(tmp, entry, manifest, profile, log)
        if not entry["parity"]["passed"]:
            raise BuildError(f"{name} failed its parity check against {entry['parity']['reference']}: max rel err "
                             f"{entry['parity']['max_rel_err']:.3g} > {FP16_PARITY_BOUND:g}; not recorded. "
                             f"Keep some blocks fp32 (ditrt export --fp32-blocks) or report the TensorRT version.")
        os.replace(tmp, artifact_dir / name)  # the previous plan of that name stays valid until now
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _record(artifact_dir, entry)
    log(f"wrote {artifact_dir / name} ({entry['bytes'] / 2**20:.1f} MiB); parity vs {entry['parity']['reference']}: "
        f"max rel err {entry['parity']['max_rel_err']:.2e} (bound {FP16_PARITY_BOUND:g})")
    return entry


def _write_temp(directory: Path, name: str, plan) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(plan))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an artifact is meant to be shared
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _record(artifact_dir: Path, entry: dict) -> None:
    """Add the entry, replacing one for the same plan file. The manifest is read again: another
    build (another GPU) may have recorded its plan meanwhile."""
    manifest = load_manifest(artifact_dir)
    manifest.data["engines"] = [e for e in manifest.engines if e.get("file") != entry["file"]] + [entry]
    manifest.save()


def parity_inputs(rows: int, model: ModelSpec, null_class: int, seed: int = 1234):
    """Latents, timesteps spanning 0..999 (the ends included) and labels cycling through the
    classes and the null class."""
    rng = np.random.default_rng([seed, rows])
    latent = rng.standard_normal((rows, model.in_channels, model.input_size, model.input_size), dtype=np.float32)
    timestep = np.linspace(999.0, 0.0, rows, dtype=np.float32) if rows > 1 else np.array([999.0], np.float32)
    labels = np.arange(rows, dtype=np.int64) * 7 % (null_class + 1)
    labels[-1] = null_class
    return latent, timestep, labels


def parity_check(plan_path: Path, entry: dict, manifest: Manifest, profile: EngineProfile,
                 log: Callable[[str], None]) -> dict:
    """The plan, through the runtime's TensorRT backend (plain enqueue, then CUDA graph replay),
    against ONNX Runtime on the fp32 graph (the fp16 graph when the artifact has no fp32 one)."""
    from .tensorrt import TensorRTBackend
    reference_precision = "fp32" if "fp32" in manifest.data["graphs"] else "fp16"
    reference = OnnxRuntimeBackend(manifest.graph_path(reference_precision), onnxruntime_device())
    runs = []
    with TensorRTBackend(plan_path, entry, artifact=str(manifest.directory)) as trt_backend:
        for rows in parity_batches(profile):
            inputs = parity_inputs(rows, manifest.model, manifest.diffusion.null_class)
            expected = reference(*inputs)
            first, replay = trt_backend(*inputs), trt_backend(*inputs)  # the second call replays the CUDA graph
            replay_metrics = compare(replay, expected)
            runs.append({"batch": rows, **compare(first, expected),
                         "graph_replay_max_rel_err": replay_metrics["max_rel_err"],
                         "graph_replay_max_abs_diff": float(np.abs(replay - first).max()),
                         "cuda_graph": trt_backend.graph_failures.get(rows, "captured")})
            log(f"  parity at {rows} rows: max rel err {runs[-1]['max_rel_err']:.2e}, cosine {runs[-1]['cosine']:.6f}, "
                f"CUDA graph {runs[-1]['cuda_graph']}")
    worst = max(max(r["max_rel_err"], r["graph_replay_max_rel_err"]) for r in runs)
    return {"reference": f"{reference.name} on denoiser.{reference_precision}.onnx", "metric": "max_rel_err",
            "max_rel_err": worst, "bound": FP16_PARITY_BOUND, "passed": bool(worst <= FP16_PARITY_BOUND), "runs": runs}
