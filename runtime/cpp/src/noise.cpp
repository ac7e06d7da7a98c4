#include "noise.hpp"

#include <algorithm>
#include <cmath>

namespace ditrt_core {
namespace {

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

NormalGenerator::NormalGenerator(uint64_t seed, uint64_t stream) {
    // Mix seed and stream through splitmix64 (the seeding xoshiro's authors recommend).
    uint64_t state = seed ^ (0xd1b54a32d192ed03ull * (stream + 1));
    for (auto& word : s_) word = splitmix64(state);
}

uint64_t NormalGenerator::bits() {  // xoshiro256**
    const uint64_t result = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0]; s_[3] ^= s_[1]; s_[1] ^= s_[2]; s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
}

float NormalGenerator::next() {  // Box-Muller in double, both values used
    if (has_spare_) {
        has_spare_ = false;
        return float(spare_);
    }
    const double u1 = double((bits() >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log is finite
    const double u2 = double(bits() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
    spare_ = r * std::sin(angle);
    has_spare_ = true;
    return float(r * std::cos(angle));
}

SeededNoise::SeededNoise(uint64_t seed, int64_t images, int64_t per_image)
    : per_image_(per_image), buffer_(size_t(images * per_image)) {
    for (int64_t i = 0; i < images; ++i) generators_.emplace_back(seed, uint64_t(i));
}

void SeededNoise::draw(float* out) {
    for (size_t i = 0; i < generators_.size(); ++i)
        for (int64_t j = 0; j < per_image_; ++j) out[int64_t(i) * per_image_ + j] = generators_[i].next();
}

void SeededNoise::initial(float* x) { draw(x); }

const float* SeededNoise::step(int64_t) {
    draw(buffer_.data());  // one draw per step, also at the last one (as the Python runtime)
    return buffer_.data();
}

void InjectedNoise::initial(float* x) { std::copy(initial_, initial_ + per_step_, x); }

}  // namespace ditrt_core
