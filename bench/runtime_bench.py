"""ONNX Runtime (`onnxruntime-fp32`, CPU EP) vs PyTorch eager (`torch-fp32`, CPU) per-forward time, and the runtime's own per-step
overhead (time outside the backend), for random-init DiT configs.

    python bench/runtime_bench.py --configs DiT-S/2,DiT-B/2 --batches 1,8

Both backends run with the same thread count, interleaved repeat by repeat, so the ratio comes
from one run on the same machine state. Targets: ONNX Runtime at least as fast as eager PyTorch;
runtime overhead under 1% of a sampling step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="DiT-S/2,DiT-B/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--loop-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="Result file [bench/results/runtime_bench.json].")
    args = parser.parse_args()

    import torch
    from ditrt import runtime
    from ditrt.exporter.model import named_config
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_random_init
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        for name in args.configs.split(","):
            cfg = named_config(name, args.image_size)
            source = source_from_random_init(cfg, 0, name)
            print(f"exporting {name} (fp32) ...", flush=True)
            art = Path(tmp) / name.replace("/", "-")
            manifest = export_artifact(source, art, ("fp32",), log=lambda m: None)
            network = manifest.network("denoiser")
            # The CPU EP on purpose (create_backend would take the CUDA EP where onnxruntime-gpu is installed).
            ort_backend = OnnxRuntimeBackend(manifest.graph_path("denoiser", "fp32"), network, "fp32", "cpu",
                                             args.threads)
            torch_backend = runtime.create_backend(manifest, "torch-fp32", network="denoiser", device="cpu")
            names = {"onnxruntime_ms": ort_backend.name, "torch_eager_ms": torch_backend.name}
            rng = np.random.default_rng(0)
            for batch in map(int, args.batches.split(",")):
                feeds = {"latent": rng.standard_normal(network.inputs[0].concrete(batch), dtype=np.float32),
                         "timestep": rng.uniform(0, 999, batch).astype(np.float32),
                         "class_label": rng.integers(0, cfg.num_classes, batch).astype(np.int64)}
                for backend in (ort_backend, torch_backend):  # warm-up
                    backend(feeds)
                ort_s, torch_s = [], []
                for _ in range(args.repeats):  # interleaved: both see the same machine state
                    ort_s += timed(lambda: ort_backend(feeds), 1)
                    torch_s += timed(lambda: torch_backend(feeds), 1)
                ort_ms, torch_ms = 1e3 * statistics.median(ort_s), 1e3 * statistics.median(torch_s)
                rows.append({"config": name, "measure": "forward", "batch": batch, "onnxruntime_ms": ort_ms,
                             "torch_eager_ms": torch_ms, "torch_over_ort": torch_ms / ort_ms})
                print(rows[-1], flush=True)
            # The runtime's own work per step: guidance, sampler math, noise (CFG doubles 4 images to 8 rows).
            pipe = runtime.Pipeline(ort_backend, manifest)
            pipe.sample([1, 2, 3, 4], num_steps=args.loop_steps, progress=False)
            s = pipe.last_stats
            rows.append({"config": name, "measure": "sampling step", "batch": s.model_rows,
                         "onnxruntime_ms": 1e3 * s.total_s / s.steps,
                         "overhead_ms": 1e3 * (s.total_s - s.backend_s) / s.steps,
                         "overhead_pct": 100 * s.overhead_fraction})
            print(rows[-1], flush=True)
    report("runtime_bench", rows, ["config", "measure", "batch", "onnxruntime_ms", "torch_eager_ms", "torch_over_ort",
                                   "overhead_ms", "overhead_pct"],
           {"threads": args.threads, "repeats": args.repeats, "image_size": args.image_size,
            "backends": names, "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "note": "medians over interleaved repeats; torch_over_ort > 1 means ONNX Runtime is faster; "
                    "backends: the registry id behind each timing column (onnxruntime on the CPU EP)"},
           out=args.out)


if __name__ == "__main__":
    main()
