"""The seeded noise stream (docs/noise.md) in numpy vs numpy's PCG64 standard normal, same shapes:
best-of-N wall time per draw and the ratio.

    python bench/noise_bench.py [--repeats 5] [--cpp-lib runtime/cpp/build/pytest-release/libditrt.so]

ditrt's stream is `ditrt.runtime.sampling.noise.normal(seed, images, draw, shape)` (Philox4x32-10 and a
polynomial Box-Muller in float64, vectorised); the yardstick is
`np.random.default_rng(0).standard_normal((images, *shape), dtype=np.float32)` (ziggurat). With
--cpp-lib, the C++ library's ditrt_noise_normal (scalar, one image at a time) is timed too.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

CASES = [("8 x 4x32x32 (DiT 256 px, batch 8)", 8, (4, 32, 32)), ("8 x 4x64x64 (DiT 512 px, batch 8)", 8, (4, 64, 64)),
         ("1 x 10^6", 1, (10 ** 6,)), ("1 x 10^7", 1, (10 ** 7,))]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and imports are not the generator's cost
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpp_filler(path: str):
    lib = ctypes.CDLL(path)
    fn = lib.ditrt_noise_normal
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_float), ctypes.c_int64]

    def fill(images: int, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty((images, int(np.prod(shape))), np.float32)
        for i in range(images):
            assert fn(0, i, 1, out[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.shape[1]) == 0
        return out
    return fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpp-lib", help="a built libditrt.so: time ditrt_noise_normal too")
    args = parser.parse_args()

    from ditrt.runtime.sampling import noise
    cpp = cpp_filler(args.cpp_lib) if args.cpp_lib else None
    rows = []
    for name, images, shape in CASES:
        values = images * int(np.prod(shape))
        repeats = max(2, args.repeats // 2) if values >= 10 ** 7 else args.repeats
        ditrt_s = best_of(lambda: noise.normal(0, range(images), 1, shape), repeats)
        rng = np.random.default_rng(0)
        pcg_s = best_of(lambda: rng.standard_normal((images, *shape), dtype=np.float32), repeats)
        row = {"case": name, "values": values, "ditrt_ms": 1e3 * ditrt_s, "pcg64_ms": 1e3 * pcg_s,
               "ratio": ditrt_s / pcg_s, "ditrt_ns_per_value": 1e9 * ditrt_s / values,
               "pcg64_ns_per_value": 1e9 * pcg_s / values}
        if cpp:
            row["cpp_ns_per_value"] = 1e9 * best_of(lambda: cpp(images, shape), repeats) / values
        rows.append(row)
    columns = ["case", "values", "ditrt_ms", "pcg64_ms", "ratio", "ditrt_ns_per_value", "pcg64_ns_per_value"]
    report("noise_bench", rows, columns + (["cpp_ns_per_value"] if cpp else []), extra={
        "noise_version": noise.NOISE_VERSION, "numpy": np.__version__, "repeats": args.repeats,
        "note": "Best of N wall times, one thread; ratio = ditrt stream / PCG64 standard_normal(float32) on the same "
                "shape. The machine's cores are shared with other jobs, so times are indicative."})


if __name__ == "__main__":
    main()
