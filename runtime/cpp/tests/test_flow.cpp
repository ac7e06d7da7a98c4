// SiT's loops (src/flow.cpp) and the portable operations (src/portable.cpp) against the Python
// runtime's values, bit for bit: the grids, each loop under an elementwise velocity (model times,
// sample, dopri5's accepted and rejected steps), exp_float32 and pairwise_sum; and the options.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <filesystem>
#include <map>

#include "ditrt/ditrt.h"
#include "error.hpp"
#include "flow.hpp"
#include "portable.hpp"
#include "test_util.hpp"

namespace {

using ditrt_core::FlowPlan;
using testutil::json;

std::vector<float> floats(const json& j) {
    std::vector<float> out;
    for (const auto& v : j) out.push_back(float(v.get<double>()));
    return out;
}

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

TEST(Flow, GridsAreTorchLinspaceAsPython) {
    REQUIRE_PYTHON_VALUES();
    for (const auto& g : testutil::python_values()["flow"]["grids"]) {
        const int64_t n = g["n"];
        const FlowPlan ode = ditrt_core::plan_flow("ode-euler", std::to_string(n), true, {});
        const FlowPlan sde = ditrt_core::plan_flow("sde-euler", std::to_string(n), true, {});
        EXPECT_EQ(ode.t, floats(g["ode"])) << n;
        EXPECT_EQ(sde.t, floats(g["sde"])) << n;
    }
}

TEST(Flow, EveryLoopIsPythonsBitForBit) {
    REQUIRE_PYTHON_VALUES();
    for (const auto& c : testutil::python_values()["flow"]["loops"]) {
        std::map<std::string, std::string> options;
        for (auto it = c["options"].begin(); it != c["options"].end(); ++it) options[it.key()] = it.value();
        FlowPlan plan = ditrt_core::plan_flow(c["sampler"], std::to_string(c["steps"].get<int64_t>()), true, options);
        if (!c["grid"].is_null()) plan.t = floats(c["grid"]);
        const std::vector<float> a = floats(c["a"]), b = floats(c["b"]), draws = floats(c["draws"]);
        std::vector<float> x = floats(c["x"]);
        const size_t count = x.size();
        std::vector<double> times;
        const ditrt_core::Velocity velocity = [&](const float* y, float t, float* v) {
            times.push_back(t);
            for (size_t e = 0; e < count; ++e) v[e] = a[e] * y[e] + t * b[e];
        };
        const ditrt_core::Draw draw = [&](int64_t k) { return draws.data() + size_t(k) * count; };
        ditrt_core::Dopri5Stats stats;
        ditrt_core::flow_sample(plan, x, velocity, draw, &stats);
        const std::string name = c["sampler"].get<std::string>() + " " + c["options"].dump();
        EXPECT_EQ(times, c["times"].get<std::vector<double>>()) << name;
        const std::vector<float> expected = floats(c["expected"]);
        ASSERT_EQ(x.size(), expected.size());
        for (size_t e = 0; e < count; ++e) ASSERT_EQ(bits(x[e]), bits(expected[e])) << name << " element " << e;
        if (plan.sampler == ditrt_core::FlowSampler::OdeDopri5) {
            EXPECT_EQ((std::vector<int64_t>{stats.function_evals, stats.accepted_steps, stats.rejected_steps}),
                      c["stats"].get<std::vector<int64_t>>())
                << name;
        } else {
            EXPECT_EQ(int64_t(times.size()), plan.model_calls()) << name;
        }
    }
}

TEST(Portable, ExpAndPairwiseSumArePythons) {
    REQUIRE_PYTHON_VALUES();
    const json& p = testutil::python_values()["portable"];
    const auto in = p["exp_in"].get<std::vector<uint32_t>>(), out = p["exp_out"].get<std::vector<uint32_t>>();
    for (size_t i = 0; i < in.size(); ++i) {
        float x;
        std::memcpy(&x, &in[i], 4);
        ASSERT_EQ(bits(ditrt_core::exp_float32(x)), out[i]) << "exp_float32(" << x << ")";
    }
    for (const auto& s : p["sums"]) {
        std::vector<double> v = s["values"].get<std::vector<double>>();
        EXPECT_EQ(ditrt_core::pairwise_sum(v.data(), int64_t(v.size())), s["expected"].get<double>()) << v.size();
    }
}

// exp_float32's fast path (libm's double exp where it decides the float32) against the series it
// stands for: every 613th float32 in [-200, 200] (about 3.6 million, the bit patterns' lowest bits
// varied by the stride), the edges, and the undecided cases counted so the fallback is exercised.
TEST(Portable, FastExpIsTheSeriesToTheBit) {
    int64_t checked = 0, undecided = 0;
    for (uint32_t sign : {0u, 0x80000000u}) {
        for (uint32_t b = 0; b <= 0x43480000u; b += 613) {  // 0x43480000 is 200.0f
            float x;
            const uint32_t u = b | sign;
            std::memcpy(&x, &u, 4);
            float decided;
            undecided += !ditrt_core::rounded_float32(std::exp(double(x)), &decided);
            ASSERT_EQ(bits(ditrt_core::exp_float32(x)), bits(ditrt_core::exp_float32_series(x))) << "exp_float32(" << x << ")";
            ++checked;
        }
    }
    EXPECT_GT(checked, 3000000);
    EXPECT_GT(undecided, 5) << "of " << checked << " arguments, " << undecided << " went to the series (20 with glibc 2.36): "
                            << "the fallback went untested";
    for (float x : {0.0f, -0.0f, 88.72f, 88.73f, -103.97f, -103.98f, -149.0f, -200.0f, 200.0f, 250.0f, -250.0f,
                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
        ASSERT_EQ(bits(ditrt_core::exp_float32(x)), bits(ditrt_core::exp_float32_series(x))) << "exp_float32(" << x << ")";
    EXPECT_TRUE(std::isnan(ditrt_core::exp_float32(std::numeric_limits<float>::quiet_NaN())));
}

// The decision itself: a double just off a float32 rounding midpoint (by less than the margin) is left
// to the series, one farther off is decided, and to the float32 on its side.
TEST(Portable, RoundingNearAMidpointIsLeftToTheSeries) {
    const float lo = 1.5f, hi = std::nextafter(lo, 2.0f);
    const double midpoint = (double(lo) + double(hi)) / 2;
    float out;
    for (double off : {0.0, 0x1p-45, -0x1p-45, 0x1p-41, -0x1p-41})
        EXPECT_FALSE(ditrt_core::rounded_float32(midpoint * (1 + off), &out)) << off;
    ASSERT_TRUE(ditrt_core::rounded_float32(midpoint * (1 + 0x1p-36), &out));
    EXPECT_EQ(out, hi);
    ASSERT_TRUE(ditrt_core::rounded_float32(midpoint * (1 - 0x1p-36), &out));
    EXPECT_EQ(out, lo);
    EXPECT_FALSE(ditrt_core::rounded_float32(std::nan(""), &out));
    // Undecided: the series decides, whichever side of the midpoint the float64 exp fell (libm's exp
    // rounds to the series' float32 on every float32 in [-200, 200] here, so only this shows the fallback).
    const float x = std::log(midpoint);
    for (double y : {midpoint * (1 - 0x1p-45), midpoint, midpoint * (1 + 0x1p-45)})
        EXPECT_EQ(bits(ditrt_core::exp_float32_from(x, y)), bits(ditrt_core::exp_float32_series(x))) << y;
}

TEST(Flow, CountsAndOptions) {
    using ditrt_core::plan_flow;
    EXPECT_EQ(plan_flow("ode-euler", "12", true, {}).model_calls(), 11);
    EXPECT_EQ(plan_flow("ode-heun2", "12", true, {}).model_calls(), 22);
    EXPECT_EQ(plan_flow("ode-dopri5", "12", true, {}).model_calls(), 0);  // adaptive
    EXPECT_EQ(plan_flow("sde-euler", "12", true, {}).model_calls(), 12);
    EXPECT_EQ(plan_flow("sde-heun", " 12\t", true, {}).model_calls(), 23);
    EXPECT_EQ(plan_flow("sde-heun", "12", true, {}).noise_draws(), 11);
    EXPECT_EQ(plan_flow("ode-dopri5", "12", true, {}).noise_draws(), 0);
    const FlowPlan tight = plan_flow("ode-dopri5", "5", true, {{"atol", "1e-9"}, {"rtol", "1"}});
    EXPECT_EQ(tight.atol, 1e-9);
    EXPECT_EQ(tight.rtol, 1.0);
    EXPECT_NO_THROW(plan_flow("sde-euler", "5", true, {{"diffusion_form", "sigma"}, {"last_step_size", "0.04"}}));
    for (const char* steps : {"1", "0", "100001", "99999999999999999999999", "", "ten", "-5", "5.0"})
        EXPECT_THROW(plan_flow("ode-euler", steps, true, {}), ditrt_core::Error) << steps;
    EXPECT_THROW(plan_flow("ode-euler", "5", true, {{"atol", "1e-3"}}), ditrt_core::Error);
    EXPECT_THROW(plan_flow("ode-dopri5", "5", true, {{"rtol", "nan"}}), ditrt_core::Error);
    EXPECT_THROW(plan_flow("sde-euler", "5", true, {{"diffusion_norm", "2"}}), ditrt_core::Error);
    EXPECT_THROW(plan_flow("ddpm", "5", true, {}), ditrt_core::Error);
}

}  // namespace

// ---- whole SiT runs through the C ABI (also under ASan + UBSan) ------------------------------------

namespace {

// tests/fake_networks.c's denoiser: model_output[r, e] = 0.1 latent[r, e mod CHW] + 1e-4 t[r] - 0.01 label[r].
int fake_denoiser(void* user, const char*, const ditrt_tensor* in, int64_t, const ditrt_tensor* out, int64_t) {
    auto* rows_seen = static_cast<std::vector<int64_t>*>(user);
    const int64_t rows = in[0].shape[0], in_row = 4 * 2 * 2, out_row = out[0].shape[1] * 4;
    const float* x = static_cast<const float*>(in[0].data);
    const float* t = static_cast<const float*>(in[1].data);
    const int64_t* y = static_cast<const int64_t*>(in[2].data);
    float* o = static_cast<float*>(out[0].data);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = 0; e < out_row; ++e) o[r * out_row + e] = 0.1f * x[r * in_row + e % in_row] + 1e-4f * t[r] - 0.01f * float(y[r]);
    rows_seen->push_back(rows);
    return 0;
}

int count_progress(void* user, int64_t done, int64_t total, double) {
    auto* seen = static_cast<std::vector<std::pair<int64_t, int64_t>>*>(user);
    seen->emplace_back(done, total);
    return 0;
}

}  // namespace

TEST(FlowCApi, SitRunsArePythonsBitForBit) {
    REQUIRE_PYTHON_VALUES();
    const json& cases = testutil::python_values()["sit_runs"];
    const std::string dir = testutil::write_artifact(cases["manifest"], "sit_runs");
    std::vector<int64_t> rows;
    ditrt_executor* executor = nullptr;
    ditrt_pipeline* pipe = nullptr;
    ASSERT_EQ(ditrt_executor_create_callback(fake_denoiser, &rows, 0, &executor), DITRT_OK);
    ASSERT_EQ(ditrt_open(dir.c_str(), executor, DITRT_OPEN_NO_VERIFY, &pipe), DITRT_OK) << ditrt_last_error();
    for (const auto& c : cases["runs"]) {
        ditrt_options* options = nullptr;
        ASSERT_EQ(ditrt_options_create(&options), DITRT_OK);
        const std::string cfg = std::to_string(c["cfg_scale"].get<double>()), steps = std::to_string(c["steps"].get<int64_t>());
        const std::string seed = std::to_string(c["seed"].get<int64_t>()), sampler = c["sampler"], guidance = c["guidance"];
        for (const auto& [k, v] : std::map<std::string, std::string>{{"sampler", sampler}, {"steps", steps}, {"cfg_scale", cfg},
                                                                      {"guidance", guidance}, {"seed", seed}})
            ASSERT_EQ(ditrt_options_set(options, k.c_str(), v.c_str()), DITRT_OK) << ditrt_last_error();
        std::vector<std::pair<int64_t, int64_t>> seen;
        ASSERT_EQ(ditrt_options_set_progress(options, count_progress, &seen), DITRT_OK);
        const std::vector<int64_t> labels = c["labels"].get<std::vector<int64_t>>();
        std::vector<float> out(labels.size() * 16, -1.0f);
        rows.clear();
        ASSERT_EQ(ditrt_sample(pipe, labels.data(), int64_t(labels.size()), options, out.data(), int64_t(out.size())), DITRT_OK)
            << ditrt_last_error();
        const std::string name = sampler + " cfg " + cfg + " " + guidance;
        const auto expected = c["expected"].get<std::vector<uint32_t>>();
        for (size_t e = 0; e < out.size(); ++e) ASSERT_EQ(bits(out[e]), expected[e]) << name << " element " << e;
        const int64_t calls = c["calls"];
        EXPECT_EQ(rows, std::vector<int64_t>(size_t(calls), c["rows"].get<int64_t>())) << name;
        int64_t total = -1;
        ASSERT_EQ(ditrt_num_steps(pipe, options, &total), DITRT_OK);
        EXPECT_EQ(total, sampler == "ode-dopri5" ? 0 : calls) << name;
        ASSERT_EQ(int64_t(seen.size()), calls) << name;
        EXPECT_EQ(seen.back(), std::make_pair(calls, total)) << name;
        ditrt_options_release(options);
    }
    ditrt_close(pipe);
    ditrt_executor_release(executor);
    std::filesystem::remove_all(dir);
}
