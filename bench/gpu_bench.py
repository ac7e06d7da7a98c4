"""GPU benchmark: per-forward latency and full-loop images/s of every backend available, in one run.

    python bench/gpu_bench.py                                   # DiT-XL/2, 256 px, random init
    python bench/gpu_bench.py --artifact engines/xl --checkpoint DiT-XL-2-256x256.pt

Backends (ids of the runtime's registry, ditrt.runtime.execution.backends.BACKENDS, plus one derived variant),
each run on its own (the others freed) and reported "unavailable: <reason>" when this machine cannot:
  tensorrt-fp16         the artifact's fp16 plan for this GPU (built here, 1/16/64 engine rows, when
                        the artifact has none that covers the batches); CUDA graph per batch size
  onnxruntime-fp16      the fp16 graph on the CUDA EP (needs onnxruntime-gpu)
  torch-fp16            the PyTorch reference in fp16 (timestep sinusoid fp32), eager
  torch-fp16-cudagraph  the same model replayed from one CUDA graph per batch size (this bench's own)
Per forward: median of --repeats calls at each engine batch (2, 16, 64 rows), numpy in and out as
the runtime calls a backend (host copies included). Full loop: --images images (8) with CFG 4.0
(2 engine rows per image) over 250 DDPM steps through runtime.Pipeline, the deployed loop.
Weights do not change the timings: without --checkpoint the model is a random init.
Writes bench/results/gpu_bench_<gpu>.json (or --out) and prints a table. When no requested backend
can run here (no GPU): prints each one's reason and "skipped: no GPU", exports nothing and exits 0.
"""
from __future__ import annotations

import gc
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_parser, report  # noqa: E402

# The registry's ids (ditrt.runtime.execution.backends.BACKENDS), plus the one variant it has not: the bench's
# own CUDA-graph wrapper around the torch reference, named after the id it derives from.
BACKENDS = ("tensorrt-fp16", "onnxruntime-fp16", "torch-fp16", "torch-fp16-cudagraph")
RENAMED = {"tensorrt": "tensorrt-fp16", "onnxruntime-cuda": "onnxruntime-fp16", "torch-eager": "torch-fp16",
           "torch-cuda-graph": "torch-fp16-cudagraph"}  # the names before the registry


def gpu_name() -> str | None:
    """The CUDA device's name through torch or cuda-python, None without a usable GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from ditrt.runtime.execution.trt.device import gpu_info
        return gpu_info().name
    except Exception:  # no cuda-python, no driver, no device
        return None


class Unavailable(Exception):
    pass


class TorchCudaGraphBackend:
    """The PyTorch reference replayed from one CUDA graph per batch size (static input tensors,
    PyTorch's capture recipe: warm up on a side stream, then capture). The runtime's backend
    protocol: named numpy tensors in and out, as the network spec says."""

    def __init__(self, model, network, max_batch: int | None = None, precision: str = "fp16"):
        import torch
        self.torch, self.model = torch, model.eval()
        self.network = network
        self.max_batch = max_batch
        self.min_batch = 1
        self.precision = precision
        self.name = f"torch-{precision}-cudagraph"
        self._graphs: dict[int, tuple] = {}

    def _capture(self, rows: int):
        torch = self.torch
        static = [torch.from_numpy(np.zeros(t.concrete(rows), t.numpy_dtype)).to("cuda") for t in self.network.inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self.model(*static)
        return graph, static, out

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = self.network.check_feeds(feeds)
        if rows not in self._graphs:
            self._graphs[rows] = self._capture(rows)
        graph, static, out = self._graphs[rows]
        for dst, name in zip(static, self.network.input_names):
            dst.copy_(self.torch.from_numpy(np.ascontiguousarray(feeds[name])))
        graph.replay()
        return {self.network.output_names[0]: out.float().cpu().numpy()}


def unavailable_reason(name: str) -> str | None:
    """Why this machine cannot run a backend at all (checked before any artifact is exported), or None."""
    if name == "tensorrt-fp16":
        from ditrt.runtime.core.errors import TensorRTUnavailable
        try:
            from ditrt.runtime.execution.trt.device import environment
            environment()  # TensorRT and a GPU, or the reason why not
        except TensorRTUnavailable as e:
            return e.missing
        except Exception as e:  # a driver that fails in another way
            return f"TensorRT cannot start ({type(e).__name__}: {e})"
        return None
    if name == "onnxruntime-fp16":
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"onnxruntime is not installed ({e})"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} has no CUDA EP (pip uninstall onnxruntime && "
                    "pip install onnxruntime-gpu)")
        return None
    try:
        import torch
    except ImportError as e:
        return f"PyTorch is not installed ({e})"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} has no usable CUDA device"
    try:
        import ditrt.exporter.torch_backend  # noqa: F401
    except ImportError as e:
        return f"the torch backend needs ditrt[export] ({e})"
    return None


def make_backend(name: str, manifest, args, batches: list[int], log):
    """(backend, note); Unavailable with the reason when this machine cannot run it."""
    from ditrt.runtime import create_backend
    from ditrt.runtime.core.errors import TensorRTUnavailable
    low, high = min(batches), max(batches)
    if name in ("tensorrt-fp16", "onnxruntime-fp16") and "fp16" not in manifest.precisions("denoiser"):
        raise Unavailable(f"{manifest.directory} has no fp16 denoiser graph (re-export with the fp16 precision)")
    if name == "tensorrt-fp16":
        from ditrt.runtime.execution.trt.compat import compatible_engine
        try:
            entry = compatible_engine(manifest, "denoiser", "fp16")
            if entry is None or entry["profile"]["min"] > low or entry["profile"]["max"] < high:
                from ditrt.runtime.jobs.build import build_engine, require_toolchain
                from ditrt.runtime.execution.trt.settings import BuildFlags, EngineProfile
                require_toolchain()
                log(f"building a TensorRT plan (1/{min(16, high)}/{high} engine rows) for this GPU ...")
                build_engine(manifest.directory, "denoiser", "fp16", EngineProfile(1, min(16, high), high), BuildFlags(),
                             log=log)
                manifest = _reload(manifest)
            backend = create_backend(manifest, name, network="denoiser", max_batch=high)
        except TensorRTUnavailable as e:
            raise Unavailable(e.missing) from None
        parity = (backend.entry or {}).get("parity", {}).get("max_rel_err")
        return backend, f"{backend.plan.name}" + (f", parity max rel err {parity:.2e}" if parity is not None else "")
    if name == "onnxruntime-fp16":
        backend = create_backend(manifest, name, network="denoiser", max_batch=high)
        if getattr(backend, "device", None) != "cuda":  # the registry falls back to the CPU EP
            raise Unavailable("ONNX Runtime would run on the CPU EP here (no CUDA EP)")
        return backend, "fp16 graph, CUDA EP, IOBinding"
    if name == "torch-fp16":
        return (create_backend(manifest, name, network="denoiser", device="cuda", checkpoint=args.checkpoint,
                               max_batch=high), "fp16 (sinusoid fp32), eager")
    if name == "torch-fp16-cudagraph":
        eager = create_backend(manifest, "torch-fp16", network="denoiser", device="cuda", checkpoint=args.checkpoint,
                               max_batch=high)
        return (TorchCudaGraphBackend(eager.model, eager.network, high, eager.precision),
                "fp16 (sinusoid fp32), one CUDA graph per batch size")
    raise Unavailable(f"unknown backend {name!r}")


def _reload(manifest):
    from ditrt.runtime.artifact.manifest import load_manifest
    return load_manifest(manifest.directory)


def example_feeds(network, rows: int) -> dict[str, np.ndarray]:
    """Random denoiser feeds: latents, timesteps in 0..999, labels including the null class."""
    rng = np.random.default_rng(rows)
    latent, timestep, label = (network.inputs[i] for i in range(3))
    return {latent.name: rng.standard_normal(latent.concrete(rows), dtype=np.float32),
            timestep.name: rng.uniform(0, 999, rows).astype(timestep.numpy_dtype),
            label.name: rng.integers(0, network.num_classes + 1, rows).astype(label.numpy_dtype)}


def forward_ms(backend, rows: int, repeats: int) -> list[float]:
    from ditrt.runtime.execution.chunking import run_chunked
    feeds = example_feeds(backend.network, rows)
    for _ in range(3):  # warm-up: CUDA graph capture, lazy allocations, autotuning
        run_chunked(backend, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_chunked(backend, feeds)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def prepare(args, log):
    """(manifest, description of the weights). The artifact is exported (fp16 graph only: what the
    GPU backends run) when it does not exist yet."""
    from ditrt.runtime.artifact.manifest import ArtifactError, load_manifest
    artifact = Path(args.artifact or ROOT / "engines" / f"bench-{args.config.replace('/', '-')}-{args.image_size}-random")
    try:
        manifest = load_manifest(artifact)
    except ArtifactError:
        if args.artifact and Path(args.artifact).exists():
            raise
        from ditrt.exporter.artifact import export_artifact
        log(f"exporting {artifact} (fp16 graph) ...")
        manifest = export_artifact(torch_source(args), artifact, ("fp16",), log=log)
    return manifest, args.checkpoint or "random init (timings do not depend on the weights)"


def torch_source(args):
    """The PyTorch model to export: --checkpoint, else a random init of --config."""
    try:
        from ditrt.exporter.model import named_config
        from ditrt.exporter.denoiser import source_from_checkpoint, source_from_random_init
    except ImportError as e:
        raise SystemExit(f"exporting an artifact needs PyTorch ({e}): pass --artifact") from None
    if args.checkpoint:
        from ditrt.exporter.checkpoints import load_checkpoint
        return source_from_checkpoint(load_checkpoint(args.checkpoint))
    return source_from_random_init(named_config(args.config, args.image_size), 0, args.config)


def versions() -> dict:
    out = {}
    for module in ("tensorrt", "onnxruntime", "torch", "polygraphy"):
        try:
            out[module] = __import__(module).__version__
        except Exception:
            out[module] = None
    return out


def main() -> int:
    parser = model_parser(__doc__, config="DiT-XL/2")
    parser.add_argument("--artifact", help="An exported artifact [engines/bench-<config>-<size>-random, exported if missing].")
    parser.add_argument("--checkpoint", help="Weights for the PyTorch backends and the export [random init].")
    parser.add_argument("--batches", default="2,16,64", help="Engine rows per forward.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"Comma-separated, of: {', '.join(BACKENDS)}.")
    parser.add_argument("--out", type=Path, help="Result file [bench/results/gpu_bench_<gpu>.json].")
    args = parser.parse_args()
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in names:
        if b not in BACKENDS:
            hint = f" (renamed {RENAMED[b]})" if b in RENAMED else ""
            parser.error(f"unknown backend {b!r}{hint}; use {', '.join(BACKENDS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive engine rows, got {args.batches!r}")
    sys.path.insert(0, str(ROOT))
    from ditrt import runtime

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    reasons = {b: unavailable_reason(b) for b in names}
    for b, reason in reasons.items():
        if reason:
            rows.append({"backend": b, "measure": "unavailable", "note": reason})
            log(f"{b}: unavailable: {reason}")
    name = gpu_name()
    if name is None or all(reasons.values()):
        print("skipped: no GPU" if name is None else f"skipped: no requested backend can run on {name}")
        return 0

    manifest, weights = prepare(args, log)
    m = manifest.model
    for backend_name in (b for b in names if not reasons[b]):
        backend = pipe = None
        try:
            backend, note = make_backend(backend_name, manifest, args, batches, log)
            log(f"{backend.name}: {note}")
            for b in batches:
                times = forward_ms(backend, b, args.repeats)
                median = statistics.median(times)
                rows.append({"backend": backend.name, "measure": "forward", "rows": b, "median_ms": median,
                             "min_ms": min(times), "rows_per_s": 1e3 * b / median, "note": note})
                log(f"  forward at {b} rows: {median:.2f} ms")
            pipe = runtime.Pipeline(backend, manifest)
            labels = np.arange(args.images) % m.num_classes
            pipe.sample(labels, num_steps=2, cfg_scale=args.cfg_scale, progress=False)  # warm the loop's batch size
            pipe.sample(labels, num_steps=args.steps, cfg_scale=args.cfg_scale, seed=0, progress=False)
            s = pipe.last_stats
            rows.append({"backend": backend.name, "measure": f"loop {args.images} images x {s.steps} steps",
                         "rows": s.model_rows, "total_s": s.total_s, "images_per_s": args.images / s.total_s,
                         "steps_per_s": s.steps_per_s, "overhead_pct": 100 * s.overhead_fraction, "note": note})
            log(f"  loop: {s.total_s:.2f} s, {args.images / s.total_s:.2f} images/s")
        except Exception as e:  # unavailable here, or failed: the other backends still run
            what = "unavailable" if isinstance(e, Unavailable) else f"failed ({type(e).__name__})"
            rows.append({"backend": backend_name, "measure": what, "note": str(e)})
            log(f"{backend_name}: {what}: {e}")
        finally:
            if backend is not None and hasattr(backend, "close"):
                backend.close()
            del backend, pipe
            gc.collect()
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    report(f"gpu_bench_{slug}", rows,
           ["backend", "measure", "rows", "median_ms", "rows_per_s", "total_s", "images_per_s", "overhead_pct", "note"],
           {"gpu": name, "config": args.config, "image_size": args.image_size, "weights": weights,
            "artifact": str(manifest.directory), "steps": args.steps, "cfg_scale": args.cfg_scale, "images": args.images,
            "sampler": "ddpm", "backends": names, "versions": versions(),
            "notes": "backend: ids of ditrt.runtime.execution.backends.BACKENDS (torch-fp16-cudagraph: this bench's CUDA-graph "
                     "wrapper of torch-fp16); forward times include host<->device copies (numpy in/out, as the "
                     "runtime calls a backend); engine rows = 2 x images under guidance"},
           out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
