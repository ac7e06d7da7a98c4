"""int8 (ModelOpt QDQ) against fp32 and fp16 on ONNX Runtime CPU, per denoiser forward, for
random-init DiT-S/2 and DiT-B/2 at 256 px; and, with --xl, the export time and peak RSS of
calibrating DiT-XL/2.

    python bench/quant_bench.py --threads 2
    python bench/quant_bench.py --configs DiT-S/2 --rows 1,8,16 --rounds 5 --xl --xl-calib-images 2

Each config is exported once by `ditrt export --precision fp32,fp16,int8` (few calibration images:
random weights say nothing about quality, only the graph's speed matters here). Then the three
graphs run in one process, interleaved (each round times fp32, fp16, int8 once per row count), so
a load change on a shared machine hits all three alike; the table gives the median per forward and
int8's speed-up over fp32. The XL run exports int8 alone in its own process (so its peak RSS is
its own, wait4's ru_maxrss) and compares the peak with the fp32 weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


def export(config: str, image_size: int, precisions: str, out: Path, calib_images: int, calib_steps: int) -> dict:
    """`ditrt export` in a subprocess: wall time and peak RSS (GiB)."""
    cmd = [sys.executable, "-m", "ditrt.cli", "export", "--config", config, "--random-init", "--image-size",
           str(image_size), "--precision", precisions, "--calib-images", str(calib_images), "--calib-steps",
           str(calib_steps), "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"  {line.rstrip()}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export of {config} failed")
    return {"wall_s": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20}


def time_forwards(art: Path, rows_list: list[int], rounds: int, threads: int) -> list[dict]:
    from ditrt import runtime
    manifest = runtime.load_manifest(art)
    spec = manifest.network("denoiser")
    backends = {p: runtime.create_backend(manifest, "onnxruntime", p, threads=threads) for p in PRECISIONS}
    feeds = {rows: spec.example_inputs(rows, seed=rows) for rows in rows_list}
    for rows in rows_list:  # warm-up: first runs allocate
        for backend in backends.values():
            backend(feeds[rows])
    times = {(p, rows): [] for p in PRECISIONS for rows in rows_list}
    for _ in range(rounds):
        for rows in rows_list:
            for p, backend in backends.items():
                start = time.perf_counter()
                backend(feeds[rows])
                times[(p, rows)].append(time.perf_counter() - start)
    out = []
    for rows in rows_list:
        fp32 = statistics.median(times[("fp32", rows)])
        for p in PRECISIONS:
            median = statistics.median(times[(p, rows)])
            out.append({"rows": rows, "precision": p, "ms_per_forward": 1e3 * median, "speedup_vs_fp32": fp32 / median,
                        "runs": rounds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="DiT-S/2,DiT-B/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=4)
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--xl", action="store_true", help="also calibrate and export DiT-XL/2 int8 (time, peak RSS)")
    parser.add_argument("--xl-calib-images", type=int, default=2)
    parser.add_argument("--xl-calib-steps", type=int, default=4)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    results, exports = [], []
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        for config in args.configs.split(","):
            art = Path(tmp) / config.replace("/", "-")
            print(f"exporting {config} at {args.image_size} px (fp32, fp16, int8; random init) ...", flush=True)
            cost = export(config, args.image_size, ",".join(PRECISIONS), art, args.calib_images, args.calib_steps)
            exports.append({"config": config, "precisions": ",".join(PRECISIONS), **cost})
            for row in time_forwards(art, rows_list, args.rounds, args.threads):
                results.append({"config": config, **row})
            for p in PRECISIONS:  # a graph's files go as soon as it is timed: the disk is shared too
                (art / f"denoiser.{p}.onnx").unlink()
        if args.xl:
            art = Path(tmp) / "DiT-XL-2"
            print(f"exporting DiT-XL/2 int8 ({args.xl_calib_images} calibration images x {args.xl_calib_steps} "
                  "steps) ...", flush=True)
            cost = export("DiT-XL/2", args.image_size, "int8", art, args.xl_calib_images, args.xl_calib_steps)
            data = json.loads((art / "manifest.json").read_text())
            params, recipe = data["model"]["parameters"], data["networks"]["denoiser"]["graphs"]["int8"]
            exports.append({"config": "DiT-XL/2", "precisions": "int8", **cost,
                            "fp32_weights_gib": params * 4 / 2**30,
                            "calib_images": args.xl_calib_images, "calib_steps": args.xl_calib_steps,
                            "max_rel_err": recipe["validation"]["onnxruntime_vs_reference"]["max_rel_err"]})
    print()
    report("quant_bench", results, ["config", "rows", "precision", "ms_per_forward", "speedup_vs_fp32", "runs"],
           extra={"threads": args.threads, "exports": exports, "image_size": args.image_size,
                  "note": "interleaved rounds on one machine; medians; the machine may be shared"})
    print()
    for e in exports:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()))


if __name__ == "__main__":
    main()
