#include <gtest/gtest.h>

#include <cmath>

#include "error.hpp"
#include "manifest.hpp"
#include "noise.hpp"
#include "sampler.hpp"
#include "test_util.hpp"

namespace {

std::vector<float> floats(const testutil::json& j) {
    std::vector<float> v;
    for (double d : j.get<std::vector<double>>()) v.push_back(float(d));
    return v;
}

double max_abs(const std::vector<float>& v) {
    double m = 0;
    for (float f : v) m = std::max(m, double(std::abs(f)));
    return m;
}

}  // namespace

TEST(Steps, OneStepOfEachSamplerEqualsPython) {
    REQUIRE_PYTHON_VALUES();
    const auto& cases = testutil::python_values()["steps"];
    ASSERT_GE(cases.size(), 4u);
    const auto betas = ditrt_core::linspace(1e-4, 0.02, 1000);
    for (const auto& c : cases) {
        const ditrt_core::Schedule s = ditrt_core::respaced_schedule(betas, c["spec"].get<std::string>());
        const auto shape = c["shape"].get<std::vector<int64_t>>();
        const ditrt_core::StepShape st{shape[0], shape[1], shape[2] * shape[3], c["out_channels"], c["learned"]};
        const auto x = floats(c["x"]), mo = floats(c["model_output"]), noise = floats(c["noise"]);
        const auto want = floats(c["expected"]);
        std::vector<float> got(want.size());
        const size_t i = c["i"];
        if (c["sampler"] == "ddpm") ditrt_core::ddpm_step(s, i, st, x.data(), mo.data(), noise.data(), got.data());
        else ditrt_core::ddim_step(s, i, st, x.data(), mo.data(), noise.data(), c["eta"], got.data());
        double worst = 0;
        for (size_t k = 0; k < want.size(); ++k) worst = std::max(worst, double(std::abs(got[k] - want[k])));
        // Same float32 operations in the same order: equal but for exp's last bit in numpy's SIMD exp.
        EXPECT_LE(worst, 2e-7 * max_abs(want)) << c["name"].get<std::string>();
    }
}

TEST(Guidance, EqualsPython) {
    REQUIRE_PYTHON_VALUES();
    for (const auto& c : testutil::python_values()["guide"]) {
        auto cond = floats(c["cond"]);
        const auto uncond = floats(c["uncond"]), want = floats(c["expected"]);
        const auto shape = c["shape"].get<std::vector<int64_t>>();
        ditrt_core::guide(cond.data(), uncond.data(), shape[0], shape[1], shape[2], c["scale"], c["guided_channels"]);
        EXPECT_EQ(cond, want);
    }
}

TEST(Guidance, OnlyTheGuidedChannelsChange) {
    std::vector<float> cond(2 * 4, 1.0f), uncond(2 * 4, 0.5f);  // 2 images, 4 channels, 1 pixel
    ditrt_core::guide(cond.data(), uncond.data(), 2, 4, 1, 4.0, 3);
    EXPECT_EQ(cond, (std::vector<float>{2.5f, 2.5f, 2.5f, 1.0f, 2.5f, 2.5f, 2.5f, 1.0f}));
}

TEST(Steps, FixedLargeIgnoresTheVarianceChannels) {
    const auto s = ditrt_core::respaced_schedule(ditrt_core::linspace(1e-4, 0.02, 1000), "10");
    std::vector<float> x(4, 0.3f), mo(8, 0.1f), noise(4, 1.0f), a(4), b(4);
    ditrt_core::ddpm_step(s, 5, {1, 4, 1, 8, false}, x.data(), mo.data(), noise.data(), a.data());
    for (int c = 4; c < 8; ++c) mo[c] = 0.9f;  // other v: no effect under fixed large
    ditrt_core::ddpm_step(s, 5, {1, 4, 1, 8, false}, x.data(), mo.data(), noise.data(), b.data());
    EXPECT_EQ(a, b);
    ditrt_core::ddpm_step(s, 5, {1, 4, 1, 8, true}, x.data(), mo.data(), noise.data(), b.data());
    EXPECT_NE(a, b);  // learned range reads them
}

TEST(Steps, NoNoiseAtTheLastStep) {
    const auto s = ditrt_core::respaced_schedule(ditrt_core::linspace(1e-4, 0.02, 1000), "ddim10");
    std::vector<float> x(4, 0.3f), mo(8, 0.1f), n1(4, 1.0f), n2(4, -3.0f), a(4), b(4);
    for (bool ddim : {false, true}) {
        if (ddim) {
            ditrt_core::ddim_step(s, 0, {1, 4, 1, 8, true}, x.data(), mo.data(), n1.data(), 1.0, a.data());
            ditrt_core::ddim_step(s, 0, {1, 4, 1, 8, true}, x.data(), mo.data(), n2.data(), 1.0, b.data());
        } else {
            ditrt_core::ddpm_step(s, 0, {1, 4, 1, 8, true}, x.data(), mo.data(), n1.data(), a.data());
            ditrt_core::ddpm_step(s, 0, {1, 4, 1, 8, true}, x.data(), mo.data(), n2.data(), b.data());
        }
        EXPECT_EQ(a, b);
    }
}

namespace {

// A denoiser that is a fixed function of its inputs, recording its batch sizes.
class ToyExecutor : public ditrt_core::Executor {
public:
    ToyExecutor(int64_t max_batch, int64_t per_row, int64_t out_per_row)
        : max_batch_(max_batch), per_row_(per_row), out_per_row_(out_per_row) {}
    void attach(const ditrt_core::Manifest&, bool) override {}
    int64_t max_batch() const override { return max_batch_; }
    void run(const float* x, const float* t, const int64_t* y, int64_t rows, float* out) override {
        calls.push_back(rows);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t e = 0; e < out_per_row_; ++e)
                out[r * out_per_row_ + e] = 0.1f * x[r * per_row_ + e % per_row_] + 1e-3f * t[r] - 0.01f * float(y[r]) +
                                            (e >= per_row_ ? 0.2f : 0.0f);
    }
    std::vector<int64_t> calls;

private:
    int64_t max_batch_, per_row_, out_per_row_;
};

}  // namespace

TEST(Loop, ChunkingByMaxBatchGivesTheSameLatents) {
    const auto m = ditrt_core::parse_manifest(testutil::minimal_manifest().dump(), ".");
    ditrt_core::SampleRequest r = ditrt_core::with_defaults(m, {1, 2, 3});
    r.steps = "5";
    std::vector<float> whole(3 * 16), chunked(3 * 16);
    ToyExecutor unlimited(0, 16, 32), limited(4, 16, 32);
    ditrt_core::sample(m, unlimited, r, whole.data(), int64_t(whole.size()));
    ditrt_core::sample(m, limited, r, chunked.data(), int64_t(chunked.size()));
    EXPECT_EQ(unlimited.calls, (std::vector<int64_t>(5, 6)));  // guided: 2 rows per image
    EXPECT_EQ(limited.calls.size(), 10u);
    EXPECT_EQ(limited.calls[0], 4);
    EXPECT_EQ(limited.calls[1], 2);
    EXPECT_EQ(whole, chunked);
    r.cfg_scale = 1.0;  // no unconditional rows at scale <= 1
    ToyExecutor plain(0, 16, 32);
    ditrt_core::sample(m, plain, r, whole.data(), int64_t(whole.size()));
    EXPECT_EQ(plain.calls, (std::vector<int64_t>(5, 3)));
}
