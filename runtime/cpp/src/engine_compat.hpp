// Which TensorRT plan of the manifest can run here: the rules of runtime/trt_plan.py
// (check_engine_compat, choose_engine), pure logic, tested without TensorRT.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace ditrt_core {

struct Compat {
    bool ok;
    std::string reason;
};

// "11.4.0.106" -> {11, 4, 0, 106} (missing trailing parts 0); throws Error(InvalidArgument) otherwise.
std::array<int, 4> parse_trt_version(const std::string& version);
// "9.0", "sm90" -> {9, 0}; throws Error(InvalidArgument) otherwise.
std::array<int, 2> parse_compute_capability(const std::string& cc);

// gpu_name empty: skip the GPU-model note.
Compat check_engine_compat(const EngineEntry& entry, const std::string& trt_version, const std::string& compute_capability,
                           const std::string& gpu_name);

struct Choice {
    const EngineEntry* entry = nullptr;  // null: none runs here
    std::vector<std::string> reasons;    // one line per rejected entry
};

// The best entry of `network` whose plan exists (and, when graph_sha256 is given, that was built
// from that fp16 graph): this exact TensorRT first, then native over same-cc over ampere+, then newest.
Choice choose_engine(const std::vector<EngineEntry>& entries, const std::string& trt_version,
                     const std::string& compute_capability, const std::string& gpu_name,
                     const std::function<bool(const std::string&)>& exists,
                     const std::map<std::string, std::string>* graph_sha256, const std::string& network = "denoiser");

}  // namespace ditrt_core
