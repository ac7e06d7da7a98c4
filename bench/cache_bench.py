"""Feature caching's speed: cached against uncached sampling on ONNX Runtime (CPU), random-init
DiT-S/2 and DiT-B/2 at 256 px, 4 images, DDIM-50, cfg 4, in one run.

    python bench/cache_bench.py --configs DiT-S/2,DiT-B/2 --repeats 1 --threads 2

Per config, the settings are interleaved (none, taylorseer, first-block, none, ...) so that a load
change on a shared machine hits them alike; each row is the median over `--repeats`. Random
weights say nothing about quality (docs/caching.md has the quality table): this is wall time and
block evaluations, with the cached latents' distance from the uncached ones as a sanity column.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_parser, report  # noqa: E402

SETTINGS = [("none", {}), ("taylorseer", {"cache_interval": 4}), ("first-block", {"threshold": 0.05})]


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--configs", default="DiT-S/2,DiT-B/2")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from ditrt import runtime
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_random_init
    from ditrt.exporter.model import named_config

    rows = []
    for name in args.configs.split(","):
        cfg = named_config(name, args.image_size)
        labels = np.arange(args.images) * 7 % cfg.num_classes
        with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
            print(f"exporting {name} at {args.image_size} px (fp32, random init) ...", flush=True)
            art = Path(tmp) / name.replace("/", "-")
            start = time.perf_counter()
            export_artifact(source_from_random_init(cfg, args.seed, name), art, precisions=("fp32",),
                            log=lambda m: None)
            print(f"  export {time.perf_counter() - start:.1f} s", flush=True)
            pipe = runtime.load(art, backend="onnxruntime", threads=args.threads)
            kw = dict(num_steps=args.steps, sampler="ddim", cfg_scale=args.cfg_scale, progress=False)
            pipe.sample(labels, **{**kw, "num_steps": 2}, cache="taylorseer")  # warm-up: every session
            times, blocks, latents = {}, {}, {}
            for _ in range(args.repeats):
                for cache, options in SETTINGS:  # interleaved
                    key = _key(cache, options)
                    start = time.perf_counter()
                    latents[key] = pipe.sample(labels, cache=cache, cache_options=options, **kw)
                    times.setdefault(key, []).append(time.perf_counter() - start)
                    blocks[key] = pipe.last_stats.block_evaluations
                    print(f"  {key}: {times[key][-1]:.2f} s", flush=True)
            base_key = _key(*SETTINGS[0])
            base = statistics.median(times[base_key])
            for cache, options in SETTINGS:
                key = _key(cache, options)
                wall = statistics.median(times[key])
                ref = latents[base_key].astype(np.float64)
                rows.append({"config": name, "setting": key, "block_evaluations": blocks[key], "wall_s": wall,
                             "speedup": base / wall, "block_ratio": blocks[base_key] / blocks[key],
                             "max_rel_err_vs_uncached": float(np.abs(latents[key] - ref).max() / np.abs(ref).max())})
        _report(rows, args)  # after each config: a partial table survives a long run


def _report(rows: list, args) -> None:
    report("cache_bench", rows, ["config", "setting", "block_evaluations", "block_ratio", "wall_s", "speedup",
                                 "max_rel_err_vs_uncached"],
           extra={"images": args.images, "steps": args.steps, "sampler": "ddim", "cfg_scale": args.cfg_scale,
                  "threads": args.threads, "repeats": args.repeats, "backend": "onnxruntime CPU fp32",
                  "note": "settings interleaved per repeat; the machine may be shared"})


def _key(cache: str, options: dict) -> str:
    return ",".join([cache, *(f"{k}={v}" for k, v in options.items())])


if __name__ == "__main__":
    main()
