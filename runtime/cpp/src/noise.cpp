#include "noise.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <utility>

#include "error.hpp"

// Every double operation must round to double: no x87 excess precision.
static_assert(FLT_EVAL_METHOD == 0, "the noise stream needs double arithmetic evaluated in double");

namespace ditrt_core {
namespace {

// Philox4x32-10 (Salmon et al., SC'11): multipliers, Weyl key increments, rounds.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The transform's constants, each the double nearest to the value named (docs/noise.md), as in
// runtime/sampling/noise.py.
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;  // ln 2 cut to 32 significant bits (fdlibm ln2_hi): e * kLn2Hi is exact
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;  // ln 2 - kLn2Hi
constexpr double kSqrtHalf = 0x1.6a09e667f3bcdp-1;
constexpr double kPiOver2_2m31 = 0x1.921fb54442d18p-31;  // (pi / 2) * 2^-31
constexpr double kAtanh[] = {  // 1/3, 1/5, ..., 1/19
    0x1.5555555555555p-2, 0x1.999999999999ap-3, 0x1.2492492492492p-3, 0x1.c71c71c71c71cp-4, 0x1.745d1745d1746p-4,
    0x1.3b13b13b13b14p-4, 0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5, 0x1.af286bca1af28p-5};
constexpr double kSin[] = {  // -1/3!, 1/5!, ..., -1/15!
    -0x1.5555555555555p-3, 0x1.1111111111111p-7, -0x1.a01a01a01a01ap-13, 0x1.71de3a556c734p-19,
    -0x1.ae64567f544e4p-26, 0x1.6124613a86d09p-33, -0x1.ae7f3e733b81fp-41};
constexpr double kCos[] = {  // -1/2!, 1/4!, ..., 1/16!
    -0x1.0000000000000p-1, 0x1.5555555555555p-5, -0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-16,
    -0x1.27e4fb7789f5cp-22, 0x1.1eed8eff8d898p-29, -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45};

constexpr uint64_t kMaxValues = uint64_t(4) << 32;  // per (image, draw): the block index is one word

// c[0] + z (c[1] + z (c[2] + ...)), innermost first: one rounding per * and + (no FMA).
template <size_t N>
double horner(double z, const double (&c)[N]) {
    double p = c[N - 1];
    for (size_t i = N - 1; i-- > 0;) p = p * z + c[i];
    return p;
}

}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> key) {
    for (int round = 0; round < kPhiloxRounds; ++round) {
        const uint64_t p0 = uint64_t(kPhiloxM0) * c[0], p1 = uint64_t(kPhiloxM1) * c[2];
        c = {uint32_t(p1 >> 32) ^ c[1] ^ key[0], uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ key[1], uint32_t(p0)};
        key = {key[0] + kPhiloxW0, key[1] + kPhiloxW1};
    }
    return c;
}

double log_poly(double u) {
    int e;
    double m = std::frexp(u, &e);  // exact: m in [0.5, 1)
    if (m < kSqrtHalf) {
        m *= 2.0;
        e -= 1;
    }
    const double s = (m - 1.0) / (m + 1.0), z = s * s, t = s + s;
    const double ln_m = t + t * (z * horner(z, kAtanh));
    return double(e) * kLn2Hi + (double(e) * kLn2Lo + ln_m);
}

void sin_cos_poly(double a, double* sin_a, double* cos_a) {
    const double z = a * a;
    *sin_a = a + (a * z) * horner(z, kSin);
    *cos_a = 1.0 + z * horner(z, kCos);
}

void box_muller(uint32_t x, uint32_t y, double* sin_part, double* cos_part) {
    const double r = std::sqrt(log_poly((double(x) + 0.5) * 0x1p-32) * -2.0);
    const uint32_t quadrant = y >> 30, octant = (y >> 29) & 1u;
    // In the upper octant, the mirror 2^30 - 1 - m of the offset m = y mod 2^30 (a bit complement).
    const uint32_t mirrored = (y ^ (0u - octant)) & 0x1FFFFFFFu;
    const double a = double(2 * uint64_t(mirrored) + 1) * kPiOver2_2m31;
    double sin_a, cos_a;
    sin_cos_poly(a, &sin_a, &cos_a);
    const bool swap = ((octant ^ quadrant) & 1u) != 0;
    double sin_t = swap ? cos_a : sin_a, cos_t = swap ? sin_a : cos_a;
    if (quadrant >= 2) sin_t = -sin_t;             // quadrants 2, 3
    if (((quadrant + 1) & 2u) != 0) cos_t = -cos_t;  // quadrants 1, 2
    *sin_part = sin_t * r;
    *cos_part = cos_t * r;
}

void normal_fill(uint64_t seed, uint64_t image, uint64_t draw, float* out, int64_t count) {
    if (count < 0 || uint64_t(count) > kMaxValues)
        throw Error(Status::InvalidArgument, "count must be in [0, 2^34] (values of one image's draw), got " +
                                                 std::to_string(count));
    if (draw >> 32) throw Error(Status::InvalidArgument, "the draw index must be below 2^32, got " + std::to_string(draw));
    const std::array<uint32_t, 2> key{uint32_t(seed), uint32_t(seed >> 32)};
    for (int64_t start = 0; start < count; start += 4) {
        const auto w = philox4x32_10({uint32_t(start / 4), uint32_t(draw), uint32_t(image), uint32_t(image >> 32)}, key);
        double v[4];
        box_muller(w[0], w[1], &v[0], &v[1]);
        box_muller(w[2], w[3], &v[2], &v[3]);
        const int64_t n = std::min<int64_t>(4, count - start);
        for (int64_t lane = 0; lane < n; ++lane) out[start + lane] = float(v[lane]);  // round to nearest even
    }
}

SeededNoise::SeededNoise(uint64_t seed, int64_t images, int64_t per_image, uint64_t image_offset)
    : seed_(seed), image_offset_(image_offset), images_(images), per_image_(per_image),
      buffer_(size_t(images * per_image)) {
    if (images > 0 && image_offset + uint64_t(images - 1) < image_offset)
        throw Error(Status::InvalidArgument, "image_offset + images passes the last image index 2^64 - 1");
}

void SeededNoise::draw(uint64_t index, float* out) const {
    for (int64_t i = 0; i < images_; ++i) normal_fill(seed_, image_offset_ + uint64_t(i), index, out + i * per_image_, per_image_);
}

void SeededNoise::initial(float* x) { draw(0, x); }

const float* SeededNoise::step(int64_t k) {
    if (k < 0) throw Error(Status::InvalidArgument, "a step index is >= 0, got " + std::to_string(k));
    draw(uint64_t(k) + 1, buffer_.data());
    return buffer_.data();
}

PrefetchedNoise::PrefetchedNoise(uint64_t seed, int64_t images, int64_t per_image, uint64_t image_offset,
                                 int64_t step_draws)
    : stream_(seed, images, per_image, image_offset), step_draws_(step_draws),
      ahead_(size_t(images * per_image)), current_(size_t(images * per_image)) {
    if (step_draws_ > 0) worker_ = std::thread(&PrefetchedNoise::work, this);
}

PrefetchedNoise::~PrefetchedNoise() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    if (worker_.joinable()) worker_.join();
}

void PrefetchedNoise::want(int64_t k) {
    if (k < step_draws_ && ready_ != k) {
        wanted_ = k;
        changed_.notify_all();
    }
}

void PrefetchedNoise::work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
        changed_.wait(lock, [&] { return stop_ || (wanted_ >= 0 && wanted_ != ready_); });
        if (stop_) return;
        const int64_t k = wanted_;
        busy_ = true;
        ready_ = -1;  // ahead_ is being overwritten
        error_ = nullptr;
        ++computed_;
        lock.unlock();
        std::exception_ptr error;
        try {
            stream_.draw(uint64_t(k) + 1, ahead_.data());
        } catch (...) {
            error = std::current_exception();
        }
        lock.lock();
        busy_ = false;
        if (wanted_ == k) wanted_ = -1;
        ready_ = k;
        error_ = error;
        changed_.notify_all();
    }
}

void PrefetchedNoise::initial(float* x) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        want(0);  // step 0 on the worker while draw 0 is computed here
    }
    stream_.initial(x);
}

const float* PrefetchedNoise::step(int64_t k) {
    if (k < 0) throw Error(Status::InvalidArgument, "a step index is >= 0, got " + std::to_string(k));
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return wanted_ != k; });  // queued or being computed: wait, never recompute
    if (ready_ == k) {  // the worker is idle (ready_ is -1 while it computes)
        std::swap(ahead_, current_);
        ready_ = -1;
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    } else {  // not prefetched (taken out of order): computed here, into the buffer the worker never writes
        ++computed_;
        lock.unlock();
        stream_.draw(uint64_t(k) + 1, current_.data());
        lock.lock();
    }
    want(k + 1);
    return current_.data();
}

int64_t PrefetchedNoise::computed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return computed_;
}

void InjectedNoise::initial(float* x) { std::copy(initial_, initial_ + per_step_, x); }

}  // namespace ditrt_core
