// Noise for the sampling loop: injected arrays, or ditrt's seeded stream.
//
// The seeded stream is specified to the bit in docs/noise.md and is the Python runtime's
// (runtime/sampling/noise.py): the same seed gives the same noise in both languages. It is counter-based
// (Philox4x32-10 keyed by the seed, counter = (block, draw, image lo, image hi)), so the draw of
// any step needs no earlier draw and an image's noise does not depend on its batch, on chunking
// or on a shard. The uniform-to-normal transform (Box-Muller in double, rounded to float at the
// end) uses only +, -, *, /, sqrt and exact operations: log, sin and cos are our own polynomials,
// written as in noise.py (same constants, same Horner order). It relies on -ffp-contract=off
// (CMakeLists.txt): a fused multiply-add would round differently.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ditrt_core {

inline constexpr const char* kNoiseVersion = "philox4x32-10+bm-poly/1";

// Philox4x32-10 (Random123 / cuRAND): four 32-bit words from a counter and a key.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// ln u for u in (0, 1); (sin a, cos a) for a in [0, pi/4]: the stream's polynomials.
double log_poly(double u);
void sin_cos_poly(double a, double* sin_a, double* cos_a);
// (r sin theta, r cos theta) in double from a radius word x and an angle word y.
void box_muller(uint32_t x, uint32_t y, double* sin_part, double* cos_part);

// Values [0, count) of draw `draw` of image `image` under `seed` (element j of a (C, H, W) draw
// flattened in C order). Error(InvalidArgument) when draw >= 2^32 or count > 2^34.
void normal_fill(uint64_t seed, uint64_t image, uint64_t draw, float* out, int64_t count);

class NoiseSource {
public:
    virtual ~NoiseSource() = default;
    virtual void initial(float* x) = 0;           // (N, C, H, W)
    virtual const float* step(int64_t k) = 0;     // (N, C, H, W) for the k-th step from the noisiest
};

// The seeded stream for `images` images of `per_image` values: image i of this run is image
// image_offset + i of the stream. initial() is draw 0, step(k) draw k + 1, in any order.
class SeededNoise : public NoiseSource {
public:
    SeededNoise(uint64_t seed, int64_t images, int64_t per_image, uint64_t image_offset = 0);
    void initial(float* x) override;
    const float* step(int64_t k) override;
    void draw(uint64_t index, float* out) const;  // draw `index` of every image into out (N, per_image)
    int64_t values() const { return images_ * per_image_; }

private:
    uint64_t seed_, image_offset_;
    int64_t images_, per_image_;
    std::vector<float> buffer_;
};

// The seeded stream with its step draws computed one model call ahead on one worker thread
// (runtime/sampling/prefetch.py in the Python runtime): taking step k queues step k + 1 when k + 1 <
// step_draws, so it is computed while the executor runs. The bits are SeededNoise's (the same
// normal_fill). At most one draw is queued or held ahead; a draw is computed once when the loop
// takes the draws in order; one taken out of order is computed on the caller's thread. The
// destructor stops and joins the worker (a failed or cancelled sample leaves no thread).
class PrefetchedNoise : public NoiseSource {
public:
    PrefetchedNoise(uint64_t seed, int64_t images, int64_t per_image, uint64_t image_offset, int64_t step_draws);
    ~PrefetchedNoise() override;
    PrefetchedNoise(const PrefetchedNoise&) = delete;
    PrefetchedNoise& operator=(const PrefetchedNoise&) = delete;
    void initial(float* x) override;               // step 0 is computed meanwhile on the worker
    const float* step(int64_t k) override;         // valid until the next step() call
    int64_t computed() const;                      // draws computed so far, on either thread (tests)

private:
    void work();
    void want(int64_t k);  // queue step k for the worker (lock held)
    SeededNoise stream_;
    const int64_t step_draws_;
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    std::vector<float> ahead_, current_;  // the worker writes ahead_; step() hands out current_
    int64_t wanted_ = -1, ready_ = -1;    // the step queued for the worker; the step in ahead_
    int64_t computed_ = 0;
    bool busy_ = false, stop_ = false;
    std::exception_ptr error_;
    std::thread worker_;
};

class InjectedNoise : public NoiseSource {
public:
    InjectedNoise(const float* initial, const float* steps, int64_t per_step)
        : initial_(initial), steps_(steps), per_step_(per_step) {}
    void initial(float* x) override;
    const float* step(int64_t k) override { return steps_ + k * per_step_; }

private:
    const float* initial_;
    const float* steps_;
    int64_t per_step_;
};

}  // namespace ditrt_core
