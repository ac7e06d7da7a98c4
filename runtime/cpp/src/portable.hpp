// Float operations both runtimes compute to the bit: runtime/core/portable.py, the same constants in
// the same order (correctly rounded +, -, *, / and exact operations only; -ffp-contract=off).
// numpy's float32 exp and libm's expf differ in the last bit, and np.sum / np.mean add in a
// blocked order of numpy's own: the samplers use these instead on both sides.
#pragma once

#include <cstdint>

namespace ditrt_core {

// exp of a float32, from a float64 series rounded once to float32 (portable.py exp_float32).
// Fast and exact: libm's double exp, rounded to float32, wherever that rounding is decided
// (rounded_float32); the series itself elsewhere (about 2^-15 of the arguments, and NaN).
float exp_float32(float x);

// exp_float32 given y, a float64 within 2^-50 of exp(x) (relative): y's float32 where
// rounded_float32 decides it, the series' where it does not.
float exp_float32_from(float x, double y);

// The series itself: the reference exp_float32 equals, bit for bit (portable.py exp_float32_series).
float exp_float32_series(float x);

// The proof margin (portable.py EXP_MARGIN): libm's double exp and the series are both within
// 2^-50 of the true exp (relative), so where y (1 +- 2^-40) rounds to one float32, both round to it.
constexpr double kExpMargin = 0x1p-40;

// y rounded to float32 in *out; false where that rounding is not decided: the interval
// y (1 +- kExpMargin) reaches another float32 (NaN counts as undecided). portable.py rounded_float32.
bool rounded_float32(double y, float* out);

// The float64 sum of v[0..n) as a tree of halves: with m = ceil(n / 2), v[i] + v[i + m] for
// i < n - m (v[m - 1] alone when n is odd), until one value is left (portable.py pairwise_sum).
// Overwrites v.
double pairwise_sum(double* v, int64_t n);

}  // namespace ditrt_core
