#include <gtest/gtest.h>

#include <cmath>

#include "error.hpp"
#include "manifest.hpp"
#include "noise.hpp"
#include "dpm_solver.hpp"
#include "images.hpp"
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

TEST(DpmSolver, ScheduleAndStepsEqualPython) {
    REQUIRE_PYTHON_VALUES();
    const auto& cases = testutil::python_values()["dpm"];
    ASSERT_GE(cases.size(), 3u);
    std::vector<double> ac;
    double product = 1.0;
    for (double b : ditrt_core::linspace(1e-4, 0.02, 1000)) ac.push_back(product *= 1.0 - b);
    for (const auto& c : cases) {
        const auto s = ditrt_core::dpm_schedule(ac, c["steps"].get<int64_t>());
        EXPECT_EQ(s.model_timesteps, c["timesteps"].get<std::vector<int64_t>>());
        EXPECT_EQ(s.orders, c["orders"].get<std::vector<int>>());
        const auto shape = c["shape"].get<std::vector<int64_t>>();  // (n, c, h, w); model output has 2c channels
        const auto x = floats(c["x"]), mo = floats(c["model_output"]), state = floats(c["state"]);
        const auto want_x = floats(c["expected_x"]), want_x0 = floats(c["expected_x0"]);
        std::vector<float> got_x(want_x.size()), got_x0(want_x.size());
        ditrt_core::dpmpp_2m_step(s, c["k"].get<size_t>(), shape[0], shape[1], shape[2] * shape[3], 2 * shape[1], x.data(),
                                  mo.data(), state.data(), got_x.data(), got_x0.data());
        // The same float32 operations; float64 coefficients agree to an ulp (libm vs numpy log/expm1).
        double worst = 0;
        for (size_t k = 0; k < want_x.size(); ++k) worst = std::max(worst, double(std::abs(got_x[k] - want_x[k])));
        EXPECT_LE(worst, 2e-7 * max_abs(want_x)) << "k " << c["k"];
        EXPECT_EQ(got_x0, want_x0) << "k " << c["k"];
    }
}

TEST(DpmSolver, StepCountsAsPython) {
    EXPECT_EQ(ditrt_core::dpm_parse_steps(" 25 ", false, 1000), 25);
    EXPECT_EQ(ditrt_core::dpm_parse_steps("999", false, 1000), 999);
    EXPECT_EQ(ditrt_core::dpm_parse_steps("250", true, 1000), 250);
    for (const char* bad : {"1000", "0", "ddim25", "10,20", "x", "", "-5", "2.5"})
        EXPECT_THROW(ditrt_core::dpm_parse_steps(bad, false, 1000), ditrt_core::Error) << bad;
    try {
        ditrt_core::dpm_parse_steps("ddim25", false, 1000);
    } catch (const ditrt_core::Error& e) {
        EXPECT_EQ(std::string(e.what()), "dpm++2m takes the number of model calls as an int (e.g. 25) or a string of digits "
                                         "(e.g. '25'), from 1 to 999; 'ddim25' is a DDPM/DDIM respacing spec");
    }
}

TEST(Images, GridAndUint8EqualPython) {
    REQUIRE_PYTHON_VALUES();
    const auto& cases = testutil::python_values()["images"];
    ASSERT_GE(cases.size(), 9u);
    for (const auto& c : cases) {
        const int64_t n = c["n"], h = c["h"], w = c["w"];
        const auto images = floats(c["images"]);
        std::vector<uint8_t> u8(size_t(n * h * w * 3));
        ditrt_core::to_uint8(images.data(), n, h, w, u8.data());
        EXPECT_EQ(u8, c["uint8"].get<std::vector<uint8_t>>()) << n << " images";
        const auto g = ditrt_core::grid_shape(n, h, w, ditrt_core::kGridNrow, ditrt_core::kGridPadding);
        EXPECT_EQ((std::vector<int64_t>{g.height, g.width}), c["grid_shape"].get<std::vector<int64_t>>()) << n << " images";
        std::vector<uint8_t> grid(size_t(g.height * g.width * 3));
        ditrt_core::grid(images.data(), n, h, w, ditrt_core::kGridNrow, ditrt_core::kGridPadding, grid.data());
        EXPECT_EQ(grid, c["grid"].get<std::vector<uint8_t>>()) << n << " images";
    }
}

// Issue 30: a degenerate table (alphas_cumprod underflows float32, the manifest readers now refuse
// it) made sigma = 0 * NaN at eta 0, so ddim_step read the (absent) noise: a segfault. At eta 0
// sigma is exactly 0 and no noise is read; at eta != 0 absent noise is an error, never a read.
TEST(Steps, DdimAtEtaZeroNeverReadsNoiseEvenOnADegenerateTable) {
    const auto betas = ditrt_core::linspace(1e-4, 0.9, 1000);
    std::vector<int64_t> timesteps(1000);
    for (int64_t t = 0; t < 1000; ++t) timesteps[size_t(t)] = t;
    const ditrt_core::Schedule s = ditrt_core::schedule_from_betas(betas, timesteps);
    ASSERT_EQ(float(s.alphas_cumprod.back()), 0.0f);  // the 0/0 of alpha_bar / alpha_bar_prev
    const ditrt_core::StepShape shape{1, 4, 4, 8, true};
    const std::vector<float> x(16, 1.0f), mo(32, 0.0f);
    std::vector<float> out(16);
    ditrt_core::ddim_step(s, 999, shape, x.data(), mo.data(), nullptr, 0.0, out.data());
    try {
        ditrt_core::ddim_step(s, 500, shape, x.data(), mo.data(), nullptr, 1.0, out.data());
        FAIL() << "eta 1 without noise must throw";
    } catch (const ditrt_core::Error& e) {
        EXPECT_NE(std::string(e.what()).find("needs noise"), std::string::npos) << e.what();
    }
}
