// Noise for the sampling loop: injected arrays, or ditrt's own seeded generator.
//
// The seeded generator is NOT numpy's: the Python runtime (numpy PCG64 per image) and this one
// (xoshiro256** per image, Box-Muller) give different images for the same seed. Both keep one
// stream per image seeded with (seed, image index), so an image does not depend on its batch or
// on chunking. Bit-for-bit parity with Python needs injected noise.
#pragma once

#include <cstdint>
#include <vector>

namespace ditrt_core {

class NormalGenerator {  // one image's stream
public:
    NormalGenerator(uint64_t seed, uint64_t stream);
    float next();

private:
    uint64_t bits();
    uint64_t s_[4];
    double spare_ = 0;
    bool has_spare_ = false;
};

class NoiseSource {
public:
    virtual ~NoiseSource() = default;
    virtual void initial(float* x) = 0;           // (N, C, H, W)
    virtual const float* step(int64_t k) = 0;     // (N, C, H, W) for the k-th step from the noisiest
};

class SeededNoise : public NoiseSource {
public:
    SeededNoise(uint64_t seed, int64_t images, int64_t per_image);
    void initial(float* x) override;
    const float* step(int64_t k) override;

private:
    void draw(float* out);
    std::vector<NormalGenerator> generators_;
    int64_t per_image_;
    std::vector<float> buffer_;
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
