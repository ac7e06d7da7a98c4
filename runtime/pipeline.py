"""The class-conditional sampling loop with classifier-free guidance, over any backend."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import Backend, OnnxRuntimeBackend, onnxruntime_device, run_batched
from .manifest import ArtifactError, Manifest, load_manifest
from .noise import InjectedNoise, SeededNoise
from .samplers import SAMPLERS, ddim_step, guide
from .schedule import Schedule, ScheduleError, respaced_schedule

BACKENDS = ("auto", "onnxruntime", "tensorrt")


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


@lru_cache(maxsize=32)
def _schedule(spec: str) -> Schedule:
    return respaced_schedule(spec)


class Pipeline:
    def __init__(self, backend: Backend, manifest: Manifest):
        d = manifest.diffusion
        if (d.beta_schedule, d.num_train_timesteps) != ("linear", 1000):
            raise ArtifactError(f"unsupported diffusion schedule {d.beta_schedule!r} over {d.num_train_timesteps} "
                                "steps: the official DiT uses 'linear' over 1000")
        self.backend = backend
        self.manifest = manifest
        self.last_stats: SampleStats | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.manifest.model
        return (m.in_channels, m.input_size, m.input_size)

    def sample(self, class_labels: Sequence[int] | np.ndarray, num_steps: int | str = 250, sampler: str = "ddpm",
               cfg_scale: float = 4.0, guidance: str = "official", seed: int = 0, eta: float = 0.0,
               noise: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> np.ndarray:
        """Latents (N, C, H, W) float32 for N class labels. See README for the conventions."""
        labels = self._check_labels(class_labels)
        sched = self._check_steps(num_steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; use {' or '.join(SAMPLERS)}")
        guided_channels = self._guided_channels(guidance)
        if not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
        if sampler == "ddim" and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        n, shape, steps = len(labels), self.latent_shape, len(sched)
        source = (SeededNoise(seed, n, shape) if noise is None
                  else InjectedNoise(*_pair(noise), num_images=n, shape=shape, num_steps=steps))

        guided = cfg_scale > 1.0  # as the official sample_ddp.py: no unconditional rows at scale <= 1
        rows = 2 * n if guided else n
        latent_in = np.empty((rows, *shape), dtype=np.float32)
        timestep_in = np.empty(rows, dtype=np.float32)
        label_in = np.concatenate([labels, np.full(n, self.manifest.diffusion.null_class, np.int64)]) if guided else labels

        step = partial(ddim_step, eta=eta) if sampler == "ddim" else SAMPLERS[sampler]
        x = source.initial()
        bar = _Progress(steps) if progress else None
        start, backend_s = time.perf_counter(), 0.0
        for k, i in enumerate(range(steps - 1, -1, -1)):
            latent_in[:n] = x
            if guided:
                latent_in[n:] = x
            timestep_in.fill(sched.timesteps[i])
            t0 = time.perf_counter()
            out = run_batched(self.backend, latent_in, timestep_in, label_in)
            backend_s += time.perf_counter() - t0
            model_out = guide(out[:n], out[n:], cfg_scale, guided_channels) if guided else out
            x = step(x, model_out, sched, i, source.step(k))
            if bar:
                bar.update(k + 1)
        self.last_stats = SampleStats(steps, rows, time.perf_counter() - start, backend_s)
        if bar:
            bar.close()
        return x

    def _check_labels(self, class_labels) -> np.ndarray:
        labels = np.asarray(class_labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"class_labels must be a non-empty 1-D sequence of ints, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"class_labels must be integers, got {labels.dtype}")
        num_classes = self.manifest.model.num_classes
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"class labels {sorted(set(bad.tolist()))} out of range: this model has classes "
                             f"0..{num_classes - 1} (the null class {num_classes} is added by guidance)")
        return labels.astype(np.int64)

    @staticmethod
    def _check_steps(num_steps) -> Schedule:
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer, str)):
            raise ScheduleError(f"num_steps must be an int or a respacing spec string, got {num_steps!r}")
        return _schedule(str(num_steps).strip())

    def _guided_channels(self, guidance: str) -> int:
        table = self.manifest.diffusion.guided_channels
        if guidance not in table:
            raise ValueError(f"unknown guidance {guidance!r}; use {' or '.join(table)}")
        return int(table[guidance])


def _pair(noise) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise ValueError("noise must be None or a tuple (initial (N,C,H,W), steps (K,N,C,H,W))")
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
         threads: int | None = None, max_batch: int | None = None) -> Pipeline:
    """A pipeline over an exported artifact. precision None: fp16 on TensorRT, fp32 on ONNX Runtime.
    backend="auto" takes TensorRT when a plan compatible with this GPU and TensorRT exists, else ONNX
    Runtime (CUDA EP when onnxruntime-gpu is installed, else CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if precision not in (None, "fp32", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; use fp32 or fp16")
    manifest = load_manifest(artifact_dir)
    if backend == "auto":
        from .tensorrt import compatible_engine
        backend = "tensorrt" if precision in (None, "fp16") and compatible_engine(manifest) else "onnxruntime"
    if backend == "tensorrt":
        if precision == "fp32":
            raise ArtifactError("TensorRT engines are built from the fp16 graph; use precision='fp16' or the "
                                "onnxruntime backend for fp32")
        from .tensorrt import TensorRTBackend
        return Pipeline(TensorRTBackend.from_manifest(manifest, max_batch=max_batch), manifest)
    path = manifest.graph_path(precision or "fp32")
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    return Pipeline(OnnxRuntimeBackend(path, onnxruntime_device(), threads, max_batch), manifest)
