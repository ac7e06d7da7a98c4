// The artifact manifest (engines/README.md, schema ditrt.manifest version 3; versions 1 and 2 are
// upgraded in memory as runtime/artifact/manifest.py does): read, checked with every rule of the Python
// reader (runtime/artifact/manifest.py, config.py, networks.py, conditioning.py, files.py) and typed. The
// field rules are runtime/spec/manifest_schema.json's, compiled in (schema.hpp); the reader's parts are
// listed in manifest_readers.hpp.
//
// One contract, two readers: a manifest the Python runtime loads, this reader loads, and one it
// refuses, this reader refuses with a message naming the field (tests/test_cpp_runtime.py feeds
// thousands of mutated manifests of both families to both). Both families are read: DiT (the
// `diffusion` section) and SiT (the `transport` section: the Linear path, velocity prediction).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "labels.hpp"

namespace ditrt_core {

enum class DType { Float32 = 1, Float16 = 2, Int64 = 3, Int32 = 4 };  // the values of ditrt_dtype
const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct Condition {  // networks.<name>.inputs[i].condition, role "condition"
    std::string kind;  // "class": the only kind (runtime/spec/conditioning.py CONDITIONINGS)
    int64_t num_classes = 0, null = 0;
};

struct TensorSpec {
    std::string name, role;  // inputs: latent, time, condition; outputs: prediction, image
    DType dtype = DType::Float32;
    std::vector<int64_t> shape;  // shape[0] is the batch axis (-1); the others 1..65536
    bool has_condition = false;
    Condition condition;
    int64_t per_row() const;  // product of shape[1:] (at most 2^48: no overflow)
};

struct GraphEntry {
    std::string file;                           // the graph, relative to the artifact directory
    std::map<std::string, std::string> sha256;  // every file of the graph (graph + external data)
};

struct NetworkSpec {
    std::string name;  // "denoiser", "decoder", ...
    std::vector<TensorSpec> inputs, outputs;
    std::string batch_unit;     // "rows" (denoiser: 2 per image under guidance) or "images"
    double scaling_factor = 0;  // the decoder's (its graph divides by it)
    std::vector<std::pair<std::string, GraphEntry>> graphs;  // precision (fp32, fp16, int8, fp8) -> graph, manifest order

    const TensorSpec* input_with_role(const std::string& role) const;  // the one input with this role, or null
    const GraphEntry* graph(const std::string& precision) const;
};

struct EngineEntry {
    // The fields runtime/execution/trt/compat.py reads. An entry with a missing or bad field is kept with
    // `problem` set: like Python, it is then never compatible (and says why); the reader never
    // refuses a manifest for an engine entry.
    std::string problem;
    std::string network, file, sha256, trt_version, gpu_name, compute_capability, hardware_compat, built_utc;
    std::string precision = "fp16";  // "precision" (absent: fp16, as Python); a non-string matches none
    bool version_compatible = false;
    int64_t opt_level = 3, min_rows = 1, opt_rows = 1, max_rows = 1;
    std::map<std::string, std::string> graph_sha256;  // of the fp16 graph the plan was built from
    bool has_graph_sha256 = false;
};

struct Manifest {
    std::string directory;
    int64_t schema_version_read = 3;  // 1 and 2 were upgraded in memory
    std::string family = "dit";       // model.family: "dit" (diffusion) or "sit" (transport)
    // model
    int64_t input_size = 0, patch_size = 0, in_channels = 0, out_channels = 0, hidden_size = 0, depth = 0,
            num_heads = 0, num_classes = 0;
    double mlp_ratio = 0;
    bool learn_sigma = false;
    // diffusion (family dit; a SiT manifest's transport is the one implemented: nothing to keep)
    int64_t num_train_timesteps = 0;
    double beta_start = 0, beta_end = 0;
    std::string variance;  // "learned_range" or "fixed_large"
    // guidance: name -> leading channels guided, manifest order
    std::vector<std::pair<std::string, int64_t>> guided_channels;
    // defaults (the family's where the manifest names none)
    std::string default_sampler = "ddpm", default_steps = "250", default_guidance = "official";
    bool default_steps_is_int = true;
    double default_cfg_scale = 4.0;
    bool has_default_eta = false;
    double default_eta = 0.0;

    // id2label (optional): the class names; label_of resolves a name as runtime/artifact/labels.py does
    bool has_labels = false;
    ClassNames labels;

    std::vector<NetworkSpec> networks;  // manifest order; the denoiser is always there
    std::vector<EngineEntry> engines;

    bool is_sit() const { return family == "sit"; }
    bool learned_variance() const { return variance == "learned_range"; }
    int64_t null_class() const { return num_classes; }
    const NetworkSpec& denoiser() const { return *network("denoiser"); }
    const NetworkSpec* network(const std::string& name) const;  // null when the artifact has none
    const int64_t* guided(const std::string& name) const;       // null when unknown
    std::vector<double> base_betas() const;  // linspace(beta_start, beta_end, num_train_timesteps)
    // directory / relative, after the reader rule: relative, inside the artifact, not through ".."
    // or a symbolic link leading out (Error(Artifact) naming `field` otherwise).
    std::string file_path(const std::string& relative, const std::string& field) const;
    // A graph of a network (Error(InvalidArgument) for an unknown network, Artifact for a missing precision).
    const GraphEntry& graph(const std::string& network, const std::string& precision) const;
};

// The largest manifest.json read (a manifest is a few KB; runtime/artifact/manifest.py MAX_MANIFEST_BYTES).
inline constexpr int64_t kMaxManifestBytes = int64_t(16) << 20;

// Reads <directory>/manifest.json: a regular file (a FIFO, a device or a link to one is refused
// before it is opened), at most kMaxManifestBytes, UTF-8 JSON; throws Error(Status::Artifact)
// with a message naming the field at fault.
Manifest load_manifest(const std::string& directory);
// The same rules over the text of a manifest (`directory` resolves its file names).
Manifest parse_manifest(const std::string& json_text, const std::string& directory);

// One `engines[]` entry from its JSON text (for tests of the compatibility rules).
EngineEntry parse_engine_entry(const std::string& json_text);

// Throws Error(Status::Artifact) unless <directory>/<relative> exists and has this sha256.
void verify_file(const Manifest& manifest, const std::string& relative, const std::string& sha256);
// Every file of a graph.
void verify_graph(const Manifest& manifest, const GraphEntry& graph);

}  // namespace ditrt_core
