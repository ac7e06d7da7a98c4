"""Export wall time and peak memory per precision for a named config (random init).

    python bench/export_bench.py --config DiT-XL/2 --image-size 256

Each precision is exported by `ditrt export` in its own process so its peak RSS is its own; the
table compares the peak with the fp32 weight bytes (target: under ~3x).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def run_export(config: str, image_size: int, precision: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ditrt.cli", "export", "--config", config, "--random-init", "--image-size",
           str(image_size), "--precision", precision, "--out", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"  {line.rstrip()}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export of {precision} failed")
    import json
    graph = json.loads((out / "manifest.json").read_text())["graphs"][precision]
    return {"precision": precision, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "graph_gib": graph["bytes"] / 2**30, "files": len(graph["files"]),
            "max_rel_err_vs_torch_fp32": graph["validation"]["onnxruntime_vs_torch_fp32"]["max_rel_err"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--precisions", default="fp32,fp16")
    args = parser.parse_args()
    from ditrt.exporter.model import named_config
    cfg = named_config(args.config, args.image_size)
    import torch
    with torch.device("meta"):
        from ditrt.exporter.model import DiT, count_parameters
        params = count_parameters(DiT(cfg))
    fp32_gib = params * 4 / 2**30
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        for precision in args.precisions.split(","):
            print(f"exporting {args.config} {args.image_size}px {precision} ...", flush=True)
            rows.append(run_export(args.config, args.image_size, precision, Path(tmp) / precision))
            rows[-1]["peak_over_fp32_weights"] = rows[-1]["peak_rss_gib"] / fp32_gib
            shutil.rmtree(Path(tmp) / precision, ignore_errors=True)
    name = f"export_bench_{args.config.replace('/', '-')}_{args.image_size}"
    report(name, rows, ["precision", "wall_s", "peak_rss_gib", "peak_over_fp32_weights", "graph_gib", "files",
                        "max_rel_err_vs_torch_fp32"],
           {"config": args.config, "image_size": args.image_size, "parameters": params, "fp32_weights_gib": fp32_gib,
            "note": "wall time includes export-time validation (checker, shape inference, ONNX Runtime vs PyTorch at batch 1 and 3)"})


if __name__ == "__main__":
    main()
