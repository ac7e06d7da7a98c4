"""Noise for the sampling loop: ditrt's seeded stream, or injected arrays.

The seeded stream (docs/noise.md, the specification to the bit) is counter-based: value j of
draw d of image i under seed s is a pure function of (s, i, d, j), so any step's noise is drawn
without the earlier ones, and an image's noise does not depend on its batch, on chunking, on the
scheduler, on a shard or on the language: the C++ runtime (runtime/cpp/src/noise.cpp) computes
the same bits. Philox4x32-10 (Random123 / cuRAND) turns a counter (block, draw, image lo, image
hi) and the key (seed lo, seed hi) into four 32-bit words; each pair of words becomes two
normals by Box-Muller in float64, rounded to float32 at the end. log, sin and cos are our own
polynomials over correctly rounded +, -, *, / and sqrt only, because numpy's SIMD kernels and
libm disagree in the last bit.

Draw 0 is the initial noise x_T; draw k + 1 is the noise of the k-th sampler step (k = 0 the
noisiest).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.validate import check_array, check_int

NOISE_VERSION = "philox4x32-10+bm-poly/1"

# Philox4x32-10 (Salmon et al., SC'11): multipliers, Weyl key increments, rounds.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

# The transform's constants, each the double nearest to the value named (docs/noise.md).
LN2_HI = float.fromhex("0x1.62e42fee00000p-1")  # ln 2 cut to 32 significant bits (fdlibm ln2_hi): e * LN2_HI is exact
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")  # ln 2 - LN2_HI
SQRT_HALF = float.fromhex("0x1.6a09e667f3bcdp-1")
PI_OVER_2_2M31 = float.fromhex("0x1.921fb54442d18p-31")  # (pi / 2) * 2^-31
ATANH = [float.fromhex(h) for h in (  # 1/3, 1/5, ..., 1/19
    "0x1.5555555555555p-2", "0x1.999999999999ap-3", "0x1.2492492492492p-3", "0x1.c71c71c71c71cp-4",
    "0x1.745d1745d1746p-4", "0x1.3b13b13b13b14p-4", "0x1.1111111111111p-4", "0x1.e1e1e1e1e1e1ep-5",
    "0x1.af286bca1af28p-5")]
SIN = [float.fromhex(h) for h in (  # -1/3!, 1/5!, ..., -1/15!
    "-0x1.5555555555555p-3", "0x1.1111111111111p-7", "-0x1.a01a01a01a01ap-13", "0x1.71de3a556c734p-19",
    "-0x1.ae64567f544e4p-26", "0x1.6124613a86d09p-33", "-0x1.ae7f3e733b81fp-41")]
COS = [float.fromhex(h) for h in (  # -1/2!, 1/4!, ..., 1/16!
    "-0x1.0000000000000p-1", "0x1.5555555555555p-5", "-0x1.6c16c16c16c17p-10", "0x1.a01a01a01a01ap-16",
    "-0x1.27e4fb7789f5cp-22", "0x1.1eed8eff8d898p-29", "-0x1.93974a8c07c9dp-37", "0x1.ae7f3e733b81fp-45")]

_MASK32, _32 = np.uint64(0xFFFFFFFF), np.uint64(32)
_CHUNK = 1 << 13  # counters per pass: the ~20 temporaries (64 KiB each) stay in cache, below malloc's mmap threshold
MAX_VALUES = 4 << 32  # per (image, draw): the block index is one 32-bit counter word


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int, xp=np) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): uint64 arrays holding 32-bit
    words (broadcast together) in, four uint64 arrays of 32-bit words out. A round is
    (c0, c1, c2, c3) <- (hi(p1) ^ c1 ^ k0, lo(p1), hi(p0) ^ c3 ^ k1, lo(p0)) with the exact 64-bit
    products p0 = M0 c0, p1 = M1 c2; in place, since fresh arrays per operation cost half the time."""
    shape = np.broadcast_shapes(*(np.shape(c) for c in (c0, c1, c2, c3)))
    c0, c1, c2, c3 = (xp.array(xp.broadcast_to(xp.asarray(c, dtype=np.uint64), shape)) for c in (c0, c1, c2, c3))
    p0, p1 = xp.empty(shape, np.uint64), xp.empty(shape, np.uint64)
    for _ in range(PHILOX_ROUNDS):
        xp.multiply(c0, np.uint64(PHILOX_M0), out=p0)
        xp.multiply(c2, np.uint64(PHILOX_M1), out=p1)
        xp.right_shift(p1, _32, out=c0)
        c0 ^= c1
        c0 ^= np.uint64(k0)
        xp.right_shift(p0, _32, out=c2)
        c2 ^= c3
        c2 ^= np.uint64(k1)
        xp.bitwise_and(p1, _MASK32, out=c1)
        xp.bitwise_and(p0, _MASK32, out=c3)
        k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _horner(z: np.ndarray, coefficients: list[float], xp=np) -> np.ndarray:
    """c[0] + z (c[1] + z (c[2] + ...)), innermost first: one rounding per * and +."""
    p = xp.full_like(z, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p *= z
        p += c
    return p


def log_poly(u: np.ndarray, xp=np) -> np.ndarray:
    """ln u for float64 u in (0, 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s)
    for s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^19."""
    m, e = xp.frexp(u)  # exact: m in [0.5, 1)
    low = m < SQRT_HALF
    m *= low + 1.0  # doubled where low (exact)
    e = e.astype(np.float64)
    e -= low
    s = m - 1.0
    m += 1.0
    s /= m  # (m - 1) / (m + 1)
    z = s * s
    s += s  # t = 2 s
    ln_m = _horner(z, ATANH, xp)  # in place, each step one of t + t * (z * h)'s roundings
    ln_m *= z
    ln_m *= s
    ln_m += s
    low_part = e * LN2_LO
    low_part += ln_m
    e *= LN2_HI
    e += low_part  # e * LN2_HI + (e * LN2_LO + ln_m)
    return e


def sin_cos_poly(a: np.ndarray, xp=np) -> tuple[np.ndarray, np.ndarray]:
    """(sin a, cos a) for float64 a in [0, pi/4], by their Taylor series to a^15 and a^16."""
    z = a * a
    sin_a = _horner(z, SIN, xp)  # a + (a * z) * h, in place with the same roundings
    sin_a *= a * z
    sin_a += a
    cos_a = _horner(z, COS, xp)  # 1 + z * h
    cos_a *= z
    cos_a += 1.0
    return sin_a, cos_a


def box_muller(radius_word: np.ndarray, angle_word: np.ndarray, xp=np) -> tuple[np.ndarray, np.ndarray]:
    """(r sin theta, r cos theta) in float64 from two 32-bit words (uint64 arrays):
    r = sqrt(-2 ln u), u = (x + 1/2) 2^-32; theta = 2 pi (y + 1/2) 2^-32, reduced exactly: the top
    two bits of y are the quadrant, the third the octant (mirrored so the angle is in (0, pi/4))."""
    u = radius_word.view(np.int64).astype(np.float64)  # exact (< 2^32); int64 converts faster than uint64
    u += 0.5
    u *= 2.0 ** -32
    r = log_poly(u, xp)
    r *= -2.0
    xp.sqrt(r, out=r)

    quadrant = angle_word >> np.uint64(30)
    octant = (angle_word >> np.uint64(29)) & np.uint64(1)
    # In the upper octant, the mirror 2^30 - 1 - m of the offset m = y mod 2^30 (a bit complement).
    mirrored = (angle_word ^ (np.uint64(0) - octant)) & np.uint64(0x1FFFFFFF)
    a = (mirrored << np.uint64(1)) | np.uint64(1)  # 2 m' + 1: the angle is (2 m' + 1) (pi/2) 2^-31
    a = a.view(np.int64).astype(np.float64)
    a *= PI_OVER_2_2M31
    sin_a, cos_a = sin_cos_poly(a, xp)
    swap = ((octant ^ quadrant) & np.uint64(1)).astype(bool)
    sin_t = xp.where(swap, cos_a, sin_a)
    sin_t *= r
    cos_t = xp.where(swap, sin_a, cos_a)
    cos_t *= r
    # The signs, as sign-bit flips (negation is exact, so before or after the product is the same):
    # sin < 0 in quadrants 2, 3; cos < 0 in quadrants 1, 2.
    sin_t.view(np.uint64)[...] ^= (quadrant >> np.uint64(1)) << np.uint64(63)
    cos_t.view(np.uint64)[...] ^= (((quadrant + np.uint64(1)) >> np.uint64(1)) & np.uint64(1)) << np.uint64(63)
    return sin_t, cos_t


def _check_uint(value, name: str, bits: int) -> int:
    """`value` as an int in [0, 2^bits) (the project's one integer check)."""
    return check_int(value, name, 0, (1 << bits) - 1)


def _check_images(images) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 1 or array.size and not (array.dtype == object or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"images must be a 1-D sequence of image indices, got {array.dtype} shape {array.shape}")
    return np.array([_check_uint(v, "an image index", 64) for v in array.tolist()], dtype=np.uint64)


def normal(seed: int, images: np.ndarray | Sequence[int], draw: int, shape: tuple[int, ...]) -> np.ndarray:
    """Draw `draw` of the given images: float32 (len(images), *shape), element j of an image the
    j-th value of its stream in C order."""
    seed = _check_uint(seed, "seed", 64)
    draw = _check_uint(draw, "draw", 32)
    return _normal(seed, _check_images(images), draw, shape)


def _normal(seed: int, image_index: np.ndarray, draw: int, shape: tuple[int, ...], xp=np) -> np.ndarray:
    """`normal` for a checked seed and draw and uint64 image indices (SeededNoise checks them once
    per run, not at every step)."""
    shape = tuple(shape)
    shape = tuple(check_int(n, f"shape {shape!r}: each size", 0) for n in shape)
    count = int(np.prod(shape, dtype=object))
    if count > MAX_VALUES:
        raise InputError(f"a draw holds at most 2^34 values per image, asked for {count}")
    n, blocks = len(image_index), -(-count // 4)
    out = xp.empty((n, blocks * 4), dtype=np.float32)
    flat = out.reshape(-1, 4)  # one row per counter
    image_index = xp.asarray(image_index)
    image_lo, image_hi = image_index & _MASK32, image_index >> np.uint64(32)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    total = n * blocks
    for start in range(0, total, _CHUNK):
        counter = xp.arange(start, min(start + _CHUNK, total), dtype=np.uint64)
        row = counter // np.uint64(max(blocks, 1))
        block = counter - row * np.uint64(blocks)
        x0, x1, x2, x3 = philox4x32_10(block, np.uint64(draw), image_lo[row], image_hi[row], k0, k1, xp)
        rows = flat[start:start + len(counter)]
        rows[:, 0], rows[:, 1] = box_muller(x0, x1, xp)  # float64 -> float32, round to nearest even
        rows[:, 2], rows[:, 3] = box_muller(x2, x3, xp)
    if blocks * 4 != count:
        out = xp.ascontiguousarray(out[:, :count])
    return out.reshape((n, *shape))


def normal_on(xp, seed: int, images: np.ndarray | Sequence[int], draw: int, shape: tuple[int, ...]):
    """`normal` computed with another array module `xp` (CuPy on a GPU; numpy is `normal`): the
    same elementwise operations on the same dtypes, each correctly rounded (+, -, *, /, sqrt) or
    exact, so the same bits, in an array of `xp`."""
    seed = _check_uint(seed, "seed", 64)
    draw = _check_uint(draw, "draw", 32)
    return _normal(seed, _check_images(images), draw, shape, xp)


class SeededNoise:
    """ditrt's seeded stream for `num_images` images of `shape`: image i of this run is image
    `image_offset + i` of the stream (a shard passes its first image's global index)."""

    def __init__(self, seed: int, num_images: int, shape: tuple[int, ...], image_offset: int = 0):
        self.seed = _check_uint(seed, "seed", 64)
        num_images = _check_uint(num_images, "num_images", 63)
        image_offset = _check_uint(image_offset, "image_offset", 64)
        if image_offset + num_images > 1 << 64:
            raise InputError(f"image_offset {image_offset} + {num_images} images passes the last image index 2^64 - 1")
        self.images = np.arange(num_images, dtype=np.uint64) + np.uint64(image_offset)
        self.shape = tuple(shape)

    def initial(self) -> np.ndarray:
        return _normal(self.seed, self.images, 0, self.shape)

    def step(self, k: int) -> np.ndarray:
        """Noise for the k-th step from the noisiest (draw k + 1): any k, any order, same array."""
        draw = _check_uint(_check_uint(k, "a step index", 32) + 1, "draw", 32)
        return _normal(self.seed, self.images, draw, self.shape)


class InjectedNoise:
    """Fixed arrays: initial (N, C, H, W) and steps (K, N, C, H, W), draw k at the k-th stochastic
    step. A sampler that draws nothing (K = 0) takes steps None or an empty array."""

    def __init__(self, initial, steps, num_images: int, shape: tuple[int, ...], num_draws: int):
        want_initial, want_steps = (num_images, *shape), (num_draws, num_images, *shape)
        initial = check_array(initial, "injected initial noise")
        steps = (np.zeros(want_steps, np.float32) if steps is None and num_draws == 0 else
                 check_array(steps, "injected step noise"))
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
