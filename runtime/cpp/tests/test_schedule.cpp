#include <gtest/gtest.h>

#include <cmath>

#include "error.hpp"
#include "schedule.hpp"
#include "test_util.hpp"

using ditrt_core::space_timesteps;

namespace {

std::vector<int64_t> range(int64_t start, int64_t stop, int64_t step) {
    std::vector<int64_t> v;
    for (int64_t t = start; t < stop; t += step) v.push_back(t);
    return v;
}

std::string schedule_error(int64_t n, const std::string& spec) {
    try {
        space_timesteps(n, spec);
    } catch (const ditrt_core::Error& e) {
        EXPECT_EQ(e.status(), ditrt_core::Status::Schedule);
        return e.what();
    }
    return "";
}

}  // namespace

TEST(Respacing, OfficialChains) {
    EXPECT_EQ(space_timesteps(1000, "10"), (std::vector<int64_t>{0, 111, 222, 333, 444, 555, 666, 777, 888, 999}));
    EXPECT_EQ(space_timesteps(1000, "ddim10"), range(0, 1000, 100));
    EXPECT_EQ(space_timesteps(1000, "ddim50"), range(0, 1000, 20));
    EXPECT_EQ(space_timesteps(1000, "1000"), range(0, 1000, 1));
    EXPECT_EQ(space_timesteps(1000, "250").size(), 250u);
    EXPECT_EQ(space_timesteps(1000, " 25 ").size(), 25u);  // stripped, as Python's str.strip / int
    EXPECT_EQ(space_timesteps(1000, " 0010 "), space_timesteps(1000, "10"));  // str(int(spec)) for digits
    EXPECT_EQ(space_timesteps(1000, "ddim 10"), range(0, 1000, 100));  // _parse_count strips the count
    const auto sections = space_timesteps(1000, "10,20,30");
    EXPECT_EQ(sections.size(), 60u);
    EXPECT_EQ(sections.front(), 0);
    EXPECT_EQ(sections.back(), 999);
}

TEST(Respacing, RoundsHalfToEvenLikePython) {
    // size 6, count 5: stride 1.25, positions 0, 1.25, 2.5, 3.75, 5 -> round(2.5) == 2 in Python.
    EXPECT_EQ(space_timesteps(6, "5"), (std::vector<int64_t>{0, 1, 2, 4, 5}));
    // size 4, count 3: stride 1.5, positions 0, 1.5, 3 -> round(1.5) == 2.
    EXPECT_EQ(space_timesteps(4, "3"), (std::vector<int64_t>{0, 2, 3}));
}

TEST(Respacing, ImpossibleSpecsAreScheduleErrors) {
    EXPECT_NE(schedule_error(1000, "0").find("must be positive"), std::string::npos);
    EXPECT_NE(schedule_error(1000, "-3").find("is not 'N', 'ddimN'"), std::string::npos);
    EXPECT_NE(schedule_error(1000, "ddim300").find("no integer stride"), std::string::npos);
    EXPECT_NE(schedule_error(1000, "1001").find("cannot take 1001 steps"), std::string::npos);
    EXPECT_NE(schedule_error(1000, "99999999999999999999999").find("is not 'N'"), std::string::npos);  // > 7 digits
    for (const char* bad : {"", "  ", "abc", "ddim", "10,,20", "2.5", "1_0", "+5", "_10", "10_", "ddimx", "12345678"})
        EXPECT_NE(schedule_error(1000, bad), "") << "spec '" << bad << "' was accepted";
    EXPECT_THROW(ditrt_core::respaced_schedule(ditrt_core::linspace(1e-4, 0.02, 1000), "1"), ditrt_core::Error);  // < 2 steps
}

TEST(Respacing, EqualsPythonOnEverySpec) {
    REQUIRE_PYTHON_VALUES();
    for (const auto& c : testutil::python_values()["respacing"]) {
        const std::string spec = c["spec"];
        const int64_t n = c["n"];
        if (c.contains("error")) {
            EXPECT_NE(schedule_error(n, spec), "") << "'" << spec << "' over " << n << ": Python refuses it";
        } else {
            EXPECT_EQ(space_timesteps(n, spec), c["steps"].get<std::vector<int64_t>>()) << "'" << spec << "' over " << n;
        }
    }
}

TEST(Linspace, NumpyArithmetic) {
    const auto b = ditrt_core::linspace(1e-4, 0.02, 1000);
    EXPECT_EQ(b.front(), 1e-4);
    EXPECT_EQ(b.back(), 0.02);
    EXPECT_EQ(b[1], 1.0 * ((0.02 - 1e-4) / 999) + 1e-4);
}

TEST(ScheduleTables, EqualPythonTables) {
    REQUIRE_PYTHON_VALUES();
    const auto& schedules = testutil::python_values()["schedules"];
    ASSERT_GE(schedules.size(), 3u);
    for (const auto& [spec, tables] : schedules.items()) {
        const ditrt_core::Schedule s = ditrt_core::respaced_schedule(ditrt_core::linspace(1e-4, 0.02, 1000), spec);
        EXPECT_EQ(s.timesteps, tables["timesteps"].get<std::vector<int64_t>>()) << spec;
        const std::pair<const char*, const std::vector<double>*> named[] = {
            {"betas", &s.betas}, {"alphas_cumprod", &s.alphas_cumprod}, {"alphas_cumprod_prev", &s.alphas_cumprod_prev},
            {"sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod},
            {"sqrt_recipm1_alphas_cumprod", &s.sqrt_recipm1_alphas_cumprod},
            {"posterior_variance", &s.posterior_variance},
            {"posterior_log_variance_clipped", &s.posterior_log_variance_clipped},
            {"posterior_mean_coef1", &s.posterior_mean_coef1}, {"posterior_mean_coef2", &s.posterior_mean_coef2},
            {"log_betas", &s.log_betas}, {"fixed_large_log_variance", &s.fixed_large_log_variance}};
        for (const auto& [name, table] : named) {
            const auto want = tables[name].get<std::vector<double>>();
            ASSERT_EQ(table->size(), want.size()) << spec << " " << name;
            for (size_t i = 0; i < want.size(); ++i) {
                // float64 agrees to an ulp or two (libm vs numpy's log); what the samplers use,
                // the float32 cast, agrees exactly.
                EXPECT_NEAR((*table)[i], want[i], 4e-16 * std::abs(want[i])) << spec << " " << name << "[" << i << "]";
                EXPECT_EQ(float((*table)[i]), float(want[i])) << spec << " " << name << "[" << i << "]";
            }
        }
    }
}
