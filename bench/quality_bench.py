"""The quality / speed table of the digits example over samplers x step counts x precisions, for the
DiT and for the SiT trained the same way (exporter/data/digits): what each acceleration costs.

    python bench/quality_bench.py --num-images 1000 --threads 2

Every row goes through the project's own path, `ditrt.runtime.jobs.quality.compare` (what `ditrt quality`
runs): the exported ONNX graphs on ONNX Runtime (CPU), the runtime's samplers and guidance (official,
cfg 4 unless the row says otherwise), the decoder graph, and a digit classifier trained on the real
digits. Columns: the classifier's accuracy on the requested labels, the Frechet distance and
improved precision / recall (k = 3) against the real digits in the classifier's feature space,
images/s (sampling + decoding), and each relative to the family's first row (DiT: fp32 DDPM-250;
SiT: fp32 SDE Euler 250, its headline sampler). Needs scikit-learn (the real digits).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

DIT_RUNS = ["sampler=ddim,steps=100", "sampler=ddim,steps=50", "sampler=ddim,steps=25", "sampler=ddim,steps=10",
            "sampler=dpm++2m,steps=50", "sampler=dpm++2m,steps=25", "sampler=dpm++2m,steps=10",
            "sampler=ddpm,steps=50", "precision=fp16", "sampler=ddim,steps=50,precision=fp16",
            "sampler=dpm++2m,steps=25,precision=fp16", "sampler=ddim,steps=50,guidance=standard",
            "sampler=ddim,steps=50,cfg_scale=1.5", "sampler=ddim,steps=50,cfg_scale=1"]
SIT_RUNS = ["sampler=sde-euler,steps=50", "sampler=sde-heun,steps=25", "sampler=ode-euler,steps=50",
            "sampler=ode-euler,steps=25", "sampler=ode-heun2,steps=25", "sampler=ode-dopri5,steps=50",
            "sampler=ode-dopri5,steps=50,precision=fp16", "sampler=ode-euler,steps=50,cfg_scale=1.5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="dit,sit")
    args = parser.parse_args()

    from ditrt.exporter.artifact import DATA, EXAMPLE_VAE, export_command
    from ditrt.runtime.jobs import quality
    from ditrt.runtime.sampling.request import LoadOptions

    classifier = quality.DigitClassifier.load(DATA / "digits" / "classifier.npz")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        for family in families:
            print(f"exporting the digits {family} ...", flush=True)
            art = export_command(DATA / "digits" / f"{family}.safetensors", num_heads=4, family=family,
                                 vae_dir=EXAMPLE_VAE, out_dir=Path(tmp) / family, log=lambda m: None)
            first = ("sampler=ddpm,steps=250" if family == "dit" else "sampler=sde-euler,steps=250")
            base = quality.parse_run(first + ",cfg_scale=4",
                                    quality.QualityRun("base", load=LoadOptions(backend="onnxruntime", precision="fp32")))
            runs = [base] + [quality.parse_run(text, base) for text in (DIT_RUNS if family == "dit" else SIT_RUNS)]
            result = quality.compare(art, runs, classifier, args.num_images, args.seed, batch=100,
                                     threads=args.threads, log=lambda m: print(m, flush=True))
            rows += [{"family": family, **row} for row in result["runs"]]
            extra["real_digits_self_check"] = result["real_digits_self_check"]
            extra["noise"] = result["noise"]
    report("quality_bench", rows, ["family", "run", "backend", "accuracy", "frechet_distance", "precision", "recall",
                                   "images_per_s", "frechet_vs_first", "speed_vs_first"],
           extra={"num_images": args.num_images, "seed": args.seed, "threads": args.threads,
                  "labels": "balanced (image i's label and noise from (seed, i))", "cfg_scale": 4.0,
                  "note": "ONNX Runtime CPU on a shared 2-core machine: images/s are indicative, the ratios within "
                          "one run are what to read. The real digits against themselves give the floor of each metric.",
                  **extra})


if __name__ == "__main__":
    main()
