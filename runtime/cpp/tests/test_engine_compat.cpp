#include <gtest/gtest.h>

#include <set>

#include "engine_compat.hpp"
#include "manifest.hpp"
#include "test_util.hpp"

using testutil::json;

namespace {

json entry(const std::string& file, const std::string& version, const std::string& cc, const std::string& hw = "none",
           bool vc = false, const std::string& built = "2026-01-01T00:00:00") {
    return {{"network", "denoiser"}, {"file", file}, {"sha256", "00"}, {"tensorrt", {{"version", version}}},
            {"gpu", {{"name", "NVIDIA H100"}, {"compute_capability", cc}, {"sm", "sm90"}}},
            {"build", {{"opt_level", 3}, {"hardware_compat", hw}, {"version_compatible", vc}}},
            {"profile", {{"min", 1}, {"opt", 16}, {"max", 64}}}, {"built_utc", built}};
}

ditrt_core::EngineEntry parsed(const json& j) { return ditrt_core::parse_engine_entry(j.dump()); }

}  // namespace

TEST(EngineCompat, Rules) {
    using ditrt_core::check_engine_compat;
    EXPECT_TRUE(check_engine_compat(parsed(entry("a", "11.4.0.106", "9.0")), "11.4.0.106", "9.0", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "11.4.0.106", "9.0")), "11.4.1.2", "9.0", "").ok);
    EXPECT_TRUE(check_engine_compat(parsed(entry("a", "11.4.0.106", "9.0", "none", true)), "11.5", "9.0", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "11.4.0.106", "9.0", "none", true)), "11.3", "9.0", "").ok);
    EXPECT_TRUE(check_engine_compat(parsed(entry("a", "10.9", "9.0", "none", true)), "11.4", "9.0", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "9.0", "9.0", "none", true)), "11.4", "9.0", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "11.4", "9.0")), "11.4", "8.6", "").ok);
    EXPECT_TRUE(check_engine_compat(parsed(entry("a", "11.4", "9.0", "ampere+")), "11.4", "8.0", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "11.4", "9.0", "ampere+")), "11.4", "7.5", "").ok);
    EXPECT_FALSE(check_engine_compat(parsed(entry("a", "11.4", "9.0", "same-cc")), "11.4", "8.9", "").ok);
    EXPECT_TRUE(check_engine_compat(parsed(entry("a", "11.4", "sm90")), "11.4", "9.0", "").ok);
    json broken = entry("a", "11.4", "9.0");
    broken.erase("profile");
    const auto c = check_engine_compat(parsed(broken), "11.4", "9.0", "");
    EXPECT_FALSE(c.ok);
    EXPECT_NE(c.reason.find("profile"), std::string::npos) << c.reason;
}

TEST(EngineCompat, ChoosePrefersExactVersionThenNativeThenNewest) {
    std::vector<ditrt_core::EngineEntry> entries = {
        parsed(entry("vc.plan", "11.3", "9.0", "none", true, "2026-03")),
        parsed(entry("ampere.plan", "11.4", "8.0", "ampere+", false, "2026-04")),
        parsed(entry("old.plan", "11.4", "9.0", "none", false, "2026-01")),
        parsed(entry("new.plan", "11.4", "9.0", "none", false, "2026-02")),
        parsed(entry("missing.plan", "11.4", "9.0", "none", false, "2026-05"))};
    auto exists = [](const std::string& f) { return f != "missing.plan"; };
    auto c = ditrt_core::choose_engine(entries, "11.4", "9.0", "", exists, nullptr);
    ASSERT_NE(c.entry, nullptr);
    EXPECT_EQ(c.entry->file, "new.plan");
    EXPECT_EQ(c.reasons.size(), 1u);  // the missing one
    entries.erase(entries.begin() + 2, entries.begin() + 4);
    c = ditrt_core::choose_engine(entries, "11.4", "9.0", "", exists, nullptr);
    EXPECT_EQ(c.entry->file, "ampere.plan");  // exact version beats the version-compatible one
    const std::map<std::string, std::string> other_graph = {{"denoiser.fp16.onnx", "ff"}};
    c = ditrt_core::choose_engine(entries, "11.4", "9.0", "", exists, &other_graph);
    EXPECT_EQ(c.entry, nullptr);
    EXPECT_EQ(c.reasons.size(), 3u);
}

TEST(EngineCompat, ChoosesOnlyFp16Plans) {
    // An fp32 plan (`ditrt build --precision fp32`) is never taken for the fp16 one, whatever its date.
    json fp32 = entry("denoiser.fp32.plan", "11.4", "9.0", "none", false, "2026-09");
    fp32["precision"] = "fp32";
    json odd = entry("odd.plan", "11.4", "9.0", "none", false, "2026-08");
    odd["precision"] = 16;
    json fp16 = entry("denoiser.fp16.plan", "11.4", "9.0", "none", false, "2026-01");
    fp16["precision"] = "fp16";
    const json unnamed = entry("unnamed.plan", "11.4", "9.0", "none", false, "2026-02");  // no field: fp16
    auto exists = [](const std::string&) { return true; };
    const std::vector<ditrt_core::EngineEntry> three = {parsed(fp32), parsed(odd), parsed(fp16)}, two = {parsed(fp16), parsed(unnamed)},
                                               one = {parsed(fp32)};  // Choice points into its vector
    auto c = ditrt_core::choose_engine(three, "11.4", "9.0", "", exists, nullptr);
    ASSERT_NE(c.entry, nullptr);
    EXPECT_EQ(c.entry->file, "denoiser.fp16.plan");
    c = ditrt_core::choose_engine(two, "11.4", "9.0", "", exists, nullptr);
    EXPECT_EQ(c.entry->file, "unnamed.plan");  // the newer of the two fp16 plans
    c = ditrt_core::choose_engine(one, "11.4", "9.0", "", exists, nullptr);
    EXPECT_EQ(c.entry, nullptr);
}

TEST(EngineCompat, EqualsPythonVerdicts) {
    REQUIRE_PYTHON_VALUES();
    const auto& cases = testutil::python_values()["compat"];
    ASSERT_GE(cases.size(), 10u);
    for (const auto& c : cases) {
        const auto got = ditrt_core::check_engine_compat(parsed(c["entry"]), c["trt_version"], c["compute_capability"], "");
        EXPECT_EQ(got.ok, c["ok"].get<bool>()) << c.dump() << "\nC++: " << got.reason;
    }
    for (const auto& c : testutil::python_values()["choose"]) {
        std::vector<ditrt_core::EngineEntry> entries;
        for (const auto& e : c["entries"]) entries.push_back(parsed(e));
        const auto existing = c["existing"].get<std::set<std::string>>();
        const auto got = ditrt_core::choose_engine(entries, c["trt_version"], c["compute_capability"], "",
                                              [&](const std::string& f) { return existing.count(f) > 0; }, nullptr);
        EXPECT_EQ(got.entry ? json(got.entry->file) : json(), c["chosen"]) << c.dump();
    }
}
