"""A scalar, pure-Python reading of docs/noise.md, written from the document and not from
runtime/sampling/noise.py: Python ints for Philox, Python floats (IEEE doubles, correctly rounded) for the
transform, its constants derived here (exact fractions rounded once, fdlibm's published ln 2 split)
rather than copied as hex, the angle reduced with the document's arithmetic (quotient, remainder,
mirror) rather than bit masks. Tests compare the vectorised numpy stream and the C++ one with it.

Run as a script it writes tests/data/noise_table.json, the committed table both languages check
(`python tests/noise_reference.py`); `--example` prints the worked example of docs/noise.md.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from fractions import Fraction
from pathlib import Path

MASK = 0xFFFFFFFF
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85

LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm e_log.c
SQRT_HALF = math.sqrt(0.5)  # correctly rounded
ANGLE_UNIT = math.ldexp(math.pi / 2, -31)  # math.pi is the double nearest pi; halving and 2^-31 are exact
ATANH = [float(Fraction(1, 2 * k + 1)) for k in range(1, 10)]  # float(Fraction) rounds to nearest
SIN = [float(Fraction((-1) ** k, math.factorial(2 * k + 1))) for k in range(1, 8)]
COS = [float(Fraction((-1) ** k, math.factorial(2 * k))) for k in range(1, 9)]


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def words(seed: int, image: int, draw: int, block: int) -> tuple[int, int, int, int]:
    return philox((block, draw, image & MASK, image >> 32), (seed & MASK, seed >> 32))


def poly(z: float, coefficients: list[float]) -> float:
    p = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        p = p * z + c
    return p


def log(u: float) -> float:
    m, e = math.frexp(u)
    if m < SQRT_HALF:
        m, e = m * 2.0, e - 1
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    t = s + s
    return e * LN2_HI + (e * LN2_LO + (t + t * (z * poly(z, ATANH))))


def sin_cos(a: float) -> tuple[float, float]:
    z = a * a
    return a + (a * z) * poly(z, SIN), 1.0 + z * poly(z, COS)


def box_muller(x: int, y: int) -> tuple[float, float]:
    r = math.sqrt(log((x + 0.5) * 2.0 ** -32) * -2.0)
    quadrant, offset = divmod(y, 1 << 30)
    upper = offset >= 1 << 29
    if upper:
        offset = (1 << 30) - 1 - offset
    s, c = sin_cos((2 * offset + 1) * ANGLE_UNIT)
    if upper:
        s, c = c, s
    sin_theta = (s, c, -s, -c)[quadrant]
    cos_theta = (c, -s, -c, s)[quadrant]
    return r * sin_theta, r * cos_theta


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]  # round to nearest even


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def value(seed: int, image: int, draw: int, j: int) -> float:
    """Element j of the draw, as float32 (a Python float holding it)."""
    w = words(seed, image, draw, j // 4)
    lane = j % 4
    pair = box_muller(w[2 * (lane // 2)], w[2 * (lane // 2) + 1])
    return f32(pair[lane % 2])


# ---- the committed table -------------------------------------------------------------------------

SEEDS_IMAGES_DRAWS = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (42, 3, 250), (2 ** 32, 0, 0), (0, 2 ** 32, 0),
                      (12345, 2 ** 32 + 5, 7), (2 ** 64 - 1, 2 ** 64 - 1, 2 ** 32 - 1), (7, 1000003, 2 ** 31 + 1)]
OFFSETS = [0, 1, 2, 3, 4, 5, 6, 7, 13, 255, 1022, 1023, 4097, 65535, 99999]
EDGE_WORDS = [0, 1, 2, (1 << 29) - 1, 1 << 29, (1 << 29) + 1, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, 0x5FFFFFFF, 0x60000000,
              0x7FFFFFFF, 0x80000000, 0x9FFFFFFF, 0xA0000000, 0xB504F333, 0xB504F334, 0xBFFFFFFF, 0xC0000000,
              0xDFFFFFFF, 0xE0000000, 0xFFFFFFFE, 0xFFFFFFFF]


def table() -> dict:
    # Philox words of the stream itself as extra transform inputs: realistic, and reproducible.
    stream_words = [w for block in range(32) for w in words(99, 0, 0, block)]
    pairs = [(x, y) for x in EDGE_WORDS for y in EDGE_WORDS[::3]] + list(zip(stream_words[::2], stream_words[1::2]))
    return {
        "about": "ditrt seeded noise stream (docs/noise.md), written by tests/noise_reference.py: float32 values as "
                 "uint32 bit patterns, float64 intermediates as JSON numbers (exact: shortest round-trip repr)",
        "version": "philox4x32-10+bm-poly/1",
        "normal": [{"seed": s, "image": i, "draw": d, "offsets": OFFSETS,
                    "bits": [f32_bits(value(s, i, d, j)) for j in OFFSETS]} for s, i, d in SEEDS_IMAGES_DRAWS],
        "log": [{"x": x, "log_u": log((x + 0.5) * 2.0 ** -32)} for x in EDGE_WORDS + stream_words],
        "box_muller": [{"x": x, "y": y, "pair": list(box_muller(x, y))} for x, y in pairs],
    }


def example() -> None:
    seed, image, draw = 42, 3, 250
    w = words(seed, image, draw, 0)
    print(f"seed {seed}, image {image}, draw {draw}, block 0")
    print(f"key     ({seed & MASK:#010x}, {seed >> 32:#010x})")
    print(f"counter (0x00000000, {draw:#010x}, {image & MASK:#010x}, {image >> 32:#010x})")
    print("words   (" + ", ".join(f"{v:#010x}" for v in w) + ")")
    for pair in range(2):
        x, y = w[2 * pair], w[2 * pair + 1]
        u = (x + 0.5) * 2.0 ** -32
        quadrant, offset = divmod(y, 1 << 30)
        upper = offset >= 1 << 29
        mirrored = (1 << 30) - 1 - offset if upper else offset
        a = (2 * mirrored + 1) * ANGLE_UNIT
        ln_u = log(u)
        r = math.sqrt(ln_u * -2.0)
        s, c = box_muller(x, y)
        print(f"pair {pair}: x = {x}, u = {u!r}, ln u = {ln_u!r}, r = {r!r}")
        print(f"        y = {y}, quadrant {quadrant}, offset {offset}, upper octant {upper}, m' = {mirrored}, a = {a!r}")
        print(f"        r sin = {s!r} -> float32 {f32(s)!r} ({f32_bits(s):#010x})")
        print(f"        r cos = {c!r} -> float32 {f32(c)!r} ({f32_bits(c):#010x})")


if __name__ == "__main__":
    if sys.argv[1:] == ["--example"]:
        example()
    else:
        out = Path(__file__).resolve().parent / "data" / "noise_table.json"
        out.write_text(json.dumps(table(), indent=1) + "\n")
        print(f"wrote {out}")
