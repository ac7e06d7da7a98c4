#include "manifest.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.hpp"
#include "schedule.hpp"
#include "sha256.hpp"

namespace ditrt_core {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

[[noreturn]] void fail(const std::string& message) { throw Error(Status::Artifact, message); }

std::string type_name(const json& j) {
    if (j.is_number_integer()) return "integer";
    return j.type_name();
}

// A field by dotted path ("model.in_channels"), with errors that name it.
const json& field(const json& root, const std::string& dotted) {
    const json* j = &root;
    size_t start = 0;
    while (true) {
        const size_t dot = dotted.find('.', start);
        const std::string key = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        if (!j->is_object()) fail(dotted.substr(0, start ? start - 1 : 0) + " must be an object");
        auto it = j->find(key);
        if (it == j->end()) fail("missing field " + dotted);
        j = &*it;
        if (dot == std::string::npos) return *j;
        start = dot + 1;
    }
}

int64_t integer(const json& root, const std::string& dotted, int64_t min_value = 1) {
    const json& j = field(root, dotted);
    if (!j.is_number_integer()) fail(dotted + " must be an integer, got " + type_name(j) + " " + j.dump());
    const int64_t v = j.get<int64_t>();
    if (v < min_value) fail(dotted + " must be >= " + std::to_string(min_value) + ", got " + std::to_string(v));
    return v;
}

double number(const json& root, const std::string& dotted) {
    const json& j = field(root, dotted);
    if (!j.is_number() || !std::isfinite(j.get<double>())) fail(dotted + " must be a finite number, got " + j.dump());
    return j.get<double>();
}

std::string string(const json& root, const std::string& dotted) {
    const json& j = field(root, dotted);
    if (!j.is_string()) fail(dotted + " must be a string, got " + type_name(j) + " " + j.dump());
    return j.get<std::string>();
}

bool boolean(const json& root, const std::string& dotted) {
    const json& j = field(root, dotted);
    if (!j.is_boolean()) fail(dotted + " must be true or false, got " + j.dump());
    return j.get<bool>();
}

void refuse_unless(const std::string& dotted, const std::string& value, std::initializer_list<const char*> allowed) {
    std::string list;
    for (const char* a : allowed) {
        if (value == a) return;
        list += std::string(list.empty() ? "" : " or ") + "\"" + a + "\"";
    }
    fail(dotted + " is \"" + value + "\": this runtime supports only " + list + " (refused, not replaced)");
}

// Reader rule: a relative path inside the artifact directory, not escaping it through "..",
// an absolute path or a symbolic link.
void check_confined(const std::string& directory, const std::string& where, const std::string& relative) {
    const fs::path p(relative);
    if (relative.empty() || p.is_absolute() || p.has_root_name() || p.has_root_directory())
        fail(where + " \"" + relative + "\" must be a relative path inside the artifact directory");
    for (const auto& part : p)
        if (part == "..") fail(where + " \"" + relative + "\" must not contain '..'");
    std::error_code ec;
    const fs::path full = fs::path(directory) / p;
    if (!fs::exists(fs::symlink_status(full, ec))) return;  // missing files are reported when used
    const fs::path root = fs::weakly_canonical(directory, ec);
    const fs::path real = fs::weakly_canonical(full, ec);
    if (ec) fail(where + " \"" + relative + "\": cannot resolve it (" + ec.message() + ")");
    const auto mismatch = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
    if (mismatch.first != root.end())
        fail(where + " \"" + relative + "\" leads out of the artifact directory (to " + real.string() + ")");
}

GraphEntry read_graph(const json& root, const std::string& at, const std::string& directory) {
    GraphEntry g;
    g.file = string(root, at + ".file");
    check_confined(directory, at + ".file", g.file);
    const json& files = field(root, at + ".files");
    if (!files.is_array()) fail(at + ".files must be a list of file names");
    const json& hashes = field(root, at + ".sha256");
    if (!hashes.is_object()) fail(at + ".sha256 must be an object file -> sha256");
    for (const auto& f : files) {
        if (!f.is_string()) fail(at + ".files entries must be strings, got " + f.dump());
        const std::string name = f.get<std::string>();
        check_confined(directory, at + ".files", name);
        auto h = hashes.find(name);
        if (h == hashes.end() || !h->is_string()) fail(at + ".sha256 lacks the digest of " + name);
        g.sha256[name] = h->get<std::string>();
    }
    if (!g.sha256.count(g.file)) fail(at + ".files must list the graph file " + g.file);
    return g;
}

// As runtime/trt_plan.py read_entry: a bad entry is kept with the reason, never fatal.
EngineEntry read_engine(const json& e, size_t index, const std::string& directory) {
    EngineEntry out;
    const std::string at = "engines[" + std::to_string(index) + "]";
    if (!e.is_object() || !e.contains("file") || !e["file"].is_string()) fail(at + ".file must be a string");
    out.file = e["file"].get<std::string>();
    check_confined(directory, at + ".file", out.file);  // a reader rule: fatal
    try {
        // Defaults as runtime/trt_plan.py read_entry; a missing sha256 fails verification at load.
        out.network = e.contains("network") ? string(e, "network") : "denoiser";
        if (e.contains("sha256")) out.sha256 = string(e, "sha256");
        out.trt_version = string(e, "tensorrt.version");
        const json& cc = field(e, "gpu.compute_capability");
        out.compute_capability = cc.is_string() ? cc.get<std::string>() : cc.dump();
        const json& name = field(e, "gpu").value("name", json());
        out.gpu_name = name.is_string() ? name.get<std::string>() : "";
        out.hardware_compat = string(e, "build.hardware_compat");
        const json& vc = field(e, "build.version_compatible");
        out.version_compatible = vc.is_boolean() ? vc.get<bool>() : (vc.is_number() && vc.get<double>() != 0);
        out.opt_level = integer(e, "build.opt_level", 0);
        out.min_rows = integer(e, "profile.min");
        out.opt_rows = integer(e, "profile.opt");
        out.max_rows = integer(e, "profile.max");
        if (e.contains("built_utc") && e["built_utc"].is_string()) out.built_utc = e["built_utc"].get<std::string>();
        if (e.contains("graph") && e["graph"].is_object() && e["graph"].contains("sha256") &&
            e["graph"]["sha256"].is_object()) {
            out.has_graph_sha256 = true;
            for (const auto& [k, v] : e["graph"]["sha256"].items())
                if (v.is_string()) out.graph_sha256[k] = v.get<std::string>();
        }
    } catch (const Error& err) {
        out.problem = "engines entry " + out.file + " lacks a field or has a bad one: " + err.what();
    }
    return out;
}

void read_model_and_diffusion(const json& root, Manifest& m) {
    m.input_size = integer(root, "model.input_size");
    m.in_channels = integer(root, "model.in_channels");
    m.out_channels = integer(root, "model.out_channels");
    m.num_classes = integer(root, "model.num_classes");
    m.num_train_timesteps = integer(root, "diffusion.num_train_timesteps", 2);
    m.beta_schedule = string(root, "diffusion.beta_schedule");
    refuse_unless("diffusion.beta_schedule", m.beta_schedule, {"linear"});
    m.beta_start = number(root, "diffusion.beta_start");
    m.beta_end = number(root, "diffusion.beta_end");
    if (!(0 < m.beta_start && m.beta_start <= m.beta_end && m.beta_end < 1))
        fail("diffusion.beta_start / beta_end must satisfy 0 < beta_start <= beta_end < 1");
    m.prediction = string(root, "diffusion.prediction");
    refuse_unless("diffusion.prediction", m.prediction, {"epsilon"});
    m.variance = string(root, "diffusion.variance");
    refuse_unless("diffusion.variance", m.variance, {"learned_range", "fixed_large"});
    if (boolean(root, "diffusion.clip_denoised"))
        fail("diffusion.clip_denoised is true: this runtime cannot clip x0 (refused, not ignored)");
    m.null_class = integer(root, "diffusion.null_class", 0);
    if (m.null_class != m.num_classes)
        fail("diffusion.null_class (" + std::to_string(m.null_class) + ") must equal model.num_classes (" +
             std::to_string(m.num_classes) + ")");
    const json& gc = field(root, "diffusion.guided_channels");
    if (!gc.is_object() || gc.empty()) fail("diffusion.guided_channels must be an object name -> channels");
    for (const auto& [name, value] : gc.items()) {
        const int64_t c = integer(root, "diffusion.guided_channels." + name);
        if (c > m.in_channels)
            fail("diffusion.guided_channels." + name + " = " + std::to_string(c) + " must be in 1..model.in_channels (" +
                 std::to_string(m.in_channels) + ")");
        m.guided_channels[name] = c;
    }
    if (m.learned_variance() && m.out_channels != 2 * m.in_channels)
        fail("diffusion.variance \"learned_range\" needs model.out_channels == 2 * model.in_channels, got " +
             std::to_string(m.out_channels) + " and " + std::to_string(m.in_channels));
    if (m.out_channels < m.in_channels)
        fail("model.out_channels (" + std::to_string(m.out_channels) + ") must be at least model.in_channels");
}

void read_defaults(const json& root, Manifest& m) {
    m.default_sampler = string(root, "defaults.sampler");
    refuse_unless("defaults.sampler", m.default_sampler, {"ddpm", "ddim"});
    const json& steps = field(root, "defaults.steps");
    if (steps.is_number_integer()) m.default_steps = std::to_string(steps.get<int64_t>());
    else if (steps.is_string()) m.default_steps = steps.get<std::string>();
    else fail("defaults.steps must be an integer or a step spec string, got " + steps.dump());
    m.default_cfg_scale = number(root, "defaults.cfg_scale");
    m.default_guidance = string(root, "defaults.guidance");
    if (!m.guided_channels.count(m.default_guidance))
        fail("defaults.guidance \"" + m.default_guidance + "\" is not a key of diffusion.guided_channels");
    space_timesteps(m.num_train_timesteps, m.default_steps);  // throws Schedule for an impossible default
}

void read_networks(const json& root, Manifest& m) {
    const json& networks = field(root, "networks");
    if (!networks.is_object()) fail("networks must be an object");
    for (const auto& [name, net] : networks.items()) {
        const std::string at = "networks." + name + ".graphs";
        const json& graphs = field(root, at);
        if (!graphs.is_object()) fail(at + " must be an object");
        for (const auto& [precision, _] : graphs.items())
            m.networks[name].graphs[precision] = read_graph(root, at + "." + precision, m.directory);
    }
    if (!m.networks.count("denoiser")) fail("missing field networks.denoiser");
    if (m.networks["denoiser"].graphs.empty()) fail("networks.denoiser.graphs lists no graph");
    const json& engines = root.contains("engines") ? root["engines"] : json::array();
    if (!engines.is_array()) fail("engines must be a list");
    for (size_t i = 0; i < engines.size(); ++i) m.engines.push_back(read_engine(engines[i], i, m.directory));
}

}  // namespace

Manifest parse_manifest(const std::string& text, const std::string& directory) {
    json root;
    try {
        root = json::parse(text);
    } catch (const json::exception& e) {
        fail(std::string("not valid JSON (") + e.what() + ")");
    }
    if (!root.is_object() || !root.contains("schema") || root["schema"] != "ditrt.manifest")
        fail("not a ditrt manifest: schema must be \"ditrt.manifest\", got " +
             (root.is_object() && root.contains("schema") ? root["schema"].dump() : std::string("nothing")));
    const json& version = field(root, "schema_version");
    if (!version.is_number_integer() || version.get<int64_t>() != 2)
        fail("schema_version is " + version.dump() + "; this reader takes the integer 2: re-export the artifact " +
             "with `ditrt export <source> --out <artifact> --force`");
    Manifest m;
    m.directory = directory;
    try {
        read_model_and_diffusion(root, m);
        read_defaults(root, m);
        read_networks(root, m);
    } catch (const json::exception& e) {  // a type nlohmann refused that no check above caught
        fail(std::string("bad field: ") + e.what());
    }
    return m;
}

Manifest load_manifest(const std::string& directory) {
    std::error_code ec;
    if (directory.empty() || !fs::is_directory(directory, ec))
        throw Error(Status::Artifact, "artifact directory not found: " + directory);
    const std::string path = (fs::path(directory) / "manifest.json").string();
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(Status::Artifact, directory + " is not a ditrt artifact: no manifest.json (create one with `ditrt export`)");
    std::stringstream text;
    text << f.rdbuf();
    try {
        return parse_manifest(text.str(), directory);
    } catch (const Error& e) {
        throw Error(e.status(), path + ": " + e.what());
    }
}

EngineEntry parse_engine_entry(const std::string& json_text) {
    return read_engine(json::parse(json_text), 0, ".");
}

std::vector<double> Manifest::base_betas() const { return linspace(beta_start, beta_end, num_train_timesteps); }

std::string Manifest::path(const std::string& relative) const { return (fs::path(directory) / relative).string(); }

const GraphEntry& Manifest::graph(const std::string& network, const std::string& precision) const {
    auto n = networks.find(network);
    if (n == networks.end()) throw Error(Status::InvalidArgument, "the artifact has no network \"" + network + "\"");
    auto g = n->second.graphs.find(precision);
    if (g == n->second.graphs.end())
        throw Error(Status::Artifact, "network " + network + " has no " + precision + " graph; re-export with --precision " + precision);
    return g->second;
}

void verify_file(const Manifest& manifest, const std::string& relative, const std::string& sha256) {
    const std::string full = manifest.path(relative);
    std::error_code ec;
    if (!fs::is_regular_file(full, ec))
        throw Error(Status::Artifact, full + " is listed in the manifest but missing");
    if (sha256_file(full) != sha256)
        throw Error(Status::Artifact, full + " does not match its sha256 in the manifest (corrupt or replaced); re-export");
}

void verify_graph(const Manifest& manifest, const GraphEntry& graph) {
    for (const auto& [name, digest] : graph.sha256) verify_file(manifest, name, digest);
}

}  // namespace ditrt_core
