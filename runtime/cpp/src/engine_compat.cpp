#include "engine_compat.hpp"

#include <algorithm>
#include <regex>
#include <set>

#include "error.hpp"

namespace ditrt_core {
namespace {

// Version-compatible plans across majors: only these (builder, runtime) pairs (TensorRT 11.4.1
// support matrix, "Engine Portability"), as CROSS_MAJOR_VERSION_COMPAT in trt_plan.py.
const std::set<std::pair<int, int>> kCrossMajor = {{8, 10}, {10, 11}};

std::string cc_text(const std::array<int, 2>& cc) { return std::to_string(cc[0]) + "." + std::to_string(cc[1]); }

std::vector<std::string> version_problems(const EngineEntry& e, const std::array<int, 4>& built,
                                          const std::array<int, 4>& here, const std::string& here_text) {
    const std::string what = "built with TensorRT " + e.trt_version + ", this is TensorRT " + here_text;
    if (built == here) return {};
    if (!e.version_compatible)
        return {what + ": a plan runs only on the TensorRT version that built it (unless built with --version-compatible)"};
    if (here < built) return {what + ": a version-compatible plan runs only on the same or a newer TensorRT"};
    if (here[0] != built[0] && !kCrossMajor.count({built[0], here[0]}))
        return {what + ": version-compatible plans do not cross from TensorRT " + std::to_string(built[0]) + " to " +
                std::to_string(here[0]) + " (supported across majors: 10 -> 11, 8 -> 10)"};
    return {};
}

std::vector<std::string> hardware_problems(const EngineEntry& e, const std::array<int, 2>& built,
                                           const std::array<int, 2>& here, const std::string& gpu_name) {
    if (e.hardware_compat == "ampere+") {
        if (here >= std::array<int, 2>{8, 0}) return {};
        return {"built for Ampere and newer GPUs (compute capability >= 8.0), this GPU has compute capability " + cc_text(here)};
    }
    if (built != here)
        return {"built on a GPU of compute capability " + cc_text(built) + " (" + e.gpu_name + "), this GPU (" +
                (gpu_name.empty() ? "unknown" : gpu_name) + ") has " + cc_text(here) + ": the plan runs only on " +
                (e.hardware_compat == "same-cc" ? "its compute capability" : "the GPU type that built it (unless built with --hardware-compat)")};
    return {};  // same compute capability, another GPU model: TensorRT runs it with a warning
}

}  // namespace

std::array<int, 4> parse_trt_version(const std::string& version) {
    static const std::regex pattern(R"(^\s*\d+(\.\d+){1,3}\s*$)");
    if (!std::regex_match(version, pattern))
        throw Error(Status::InvalidArgument, "not a TensorRT version: '" + version + "' (expected e.g. '11.4.0.106')");
    std::array<int, 4> parts{0, 0, 0, 0};
    size_t k = 0, pos = 0;
    while (k < 4 && pos < version.size()) {
        size_t used = 0;
        parts[k++] = std::stoi(version.substr(pos), &used);
        pos += used + 1;
    }
    return parts;
}

std::array<int, 2> parse_compute_capability(const std::string& cc) {
    std::smatch m;
    static const std::regex dotted(R"(^\s*(\d+)\.(\d+)\s*$)"), sm(R"(^\s*sm(\d+)(\d)\s*$)");
    if (std::regex_match(cc, m, dotted) || std::regex_match(cc, m, sm)) return {std::stoi(m[1]), std::stoi(m[2])};
    throw Error(Status::InvalidArgument, "not a compute capability: '" + cc + "' (expected e.g. '9.0' or 'sm90')");
}

Compat check_engine_compat(const EngineEntry& e, const std::string& trt_version, const std::string& compute_capability,
                           const std::string& gpu_name) {
    if (!e.problem.empty()) return {false, e.problem};
    std::array<int, 4> built_v{}, here_v{};
    std::array<int, 2> built_cc{}, here_cc{};
    try {
        built_v = parse_trt_version(e.trt_version);
        built_cc = parse_compute_capability(e.compute_capability);
        here_v = parse_trt_version(trt_version);
        here_cc = parse_compute_capability(compute_capability);
        if (e.hardware_compat != "none" && e.hardware_compat != "ampere+" && e.hardware_compat != "same-cc")
            throw Error(Status::InvalidArgument, "build.hardware_compat must be none, ampere+ or same-cc, got " + e.hardware_compat);
    } catch (const Error& err) {
        return {false, e.file + ": " + err.what()};
    }
    std::vector<std::string> problems = version_problems(e, built_v, here_v, trt_version);
    for (auto& p : hardware_problems(e, built_cc, here_cc, gpu_name)) problems.push_back(p);
    if (!problems.empty()) {
        std::string reason = e.file + ": ";
        for (size_t i = 0; i < problems.size(); ++i) reason += (i ? "; " : "") + problems[i];
        return {false, reason + ". Rebuild it on this machine with `ditrt build`"};
    }
    return {true, e.file + (built_v == here_v ? ": built for this TensorRT version" : ": version-compatible plan")};
}

Choice choose_engine(const std::vector<EngineEntry>& entries, const std::string& trt_version,
                     const std::string& compute_capability, const std::string& gpu_name,
                     const std::function<bool(const std::string&)>& exists,
                     const std::map<std::string, std::string>* graph_sha256, const std::string& network) {
    Choice choice;
    std::vector<const EngineEntry*> candidates;
    for (const auto& e : entries) {
        if (e.network != network && e.problem.empty()) continue;  // plans of other networks are not asked for
        if (e.precision != "fp16" && e.problem.empty()) continue;  // this runtime runs fp16 plans (compat.choose_for)
        Compat c = check_engine_compat(e, trt_version, compute_capability, gpu_name);
        if (c.ok && !exists(e.file)) c = {false, e.file + ": listed in the manifest but the file is missing; rebuild it"};
        else if (c.ok && graph_sha256 && (!e.has_graph_sha256 || e.graph_sha256 != *graph_sha256))
            c = {false, e.file + ": built from another fp16 graph than the artifact's; rebuild it"};
        if (c.ok) candidates.push_back(&e);
        else choice.reasons.push_back(c.reason);
    }
    if (candidates.empty()) return choice;
    const auto here = parse_trt_version(trt_version);
    auto rank = [](const std::string& level) { return level == "none" ? 0 : level == "same-cc" ? 1 : 2; };
    // Newest first, then a stable sort by (not this exact version, portability rank): the first
    // minimum of Python's min() over the newest-first list.
    std::stable_sort(candidates.begin(), candidates.end(),
                     [](const EngineEntry* a, const EngineEntry* b) { return a->built_utc > b->built_utc; });
    std::stable_sort(candidates.begin(), candidates.end(), [&](const EngineEntry* a, const EngineEntry* b) {
        auto key = [&](const EngineEntry* e) { return std::make_pair(parse_trt_version(e->trt_version) != here, rank(e->hardware_compat)); };
        return key(a) < key(b);
    });
    choice.entry = candidates.front();
    return choice;
}

}  // namespace ditrt_core
