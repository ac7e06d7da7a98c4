"""Issue 29's GPU checks in one run (under 10 minutes): the sampling loop's device side.

    python bench/gpu_loop_bench.py [--images 8] [--calls 50]

1. the GPU tests of the loop (pytest -m gpu tests/test_gpu_loop.py): the device noise stream
   (CuPy) equals the host stream bit for bit; IOBinding and CUDA graphs give session.run's outputs;
2. per-call time of the ONNX Runtime CUDA EP at DiT-XL/2-256 shapes (a depth-1 random-init export,
   so the engine time is small and the host's share shows) with --images images under guidance:
   plain `session.run` (io_binding off), IOBinding with reused OrtValues, and CUDA graphs;
3. the exposed host time of the Python loop over that backend (bench/host_bench.py's measure:
   (wall - time inside the backend) / calls) for ddpm and sde-euler, the two samplers that draw
   noise, with the prefetch;
4. one noise draw at --images x 4x32x32: numpy on the host vs CuPy on the device.
Writes bench/results/gpu_loop_bench_<gpu>.json. Without a GPU (no CUDA EP, no CuPy): prints each
check's reason, "skipped: no GPU", and exits 0.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402
from host_bench import artifact  # noqa: E402


def cuda_ep() -> str | None:
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return "onnxruntime has no CUDA EP (install onnxruntime-gpu in place of onnxruntime)"


def cupy_or_reason():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception as e:  # not installed, no driver, no device
        return f"no CuPy on a GPU ({type(e).__name__}: {e})"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and the CUDA graph's capture)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class Timed:
    """A backend wrapper that sums the time inside its calls (host_bench's measure)."""

    def __init__(self, backend):
        self.backend, self.inside_s, self.calls = backend, 0.0, 0
        self.name, self.network = backend.name, backend.network
        self.max_batch, self.min_batch = backend.max_batch, backend.min_batch

    def __call__(self, feeds):
        start = time.perf_counter()
        out = self.backend(feeds)
        self.inside_s += time.perf_counter() - start
        self.calls += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50, help="model calls per timing")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ditrt-host-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ditrt import runtime
    from ditrt.runtime.sampling import noise
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    from ditrt.runtime.execution.pipeline import Pipeline

    no_ep, cupy = cuda_ep(), cupy_or_reason()
    if no_ep and isinstance(cupy, str):
        print(f"{no_ep}; {cupy}\nskipped: no GPU")
        return
    rows = []
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_gpu_loop.py"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    rows.append({"check": "pytest -m gpu tests/test_gpu_loop.py", "result": summary, "ok": tests.returncode == 0})
    print(tests.stdout[-3000:], flush=True)

    rows_per_call = 2 * args.images  # guidance
    if not no_ep:
        art = artifact("dit", args.cache)
        manifest = runtime.load_manifest(art)
        spec, path = manifest.network("denoiser"), manifest.graph_path("denoiser", "fp32")
        feeds = spec.example_inputs(rows_per_call)
        variants = {"session.run": dict(io_binding=False), "io_binding": dict(io_binding=True),
                    "cuda_graph": dict(io_binding=True, cuda_graph=True)}
        for name, options in variants.items():
            backend = OnnxRuntimeBackend(path, spec, "fp32", "cuda", **options)
            ms = median_ms(lambda: backend(feeds), args.calls)
            rows.append({"check": f"denoiser call, {rows_per_call} rows", "variant": name, "ms": ms})
            for sampler, steps in (("ddpm", str(args.calls)), ("sde-euler", args.calls)):
                timed = Timed(backend)
                pipe = Pipeline(timed, manifest)
                pipe.sample(np.arange(args.images) % 1000, num_steps=steps, sampler=sampler, cfg_scale=4.0,
                            progress=False)
                wall = pipe.last_stats.total_s
                rows.append({"check": f"exposed host time per call, {sampler}", "variant": name,
                             "us": 1e6 * (wall - timed.inside_s) / timed.calls, "calls": timed.calls})
            print(rows[-3:], flush=True)
    else:
        rows.append({"check": "ONNX Runtime CUDA EP", "result": no_ep})
    images = list(range(args.images))
    host_ms = median_ms(lambda: noise.normal(0, images, 1, (4, 32, 32)), 9)
    rows.append({"check": f"one noise draw, {args.images} x 4x32x32", "variant": "numpy (host)", "ms": host_ms})
    if not isinstance(cupy, str):
        def device_draw():
            noise.normal_on(cupy, 0, images, 1, (4, 32, 32))
            cupy.cuda.Device().synchronize()
        rows.append({"check": f"one noise draw, {args.images} x 4x32x32", "variant": "cupy (device)",
                     "ms": median_ms(device_draw, 9)})
    else:
        rows.append({"check": "device noise", "result": cupy})
    gpu = "gpu"
    try:
        import onnxruntime as ort
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                                          capture_output=True, text=True).stdout.strip() or "gpu")
        extra = {"onnxruntime": ort.__version__}
    except OSError:
        extra = {}
    report(f"gpu_loop_bench_{gpu}", rows, ["check", "variant", "ms", "us", "calls", "result", "ok"],
           {"images": args.images, "calls": args.calls, **extra}, out=args.out)


if __name__ == "__main__":
    main()
