// SiT's loops (src/flow.cpp) and the portable operations (src/portable.cpp) against the Python
// runtime's values, bit for bit: the grids, each loop under an elementwise velocity (model times,
// sample, dopri5's accepted and rejected steps), exp_float32 and pairwise_sum; and the options.
#include <gtest/gtest.h>

#include <cstring>

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
        const FlowPlan plan = ditrt_core::plan_flow(c["sampler"], std::to_string(c["steps"].get<int64_t>()), true, options);
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
