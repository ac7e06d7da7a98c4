"""Noise for the sampling loop: seeded (numpy) or injected arrays.

Seeded noise uses one generator per image, seeded with (seed, image index): an image's noise is
the same whatever the batch it is sampled in and whatever the backend's chunking.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


class SeededNoise:
    def __init__(self, seed: int, num_images: int, shape: tuple[int, ...]):
        self.generators = [np.random.default_rng([int(seed), row]) for row in range(num_images)]
        self.shape = tuple(shape)

    def _draw(self) -> np.ndarray:
        return np.stack([g.standard_normal(self.shape, dtype=np.float32) for g in self.generators])

    def initial(self) -> np.ndarray:
        return self._draw()

    def step(self, k: int) -> np.ndarray:
        """Noise for the k-th step from the noisiest (drawn in order, once per step)."""
        return self._draw()


class InjectedNoise:
    """Fixed arrays: initial (N, C, H, W) and steps (K, N, C, H, W), step k at the k-th step."""

    def __init__(self, initial: np.ndarray, steps: np.ndarray, num_images: int, shape: tuple[int, ...], num_steps: int):
        initial, steps = np.asarray(initial), np.asarray(steps)
        want_initial, want_steps = (num_images, *shape), (num_steps, num_images, *shape)
        if initial.shape != want_initial:
            raise InputError(f"injected initial noise has shape {initial.shape}; expected {want_initial}")
        if steps.shape != want_steps:
            raise InputError(f"injected step noise has shape {steps.shape}; expected {want_steps} "
                             f"(steps, images, C, H, W)")
        self._initial = initial.astype(np.float32, copy=False)
        self._steps = steps.astype(np.float32, copy=False)
        for what, array in (("initial", self._initial), ("step", self._steps)):
            if not np.isfinite(array).all():
                raise InputError(f"injected {what} noise contains NaN or inf (in float32)")

    def initial(self) -> np.ndarray:
        return self._initial.copy()

    def step(self, k: int) -> np.ndarray:
        return self._steps[k]
