"""SiT sampling on ONNX Runtime (CPU), for a random-init SiT of DiT-S/2 size: the wall time and
model calls of `ode-euler` 50 steps, `ode-dopri5` (SiT's default ODE sampler, adaptive) and
`sde-euler` 250 steps (SiT's headline sampler) for 2 images, guided at cfg 4 (official guidance),
through `runtime.load(...).sample(...)`. The official code calls the model twice per SDE drift
(velocity, then inside the score); ditrt once: the table shows both counts.

    python bench/sit_bench.py --config DiT-S/2 --image-size 256 --threads 2

Random weights say nothing about sample quality: these are costs, not a quality claim.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_parser, report  # noqa: E402

RUNS = (("ode-euler", 50), ("ode-dopri5", 50), ("sde-euler", 250))


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    args = parser.parse_args()

    import torch
    from ditrt import runtime
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_random_init
    from ditrt.exporter.model import named_config
    from ditrt.runtime.sampling.samplers import SAMPLERS

    torch.set_num_threads(args.threads)
    cfg = named_config(args.config, args.image_size)
    labels = [(7 * i) % cfg.num_classes for i in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sit-bench-") as tmp:
        art = Path(tmp) / "sit"
        print(f"exporting a random-init SiT ({args.config} size, {args.image_size} px, fp32) ...", flush=True)
        start = time.perf_counter()
        export_artifact(source_from_random_init(cfg, args.seed, args.config, family="sit"), art, ("fp32",),
                        log=lambda m: None)
        print(f"exported in {time.perf_counter() - start:.1f} s", flush=True)
        pipe = runtime.load(art, backend="onnxruntime", precision="fp32", threads=args.threads)
        pipe.sample(labels, num_steps=3, sampler="ode-euler", cfg_scale=args.cfg_scale, progress=False)  # warm-up
        for sampler, steps in RUNS:
            print(f"{sampler} {steps} steps ...", flush=True)
            pipe.sample(labels, num_steps=steps, sampler=sampler, cfg_scale=args.cfg_scale, seed=args.seed,
                        progress=False)
            s = pipe.last_stats
            official = s.steps * (2 if SAMPLERS[sampler].uses_noise else 1)
            rows.append({"sampler": sampler, "num_steps": steps, "images": args.images, "model_calls": s.steps,
                         "official_model_calls": official, "rows_per_call": s.model_rows, "wall_s": round(s.total_s, 2),
                         "s_per_call": round(s.total_s / s.steps, 4), "overhead_fraction": round(s.overhead_fraction, 4)})
    report("sit_bench", rows, ["sampler", "num_steps", "images", "model_calls", "official_model_calls", "wall_s",
                               "s_per_call", "overhead_fraction"],
           extra={"config": args.config, "image_size": args.image_size, "threads": args.threads,
                  "cfg_scale": args.cfg_scale, "guidance": "official", "weights": f"random init, seed {args.seed}",
                  "backend": "onnxruntime-fp32 (CPU)", "noise": runtime.NOISE_VERSION})


if __name__ == "__main__":
    main()
