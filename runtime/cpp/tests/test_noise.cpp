// The seeded noise stream (docs/noise.md): Philox4x32-10 against Random123's known answers, the
// committed table tests/data/noise_table.json (written by tests/noise_reference.py, checked by the
// Python runtime too) bit for bit, random access, and the C ABI. tests/test_cpp_runtime.py checks
// that this stream equals the Python one over 10^6 values.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "ditrt/ditrt.h"
#include "error.hpp"
#include "noise.hpp"
#include "test_util.hpp"

namespace {

// The table's path: DITRT_NOISE_TABLE (set by tests/CMakeLists.txt to the source tree's file).
const testutil::json& noise_table() {
    static const testutil::json table = [] {
        std::ifstream f(DITRT_NOISE_TABLE);
        return f ? testutil::json::parse(f) : testutil::json();
    }();
    return table;
}

#define REQUIRE_NOISE_TABLE()                                                                   \
    if (noise_table().is_null()) GTEST_SKIP() << "no noise table at " DITRT_NOISE_TABLE;

uint32_t bits_of(float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
}

std::vector<float> draw_of(uint64_t seed, uint64_t image, uint64_t draw, int64_t count) {
    std::vector<float> out(static_cast<size_t>(count));
    ditrt_core::normal_fill(seed, image, draw, out.data(), count);
    return out;
}

}  // namespace

TEST(Noise, PhiloxMatchesRandom123KnownAnswers) {  // Random123 tests/kat_vectors, "philox4x32 10"
    using W4 = std::array<uint32_t, 4>;
    using W2 = std::array<uint32_t, 2>;
    EXPECT_EQ(ditrt_core::philox4x32_10(W4{0, 0, 0, 0}, W2{0, 0}), (W4{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
    EXPECT_EQ(ditrt_core::philox4x32_10(W4{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, W2{0xffffffff, 0xffffffff}),
              (W4{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
    EXPECT_EQ(ditrt_core::philox4x32_10(W4{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, W2{0xa4093822, 0x299f31d0}),
              (W4{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Noise, ReproducesTheTable) {
    REQUIRE_NOISE_TABLE();
    const auto& table = noise_table();
    EXPECT_EQ(table["version"].get<std::string>(), ditrt_core::kNoiseVersion);
    ASSERT_FALSE(table["normal"].empty());
    for (const auto& e : table["normal"]) {
        const auto offsets = e["offsets"].get<std::vector<int64_t>>();
        const auto bits = e["bits"].get<std::vector<uint32_t>>();
        const auto values = draw_of(e["seed"].get<uint64_t>(), e["image"].get<uint64_t>(), e["draw"].get<uint64_t>(),
                                    *std::max_element(offsets.begin(), offsets.end()) + 1);
        for (size_t k = 0; k < offsets.size(); ++k)
            EXPECT_EQ(bits_of(values[size_t(offsets[k])]), bits[k]) << e.dump() << " offset " << offsets[k];
    }
}

TEST(Noise, TransformReproducesTheTableInDouble) {  // before float rounding: a last-bit change shows here
    REQUIRE_NOISE_TABLE();
    const auto& table = noise_table();
    ASSERT_FALSE(table["log"].empty());
    for (const auto& e : table["log"]) {
        const uint32_t x = e["x"].get<uint32_t>();
        EXPECT_EQ(ditrt_core::log_poly((double(x) + 0.5) * 0x1p-32), e["log_u"].get<double>()) << "x " << x;
    }
    ASSERT_FALSE(table["box_muller"].empty());
    for (const auto& e : table["box_muller"]) {
        double s, c;
        ditrt_core::box_muller(e["x"].get<uint32_t>(), e["y"].get<uint32_t>(), &s, &c);
        EXPECT_EQ(s, e["pair"][0].get<double>()) << e.dump();
        EXPECT_EQ(c, e["pair"][1].get<double>()) << e.dump();
    }
}

TEST(Noise, SeededNoiseIsRandomAccessPerImageAndOffset) {
    const int64_t per_image = 18;  // not a multiple of 4
    ditrt_core::SeededNoise three(7, 3, per_image), forward(7, 3, per_image);
    std::vector<std::vector<float>> steps;
    for (int64_t k = 0; k < 5; ++k) {
        const float* s = forward.step(k);
        steps.emplace_back(s, s + 3 * per_image);
    }
    for (int64_t k = 4; k >= 0; --k) {  // backwards, on another object: the same draws
        const float* got = three.step(k);
        EXPECT_TRUE(std::equal(steps[size_t(k)].begin(), steps[size_t(k)].end(), got)) << "step " << k;
    }
    std::vector<float> initial(size_t(3 * per_image));
    three.initial(initial.data());
    for (int64_t i = 0; i < 3; ++i) {
        ditrt_core::SeededNoise alone(7, 1, per_image, uint64_t(i));  // image i of a run = image 0 at offset i
        std::vector<float> x(static_cast<size_t>(per_image));
        alone.initial(x.data());
        EXPECT_TRUE(std::equal(x.begin(), x.end(), initial.begin() + i * per_image));
        EXPECT_EQ(x, draw_of(7, uint64_t(i), 0, per_image));
        const float* s = alone.step(3);
        EXPECT_TRUE(std::equal(s, s + per_image, steps[3].begin() + i * per_image));
        EXPECT_EQ(std::vector<float>(s, s + per_image), draw_of(7, uint64_t(i), 4, per_image));  // step k = draw k + 1
    }
    EXPECT_NE(steps[0], steps[1]);
    EXPECT_NE(draw_of(7, 0, 0, 16), draw_of(8, 0, 0, 16));
    EXPECT_THROW(three.step(-1), ditrt_core::Error);
    EXPECT_THROW(ditrt_core::SeededNoise(7, 3, 4, ~uint64_t(0) - 1), ditrt_core::Error);  // passes image 2^64 - 1
}

TEST(Noise, MomentsOfAHundredThousandValues) {
    const auto z = draw_of(1, 0, 0, 100000);
    double mean = 0, var = 0;
    for (float v : z) mean += v;
    mean /= double(z.size());
    for (float v : z) var += (v - mean) * (v - mean);
    var /= double(z.size());
    EXPECT_NEAR(mean, 0.0, 0.015);  // ~5 standard errors
    EXPECT_NEAR(var, 1.0, 0.025);
}

TEST(Noise, CApiFillsTheStreamAndRefusesBadArguments) {
    EXPECT_STREQ(ditrt_noise_version(), ditrt_core::kNoiseVersion);
    std::vector<float> out(10, -1.0f);
    ASSERT_EQ(ditrt_noise_normal(5, 1ull << 32, 9, out.data(), 9), DITRT_OK) << ditrt_last_error();
    const auto want = draw_of(5, 1ull << 32, 9, 9);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), out.begin()));
    EXPECT_EQ(out[9], -1.0f);  // nothing past count
    EXPECT_EQ(ditrt_noise_normal(5, 0, 0, nullptr, 0), DITRT_OK);  // nothing to write
    EXPECT_EQ(ditrt_noise_normal(5, 0, 0, nullptr, 4), DITRT_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ditrt_last_error()).find("out must not be NULL"), std::string::npos);
    EXPECT_EQ(ditrt_noise_normal(5, 0, 0, out.data(), -1), DITRT_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ditrt_last_error()).find("count must be in [0, 2^34]"), std::string::npos);
    EXPECT_EQ(ditrt_noise_normal(5, 0, 0, out.data(), (int64_t(4) << 32) + 1), DITRT_INVALID_ARGUMENT);
    EXPECT_EQ(ditrt_noise_normal(5, 0, 1ull << 32, out.data(), 4), DITRT_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ditrt_last_error()).find("draw index must be below 2^32"), std::string::npos);
    ASSERT_EQ(ditrt_noise_normal(5, 0, 0xFFFFFFFFull, out.data(), 4), DITRT_OK);  // the last draw
}

TEST(Noise, PrefetchedNoiseIsTheSeededStreamComputedOnceAhead) {
    const int64_t per_image = 4 * 8 * 8, images = 3, draws = 6;
    ditrt_core::SeededNoise plain(9, images, per_image, 5);
    ditrt_core::PrefetchedNoise ahead(9, images, per_image, 5, draws);
    std::vector<float> a(size_t(images * per_image)), b(a.size());
    plain.initial(a.data());
    ahead.initial(b.data());
    EXPECT_EQ(a, b);
    for (int64_t k = 0; k < draws; ++k) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the executor's call
        const float* want = plain.step(k);
        const float* got = ahead.step(k);
        EXPECT_TRUE(std::equal(want, want + a.size(), got)) << "step " << k;
    }
    EXPECT_EQ(ahead.computed(), draws);  // each draw once, none past step_draws
    // Out of order (a retry): the stream's values, computed on the caller's thread.
    for (int64_t k : {2, 0, 5}) {
        const float* want = plain.step(k);
        std::vector<float> copy(want, want + a.size());
        const float* got = ahead.step(k);
        EXPECT_TRUE(std::equal(copy.begin(), copy.end(), got)) << "step " << k;
    }
    EXPECT_LE(ahead.computed(), draws + 3 + 2);  // at most the prefetched next of each, bounded
}

TEST(Noise, PrefetchedNoiseStopsItsWorkerWhenDropped) {  // a failed or cancelled sample destroys it mid-loop
    for (int i = 0; i < 20; ++i) {
        ditrt_core::PrefetchedNoise ahead(1, 2, 256, 0, 100);
        std::vector<float> x(512);
        ahead.initial(x.data());
        if (i % 2) ahead.step(0);
    }  // the destructor joins: ASan / TSan would flag a thread that outlives its buffers
    SUCCEED();
}
