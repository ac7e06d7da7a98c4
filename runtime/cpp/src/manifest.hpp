// The artifact manifest (engines/README.md, schema ditrt.manifest version 2): read, checked by the
// reader rules, and typed. Only the fields the C++ runtime uses are kept.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ditrt_core {

struct GraphEntry {
    std::string file;                           // the graph, relative to the artifact directory
    std::map<std::string, std::string> sha256;  // every file of the graph (graph + external data)
};

struct EngineEntry {
    // The fields runtime/trt_plan.py's read_entry reads. An entry with a missing or bad field is
    // kept with `problem` set: like Python, it is then never compatible (and says why).
    std::string problem;
    std::string network, file, sha256, trt_version, gpu_name, compute_capability, hardware_compat, built_utc;
    bool version_compatible = false;
    int64_t opt_level = 3, min_rows = 1, opt_rows = 1, max_rows = 1;
    std::map<std::string, std::string> graph_sha256;  // of the fp16 graph the plan was built from
    bool has_graph_sha256 = false;
};

struct Network {
    std::map<std::string, GraphEntry> graphs;  // "fp32" / "fp16"
};

struct Manifest {
    std::string directory;
    // model
    int64_t input_size = 0, in_channels = 0, out_channels = 0, num_classes = 0;
    // diffusion
    int64_t num_train_timesteps = 0, null_class = 0;
    double beta_start = 0, beta_end = 0;
    std::string beta_schedule, prediction, variance;
    std::map<std::string, int64_t> guided_channels;
    // defaults
    std::string default_sampler, default_steps, default_guidance;
    double default_cfg_scale = 0;

    std::map<std::string, Network> networks;
    std::vector<EngineEntry> engines;

    bool learned_variance() const { return variance == "learned_range"; }
    std::vector<double> base_betas() const;        // linspace(beta_start, beta_end, num_train_timesteps)
    std::string path(const std::string& relative) const;  // directory / relative
    const GraphEntry& graph(const std::string& network, const std::string& precision) const;
};

// Reads <directory>/manifest.json; throws Error(Status::Artifact) naming the field at fault.
Manifest load_manifest(const std::string& directory);
Manifest parse_manifest(const std::string& json_text, const std::string& directory);

// One `engines[]` entry from its JSON text (for tests of the compatibility rules).
EngineEntry parse_engine_entry(const std::string& json_text);

// Throws Error(Status::Artifact) unless <directory>/<relative> exists and has this sha256.
void verify_file(const Manifest& manifest, const std::string& relative, const std::string& sha256);
// Every file of a graph.
void verify_graph(const Manifest& manifest, const GraphEntry& graph);

}  // namespace ditrt_core
