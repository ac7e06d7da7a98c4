"""The VAE decoder at the real sd-vae layout (diffusers AutoencoderKL, block_out_channels
(128, 256, 512, 512), layers_per_block 2, 4 latent channels; random init): export time and peak RSS
of the fp32 and fp16 graphs, their error vs PyTorch fp32, and decoding a batch of images with ONNX
Runtime fp32 vs diffusers eager (`vae.decode(latents / 0.18215).sample`) on the same thread count.

    python bench/vae_bench.py --image-size 256 --images 8 --threads 2 --repeats 3

Each export (with its validation: PyTorch fp32 reference, checker, shape inference, ONNX Runtime,
TensorRT lint) runs in its own subprocess, whose peak RSS comes from os.wait4. The decode timings
are interleaved repeat by repeat (same machine state), after a batch-1 warm-up of each.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

SEED = 0


def export_worker(precision: str, out: Path, latent_size: int, threads: int) -> None:
    """Runs in the subprocess: export one precision, write the manifest section and step timings."""
    import torch
    torch.set_num_threads(threads)
    from ditrt.exporter.decoder import DecoderExporter
    from ditrt.exporter.onnx_export import Steps, export_network
    from ditrt.exporter.vae import random_vae
    lines: list[str] = []
    start = time.perf_counter()
    loaded = random_vae(seed=SEED)
    exporter = DecoderExporter(loaded, (loaded.latent_channels, latent_size, latent_size))
    section = export_network(exporter, out, (precision,), 20, Steps(3, lines.append))
    steps = {m.group(1): float(m.group(2)) for line in lines if (m := re.match(r"\[\d+/\d+\] (.*): ([\d.]+) s$", line))}
    (out / f"section.{precision}.json").write_text(json.dumps({"section": section, "steps": steps,
                                                               "total_s": time.perf_counter() - start}))


def run_export(precision: str, out: Path, latent_size: int, threads: int) -> dict:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", precision, "--worker-out", str(out),
                             "--latent-size", str(latent_size), "--threads", str(threads)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{precision} export worker failed with exit code {proc.returncode}")
    result = json.loads((out / f"section.{precision}.json").read_text())
    graph = result["section"]["graphs"][precision]
    steps = result["steps"]
    return {"precision": precision, "file": str(out / graph["file"]), "graph_mb": graph["bytes"] / 2**20,
            "export_s": next(v for k, v in steps.items() if k.startswith("exporting")),
            "validate_s": next(v for k, v in steps.items() if k.startswith("validating")),
            "reference_s": next(v for k, v in steps.items() if k.startswith("PyTorch")),
            "subprocess_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
            "rel_err_vs_torch_fp32": graph["validation"]["onnxruntime_vs_torch_fp32"]["max_rel_err"],
            "bound": graph["validation"]["onnxruntime_vs_torch_fp32"]["bound"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--latent-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return export_worker(args.worker, Path(args.worker_out), args.latent_size, args.threads)

    latent_size = args.image_size // 8
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        exports = {}
        for precision in ("fp32", "fp16"):
            print(f"exporting the {precision} decoder ({args.image_size} px) in a subprocess ...", flush=True)
            exports[precision] = run_export(precision, Path(tmp) / precision, latent_size, args.threads)
            rows.append({"measure": "export", **{k: v for k, v in exports[precision].items() if k != "file"}})
            print(rows[-1], flush=True)

        import onnxruntime as ort
        import torch
        from ditrt.exporter.vae import random_vae
        from ditrt.runtime.jobs.parity import compare
        torch.set_num_threads(args.threads)
        loaded = random_vae(seed=SEED)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(exports["fp32"]["file"], options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(SEED)
        latents = rng.standard_normal((args.images, 4, latent_size, latent_size), dtype=np.float32)

        def run_ort(x):
            return session.run(["image"], {"latent": x})[0]

        def run_eager(x):
            with torch.no_grad():
                return loaded.model.decode(torch.from_numpy(x) / loaded.scaling_factor).sample.numpy()

        for fn in (run_ort, run_eager):  # warm-up
            fn(latents[:1])
        ort_s, eager_s = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            ort_images = run_ort(latents)
            ort_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            eager_images = run_eager(latents)
            eager_s.append(time.perf_counter() - start)
            print(f"repeat {r + 1}/{args.repeats}: onnxruntime {ort_s[-1]:.1f} s, eager {eager_s[-1]:.1f} s", flush=True)
        ort_med, eager_med = statistics.median(ort_s), statistics.median(eager_s)
        rows.append({"measure": f"decode {args.images} images", "precision": "fp32", "onnxruntime_s": ort_med,
                     "torch_eager_s": eager_med, "torch_over_ort": eager_med / ort_med,
                     "rel_err_vs_torch_fp32": compare(ort_images, eager_images)["max_rel_err"]})
        print(rows[-1], flush=True)
    report("vae_bench", rows, ["measure", "precision", "export_s", "validate_s", "peak_rss_mb", "graph_mb",
                               "rel_err_vs_torch_fp32", "bound", "onnxruntime_s", "torch_eager_s", "torch_over_ort"],
           {"layout": "sd-vae (AutoencoderKL, block_out_channels 128/256/512/512, layers_per_block 2), random init",
            "image_size": args.image_size, "latent_size": latent_size, "images": args.images,
            "threads": args.threads, "repeats": args.repeats,
            "decode_timings_s": {"onnxruntime": ort_s, "torch_eager": eager_s},
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "diffusers": __import__("diffusers").__version__,
            "note": "export_s: torch.onnx.export alone; validate_s: checker + shape inference + ONNX Runtime on "
                    "batches 1 and 3 + lint; peak_rss_mb: the export subprocess (model build, PyTorch reference, "
                    "export, validation); rel_err: max abs err / max abs reference; decode: medians of interleaved "
                    "repeats, torch_over_ort > 1 means ONNX Runtime is faster"})


if __name__ == "__main__":
    main()
