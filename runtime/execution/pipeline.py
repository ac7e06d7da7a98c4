"""The conditional sampling loop with classifier-free guidance, over any backend.

A `Pipeline` holds what is shared and read-only: the manifest, the backend and a schedule cache.
Everything one request changes lives in its `SampleRun` (conditions, noise, the sampler's loop and
its state), so concurrent `sample` calls on one pipeline from several threads return exactly what
sequential calls return, and a batching scheduler can step many runs through one backend call
(`feeds()` of several runs concatenated, `advance()` each with its rows of the output). Backends
serialise their own calls where the engine needs it (TensorRT holds a lock).

Guidance is the official `forward_with_cfg`: the model sees [x; x] with conditions [c; null], and
the guided output mixes the first `guided_channels` channels (u + s (c - u)); the rest stay per
half. A loop that integrates the whole guided batch (`Sampler.integrates_null_half`: SiT's dopri5,
whose error norm covers both halves) gets the state [x; x_null] and the 2N-row guided output; the
model is still fed [x; x], as the official code does.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import create_backend
from .cache import NONE, Segments, denoise, start_cache
from .chunking import Backend, run_chunked
from ..core.errors import CallBudgetReached, InputError, StepError
from ..artifact.labels import resolve_labels
from ..artifact.manifest import Manifest, load_manifest
from ..sampling.noise import InjectedNoise, SeededNoise
from ..sampling.prefetch import NoisePrefetch
from ..core.progress import StepProgress
from ..sampling import request
from ..sampling.request import LoadOptions, SampleSpec
from ..sampling.samplers import Sampler, get_sampler, guide
from ..core.validate import check_array, check_int, check_number


MAX_MODEL_CALLS = 1000  # an adaptive sampler's default budget per run (serve: --max-steps); dopri5 at its
# default tolerances takes tens of calls, so reaching 1000 means tolerances no float32 loop can meet
MODEL_CALLS_LIMIT = 1_000_000  # the largest budget one may ask for


@dataclass
class SampleStats:
    steps: int  # model calls
    model_rows: int  # rows per model call (doubled under guidance)
    total_s: float
    backend_s: float
    block_evaluations: float | None = None  # transformer blocks run per row: depth per full call (cache.py)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.total_s if self.total_s else float("inf")

    @property
    def overhead_fraction(self) -> float:
        """Time spent outside the backend (guidance, sampler math, noise) per unit of loop time."""
        return (self.total_s - self.backend_s) / self.total_s if self.total_s else 0.0


@lru_cache(maxsize=64)
def _schedule(sampler: str, process, steps):
    return get_sampler(sampler).schedule(process, steps)


def schedule_for(sampler: Sampler, process, steps):
    """The sampler's schedule for a step spec over the family's process (frozen, hashable: the cache
    key), cached."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer, str)):
        raise InputError(f"num_steps must be an int or a step spec string ({sampler.steps_help}), got {steps!r}")
    return _schedule(sampler.name, process, steps if isinstance(steps, str) else int(steps))


class Pipeline:
    def __init__(self, backend: Backend, manifest: Manifest, decoder: Backend | None = None):
        if backend.network.name != "denoiser":
            raise InputError(f"a pipeline samples with the denoiser, not the {backend.network.name}")
        self.backend = backend
        self.decoder = decoder
        self.manifest = manifest
        self.last_stats: SampleStats | None = None
        self.segment_options: dict = {}  # create_backend options for the segments (load() sets them)
        self._segments: Segments | None = None
        self._segments_lock = threading.Lock()

    def segments(self) -> Segments:
        """The denoiser's segment backends (feature caching), created on first use with the
        denoiser's backend kind and precision."""
        with self._segments_lock:
            if self._segments is None:
                names = [n for n, s in self.manifest.networks.items() if s.extra.get("segment_of") == "denoiser"]
                self._segments = Segments({n: create_backend(self.manifest, self.backend.name, None, n,
                                                             **self.segment_options) for n in names})
            return self._segments

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.model.latent_shape

    def start(self, class_labels: Sequence[int] | np.ndarray, num_steps: int | str | None = None,
              sampler: str | None = None, cfg_scale: float | None = None, guidance: str | None = None,
              seed: int = 0, eta: float | None = None, noise: tuple | None = None, image_offset: int = 0,
              max_model_calls: int | None = None, cache: str = NONE, cache_options: dict | None = None,
              **sampler_options) -> "SampleRun":
        """A validated run, ready to step; None means the manifest's default. `sampler_options` are
        the chosen sampler's own options (e.g. atol/rtol for ode-dopri5); an option it does not take
        is refused. `max_model_calls` caps an adaptive sampler's model calls (default
        MAX_MODEL_CALLS; CallBudgetReached when reached); fixed-step samplers refuse it. `cache` /
        `cache_options`: feature caching (runtime/execution/cache.py, docs/caching.md)."""
        return self.start_spec(SampleSpec(class_labels, sampler, num_steps, guidance, cfg_scale, seed, image_offset,
                                          request.sampler_options(eta, sampler_options), max_model_calls, cache,
                                          cache_options or {}), noise)

    def start_spec(self, spec: SampleSpec, noise: tuple | None = None) -> "SampleRun":
        """`start` for a request built elsewhere (runtime/sampling/request.py); `noise` injects the noise."""
        run = SampleRun(self, spec, noise)
        if spec.max_model_calls is not None:
            run.limit_model_calls(spec.max_model_calls)
        return run

    def sample(self, class_labels: Sequence[int] | np.ndarray, num_steps: int | str | None = None,
               sampler: str | None = None, cfg_scale: float | None = None, guidance: str | None = None,
               seed: int = 0, eta: float | None = None, noise: tuple | None = None, progress: bool = True,
               image_offset: int = 0, max_model_calls: int | None = None, cache: str = NONE,
               cache_options: dict | None = None, **sampler_options) -> np.ndarray:
        """Latents (N, C, H, W) float32 for N class labels. See docs/runtime.md for the conventions;
        `max_model_calls`: see `start`; `cache` "first-block" or "taylorseer" with diffusers'
        `cache_options` in docs/caching.md."""
        spec = SampleSpec(class_labels, sampler, num_steps, guidance, cfg_scale, seed, image_offset,
                          request.sampler_options(eta, sampler_options), max_model_calls, cache, cache_options or {})
        return self.sample_spec(spec, noise, progress)

    def sample_spec(self, spec: SampleSpec, noise: tuple | None = None, progress: bool = True) -> np.ndarray:
        """`sample` for a request built elsewhere (runtime/sampling/request.py)."""
        run = self.start_spec(spec, noise)
        bar = StepProgress(run) if progress else None
        start, backend_s = time.perf_counter(), 0.0
        try:
            while not run.done:
                feeds = run.feeds()
                t0 = time.perf_counter()
                output = denoise(self, [run], feeds, self.backend)  # cache "none": the monolithic graph
                backend_s += time.perf_counter() - t0
                run.advance(output)
                if bar:
                    bar.update()
        finally:  # a failing backend or an interrupt leaves no prefetch thread behind
            run.close()
            if bar:
                bar.close()
        self.last_stats = SampleStats(run.steps_done, run.rows, time.perf_counter() - start, backend_s,
                                      run.block_evaluations())
        return run.result

    def sample_batches(self, spec: SampleSpec, labels: np.ndarray, batch: int, first_index: int = 0):
        """The latents of `labels` in batches of `batch` (each after its call; `last_stats` is that
        call's): image i of the job (first_index + its position) draws the noise of image i of
        spec's seed, so the images are the same whatever the batch (generate, quality, calibration)."""
        for start in range(0, len(labels), batch):
            yield self.sample_spec(spec.for_batch(labels[start:start + batch], first_index + start), progress=False)

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
    """One request's sampling loop, stepped from outside: `feeds()` are this model call's denoiser
    rows ([x; x] with conditions [c; null] under guidance), `advance(model_output)` applies guidance
    and hands the output to the sampler's loop. Nothing here is shared with other runs.

    A seeded run that draws step noise computes draw k + 1 on its own worker thread while the engine
    runs (runtime/sampling/prefetch.py; the same bits); the thread stops when the run finishes or fails, at
    `close()` (a driver that drops a run early calls it), or when the run is collected."""

    def __init__(self, pipeline: Pipeline, spec: SampleSpec, noise: tuple | None = None):
        manifest = pipeline.manifest
        defaults = manifest.defaults
        network = pipeline.backend.network
        self.latent_name, self.time_name = network.input("latent").name, network.input("time").name
        self.output_name = network.output.name
        condition = class_condition(network)
        self.condition_name = condition.name
        class_labels = spec.labels
        if isinstance(class_labels, (list, tuple)) and any(isinstance(v, str) for v in class_labels):
            class_labels = resolve_labels(class_labels, manifest.labels)  # class names, as DiTPipeline.get_label_ids
        self.labels = condition.condition.check(class_labels)
        self.sampler = get_sampler(spec.sampler if spec.sampler is not None else defaults.sampler, manifest.family.name)
        options = spec.options
        if not isinstance(options, dict):
            raise InputError(f"sampler options must be a dict of option names to values, got {type(options).__name__}")
        if options.get("eta") is None and defaults.eta is not None and "eta" in self.sampler.options:
            options = {**options, "eta": defaults.eta}  # the manifest's default eta, for samplers that take one
        self.options = self.sampler.bind(**options)
        self.schedule = schedule_for(self.sampler, manifest.process,
                                     spec.steps if spec.steps is not None else defaults.steps)
        self.guided_channels = manifest.guidance.channels(spec.guidance if spec.guidance is not None
                                                          else defaults.guidance)
        self.cfg_scale = check_number(defaults.cfg_scale if spec.cfg_scale is None else spec.cfg_scale, "cfg_scale",
                                      float32=True)
        n, shape = len(self.labels), manifest.model.latent_shape
        if noise is None:
            self.noise = SeededNoise(spec.seed, n, shape, spec.image_offset)
        else:
            if spec.image_offset:
                raise InputError("image_offset selects seeded noise; it does not apply to injected noise")
            if not isinstance(noise, (tuple, list)) or len(noise) != 2:
                raise InputError("noise must be None or a tuple (initial (N,C,H,W), steps (K,N,C,H,W) or None)")
            self.noise = InjectedNoise(noise[0], noise[1], n, shape, self.sampler.noise_draws(self.schedule))
        self.guided = self.cfg_scale > 1.0  # as the official sample_ddp.py: no unconditional rows at scale <= 1
        self.rows = 2 * n if self.guided else n
        self.condition_rows = (np.concatenate([self.labels, condition.condition.null_rows(n)]) if self.guided
                               else self.labels)
        self.null_half = self.guided and self.sampler.integrates_null_half
        self.backend_name = pipeline.backend.name
        self.total_steps = self.sampler.model_calls(self.schedule)  # None: adaptive
        self.max_model_calls = self.total_steps or MAX_MODEL_CALLS
        self._budget_names = ("max_model_calls", "")  # the option that sets it, and the most it may be
        self.cache = start_cache(manifest, self.sampler, self.schedule, spec.cache, spec.cache_options, self.rows,
                                 getattr(pipeline.backend, "precision", None))
        self.depth = manifest.model.depth
        self.steps_done = 0
        self._prefetch = self._noise_prefetch()
        step_noise = self._prefetch or (self.noise.step if self.sampler.uses_noise else None)
        x = self.noise.initial()
        self._loop = self.sampler.loop(np.concatenate([x, x]) if self.null_half else x, self.schedule,
                                       step_noise, **self.options)
        self._result: np.ndarray | None = None
        self._pending = self._next(None)

    def _noise_prefetch(self) -> NoisePrefetch | None:
        """The seeded stream's step draws one call ahead (injected noise is already in memory)."""
        count = self.sampler.step_draws(self.schedule, self.options)
        if not isinstance(self.noise, SeededNoise) or count == 0:
            return None
        return NoisePrefetch(self.noise.step, count)  # its thread starts with the first model call

    def close(self) -> None:
        """Stop this run's noise prefetch (idempotent; a finished or failed run has done it)."""
        if self._prefetch is not None:
            self._prefetch.close()

    @property
    def done(self) -> bool:
        return self._result is not None

    def limit_model_calls(self, budget: int, option: str = "max_model_calls", limit: int = MODEL_CALLS_LIMIT,
                          where: str = "") -> None:
        """Cap an adaptive sampler's model calls at `budget` (in [1, limit]): `advance` raises
        CallBudgetReached once the budget is made and the loop has not ended. A fixed-step sampler
        makes a known number of calls: a budget for it is refused. `option` and `where` name the
        setting in messages (serve: max_calls, "the server's max_steps")."""
        if self.total_steps is not None:
            raise InputError(f"{option} applies to adaptive samplers only; {self.sampler.name} makes exactly "
                             f"{self.total_steps} model calls")
        self.max_model_calls = check_int(budget, f"{option} (model calls)", 1, limit)
        self._budget_names = (option, f" (at most {limit}, {where})" if where else "")

    def block_evaluations(self) -> float:
        """Transformer-block evaluations so far, per row: depth per uncached call."""
        return self.cache.block_evaluations() if self.cache is not None else float(self.depth * self.steps_done)

    @property
    def timestep(self) -> float:
        """The model time of the next call (the last one's once done)."""
        return self._pending[1]

    def feeds(self) -> dict[str, np.ndarray]:
        if self.done:
            raise InputError(f"this run is finished ({self.steps_done} model calls); it takes no more feeds")
        x, t = self._pending
        if self._prefetch is not None and self.steps_done == 0:
            self._prefetch.start()  # the first step draw, while the engine runs the first call
        if self.null_half:
            x = x[:len(self.labels)]
        latent = np.concatenate([x, x]) if self.guided else x
        return {self.latent_name: latent, self.time_name: np.full(self.rows, t, dtype=np.float32),
                self.condition_name: self.condition_rows}

    def advance(self, model_output: np.ndarray) -> None:
        if self.done:
            raise InputError(f"this run is finished ({self.steps_done} model calls); advance was called again")
        model_output = check_array(model_output, "model_output")
        if model_output.ndim != 4 or model_output.shape[0] != self.rows or model_output.shape[2:] != self._pending[0].shape[2:]:
            raise InputError(f"model_output has shape {model_output.shape}; this run's step takes ({self.rows}, channels, "
                             f"{', '.join(map(str, self._pending[0].shape[2:]))})")
        self._pending = self._next(self._guide(model_output.astype(np.float32, copy=False)))
        self.steps_done += 1
        if not self.done and self.steps_done >= self.max_model_calls:
            option, most = self._budget_names
            raise CallBudgetReached(
                f"{self.sampler.name} made {self.steps_done} model calls (its {option}) without reaching the end "
                f"(t={self.timestep:.4g}); loosen its tolerances (atol, rtol) or raise {option}{most}")

    def _guide(self, out: np.ndarray) -> np.ndarray:
        if not self.guided:
            return out
        n = len(self.labels)
        guided = guide(out[:n], out[n:], self.cfg_scale, self.guided_channels)
        if not self.null_half:
            return guided
        null = out[n:].copy()  # forward_with_cfg's second half: the same guided channels, its own rest
        null[:, :self.guided_channels] = guided[:, :self.guided_channels]
        return np.concatenate([guided, null])

    def _next(self, output: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Send the output to the loop; the next (state, t), or the result when the loop ends."""
        previous = getattr(self, "_pending", (None, float("nan")))[1]
        try:
            x, t = next(self._loop) if output is None else self._loop.send(output)
        except StopIteration as stop:
            self.close()
            x, t = stop.value, previous
            self._result = x[:len(self.labels)] if self.null_half else x
        except BaseException:
            self.close()
            raise
        if not np.isfinite(x).all():
            self.close()
            at = f"step {self.steps_done + 1}/{self.total_steps}" if self.total_steps else f"model call {self.steps_done + 1}"
            raise StepError(f"sampling produced NaN or inf at {at} (timestep {previous:g}) on {self.backend_name}; the "
                            f"model output or cfg_scale {self.cfg_scale:g} overflows float32")
        return x, t

    @property
    def result(self) -> np.ndarray:
        if not self.done:
            raise InputError(f"this run has done {self.steps_done} model calls and is not finished")
        return self._result.astype(np.float32, copy=False)


def class_condition(network):
    """The denoiser's one class-condition input (its TensorSpec; `.condition` the ClassLabels), or
    an InputError naming what it takes instead: sampling takes class labels."""
    conditions = network.conditions
    if len(conditions) != 1 or conditions[0].condition.kind != "class":
        kinds = [t.condition.kind for t in conditions]
        raise InputError(f"this denoiser takes {kinds or 'no'} conditioning; Pipeline.sample takes class labels "
                         "(one 'class' condition input)")
    return conditions[0]


def decode(decoder: Backend, latents: np.ndarray) -> np.ndarray:
    """Images (N, 3, H, W) float32 from a decoder backend: chunked by its max batch, refused when
    the latents or the images are not finite (naming the network and its precision)."""
    from ..core.images import check_finite
    latents = np.asarray(latents)
    want = decoder.network.input("latent")
    if latents.ndim != 4 or latents.shape[1:] != want.concrete(1)[1:] or not np.issubdtype(latents.dtype, np.floating):
        raise InputError(f"latents have shape {latents.shape} ({latents.dtype}); the decoder takes float "
                         f"(N, {', '.join(map(str, want.concrete(1)[1:]))})")
    if len(latents) == 0:
        raise InputError("latents hold no image (N = 0)")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or inf")
    images = run_chunked(decoder, {want.name: latents.astype(np.float32, copy=False)})[decoder.network.output.name]
    check_finite(images, "decoder", decoder.precision)
    return images


def decoder_backend_name(backend: str) -> str:
    """The backend `load` opens the decoder on for the denoiser's `backend`: the same kind, in the
    decoder's own precision ("auto" stays "auto")."""
    return backend if backend == "auto" else str(backend).partition("-")[0]


def load(artifact_dir: str | Path, backend: str = "auto", precision: str | None = None,
         threads: int | None = None, max_batch: int | None = None, allow_plan_host_code: bool = False,
         verify: bool = True, decoder: bool | None = None, decoder_precision: str | None = None,
         decoder_max_batch: int | None = None, public_key: str | Path | None = None) -> Pipeline:
    """A pipeline over an exported artifact. backend: "auto", a kind ("onnxruntime", "tensorrt")
    or an id ("onnxruntime-fp16"); precision None: fp16 on TensorRT, fp32 on ONNX Runtime.
    "auto" takes TensorRT when a plan compatible with this GPU and TensorRT exists, else ONNX
    Runtime (CUDA EP when onnxruntime-gpu is installed, else CPU). `allow_plan_host_code` lets a
    version-compatible TensorRT plan (whose sha256 matched) run the host code it embeds: only for
    plans you built or trust. `verify` (default on) checks every file a backend reads against the
    manifest's sha256 before use; hashes are cached per (path, inode, size, mtime, ctime), so
    loading the same artifact again does not rehash it. verify=False is the documented opt-out.
    `decoder` None loads the artifact's VAE decoder when it has one (True requires it, False skips
    it), on the same backend kind, in `decoder_precision` (None: the kind's default; fp32 avoids
    the fp16 overflow VAE decoders are known for). `public_key` (a PEM file): refuse the artifact
    unless its signature (model.sig, `ditrt sign`) verifies with it and covers every file in it."""
    return load_pipeline(artifact_dir, LoadOptions(backend, precision, threads, max_batch, verify, decoder,
                                                   decoder_precision, decoder_max_batch, allow_plan_host_code,
                                                   public_key))


def load_pipeline(artifact_dir: str | Path, options: LoadOptions) -> Pipeline:
    """`load` with its options in one object (runtime/sampling/request.py)."""
    o = options
    if o.public_key is not None:
        from ..artifact.signing import require_signature
        require_signature(artifact_dir, o.public_key)
    manifest = load_manifest(artifact_dir)
    shared = o.backend_options()
    denoiser = create_backend(manifest, o.backend, o.precision, "denoiser", max_batch=o.max_batch, **shared)
    decoder_backend = None
    if o.decoder or (o.decoder is None and "decoder" in manifest.networks):
        manifest.network("decoder")
        decoder_backend = create_backend(manifest, decoder_backend_name(o.backend), o.decoder_precision, "decoder",
                                         max_batch=o.decoder_max_batch, **shared)
    elif o.decoder_precision is not None:
        raise InputError("decoder_precision given, but no decoder is loaded")
    pipe = Pipeline(denoiser, manifest, decoder_backend)
    pipe.segment_options = {"max_batch": o.max_batch, **shared}
    return pipe
