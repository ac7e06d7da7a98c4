"""Float operations whose result both runtimes compute to the bit (docs/cpp.md, "Bit for bit").

numpy's float32 `exp` (a SIMD kernel) and libm's `expf` disagree in the last bit for some
arguments, and numpy's `sum` / `mean` add in an order of its own (pairwise, in blocks that depend
on the array's layout). Where a sampler needs these, it uses the versions here, which are written
with correctly rounded +, -, *, / and exact operations only, in an order the C++ runtime
(runtime/cpp/src/portable.cpp) follows: same inputs, same bits, in either language.
"""
from __future__ import annotations

import threading

import numpy as np

# exp(x) = 2^k exp(r), k = floor(x / ln 2 + 1/2), r = (x - k LN2_HI) - k LN2_LO, |r| <= 0.35: the
# Taylor series of exp(r) to r^13 (the next term is below 2^-57 relative), Horner, in float64.
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
LN2_HI = float.fromhex("0x1.62e42fee00000p-1")  # 33 significant bits: k * LN2_HI is exact for |k| < 2^20
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")  # ln 2 - LN2_HI
EXP_TAYLOR = [float.fromhex(h) for h in (  # 1/2!, 1/3!, ..., 1/13!
    "0x1.0000000000000p-1", "0x1.5555555555555p-3", "0x1.5555555555555p-5", "0x1.1111111111111p-7",
    "0x1.6c16c16c16c17p-10", "0x1.a01a01a01a01ap-13", "0x1.a01a01a01a01ap-16", "0x1.71de3a556c734p-19",
    "0x1.27e4fb7789f5cp-22", "0x1.ae64567f544e4p-26", "0x1.1eed8eff8d898p-29", "0x1.6124613a86d09p-33")]
EXP_LIMIT = 200.0  # beyond it exp rounds to 0 or inf in float32 (exp(-104) is below the least subnormal)


# The fast path's proof margin: numpy's float64 exp and the series above are both within 2^-50 of the
# true exp (relative), so a value whose whole interval y (1 +- 2^-40) rounds to one float32 rounds to
# that float32 from either of them.
EXP_MARGIN = 2.0 ** -40


def exp_float32(x) -> np.ndarray:
    """exp of float32 values, rounded once to float32 from the float64 series: the same bits as
    ditrt_core::exp_float32. NaN stays NaN; |x| > EXP_LIMIT gives 0 or inf.

    Fast and exact: numpy's float64 exp, rounded to float32, is the series' float32 wherever the
    interval exp(x) (1 +- EXP_MARGIN) rounds to a single float32; the few values near a rounding
    boundary (about 2^-15 of them), and NaN, go through the series itself (`exp_float32_series`).
    The float64 work happens in this thread's scratch buffers: a sampler step calls this on every
    model call, and fresh large temporaries cost more than the arithmetic (page faults)."""
    x = np.asarray(x, dtype=np.float32)
    y, rounded = _scratch(x.shape)
    np.copyto(y, x)
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    out, unsure = rounded_float32(y, rounded)
    if unsure.any():
        out[unsure] = exp_float32_series(x[unsure])
    return out


def rounded_float32(y: np.ndarray, work: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 values rounded to float32, and where that rounding is not decided: the interval
    y (1 +- EXP_MARGIN) reaches another float32 (NaN counts as undecided). `work`: a float32 array
    of y's shape to use as scratch."""
    work = np.empty(y.shape, np.float32) if work is None else work
    with np.errstate(over="ignore"):
        out = y.astype(np.float32)
        np.multiply(y, 1.0 - EXP_MARGIN, out=work, casting="unsafe")  # the float64 product, then rounded
        unsure = work != out
        np.multiply(y, 1.0 + EXP_MARGIN, out=work, casting="unsafe")
    unsure |= work != out
    return out, unsure


_SCRATCH = threading.local()


def _scratch(shape) -> tuple[np.ndarray, np.ndarray]:
    """This thread's float64 and float32 work arrays of `shape` (kept for the last size asked)."""
    size = int(np.prod(shape))
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None or buffers[0].size != size:
        buffers = _SCRATCH.buffers = (np.empty(size, np.float64), np.empty(size, np.float32))
    return buffers[0].reshape(shape), buffers[1].reshape(shape)


def exp_float32_series(x) -> np.ndarray:
    """The series itself, element by element as the C++ runtime computes it (the reference of
    `exp_float32`, which calls it where numpy's exp cannot decide the float32)."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    inside = np.abs(x) <= EXP_LIMIT
    v = np.where(inside, x, 0.0)
    k = np.floor(v * INV_LN2 + 0.5)
    r = (v - k * LN2_HI) - k * LN2_LO
    p = np.full_like(r, EXP_TAYLOR[-1])
    for c in reversed(EXP_TAYLOR[:-1]):
        p = p * r + c
    p = (p * r + 1.0) * r + 1.0  # 1 + r (1 + r (1/2 + ...))
    out = np.ldexp(p, k.astype(np.int32))
    out = np.where(inside, out, np.where(x > 0, np.inf, 0.0))
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as in C++
        return np.where(np.isnan(x), np.nan, out).astype(np.float32)


def pairwise_sum(values) -> np.float64:
    """The float64 sum of `values` (flattened, C order) as a tree of halves: with m = ceil(n / 2),
    v[i] + v[i + m] for i < n - m (v[m - 1] kept alone when n is odd), until one value is left;
    0.0 for no values. ditrt_core::pairwise_sum adds in the same order."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.float64(0.0)
    while v.size > 1:
        m = (v.size + 1) // 2
        head = v[:m].copy()
        head[:v.size - m] += v[m:]
        v = head
    return np.float64(v[0])


def rms(values) -> np.float64:
    """sqrt(mean(values^2)) in float64 (torchdiffeq's _rms_norm): squares exact from float32,
    the pairwise sum, one division by the count, a correctly rounded sqrt."""
    v = np.asarray(values)
    return np.sqrt(pairwise_sum(np.square(v, dtype=np.float64)) / np.float64(v.size))
