"""Noise for the sampling loop: seeded (numpy) or injected arrays.

Seeded noise uses one generator per image, seeded with (seed, image index): an image's noise is
the same whatever the batch it is sampled in and whatever the backend's chunking.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

NOISE_VERSION = "numpy-pcg64-per-image/1"  # ditrt 0.2's seeded stream


class SeededNoise:
    def __init__(self, seed: int, num_images: int, shape: tuple[int, ...], image_offset: int = 0):
        self.generators = [np.random.default_rng([int(seed), image_offset + row]) for row in range(num_images)]
        self.shape = tuple(shape)

    def _draw(self) -> np.ndarray:
        return np.stack([g.standard_normal(self.shape, dtype=np.float32) for g in self.generators])

    def initial(self) -> np.ndarray:
        return self._draw()

    def step(self, k: int) -> np.ndarray:
        """Noise for the k-th step from the noisiest (drawn in order, once per step)."""
        return self._draw()


class InjectedNoise:
    """Fixed arrays: initial (N, C, H, W) and steps (K, N, C, H, W), draw k at the k-th stochastic
    step. A sampler that draws nothing (K = 0) takes steps None or an empty array."""

    def __init__(self, initial, steps, num_images: int, shape: tuple[int, ...], num_draws: int):
        want_initial, want_steps = (num_images, *shape), (num_draws, num_images, *shape)
        initial = _float_array(initial, "initial")
        steps = np.zeros(want_steps, np.float32) if steps is None and num_draws == 0 else _float_array(steps, "step")
        if steps.size == 0 and num_draws == 0:
            steps = np.zeros(want_steps, np.float32)
        if initial.shape != want_initial:
            raise InputError(f"injected initial noise has shape {initial.shape}; expected {want_initial}")
        if steps.shape != want_steps:
            raise InputError(f"injected step noise has shape {steps.shape}; expected {want_steps} "
                             f"(draws, images, C, H, W)" + (" or None: this sampler draws no noise" if not num_draws else ""))
        self._initial = initial.astype(np.float32, copy=False)
        self._steps = steps.astype(np.float32, copy=False)
        for what, array in (("initial", self._initial), ("step", self._steps)):
            if not np.isfinite(array).all():
                raise InputError(f"injected {what} noise contains NaN or inf (in float32)")

    def initial(self) -> np.ndarray:
        return self._initial.copy()

    def step(self, k: int) -> np.ndarray:
        return self._steps[k]


def _float_array(value, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputError(f"injected {what} noise is not an array ({e})") from None
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"injected {what} noise must be a float array, got {array.dtype}")
    return array
