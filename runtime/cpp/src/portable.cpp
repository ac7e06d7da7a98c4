#include "portable.hpp"

#include <cmath>
#include <limits>

namespace ditrt_core {
namespace {

// runtime/core/portable.py: INV_LN2, LN2_HI (33 significant bits), LN2_LO, 1/2! .. 1/13!, EXP_LIMIT.
constexpr double kInvLn2 = 0x1.71547652b82fep+0;
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kExpTaylor[] = {0x1.0000000000000p-1,  0x1.5555555555555p-3,  0x1.5555555555555p-5,
                                 0x1.1111111111111p-7,  0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13,
                                 0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19, 0x1.27e4fb7789f5cp-22,
                                 0x1.ae64567f544e4p-26, 0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};
constexpr int kTerms = int(sizeof kExpTaylor / sizeof kExpTaylor[0]);
constexpr double kExpLimit = 200.0;

}  // namespace

float exp_float32_series(float x32) {
    const double x = x32;
    if (std::isnan(x)) return std::numeric_limits<float>::quiet_NaN();
    if (!(std::fabs(x) <= kExpLimit)) return x > 0 ? std::numeric_limits<float>::infinity() : 0.0f;
    const double k = std::floor(x * kInvLn2 + 0.5);
    const double r = (x - k * kLn2Hi) - k * kLn2Lo;
    double p = kExpTaylor[kTerms - 1];
    for (int i = kTerms - 2; i >= 0; --i) p = p * r + kExpTaylor[i];
    p = (p * r + 1.0) * r + 1.0;
    return float(std::ldexp(p, int(k)));
}

bool rounded_float32(double y, float* out) {
    *out = float(y);
    // The float64 products, each rounded to float32 (as numpy's multiply with a float32 out).
    return float(y * (1.0 - kExpMargin)) == *out && float(y * (1.0 + kExpMargin)) == *out;
}

float exp_float32_from(float x, double y) {
    float out;
    return rounded_float32(y, &out) ? out : exp_float32_series(x);
}

float exp_float32(float x) { return exp_float32_from(x, std::exp(double(x))); }

double pairwise_sum(double* v, int64_t n) {
    if (n <= 0) return 0.0;
    while (n > 1) {
        const int64_t m = (n + 1) / 2;
        for (int64_t i = 0; i < n - m; ++i) v[i] = v[i] + v[i + m];
        n = m;
    }
    return v[0];
}

}  // namespace ditrt_core
