"""DPM-Solver++(2M) vs the official DDPM-250 loop on ONNX Runtime (CPU), for a random-init DiT:
wall time of one DDPM-250 run vs one 25-call DPM-Solver++ run, and how far DPM-Solver++ at 10/25/50
calls ends from DDPM-250 started from the same initial noise.

    python bench/dpm_bench.py --config DiT-S/2 --image-size 256 --threads 2

Every sampler runs through the runtime's pipeline on one ONNX Runtime session (injected noise). DDIM-250 (eta 0, same initial noise) is added as a context row: it is the deterministic ODE
sample DPM-Solver++ approximates, while DDPM is stochastic and ends elsewhere by construction.
Random weights say nothing about sample quality: these distances are numerics, not a quality claim.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_parser, report  # noqa: E402


def distance(a: np.ndarray, ref: np.ndarray) -> dict:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    rms = lambda v: float(np.sqrt(np.mean(v * v)))  # noqa: E731
    return {"max_rel_err": float(np.abs(a - ref).max() / np.abs(ref).max()), "rms_rel": rms(a - ref) / rms(ref)}


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--guidance", default="official")
    parser.add_argument("--ddpm-steps", type=int, default=250)
    parser.add_argument("--dpm-steps", default="10,25,50")
    parser.add_argument("--timed-dpm-steps", type=int, default=25)
    args = parser.parse_args()

    import onnxruntime
    from ditrt import runtime
    from ditrt.exporter.model import named_config
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_random_init

    dpm_steps = sorted({*map(int, args.dpm_steps.split(",")), args.timed_dpm_steps})
    cfg = named_config(args.config, args.image_size)
    labels = np.arange(args.images) * 7 % cfg.num_classes
    rng = np.random.default_rng(args.seed)
    shape = (args.images, cfg.in_channels, cfg.input_size, cfg.input_size)
    initial = rng.standard_normal(shape, dtype=np.float32)
    step_noise = rng.standard_normal((args.ddpm_steps, *shape), dtype=np.float32)
    rows, finals, seconds = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="dpm-bench-") as tmp:
        print(f"exporting {args.config} at {args.image_size} px (fp32, random init) ...", flush=True)
        art = Path(tmp) / args.config.replace("/", "-")
        export_artifact(source_from_random_init(cfg, args.seed, args.config), art, precisions=("fp32",),
                        log=lambda m: None)
        pipe = runtime.load(art, backend="onnxruntime", threads=args.threads)
        pipe.sample(labels, num_steps=2, sampler="dpm++2m", cfg_scale=args.cfg_scale, progress=False)  # warm-up

        def ddpm_like(sampler: str) -> np.ndarray:
            start = time.perf_counter()
            x = pipe.sample(labels, num_steps=args.ddpm_steps, sampler=sampler, cfg_scale=args.cfg_scale,
                            guidance=args.guidance, noise=(initial, step_noise), progress=False)
            seconds[f"{sampler}{args.ddpm_steps}"] = time.perf_counter() - start
            return x

        print(f"DDPM-{args.ddpm_steps} ...", flush=True)
        reference = ddpm_like("ddpm")
        for steps in dpm_steps:
            print(f"DPM-Solver++(2M) {steps} calls ...", flush=True)
            start = time.perf_counter()
            finals[steps] = pipe.sample(labels, num_steps=steps, sampler="dpm++2m", cfg_scale=args.cfg_scale,
                                        guidance=args.guidance, noise=(initial, step_noise[:steps]), progress=False)
            seconds[f"dpm{steps}"] = time.perf_counter() - start
        print(f"DDIM-{args.ddpm_steps} (context) ...", flush=True)
        ddim = ddpm_like("ddim")

    ddpm_key = f"ddpm{args.ddpm_steps}"
    rows.append({"sampler": f"DDPM-{args.ddpm_steps}", "model_calls": args.ddpm_steps, "wall_s": seconds[ddpm_key],
                 "speedup_vs_ddpm": 1.0})
    for steps in dpm_steps:
        rows.append({"sampler": f"DPM-Solver++(2M)-{steps}", "model_calls": steps, "wall_s": seconds[f"dpm{steps}"],
                     "speedup_vs_ddpm": seconds[ddpm_key] / seconds[f"dpm{steps}"],
                     **{f"vs_ddpm_{k}": v for k, v in distance(finals[steps], reference).items()},
                     **{f"vs_ddim_{k}": v for k, v in distance(finals[steps], ddim).items()}})
    rows.append({"sampler": f"DDIM-{args.ddpm_steps} (context)", "model_calls": args.ddpm_steps,
                 "wall_s": seconds[f"ddim{args.ddpm_steps}"],
                 "speedup_vs_ddpm": seconds[ddpm_key] / seconds[f"ddim{args.ddpm_steps}"],
                 **{f"vs_ddpm_{k}": v for k, v in distance(ddim, reference).items()}})
    timed = f"dpm{args.timed_dpm_steps}"
    report("dpm_bench", rows, ["sampler", "model_calls", "wall_s", "speedup_vs_ddpm", "vs_ddpm_max_rel_err",
                               "vs_ddpm_rms_rel", "vs_ddim_max_rel_err", "vs_ddim_rms_rel"],
           {"config": args.config, "image_size": args.image_size, "weights": f"random init (seed {args.seed})",
            "backend": f"onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads, fp32 graph",
            "images": args.images, "labels": labels.tolist(), "cfg_scale": args.cfg_scale,
            "guidance": args.guidance, "model_rows_per_call": 2 * args.images,
            f"wall_ratio_ddpm{args.ddpm_steps}_over_{timed}": seconds[ddpm_key] / seconds[timed],
            "note": ("One run each, interleaved with nothing; the machine's 2 cores are shared, so times are "
                     "indicative. Distances: max |a - ref| / max |ref| and RMS(a - ref) / RMS(ref) of the final "
                     "latents from the same initial noise. DDPM is stochastic (its own step noise), DPM-Solver++ "
                     "and DDIM (eta 0) solve the probability-flow ODE, so DPM vs DDPM cannot go to zero; DPM vs "
                     "DDIM-250 measures the solver's convergence. NO QUALITY CLAIM can be made from these numbers: "
                     "the weights are random, not trained; image quality needs real DiT weights (and FID).")})


if __name__ == "__main__":
    main()
