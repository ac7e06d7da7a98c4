"""`ditrt build`: TensorRT plans from an artifact's ONNX graphs, one per network.

TensorRT 11 has no fp16 builder flag: every network is strongly typed, precision comes from the
graph's tensor types. So an fp16 plan is built from `<network>.fp16.onnx` (fp16 weights and
activations, float32 where the graph says so) and an fp32 plan from `<network>.fp32.onnx`, with
a STRONGLY_TYPED network, through Polygraphy: one optimisation profile over the batch axis (in
the network's batch unit, see runtime/execution/trt/settings.py), a persistent timing cache, optional
portability flags. Right after the build the plan is run through the runtime's own TensorRT
backend and compared with ONNX Runtime on the same network's fp32 graph; only a plan that passes
is renamed into place and recorded in the manifest's `engines`.

No torch here (the build runs where only the runtime is installed); tensorrt and polygraphy are
imported inside the functions that use them.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.version import __version__ as _version
from ..execution.backends import OnnxRuntimeBackend, onnxruntime_device
from ..core.errors import InputError, StepError, TensorRTUnavailable
from ..core.files import atomic_output, check_outputs, sha256_file
from ..artifact.manifest import Manifest, engine_entry, load_manifest
from ..spec.networks import NetworkSpec
from .parity import compare
from ..execution.trt import device
from ..execution.trt.settings import (BuildFlags, EngineProfile, default_profile, parity_batches, parity_bound, plan_filename,
                       timing_cache_filename)
from ..artifact.versions import cc_string

class BuildError(StepError):
    """TensorRT could not build the plan, or the plan failed its parity check: nothing was recorded."""


def require_toolchain():
    """The tensorrt module, after checking that Polygraphy and cuda-python import too;
    TensorRTUnavailable (with the install hint) otherwise."""
    trt = device.import_tensorrt()
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailable(f"Polygraphy is not installed (import polygraphy.backend.trt: {e})") from None
    device.import_cudart()
    return trt


def config_kwargs(profile: EngineProfile, flags: BuildFlags, network: NetworkSpec, timing_cache: str | Path, trt) -> dict:
    """Keyword arguments for polygraphy's CreateConfig. `trt` supplies the enums (the tensorrt
    module; unit tests pass a stand-in). No precision flag: the strongly typed network decides."""
    from polygraphy.backend.trt import Profile
    shapes = Profile()
    for name, (low, opt, high) in network.profile_shapes(profile.min_rows, profile.opt_rows, profile.max_rows).items():
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


def engine_loader(onnx_path: str | Path, profile: EngineProfile, flags: BuildFlags, network: NetworkSpec,
                  timing_cache: str | Path, trt):
    """Polygraphy's lazy loader chain, ONNX file -> strongly typed network -> serialised plan;
    calling it builds (and merges the new timings into the timing cache file)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    parsed = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(**config_kwargs(profile, flags, network, timing_cache, trt))
    return EngineBytesFromNetwork(parsed, config=config, save_timing_cache=str(timing_cache))


def build_engine(artifact_dir: str | Path, network: str = "denoiser", precision: str = "fp16",
                 profile: EngineProfile | None = None, flags: BuildFlags = BuildFlags(),
                 log: Callable[[str], None] = print) -> dict:
    """Build, parity-check and record one plan of one network; returns its manifest entry. Raises
    ArtifactError (bad artifact), TensorRTUnavailable (no TensorRT / GPU) or BuildError."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    spec = manifest.network(network)
    profile = profile or default_profile(spec)
    graph = manifest.graph(network, precision)  # ArtifactError naming the re-export when it is missing
    manifest.verify_files(network, precision)
    trt = require_toolchain()
    env = device.environment()
    name = plan_filename(network, precision, env.gpu.sm, env.trt_version, flags.hardware_compat, flags.version_compatible)
    timing_cache = Path(flags.timing_cache) if flags.timing_cache else artifact_dir / timing_cache_filename(env.gpu.sm, env.trt_version)
    log(f"building {name} from {graph['file']} (strongly typed) on {env.gpu.name} (compute capability "
        f"{cc_string(env.gpu.compute_capability)}), TensorRT {env.trt_version}: batch "
        f"{profile.min_rows}/{profile.opt_rows}/{profile.max_rows} {spec.batch_unit}, opt level {flags.opt_level}, "
        f"timing cache {timing_cache}")
    loader = engine_loader(manifest.graph_path(network, precision), profile, flags, spec, timing_cache, trt)
    start = time.perf_counter()
    try:
        plan = loader()
    except Exception as e:  # Polygraphy raises after TensorRT logged the real cause
        raise BuildError(f"TensorRT could not build {name} from {graph['file']}: {e} (TensorRT's log above has "
                         "the cause)") from e
    seconds = time.perf_counter() - start
    log(f"built in {seconds:.1f} s")

    # The plan goes to its final name only after it passed its parity check: until then it sits
    # under a temporary name, and a failure removes it (a previous plan of that name stays valid).
    with atomic_output(artifact_dir / name, durable=True) as f:
        f.write(memoryview(plan))
        f.flush()
        del plan
        import polygraphy
        entry = engine_entry(
            network=spec, precision=precision, file=name, sha256=sha256_file(f.name), size=Path(f.name).stat().st_size,
            trt_version=env.trt_version, gpu_name=env.gpu.name, compute_capability=env.gpu.compute_capability,
            driver_version=env.gpu.driver_version, cuda_driver_version=env.gpu.cuda_driver_version,
            cuda_runtime_version=env.gpu.cuda_runtime_version, profile=profile,
            flags=replace(flags, timing_cache=str(timing_cache)), graph=graph,
            build_seconds=seconds,
            versions={"ditrt": _version, "polygraphy": polygraphy.__version__})
        entry["parity"] = parity_check(Path(f.name), entry, manifest, spec, profile, log)
        if not entry["parity"]["passed"]:
            raise BuildError(f"{name} failed its parity check against {entry['parity']['reference']}: max rel err "
                             f"{entry['parity']['max_rel_err']:.3g} > {entry['parity']['bound']:g}; not recorded. "
                             f"Keep some blocks fp32 (ditrt export --fp32-blocks), build the fp32 graph "
                             f"(--precision fp32) or report the TensorRT version.")
    manifest.record_engine(entry)
    log(f"wrote {artifact_dir / name} ({entry['bytes'] / 2**20:.1f} MiB); parity vs {entry['parity']['reference']}: "
        f"max rel err {entry['parity']['max_rel_err']:.2e} (bound {entry['parity']['bound']:g})")
    return entry


def parity_check(plan_path: Path, entry: dict, manifest: Manifest, spec: NetworkSpec, profile: EngineProfile,
                 log: Callable[[str], None]) -> dict:
    """The plan, through the runtime's TensorRT backend (plain enqueue, then CUDA graph replay),
    against ONNX Runtime on the same network's fp32 graph (its fp16 graph when there is no fp32 one)."""
    from ..execution.trt.backend import TensorRTBackend
    reference_precision = "fp32" if "fp32" in manifest.precisions(spec.name) else "fp16"
    reference_path = manifest.graph_path(spec.name, reference_precision)
    reference = OnnxRuntimeBackend(reference_path, spec, reference_precision, onnxruntime_device())
    output = spec.output_names[0]
    bound = parity_bound(entry["precision"])
    runs = []
    with TensorRTBackend(plan_path, spec, entry, artifact=str(manifest.directory), allow_host_code=True) as plan_backend:
        for rows in parity_batches(profile):
            feeds = spec.example_inputs(rows, seed=1234)
            expected = reference(feeds)[output]
            first, replay = plan_backend(feeds)[output], plan_backend(feeds)[output]  # the second call replays the CUDA graph
            replay_metrics = compare(replay, expected)
            runs.append({"batch": rows, **compare(first, expected),
                         "graph_replay_max_rel_err": replay_metrics["max_rel_err"],
                         "graph_replay_max_abs_diff": float(np.abs(replay - first).max()),
                         "cuda_graph": plan_backend.graph_failures.get(rows, "captured")})
            log(f"  parity at {rows} {spec.batch_unit}: max rel err {runs[-1]['max_rel_err']:.2e}, cosine "
                f"{runs[-1]['cosine']:.6f}, CUDA graph {runs[-1]['cuda_graph']}")
    worst = max(max(r["max_rel_err"], r["graph_replay_max_rel_err"]) for r in runs)
    return {"reference": f"{reference.name} on {reference_path.name}", "metric": "max_rel_err",
            "max_rel_err": worst, "bound": bound, "passed": bool(worst <= bound), "runs": runs}


def quantized_fallback(precision: str, have: list[str]) -> str:
    """The decoder's plan precision under `--precision int8|fp8`: it has no quantized graph (no
    recipe), so it builds fp16 as the default build does, or fp32 where it has no fp16 graph."""
    from ..spec.networks import QUANTIZED_PRECISIONS
    if precision not in QUANTIZED_PRECISIONS:
        return precision
    return "fp16" if "fp16" in have else "fp32"


def build_all(artifact_dir: str | Path, network: str = "all", precision: str = "fp16", decoder_precision: str | None = None,
              min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None,
              flags: BuildFlags = BuildFlags(), log: Callable[[str], None] = print) -> list[dict]:
    """`ditrt build`: a plan for each requested network (`all`: every network of the artifact), the
    decoder in `decoder_precision` (default `precision`); batch bounds in the network's unit, so they
    need one network. Everything is checked before the first build starts."""
    manifest = load_manifest(artifact_dir)
    check_outputs([("--timing-cache", flags.timing_cache)], manifest.inputs(every_file=False))
    from ..spec.networks import QUANTIZED_PRECISIONS
    names = list(manifest.networks) if network == "all" else [manifest.network(network).name]
    segments = [n for n in names if manifest.network(n).extra.get("segment_of")]
    if network == "all" and precision in QUANTIZED_PRECISIONS and segments:  # a cache refuses quantized pipelines
        log(f"the denoiser's segments ({', '.join(segments)}) have no {precision} graphs (feature caching runs fp32 / "
            f"fp16 pipelines): no plans for them")
        names = [n for n in names if n not in segments]
    units = {manifest.network(n).batch_unit for n in names}
    if any(v is not None for v in (min_batch, opt_batch, max_batch)) and len(units) > 1:
        raise InputError(f"--min-batch/--opt-batch/--max-batch are in one network's unit; this artifact has "
                         f"{', '.join(names)} (units: {', '.join(sorted(units))}): add --network NAME")
    jobs = []
    for name in names:
        spec = manifest.network(name)
        base = default_profile(spec)
        low = base.min_rows if min_batch is None else min_batch
        high = base.max_rows if max_batch is None else max_batch
        opt = opt_batch if opt_batch is not None else max(low, min(base.opt_rows, high)) if isinstance(low, int) and \
            isinstance(high, int) else base.opt_rows
        plan_precision = (decoder_precision or quantized_fallback(precision, manifest.precisions(name))) if name == "decoder" else precision
        manifest.graph(name, plan_precision)  # the graph must exist before any build starts
        jobs.append((name, plan_precision, EngineProfile(low, opt, high)))
    return [build_engine(artifact_dir, name, plan_precision, profile, flags, log) for name, plan_precision, profile in jobs]
