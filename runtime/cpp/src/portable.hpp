// Float operations both runtimes compute to the bit: runtime/core/portable.py, the same constants in
// the same order (correctly rounded +, -, *, / and exact operations only; -ffp-contract=off).
// numpy's float32 exp and libm's expf differ in the last bit, and np.sum / np.mean add in a
// blocked order of numpy's own: the samplers use these instead on both sides.
#pragma once

#include <cstdint>

namespace ditrt_core {

// exp of a float32, from a float64 series rounded once to float32 (portable.py exp_float32).
float exp_float32(float x);

// The float64 sum of v[0..n) as a tree of halves: with m = ceil(n / 2), v[i] + v[i + m] for
// i < n - m (v[m - 1] alone when n is odd), until one value is left (portable.py pairwise_sum).
// Overwrites v.
double pairwise_sum(double* v, int64_t n);

}  // namespace ditrt_core
