"""GPU benchmark: per-forward latency and full-loop images/s of every backend available, in one run.

    python bench/gpu_bench.py                                   # DiT-XL/2, 256 px, random init
    python bench/gpu_bench.py --artifact engines/xl --checkpoint DiT-XL-2-256x256.pt

Backends, each run on its own (the others freed) and skipped with the reason when unavailable:
  tensorrt          the artifact's fp16 plan for this GPU (built here, 1/16/64 engine rows, when
                    the artifact has none that covers the batches); CUDA graph per batch size
  onnxruntime-cuda  the fp16 graph on the CUDA EP (needs onnxruntime-gpu)
  torch-eager       the PyTorch reference in fp16 (timestep sinusoid fp32), eager
  torch-cuda-graph  the same model replayed from one CUDA graph per batch size
Per forward: median of --repeats calls at each engine batch (2, 16, 64 rows), numpy in and out as
the runtime calls a backend (host copies included). Full loop: --images images (8) with CFG 4.0
(2 engine rows per image) over 250 DDPM steps through runtime.Pipeline, the deployed loop.
Weights do not change the timings: without --checkpoint the model is a random init.
Writes bench/results/gpu_bench_<gpu>.json and prints a table. Without a GPU: prints
"skipped: no GPU" and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-eager", "torch-cuda-graph")


def gpu_name() -> str | None:
    """The CUDA device's name through torch or cuda-python, None without a usable GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from ditrt.runtime.tensorrt import gpu_info
        return gpu_info().name
    except Exception:  # no cuda-python, no driver, no device
        return None


class TorchCudaGraphBackend:
    """The PyTorch reference replayed from one CUDA graph per batch size (static input tensors,
    PyTorch's capture recipe: warm up on a side stream, then capture)."""

    def __init__(self, model, max_batch: int | None = None):
        import torch
        self.torch, self.model, self.max_batch = torch, model, max_batch
        self.name = "torch-cuda-graph-fp16"
        self._graphs: dict[int, tuple] = {}

    def _capture(self, latent_shape: tuple[int, ...]):
        torch = self.torch
        n = latent_shape[0]
        static = (torch.zeros(latent_shape, device="cuda"), torch.zeros(n, device="cuda"),
                  torch.zeros(n, dtype=torch.int64, device="cuda"))
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

    def __call__(self, latent: np.ndarray, timestep: np.ndarray, class_label: np.ndarray) -> np.ndarray:
        n = len(latent)
        if n not in self._graphs:
            self._graphs[n] = self._capture(latent.shape)
        graph, static, out = self._graphs[n]
        for dst, src in zip(static, (latent, timestep, class_label)):
            dst.copy_(self.torch.from_numpy(np.ascontiguousarray(src)))
        graph.replay()
        return out.float().cpu().numpy()


def make_backend(name: str, manifest, model, max_rows: int, log):
    """(backend, note); Unavailable with the reason when this machine cannot run it."""
    if name == "tensorrt":
        from ditrt.runtime.tensorrt import TensorRTBackend, compatible_engine, environment
        from ditrt.runtime.trt_plan import BuildFlags, EngineProfile, TensorRTUnavailable
        try:
            environment()  # TensorRT and a GPU, or the reason why not
            entry = compatible_engine(manifest)
            if entry is None or entry["profile"]["max"] < max_rows:
                from ditrt.runtime.trt_build import build_engine
                log(f"building a TensorRT plan (1/16/{max_rows} engine rows) for this GPU ...")
                build_engine(manifest.directory, EngineProfile(1, min(16, max_rows), max_rows), BuildFlags(), log=log)
                manifest = _reload(manifest)
            backend = TensorRTBackend.from_manifest(manifest)
        except TensorRTUnavailable as e:
            raise Unavailable(e.missing) from None
        return backend, f"{backend.plan.name}, parity max rel err {backend.entry['parity']['max_rel_err']:.2e}"
    if name == "onnxruntime-cuda":
        import onnxruntime as ort
        from ditrt.runtime.backends import OnnxRuntimeBackend
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable(f"onnxruntime {ort.__version__} has no CUDA EP (pip uninstall onnxruntime && "
                              "pip install onnxruntime-gpu)")
        return OnnxRuntimeBackend(manifest.graph_path("fp16"), "cuda"), "fp16 graph, IOBinding"
    if model is None:
        raise Unavailable("PyTorch with CUDA is not installed")
    if name == "torch-eager":
        from ditrt.exporter.torch_backend import TorchBackend
        return TorchBackend(model, "cuda"), "fp16 (sinusoid fp32)"
    return TorchCudaGraphBackend(model), "fp16 (sinusoid fp32), one graph per batch size"


class Unavailable(Exception):
    pass


def _reload(manifest):
    from ditrt.runtime.manifest import load_manifest
    return load_manifest(manifest.directory)


def forward_ms(backend, rows: int, shape: tuple[int, ...], num_classes: int, repeats: int) -> list[float]:
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, *shape), dtype=np.float32)
    t = rng.uniform(0, 999, rows).astype(np.float32)
    y = rng.integers(0, num_classes + 1, rows).astype(np.int64)
    for _ in range(3):  # warm-up: CUDA graph capture, lazy allocations, autotuning
        backend(x, t, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend(x, t, y)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def prepare(args, log):
    """(manifest, fp16 torch model on the GPU or None, description of the weights). The artifact is
    exported (fp16 graph only: what the GPU backends run) when it does not exist yet."""
    from ditrt.runtime.manifest import ArtifactError, load_manifest
    try:
        import torch
        has_torch_cuda = torch.cuda.is_available()
    except ImportError:
        has_torch_cuda = False
    artifact = Path(args.artifact or ROOT / "engines" / f"bench-{args.config.replace('/', '-')}-{args.image_size}-random")
    try:
        manifest = load_manifest(artifact)
    except ArtifactError:
        manifest = None
    source = None
    if has_torch_cuda or manifest is None:
        source = torch_source(args, manifest)
    if manifest is None:
        from ditrt.exporter.onnx_export import export_artifact
        log(f"exporting {artifact} (fp16 graph) ...")
        manifest = export_artifact(source, artifact, ("fp16",), log=log)
    model = None
    if has_torch_cuda:
        from ditrt.exporter.model import set_precision
        model = set_precision(source.model, "fp16").to("cuda").eval()
    return manifest, model, args.checkpoint or "random init (timings do not depend on the weights)"


def torch_source(args, manifest):
    """The PyTorch model: --checkpoint, else a random init of the artifact's config (or --config)."""
    try:
        from ditrt.exporter.model import DiTConfig, named_config
        from ditrt.exporter.onnx_export import source_from_checkpoint, source_from_random_init
    except ImportError as e:
        raise SystemExit(f"exporting an artifact needs PyTorch ({e}): pass --artifact") from None
    if args.checkpoint:
        from ditrt.exporter.checkpoints import load_checkpoint
        return source_from_checkpoint(load_checkpoint(args.checkpoint))
    if manifest is not None:
        config = DiTConfig(**{k: manifest.data["model"][k] for k in DiTConfig.__dataclass_fields__})
        return source_from_random_init(config, 0, manifest.data["model"].get("name"))
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--artifact", help="An exported artifact [engines/bench-<config>-<size>-random, exported if missing].")
    parser.add_argument("--checkpoint", help="Weights for the PyTorch backends and the export [random init].")
    parser.add_argument("--batches", default="2,16,64", help="Engine rows per forward.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    name = gpu_name()
    if name is None:
        print("skipped: no GPU")
        return 0
    sys.path.insert(0, str(ROOT))
    from ditrt import runtime

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    manifest, model, weights = prepare(args, log)
    m = manifest.model
    shape = (m.in_channels, m.input_size, m.input_size)
    rows = []
    for backend_name in args.backends.split(","):
        try:
            backend, note = make_backend(backend_name, manifest, model, max(batches), log)
        except Exception as e:  # unavailable here, or failed to set up: the other backends still run
            what = "skipped" if isinstance(e, Unavailable) else f"failed ({type(e).__name__})"
            rows.append({"backend": backend_name, "measure": what, "note": str(e)})
            log(f"{backend_name}: {what}: {e}")
            continue
        log(f"{backend_name} ({backend.name}): {note}")
        for b in batches:
            times = forward_ms(backend, b, shape, m.num_classes, args.repeats)
            median = statistics.median(times)
            rows.append({"backend": backend_name, "measure": "forward", "rows": b, "median_ms": median,
                         "min_ms": min(times), "rows_per_s": 1e3 * b / median, "note": note})
            log(f"  forward at {b} rows: {median:.2f} ms")
        pipe = runtime.Pipeline(backend, manifest)
        labels = np.arange(args.images) % m.num_classes
        pipe.sample(labels, num_steps=2, cfg_scale=args.cfg_scale, progress=False)  # warm the loop's batch size
        pipe.sample(labels, num_steps=args.steps, cfg_scale=args.cfg_scale, seed=0, progress=False)
        s = pipe.last_stats
        rows.append({"backend": backend_name, "measure": f"loop {args.images} images x {s.steps} steps", "rows": s.model_rows,
                     "total_s": s.total_s, "images_per_s": args.images / s.total_s, "steps_per_s": s.steps_per_s,
                     "overhead_pct": 100 * s.overhead_fraction, "note": note})
        log(f"  loop: {s.total_s:.2f} s, {args.images / s.total_s:.2f} images/s")
        if hasattr(backend, "close"):
            backend.close()
        del backend, pipe
        gc.collect()
        if model is not None:
            import torch
            torch.cuda.empty_cache()

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    report(f"gpu_bench_{slug}", rows,
           ["backend", "measure", "rows", "median_ms", "rows_per_s", "total_s", "images_per_s", "overhead_pct", "note"],
           {"gpu": name, "config": args.config, "image_size": args.image_size, "weights": weights,
            "artifact": str(manifest.directory), "steps": args.steps, "cfg_scale": args.cfg_scale, "images": args.images,
            "sampler": "ddpm", "versions": versions(),
            "notes": "forward times include host<->device copies (numpy in/out, as the runtime calls a backend); "
                     "engine rows = 2 x images under guidance"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
