"""Sample quality of the digits example model through the project's own pipeline: an exported
artifact sampled by `ditrt.runtime` (ONNX Runtime) and decoded by its VAE decoder graph, scored by
`ditrt.runtime.quality` against scikit-learn's real digits.

    ditrt export exporter/data/digits/dit.safetensors --num-heads 4 --vae exporter/data/digits/vae --out /tmp/digits-art
    python bench/digits_quality.py /tmp/digits-art --per-class 20 --threads 2

Per run (by default DDPM-250, DDIM-50, DPM-Solver++(2M)-25 at cfg 4, and DDIM-50 at cfg 1, 1.5 and
2.5): the classifier's accuracy on balanced labels (0..9, --per-class each), the Frechet distance of
the classifier's hidden features to the real digits', improved precision / recall (k = 3) and the
sampling time. The real digits go
through `quality.real_digit_images`, exactly the training preparation. Needs scikit-learn (the real digits).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# sampler:steps:guidance[:cfg scale]; the last three show the guidance trade-off (accuracy vs diversity)
RUNS = ("ddpm:250:official,ddim:50:official,ddim:50:standard,dpm++2m:25:official,"
        "ddim:50:official:1,ddim:50:official:1.5,ddim:50:official:2.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--runs", default=RUNS, help="Comma-separated sampler:steps:guidance[:cfg scale].")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="Guidance scale of runs that name none.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classifier", type=Path, default=ROOT / "exporter" / "data" / "digits" / "classifier.npz")
    parser.add_argument("--out", type=Path, help="Result file [bench/results/digits_quality.json].")
    args = parser.parse_args()

    from sklearn.datasets import load_digits
    from ditrt import runtime
    from ditrt.runtime import quality

    digits = load_digits()
    classifier = quality.DigitClassifier.load(args.classifier)
    real_images = quality.real_digit_images(digits.images)
    real_features = classifier.features(real_images)
    # Floors for the sample rows: the real digits scored against themselves, all of them and a
    # balanced subset of the samples' size (the Frechet distance of a finite set is biased upward).
    rng = np.random.default_rng(args.seed)
    subset = np.concatenate([rng.choice(np.flatnonzero(digits.target == c), args.per_class, replace=False)
                             for c in range(10)])
    rows = [{"run": "real digits, all (self-check)", "images": len(real_images),
             **quality.digit_scores(classifier, real_images, digits.target, real_features)},
            {"run": "real digits, balanced subset", "images": len(subset),
             **quality.digit_scores(classifier, real_images[subset], digits.target[subset], real_features)}]
    pipe = runtime.load(args.artifact, backend="onnxruntime-fp32", threads=args.threads, decoder=True,
                        decoder_precision="fp32")
    labels = np.repeat(np.arange(pipe.manifest.model.num_classes), args.per_class)
    for spec in args.runs.split(","):
        sampler, steps, guidance, *scale = spec.split(":")
        cfg_scale = float(scale[0]) if scale else args.cfg_scale
        print(f"sampling {len(labels)} images with {sampler}-{steps} cfg {cfg_scale:g} ({guidance} guidance) ...", flush=True)
        start = time.perf_counter()
        latents = pipe.sample(labels, num_steps=int(steps), sampler=sampler, cfg_scale=cfg_scale,
                              guidance=guidance, seed=args.seed, progress=False)
        images = pipe.decode(latents)
        seconds = time.perf_counter() - start
        rows.append({"run": f"{sampler}-{steps} cfg {cfg_scale:g} {guidance}", "images": len(labels),
                     **quality.digit_scores(classifier, images, labels, real_features), "seconds": seconds})
    report("digits_quality", rows, ["run", "images", "accuracy", "frechet_distance", "precision", "recall", "seconds"],
           extra={"artifact": str(args.artifact), "seed": args.seed, "threads": args.threads,
                  "backend": pipe.backend.name, "decoder": pipe.decoder.name}, out=args.out)


if __name__ == "__main__":
    main()
