"""Sample-quality metrics for the digits example model, in numpy only (no torch, no scikit-learn).

- The image mapping. Training images are scikit-learn's 8x8 digits (grey levels 0..16) made into
  what an sd-vae-style VAE takes: `real_digit_images` maps level v to v / 8 - 1 in [-1, 1],
  repeats each pixel as an `upsample` x `upsample` block (nearest) and copies the grey into R, G
  and B. `classifier_input` is its exact inverse for any (N, 3, H, W) batch in the decoder's range:
  clip to [-1, 1] (as the PNG writers do), average R, G, B, average each (H / 8) x (W / 8) block
  (area downsampling to 8x8), then (g + 1) * 8, giving levels in 0..16 again. Real digits come back
  bit for bit; generated ones are read the same way.
- `DigitClassifier`: a one-hidden-layer MLP trained with scikit-learn on the real digits (by
  `examples/digits/train_digits.py`) and stored as plain arrays; its ReLU hidden layer is the feature
  space of the Frechet distance and of precision / recall (as Inception's pool features are for FID).
- `frechet_distance`: FID's formula on two feature sets.
- `precision_recall`: Kynkaanniemi et al. 2019 (improved precision and recall, k-NN balls).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.files import check_regular
from ..sampling.request import LoadOptions, SampleSpec
from ..core.validate import check_int

DIGIT_SIDE = 8  # scikit-learn's digits are 8x8
DIGIT_LEVELS = 16  # ... with grey levels 0..16


def real_digit_images(digits: np.ndarray, upsample: int = 8) -> np.ndarray:
    """(N, 8, 8) grey levels 0..16 -> (N, 3, 8 * upsample, 8 * upsample) float32 in [-1, 1]: the
    training images of the digits model (level / 8 - 1, nearest upsampling, grey in R, G and B)."""
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE):
        raise InputError(f"digits must be shaped (N, {DIGIT_SIDE}, {DIGIT_SIDE}), got {digits.shape}")
    if digits.min(initial=0) < 0 or digits.max(initial=0) > DIGIT_LEVELS:
        raise InputError(f"digit grey levels must lie in 0..{DIGIT_LEVELS}")
    upsample = check_int(upsample, "upsample", 1)
    grey = digits.astype(np.float32) / np.float32(DIGIT_LEVELS / 2) - np.float32(1)  # (N, 8, 8)
    grey = grey.repeat(upsample, axis=1).repeat(upsample, axis=2)  # (N, 8u, 8u)
    return np.ascontiguousarray(np.repeat(grey[:, None], 3, axis=1))  # (N, 3, 8u, 8u)


def classifier_input(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] (H, W multiples of 8) -> (N, 64) float64 grey levels 0..16:
    the exact inverse of `real_digit_images`, applied alike to real and generated images."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % DIGIT_SIDE or images.shape[3] % DIGIT_SIDE:
        raise InputError(f"images must be shaped (N, 3, H, W) with H and W multiples of {DIGIT_SIDE}, got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"images must be floating point (the decoder's [-1, 1] range), got {images.dtype}")
    if not np.isfinite(images).all():
        raise InputError("images contain NaN or inf")
    n, _, h, w = images.shape
    grey = np.clip(images.astype(np.float64), -1.0, 1.0).mean(axis=1)  # (N, H, W)
    blocks = grey.reshape(n, DIGIT_SIDE, h // DIGIT_SIDE, DIGIT_SIDE, w // DIGIT_SIDE).mean(axis=(2, 4))  # (N, 8, 8)
    return ((blocks + 1.0) * (DIGIT_LEVELS / 2)).reshape(n, DIGIT_SIDE * DIGIT_SIDE)


@dataclass(frozen=True)
class DigitClassifier:
    """scikit-learn's MLPClassifier (one ReLU hidden layer, softmax output) in numpy, float64.
    Its input is `classifier_input(images) * input_scale` (levels 0..16 scaled to 0..1)."""
    hidden_weight: np.ndarray  # (64, F)
    hidden_bias: np.ndarray  # (F,)
    output_weight: np.ndarray  # (F, 10)
    output_bias: np.ndarray  # (10,)
    classes: np.ndarray  # (10,) the label of each output column
    input_scale: float

    ARRAYS = ("hidden_weight", "hidden_bias", "output_weight", "output_bias", "classes", "input_scale")

    @classmethod
    def load(cls, path: str | Path) -> "DigitClassifier":
        path = check_regular(Path(path), "digit classifier")  # a FIFO would block np.load, a device never end
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in cls.ARRAYS}
        except KeyError as e:
            raise InputError(f"{path} is not a digit classifier: array {e.args[0]} is missing") from None
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the digit classifier {path}: {e}") from None
        classifier = cls(**{k: v.astype(np.float64) for k, v in arrays.items() if k not in ("classes", "input_scale")},
                         classes=arrays["classes"], input_scale=float(arrays["input_scale"]))
        d, f = classifier.hidden_weight.shape
        if d != DIGIT_SIDE * DIGIT_SIDE or classifier.hidden_bias.shape != (f,) or classifier.output_weight.shape[0] != f \
                or classifier.output_bias.shape != classifier.output_weight.shape[1:] \
                or classifier.classes.shape != classifier.output_bias.shape:
            raise InputError(f"{path}: inconsistent classifier shapes")
        return classifier

    def save(self, path: str | Path) -> None:
        np.savez(path, **{name: np.asarray(getattr(self, name)) for name in self.ARRAYS})

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, F) float64: the hidden layer's ReLU activations."""
        x = classifier_input(images) * self.input_scale  # (N, 64)
        return np.maximum(x @ self.hidden_weight + self.hidden_bias, 0.0)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, 10) class probabilities (columns in `classes` order)."""
        return self.proba_from_features(self.features(images))

    def proba_from_features(self, features: np.ndarray) -> np.ndarray:
        """(N, F) hidden activations -> (N, 10) softmax probabilities."""
        logits = features @ self.output_weight + self.output_bias  # (N, 10)
        logits = logits - logits.max(axis=1, keepdims=True)  # as scikit-learn's softmax
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N,) labels."""
        return self.classes[self.predict_proba(images).argmax(axis=1)]


def _check_features(features: np.ndarray, what: str, min_rows: int = 2) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < min_rows:
        raise InputError(f"{what} must be shaped (N, F) with N >= {min_rows}, got {features.shape}")
    if not np.isfinite(features).all():
        raise InputError(f"{what} contain NaN or inf")
    return features


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    rounded below zero are taken as zero)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID's ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two (N, F) feature sets
    (covariances with ddof 1). (S_a S_b)^1/2 has the eigenvalues of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2, so its trace is their square roots' sum: no general matrix square root."""
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    root_a = _psd_sqrt(np.atleast_2d(cov_a))
    middle = root_a @ np.atleast_2d(cov_b) @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(np.atleast_2d(cov_a)) + np.trace(np.atleast_2d(cov_b)) \
        - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # >= 0 in exact arithmetic; equal sets can round to -1e-15


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) squared Euclidean distances, clipped at zero (the expanded form can round below)."""
    d = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii(points: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (itself excluded)."""
    radii = np.empty(len(points))
    for start in range(0, len(points), chunk):
        d = _squared_distances(points[start:start + chunk], points)  # (c, N)
        d[np.arange(len(d)), np.arange(start, start + len(d))] = np.inf  # not its own neighbour
        radii[start:start + chunk] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def _covered(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Whether each query lies in at least one ball (centre, k-NN radius), boundary included."""
    inside = np.empty(len(queries), dtype=bool)
    for start in range(0, len(queries), chunk):
        inside[start:start + chunk] = (_squared_distances(queries[start:start + chunk], centres) <= radii[None]).any(axis=1)
    return inside


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019). Each set's manifold is the union
    of balls around its points with radius the distance to the k-th nearest other point of the same
    set. Precision: the fraction of fake points inside the real manifold; recall: the fraction of
    real points inside the fake manifold."""
    k = check_int(k, "k", 1)
    real = _check_features(real_features, "real_features", k + 1)
    fake = _check_features(fake_features, "fake_features", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise InputError(f"feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _covered(fake, real, _knn_radii(real, k, chunk), chunk).mean()
    recall = _covered(real, fake, _knn_radii(fake, k, chunk), chunk).mean()
    return float(precision), float(recall)


def digit_scores(classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
                 k: int = 3) -> dict[str, float]:
    """Generated images (N, 3, H, W) sampled for `labels` (N,) against the real digits' features:
    accuracy (the classifier reads the requested label), Frechet distance, precision and recall."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise InputError(f"labels must be shaped ({len(images)},) like the images, got {labels.shape}")
    features = classifier.features(images)
    predicted = classifier.classes[classifier.proba_from_features(features).argmax(axis=1)]
    precision, recall = precision_recall(real_features, features, k)
    return {"accuracy": float((predicted == labels).mean()), "frechet_distance": frechet_distance(real_features, features),
            "precision": precision, "recall": recall}


# ---- `ditrt quality`: what each configuration costs in quality and speed ----------------------------

def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 8x8 images, no download) as the training images and
    their labels: the reference the samples are scored against."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InputError(f"ditrt quality compares with scikit-learn's digits: pip install 'ditrt[quality]' ({e})") from None
    digits = load_digits()
    return real_digit_images(digits.images), digits.target.astype(np.int64)


@dataclass(frozen=True)
class QualityRun:
    """One configuration: a name, what to sample (its labels and seed come from `compare`) and how
    to load the pipeline."""
    name: str
    spec: SampleSpec = SampleSpec()
    load: LoadOptions = LoadOptions()


# `--compare` keys that are fields of the spec or the load options; a cache option goes to the cache's
# options, anything else is a sampler option (e.g. atol).
_SPEC_KEYS = {"sampler": str, "steps": str, "cfg_scale": float, "guidance": str, "cache": str}
_LOAD_KEYS = {"backend": str, "precision": str, "decoder_precision": str}


def parse_run(text: str, base: QualityRun) -> QualityRun:
    """A configuration from `key=value,key=value` over the base options, e.g. `sampler=ddim,steps=50`
    or `precision=fp16` (keys: sampler, steps, cfg_scale, guidance, eta, backend, precision,
    decoder_precision, cache, a cache option such as cache_interval or threshold, or a sampler
    option)."""
    from dataclasses import replace
    from ..execution.cache import cache_option_names
    spec_changes, load_changes, seen = {}, {}, set()
    options, cache_options = dict(base.spec.options), dict(base.spec.cache_options)
    for item in [p.strip() for p in str(text).split(",") if p.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise InputError(f"--compare takes key=value pairs separated by commas (e.g. sampler=ddim,steps=50), "
                             f"got {item!r} in {text!r}")
        if key in seen:  # the last one would silently win
            raise InputError(f"--compare {text!r} sets {key} twice; give each key once")
        seen.add(key)
        if key in _SPEC_KEYS or key in _LOAD_KEYS:
            kind, changes = (_SPEC_KEYS[key], spec_changes) if key in _SPEC_KEYS else (_LOAD_KEYS[key], load_changes)
            try:
                changes[key] = kind(value.strip())
            except ValueError:
                raise InputError(f"--compare {key} must be a number, got {value!r}") from None
        elif key in cache_option_names():
            cache_options[key] = value.strip()  # the cache checks and converts it
        else:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value.strip()
    if (not spec_changes and not load_changes and options == base.spec.options
            and cache_options == base.spec.cache_options):
        raise InputError(f"--compare {text!r} changes nothing")
    if spec_changes.get("cache", base.spec.cache) == "none":
        cache_options = {}  # cache=none over a cached base: no cache options
    spec = replace(base.spec, **spec_changes, options=options, cache_options=cache_options)
    return QualityRun(text.strip(), spec, replace(base.load, **load_changes))


def compare(artifact, runs: list[QualityRun], classifier: DigitClassifier, num_images: int = 1000, seed: int = 0,
            batch: int = 100, threads: int | None = None, log=lambda m: None, labels: str = "balanced") -> dict:
    """Sample `num_images` balanced images (image i: label and noise from (seed, i), as `ditrt
    generate`) with each configuration, decode them with the artifact's decoder and score them:
    accuracy, Frechet distance, precision / recall against the real digits, images/s (sampling and
    decoding); each relative to the first configuration. `labels`: "balanced" over every class, or
    a comma-separated list of class numbers or names the images are balanced over (`ditrt generate`'s
    --labels)."""
    import time
    from dataclasses import replace
    from .generate import balanced_labels, listed_labels, resolve_sampling
    from ..artifact.manifest import load_manifest
    from ..execution.pipeline import class_condition, load_pipeline
    num_images = check_int(num_images, "--num-images", 20, 1_000_000)
    batch = check_int(batch, "--batch", 1, 100_000)
    if not runs:
        raise InputError("quality needs at least one configuration")
    for key in sorted({str(r.load.public_key) for r in runs if r.load.public_key is not None}):
        from ..artifact.signing import require_signature  # once, before the manifest is read (not once per pipeline)
        require_signature(artifact, key)
    manifest = load_manifest(artifact)
    for run in runs:  # every configuration checked before the first one samples
        resolve_sampling(manifest, run.spec, np.zeros(1, np.int64))
    manifest.network("decoder")  # images are scored: the artifact needs its decoder
    condition = class_condition(manifest.network("denoiser"))
    if condition.condition.num_classes != len(classifier.classes):
        raise InputError(f"the artifact has {condition.condition.num_classes} classes, the classifier "
                         f"{len(classifier.classes)}: ditrt quality scores the digits example")
    real_images, real_labels = load_real_digits()
    real_features = classifier.features(real_images)
    label_spec = labels
    labels = (balanced_labels(seed, 0, num_images, condition.condition.num_classes) if label_spec == "balanced"
              else listed_labels(label_spec, seed, num_images, condition.condition, manifest.labels))
    rows, pipes = [], {}
    for run in runs:
        key = (run.load.backend, run.load.precision, run.load.decoder_precision)
        if key not in pipes:
            pipes[key] = load_pipeline(artifact, replace(run.load, threads=threads, decoder=True, public_key=None))
        pipe = pipes[key]
        log(f"{run.name}: {num_images} images on {pipe.backend.name} ...")
        images, calls, blocks = [], 0, 0.0
        start = time.perf_counter()
        for latents in pipe.sample_batches(run.spec.for_batch(None, seed=seed), labels, batch):
            calls += pipe.last_stats.steps
            blocks += pipe.last_stats.block_evaluations
            images.append(pipe.decode(latents))
        seconds = time.perf_counter() - start
        scores = digit_scores(classifier, np.concatenate(images), labels, real_features)
        batches = -(-num_images // batch)
        rows.append({"run": run.name, "backend": pipe.backend.name, "images": num_images,
                     "model_calls_per_batch": calls // batches, "cache": run.spec.cache,
                     "cache_options": run.spec.cache_options,
                     "block_evaluations": blocks / batches, **scores, "seconds": seconds,
                     "images_per_s": num_images / seconds})
    first = rows[0]
    for row in rows:
        row["frechet_vs_first"] = row["frechet_distance"] - first["frechet_distance"]
        row["accuracy_vs_first"] = row["accuracy"] - first["accuracy"]
        row["speed_vs_first"] = row["images_per_s"] / first["images_per_s"]
    reference = digit_scores(classifier, real_images, real_labels, real_features)
    from ..sampling.noise import NOISE_VERSION
    return {"artifact": str(artifact), "num_images": num_images, "seed": seed, "labels": label_spec,
            "noise": NOISE_VERSION, "classifier_classes": len(classifier.classes),
            "real_digits_self_check": reference, "runs": rows}


def format_report(report: dict) -> str:
    columns = [("run", "{}"), ("block_evaluations", "{:.1f}"), ("accuracy", "{:.3f}"), ("frechet_distance", "{:.3f}"), ("precision", "{:.3f}"),
               ("recall", "{:.3f}"), ("images_per_s", "{:.2f}"), ("frechet_vs_first", "{:+.3f}"),
               ("speed_vs_first", "{:.2f}x")]
    table = [[name for name, _ in columns]] + [[fmt.format(r[name]) for name, fmt in columns] for r in report["runs"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    ref = report["real_digits_self_check"]
    over = "" if report.get("labels", "balanced") == "balanced" else f" over classes {report['labels']}"
    lines.append(f"{report['num_images']} balanced images{over} per run, seed {report['seed']}, noise {report['noise']}; "
                 f"real digits against themselves: accuracy {ref['accuracy']:.3f}, Frechet {ref['frechet_distance']:.3f}")
    return "\n".join(lines)
