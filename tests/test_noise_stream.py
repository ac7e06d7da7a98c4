"""The seeded noise stream (docs/noise.md): Philox4x32-10 against Random123's known answers, the
committed table (tests/data/noise_table.json, written by the scalar reference tests/noise_reference.py)
bit for bit, the polynomial log / sin / cos against libm and mpmath, the normal distribution it
must be, and random access (any draw, any image, any batch, any offset). The C++ side checks the
same table (runtime/cpp/tests/test_noise.cpp) and equals this one over 10^6 values
(tests/test_cpp_runtime.py)."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

import noise_reference as ref
from conftest import ROOT
from ditrt.runtime.sampling import noise
from ditrt.runtime.core.errors import InputError

TABLE = json.loads((ROOT / "tests" / "data" / "noise_table.json").read_text())

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter, key, expected words.
PHILOX_KATS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KATS)
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert tuple(int(w) for w in noise.philox4x32_10(*counter, *key)) == expected
    assert ref.philox(counter, key) == expected  # the reference the table came from, too


def test_philox_vectorised_over_broadcast_counters():
    counters = np.array([kat[0] for kat in PHILOX_KATS[:1] * 3], dtype=np.uint64)  # key 0 for all three
    counters[1, 0], counters[2, 2] = 1, 7  # block 1; image 7
    got = np.stack(noise.philox4x32_10(*counters.T, 0, 0), axis=1)
    for row, counter in zip(got, counters.tolist()):
        assert tuple(row.tolist()) == ref.philox(tuple(counter), (0, 0))


def test_constants_are_the_documented_doubles():
    assert noise.ATANH == [float(Fraction(1, 2 * k + 1)) for k in range(1, 10)]
    assert noise.SIN == [float(Fraction((-1) ** k, math.factorial(2 * k + 1))) for k in range(1, 8)]
    assert noise.COS == [float(Fraction((-1) ** k, math.factorial(2 * k))) for k in range(1, 9)]
    assert noise.SQRT_HALF == math.sqrt(0.5)
    assert noise.PI_OVER_2_2M31 == math.ldexp(math.pi / 2, -31)
    hi = Fraction(noise.LN2_HI)
    assert hi.denominator <= 2 ** 32 and 33 * hi == Fraction(33 * noise.LN2_HI)  # e * LN2_HI exact for |e| <= 33
    import mpmath
    mpmath.mp.prec = 200
    assert abs(mpmath.mpf(noise.LN2_HI) + mpmath.mpf(noise.LN2_LO) - mpmath.log(2)) < 1e-25
    assert noise.NOISE_VERSION == TABLE["version"] == "philox4x32-10+bm-poly/1"


# ---- the committed table ----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", TABLE["normal"], ids=lambda e: f"s{e['seed']}-i{e['image']}-d{e['draw']}")
def test_normal_reproduces_the_table(entry):
    offsets = entry["offsets"]
    draw = noise.normal(entry["seed"], [entry["image"]], entry["draw"], (max(offsets) + 1,))[0]
    assert draw.view(np.uint32)[offsets].tolist() == entry["bits"]


def test_the_transform_reproduces_the_table_in_float64():
    """Bit-exact in float64, before the float32 rounding: a last-bit change in log / sin / cos
    (numpy's SIMD log, a changed coefficient) shows here although float32 would mostly hide it."""
    x = np.array([e["x"] for e in TABLE["log"]], dtype=np.uint64)
    assert noise.log_poly((x.astype(np.float64) + 0.5) * 2.0 ** -32).tolist() == [e["log_u"] for e in TABLE["log"]]
    pairs = TABLE["box_muller"]
    s, c = noise.box_muller(np.array([e["x"] for e in pairs], np.uint64), np.array([e["y"] for e in pairs], np.uint64))
    assert np.stack([s, c], axis=1).tolist() == [e["pair"] for e in pairs]


def test_the_vectorised_stream_equals_the_scalar_reference():
    rng = np.random.default_rng(5)
    cases = [(int(rng.integers(0, 2 ** 63)) * 2 + 1, int(rng.integers(0, 2 ** 63)) * 2, int(rng.integers(0, 2 ** 32)))
             for _ in range(6)] + [(0, 0, 0), (2 ** 64 - 1, 2 ** 64 - 1, 2 ** 32 - 1)]
    for seed, image, draw in cases:
        got = noise.normal(seed, [image], draw, (4099,))[0]  # not a multiple of 4
        for j in [0, 1, 2, 3, 4, 4095, 4096, 4097, 4098, *rng.integers(0, 4099, 24).tolist()]:
            assert got[j] == ref.value(seed, image, draw, j), (seed, image, draw, j)


def test_a_draw_is_its_stream_in_c_order_whatever_the_shape():
    flat = noise.normal(9, [2, 5], 3, (2 * 3 * 5 + 3,))
    np.testing.assert_array_equal(noise.normal(9, [2, 5], 3, (2, 3, 5)), flat[:, :30].reshape(2, 2, 3, 5))
    np.testing.assert_array_equal(noise.normal(9, [2, 5], 3, (5,)), flat[:, :5])
    assert noise.normal(9, [2, 5], 3, (0,)).shape == (2, 0)
    assert noise.normal(9, [], 3, (4, 2)).shape == (0, 4, 2)


# ---- accuracy of the polynomials ----------------------------------------------------------------------------

def test_log_poly_against_libm_and_mpmath():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64),
                        np.array(ref.EDGE_WORDS, np.uint64)])
    u = (x.astype(np.float64) + 0.5) * 2.0 ** -32  # every u the stream uses, 2^-33 .. 1 - 2^-33
    got = noise.log_poly(u)
    want = np.array([math.log(v) for v in u])
    rel = np.abs(got - want) / np.abs(want)
    print(f"log_poly vs math.log over {len(u)} points: max rel err {rel.max():.2e}")
    assert rel.max() <= 2.5e-16  # measured 2.2e-16: within one ulp of glibc's log
    import mpmath
    mpmath.mp.prec = 120
    worst = np.argsort(-rel)[:20]
    exact = [mpmath.log(mpmath.mpf(float(v))) for v in u[worst]]
    assert max(abs(float((mpmath.mpf(float(g)) - e) / e)) for g, e in zip(got[worst], exact)) <= 2.5e-16


def test_sin_cos_poly_against_libm():
    a = np.concatenate([np.random.default_rng(2).random(200_000) * (math.pi / 4),
                        [ref.ANGLE_UNIT, math.pi / 4 - 1e-12, math.pi / 4]])
    s, c = noise.sin_cos_poly(a)
    rel_s = np.abs(s - np.sin(a)) / np.sin(a)  # np.sin is fine as a yardstick, not in the stream
    rel_c = np.abs(c - np.cos(a)) / np.cos(a)
    rel_s_libm = max(abs(g - math.sin(v)) / math.sin(v) for g, v in zip(s[:20_000], a[:20_000]))
    print(f"sin_cos_poly on [0, pi/4]: max rel err sin {rel_s.max():.2e} (libm {rel_s_libm:.2e}), cos {rel_c.max():.2e}")
    assert max(rel_s.max(), rel_c.max(), rel_s_libm) <= 2.5e-16  # measured 2.2e-16 / 1.6e-16


def test_box_muller_against_mpmath_on_edge_words():
    """The whole transform, quadrant and octant reduction included, against the exact
    sqrt(-2 ln u) (sin, cos)(2 pi v) at every quadrant / octant boundary and the u extremes."""
    import mpmath
    mpmath.mp.prec = 120
    xs, ys = zip(*[(x, y) for x in ref.EDGE_WORDS for y in ref.EDGE_WORDS])
    s, c = noise.box_muller(np.array(xs, np.uint64), np.array(ys, np.uint64))
    worst = 0.0
    for x, y, got_s, got_c in zip(xs, ys, s, c):
        r = mpmath.sqrt(-2 * mpmath.log((mpmath.mpf(x) + 0.5) / 2 ** 32))
        theta = 2 * mpmath.pi * (mpmath.mpf(y) + 0.5) / 2 ** 32
        for got, want in ((got_s, r * mpmath.sin(theta)), (got_c, r * mpmath.cos(theta))):
            worst = max(worst, float(abs((mpmath.mpf(float(got)) - want) / want)))
    print(f"box_muller vs mpmath on {len(xs)} edge pairs: max rel err {worst:.2e}")
    assert worst <= 6e-16
    assert np.abs(np.concatenate([s, c])).max() <= math.sqrt(-2 * math.log(2.0 ** -33)) + 1e-12  # 6.76: the tail's end


# ---- statistics -----------------------------------------------------------------------------------------------

def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_a_million_values_are_standard_normal():
    z = noise.normal(2024, [0, 1, 2, 3], 5, (250_000,)).astype(np.float64).ravel()  # 10^6 values
    n = z.size
    mean, var = z.mean(), z.var()
    skew = np.mean((z - mean) ** 3) / var ** 1.5
    excess_kurtosis = np.mean((z - mean) ** 4) / var ** 2 - 3.0
    # Bounds ~5 standard errors (1e-3, 1.4e-3, 2.4e-3, 4.9e-3 at n = 10^6).
    print(f"n {n}: mean {mean:.2e} var {var:.5f} skew {skew:.2e} excess kurtosis {excess_kurtosis:.2e}")
    assert abs(mean) < 5e-3 and abs(var - 1) < 7e-3 and abs(skew) < 1.2e-2 and abs(excess_kurtosis) < 2.5e-2
    # Chi-square on 0.25-wide bins over [-4, 4] plus both tails, probabilities from math.erf.
    edges = np.concatenate([[-np.inf], np.arange(-4.0, 4.001, 0.25), [np.inf]])
    observed = np.histogram(z, edges)[0]
    expected = n * np.diff([_normal_cdf(e) if np.isfinite(e) else float(e > 0) for e in edges])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    print(f"chi-square {chi2:.1f} on {len(expected) - 1} degrees of freedom")
    assert chi2 < 70.0  # 34 dof: the 0.1% critical value is 65.2
    try:
        from scipy import stats
    except ImportError:
        return
    ks = stats.kstest(z, "norm")
    print(f"KS statistic {ks.statistic:.2e}, p {ks.pvalue:.3f}")
    assert ks.statistic < 1.95 / math.sqrt(n)  # the 0.1% critical value


@pytest.mark.parametrize("other", [dict(draw=6), dict(image=1), dict(seed=2025), dict(seed=2024 + 2 ** 32),
                                   dict(image=2 ** 32), dict(lag=1), dict(lag=2), dict(lag=4)])
def test_draws_images_seeds_and_neighbours_are_uncorrelated(other):
    base = dict(seed=2024, image=0, draw=5)
    a = noise.normal(base["seed"], [base["image"]], base["draw"], (200_004,))[0].astype(np.float64)
    lag = other.pop("lag", 0)
    if lag:
        a, b = a[:-lag], a[lag:]
    else:
        p = {**base, **other}
        b = noise.normal(p["seed"], [p["image"]], p["draw"], (200_004,))[0].astype(np.float64)
    rho = float(np.corrcoef(a, b)[0, 1])
    assert abs(rho) < 1e-2, rho  # 4.5 standard errors at n = 2e5


# ---- random access ------------------------------------------------------------------------------------------

def test_steps_are_random_access():
    shape = (4, 3, 3)
    noise_a, noise_b = noise.SeededNoise(11, 3, shape), noise.SeededNoise(11, 3, shape)
    forward = [noise_a.step(k) for k in range(6)]
    backward = [noise_b.step(k) for k in reversed(range(6))][::-1]
    for k in range(6):
        np.testing.assert_array_equal(forward[k], backward[k])
        np.testing.assert_array_equal(noise_a.step(k), forward[k])  # again: the same array
        np.testing.assert_array_equal(forward[k], noise.normal(11, [0, 1, 2], k + 1, shape))
    np.testing.assert_array_equal(noise_a.initial(), noise.normal(11, [0, 1, 2], 0, shape))
    assert not np.array_equal(noise_a.initial(), forward[0]) and not np.array_equal(forward[0], forward[1])
    assert noise_a.step(2 ** 31).shape == (3, *shape)  # a far step costs what a near one does


def test_an_image_is_the_same_alone_in_a_batch_or_at_an_offset():
    shape = (4, 8, 8)
    batch = noise.SeededNoise(3, 5, shape)
    for i in range(5):
        alone = noise.SeededNoise(3, 1, shape, image_offset=i)
        np.testing.assert_array_equal(batch.initial()[i], alone.initial()[0])
        np.testing.assert_array_equal(batch.step(4)[i], alone.step(4)[0])
        np.testing.assert_array_equal(batch.step(4)[i], noise.normal(3, [i], 5, shape)[0])
    shard = noise.SeededNoise(3, 2, shape, image_offset=2 ** 64 - 2)  # the last two image indices
    np.testing.assert_array_equal(shard.step(0), noise.normal(3, [2 ** 64 - 2, 2 ** 64 - 1], 1, shape))


@pytest.mark.parametrize("call,message", [
    (lambda: noise.normal(-1, [0], 0, (4,)), "seed must be a non-negative integer below 2^64, got -1"),
    (lambda: noise.normal(2 ** 64, [0], 0, (4,)), "seed must be a non-negative integer below 2^64"),
    (lambda: noise.normal(1.0, [0], 0, (4,)), "seed must be a non-negative integer below 2^64, got 1.0"),
    (lambda: noise.normal(True, [0], 0, (4,)), "got True"),
    (lambda: noise.normal("3", [0], 0, (4,)), "got '3'"),
    (lambda: noise.normal(0, [-1], 0, (4,)), "an image index must be a non-negative integer below 2^64, got -1"),
    (lambda: noise.normal(0, [2 ** 64], 0, (4,)), "an image index must be"),
    (lambda: noise.normal(0, [0.5], 0, (4,)), "images must be a 1-D sequence of image indices"),
    (lambda: noise.normal(0, [[0]], 0, (4,)), "images must be a 1-D sequence"),
    (lambda: noise.normal(0, [0], -1, (4,)), "draw must be a non-negative integer below 2^32, got -1"),
    (lambda: noise.normal(0, [0], 2 ** 32, (4,)), "draw must be a non-negative integer below 2^32"),
    (lambda: noise.normal(0, [0], 0, (4, -1)), "each size must be a non-negative integer"),
    (lambda: noise.normal(0, [0], 0, (2 ** 35,)), "at most 2^34 values per image"),
    (lambda: noise.SeededNoise(0, 1, (4,)).step(-1), "a step index must be a non-negative integer"),
    (lambda: noise.SeededNoise(0, 3, (4,), image_offset=2 ** 64 - 2), "passes the last image index"),
    (lambda: noise.SeededNoise(0, 1, (4,), image_offset=-5), "image_offset must be a non-negative integer"),
])
def test_bad_arguments_are_input_errors(call, message):
    with pytest.raises(InputError, match=message.replace("^", r"\^").replace("(", r"\(")):
        call()


def test_numpy_integers_are_accepted():
    np.testing.assert_array_equal(noise.normal(np.uint64(2 ** 64 - 1), np.array([3], np.uint64), np.int32(2), (8,)),
                                  noise.normal(2 ** 64 - 1, [3], 2, (8,)))
