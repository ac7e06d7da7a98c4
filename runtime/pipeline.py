"""The class-conditional sampling loop with classifier-free guidance, over any backend.

A `Pipeline` holds what is shared and read-only: the manifest, the backend and a schedule cache.
Everything one request changes lives in its `SampleRun` (labels, noise, the current latents, the
sampler's state), so concurrent `sample` calls on one pipeline from several threads return exactly
what sequential calls return, and a batching scheduler can step many runs through one backend
call (`feeds()` of several runs concatenated, `advance()` each with its rows of the output).
Backends serialise their own calls where the engine needs it (TensorRT holds a lock).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import Backend, create_backend, run_chunked
from .config import Diffusion
from .errors import InputError, StepError
from .manifest import Manifest, load_manifest
from .noise import InjectedNoise, SeededNoise
from .samplers import Sampler, get_sampler, guide


@dataclass
class SampleStats:
    steps: int
    model_rows: int  # rows per model call (doubled under guidance)
    total_s: float
    backend_s: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.total_s if self.total_s else float("inf")

    @property
    def overhead_fraction(self) -> float:
        """Time spent outside the backend (guidance, sampler math, noise) per unit of loop time."""
        return (self.total_s - self.backend_s) / self.total_s if self.total_s else 0.0


@lru_cache(maxsize=64)
def _schedule(sampler: str, diffusion_key: tuple, steps) -> object:
    return get_sampler(sampler).schedule(_DIFFUSIONS[diffusion_key], steps)


_DIFFUSIONS: dict[tuple, Diffusion] = {}


def schedule_for(sampler: Sampler, diffusion: Diffusion, steps):
    """The sampler's schedule for a step spec, cached per (sampler, diffusion, steps)."""
    key = (diffusion.num_train_timesteps, diffusion.beta_schedule, diffusion.beta_start, diffusion.beta_end,
           diffusion.variance)
    _DIFFUSIONS.setdefault(key, diffusion)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer, str)):
        raise InputError(f"num_steps must be an int or a step spec string ({sampler.steps_help}), got {steps!r}")
    return _schedule(sampler.name, key, steps if isinstance(steps, str) else int(steps))


class Pipeline:
    def __init__(self, backend: Backend, manifest: Manifest, decoder: Backend | None = None):
        if backend.network.name != "denoiser":
            raise InputError(f"a pipeline samples with the denoiser, not the {backend.network.name}")
        self.backend = backend
        self.decoder = decoder
        self.manifest = manifest
        self.last_stats: SampleStats | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.model.latent_shape

    def start(self, class_labels: Sequence[int] | np.ndarray, num_steps: int | str | None = None,
              sampler: str | None = None, cfg_scale: float | None = None, guidance: str | None = None,
              seed: int = 0, eta: float | None = None,
              noise: tuple[np.ndarray, np.ndarray] | None = None) -> "SampleRun":
        """A validated run, ready to step; None means the manifest's default."""
        return SampleRun(self, class_labels, num_steps, sampler, cfg_scale, guidance, seed, eta, noise)

    def sample(self, class_labels: Sequence[int] | np.ndarray, num_steps: int | str | None = None,
               sampler: str | None = None, cfg_scale: float | None = None, guidance: str | None = None,
               seed: int = 0, eta: float | None = None, noise: tuple[np.ndarray, np.ndarray] | None = None,
               progress: bool = True) -> np.ndarray:
        """Latents (N, C, H, W) float32 for N class labels. See README for the conventions."""
        run = self.start(class_labels, num_steps, sampler, cfg_scale, guidance, seed, eta, noise)
        bar = _Progress(run.total_steps) if progress else None
        start, backend_s = time.perf_counter(), 0.0
        while not run.done:
            feeds = run.feeds()
            t0 = time.perf_counter()
            outputs = run_chunked(self.backend, feeds)
            backend_s += time.perf_counter() - t0
            run.advance(outputs["model_output"])
            if bar:
                bar.update(run.steps_done)
        if bar:
            bar.close()
        self.last_stats = SampleStats(run.total_steps, run.rows, time.perf_counter() - start, backend_s)
        return run.result

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images (N, 3, H, W) float32 from DiT-scale latents (N, C, h, w), as the official scripts'
        `vae.decode(latents / scaling_factor).sample` (the decoder graph divides; not clamped).
        Chunked by the decoder's max batch; NaN/inf output is an error naming the network."""
        if self.decoder is None:
            if "decoder" in self.manifest.networks:
                raise InputError("this pipeline was loaded without its decoder (runtime.load(..., decoder=True))")
            self.manifest.network("decoder")  # ArtifactError: the artifact has no decoder, with the export hint
        return decode(self.decoder, latents)


class SampleRun:
    """One request's sampling loop, stepped from outside: `feeds()` are this step's denoiser rows
    ([x; x] with labels [y; null] under guidance), `advance(model_output)` applies guidance and the
    sampler step. Nothing here is shared with other runs."""

    def __init__(self, pipeline: Pipeline, class_labels, num_steps, sampler, cfg_scale, guidance, seed, eta, noise):
        manifest = pipeline.manifest
        defaults, diffusion = manifest.defaults, manifest.diffusion
        self.labels = _check_labels(class_labels, manifest.model.num_classes)
        self.sampler = get_sampler(sampler if sampler is not None else defaults.sampler)
        self.options = self.sampler.bind(eta=eta)
        self.schedule = schedule_for(self.sampler, diffusion, num_steps if num_steps is not None else defaults.steps)
        guidance = guidance if guidance is not None else defaults.guidance
        if guidance not in diffusion.guided_channels:
            raise InputError(f"unknown guidance {guidance!r}; use {' or '.join(diffusion.guided_channels)}")
        self.guided_channels = int(diffusion.guided_channels[guidance])
        self.cfg_scale = _check_cfg_scale(defaults.cfg_scale if cfg_scale is None else cfg_scale)
        n, shape, steps = len(self.labels), manifest.model.latent_shape, len(self.schedule)
        if noise is None:
            self.noise = SeededNoise(seed, n, shape)
        else:
            self.noise = InjectedNoise(*_pair(noise), num_images=n, shape=shape, num_steps=steps)
        self.guided = self.cfg_scale > 1.0  # as the official sample_ddp.py: no unconditional rows at scale <= 1
        self.rows = 2 * n if self.guided else n
        self.label_rows = (np.concatenate([self.labels, np.full(n, diffusion.null_class, np.int64)]) if self.guided
                           else self.labels)
        self.backend_name = pipeline.backend.name
        self.total_steps, self.steps_done = steps, 0
        self.x = self.noise.initial()
        self.state = None

    @property
    def done(self) -> bool:
        return self.steps_done >= self.total_steps

    @property
    def timestep(self) -> float:
        return float(self.schedule.model_timesteps[self.steps_done])

    def feeds(self) -> dict[str, np.ndarray]:
        latent = np.concatenate([self.x, self.x]) if self.guided else self.x
        return {"latent": latent, "timestep": np.full(self.rows, self.timestep, dtype=np.float32),
                "class_label": self.label_rows}

    def advance(self, model_output: np.ndarray) -> None:
        n, k = len(self.labels), self.steps_done
        out = guide(model_output[:n], model_output[n:], self.cfg_scale, self.guided_channels) if self.guided else model_output
        noise = self.noise.step(k) if self.sampler.uses_noise else None
        self.x, self.state = self.sampler.step(self.x, out, self.schedule, k, noise, self.state, **self.options)
        if not np.isfinite(self.x).all():
            raise StepError(f"sampling produced NaN or inf at step {k + 1}/{self.total_steps} (timestep "
                            f"{self.timestep:g}) on {self.backend_name}; the model output or cfg_scale "
                            f"{self.cfg_scale:g} overflows float32")
        self.steps_done += 1

    @property
    def result(self) -> np.ndarray:
        if not self.done:
            raise InputError(f"this run has done {self.steps_done} of {self.total_steps} steps")
        return self.x


def decode(decoder: Backend, latents: np.ndarray) -> np.ndarray:
    """Images (N, 3, H, W) float32 from a decoder backend: chunked by its max batch, refused when
    the latents or the images are not finite (naming the network and its precision)."""
    from .images import check_finite
    latents = np.asarray(latents)
    want = decoder.network.inputs[0]
    if latents.ndim != 4 or latents.shape[1:] != want.concrete(1)[1:] or not np.issubdtype(latents.dtype, np.floating):
        raise InputError(f"latents have shape {latents.shape} ({latents.dtype}); the decoder takes float "
                         f"(N, {', '.join(map(str, want.concrete(1)[1:]))})")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf")
    images = run_chunked(decoder, {want.name: latents.astype(np.float32, copy=False)})[decoder.network.output_names[0]]
    check_finite(images, "decoder", decoder.precision)
    return images


def _check_labels(class_labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(class_labels)
    if labels.ndim != 1 or labels.size == 0:
        raise InputError(f"class_labels must be a non-empty 1-D sequence of ints, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"class_labels must be integers, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InputError(f"class labels {sorted(set(bad.tolist()))} out of range: this model has classes "
                         f"0..{num_classes - 1} (the null class {num_classes} is added by guidance)")
    return labels.astype(np.int64)


def _check_cfg_scale(cfg_scale) -> float:
    # Checked in float32, the dtype guidance uses: 1e39 is finite in float64 but inf in float32.
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float, np.floating)) \
            or not np.isfinite(_float32(cfg_scale)):
        raise InputError(f"cfg_scale must be a finite float32 number, got {cfg_scale!r}")
    return float(cfg_scale)


def _pair(noise) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise InputError("noise must be None or a tuple (initial (N,C,H,W), steps (K,N,C,H,W))")
    return noise[0], noise[1]


class _Progress:
    """Progress on stderr without dependencies: a redrawn bar on a terminal (at most 10 redraws a
    second), one line per tenth of the loop elsewhere (CI logs)."""

    def __init__(self, total: int):
        self.total, self.start, self.last_draw, self.last_tenth = total, time.perf_counter(), 0.0, 0
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            if now - self.last_draw < 0.1 and done < self.total:
                return
            self.last_draw = now
            filled = int(30 * done / self.total)
            sys.stderr.write(f"\rsampling [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} steps, {rate:.1f} steps/s")
        else:
            tenth = 10 * done // self.total
            if tenth == self.last_tenth:
                return
            self.last_tenth = tenth
            sys.stderr.write(f"sampling {done}/{self.total} steps, {rate:.1f} steps/s\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def load(artifact_dir: str | Path, backend: str = "auto", precision: str | None = None,
         threads: int | None = None, max_batch: int | None = None, allow_plan_host_code: bool = False,
         verify: bool = True, decoder: bool | None = None, decoder_precision: str | None = None,
         decoder_max_batch: int | None = None) -> Pipeline:
    """A pipeline over an exported artifact. backend: "auto", a kind ("onnxruntime", "tensorrt")
    or an id ("onnxruntime-fp16"); precision None: fp16 on TensorRT, fp32 on ONNX Runtime.
    "auto" takes TensorRT when a plan compatible with this GPU and TensorRT exists, else ONNX
    Runtime (CUDA EP when onnxruntime-gpu is installed, else CPU). `allow_plan_host_code` lets a
    version-compatible TensorRT plan (whose sha256 matched) run the host code it embeds: only for
    plans you built or trust. `verify` (default on) checks every file a backend reads against the
    manifest's sha256 before use; hashes are cached per (path, size, mtime), so loading the same
    artifact again does not rehash it. verify=False is the documented opt-out.
    `decoder` None loads the artifact's VAE decoder when it has one (True requires it, False skips
    it), on the same backend kind, in `decoder_precision` (None: the kind's default; fp32 avoids
    the fp16 overflow VAE decoders are known for)."""
    manifest = load_manifest(artifact_dir)
    denoiser = create_backend(manifest, backend, precision, "denoiser", threads=threads, max_batch=max_batch,
                              allow_plan_host_code=allow_plan_host_code, verify=verify)
    decoder_backend = None
    if decoder or (decoder is None and "decoder" in manifest.networks):
        manifest.network("decoder")
        kind = backend if backend == "auto" else str(backend).partition("-")[0]  # the kind, its own precision
        decoder_backend = create_backend(manifest, kind, decoder_precision, "decoder", threads=threads,
                                         max_batch=decoder_max_batch, allow_plan_host_code=allow_plan_host_code,
                                         verify=verify)
    elif decoder_precision is not None:
        raise InputError("decoder_precision given, but no decoder is loaded")
    return Pipeline(denoiser, manifest, decoder_backend)


def _float32(value) -> np.float32:
    with np.errstate(over="ignore"):  # an overflow is the answer (inf), not a warning
        return np.float32(value)
