#include "manifest.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "error.hpp"
#include "manifest_readers.hpp"
#include "schedule.hpp"
#include "sha256.hpp"

namespace ditrt_core {
namespace reader {

[[noreturn]] void fail(const std::string& message) { throw Error(Status::Artifact, message); }

namespace {
const Json kNone;  // Python's None: what dict.get returns for a missing key
}  // namespace

// d.get(key) of a dict (None when missing).
const Json& get(const Json& d, const std::string& key) {
    auto it = d.find(key);
    return it == d.end() ? kNone : *it;
}

std::string quoted(const std::string& s) { return pyjson::repr(Json(s)); }

}  // namespace reader

namespace {

using namespace reader;
namespace fs = std::filesystem;

// ---- schema upgrades (runtime/artifact/manifest.py upgrade_schema_1 / upgrade_schema_2, on JSON) ----------

// What Python's KeyError / TypeError / AttributeError would be: the upgrade cannot run.
struct UpgradeFailure {
    std::string what;
};

const Json& key(const Json& d, const std::string& k) {  // d[k]
    if (!d.is_object()) throw UpgradeFailure{"TypeError: " + std::string(d.type_name()) + " is not subscriptable by " + quoted(k)};
    auto it = d.find(k);
    if (it == d.end()) throw UpgradeFailure{"KeyError: " + quoted(k)};
    return *it;
}

const Json& get_of(const Json& d, const std::string& k) {  // d.get(k) on something that must be a dict
    if (!d.is_object()) throw UpgradeFailure{"AttributeError: " + std::string(d.type_name()) + " has no attribute 'get'"};
    return get(d, k);
}

// The items of `for x in value` where each x must be a dict ({**x} / x.get): a list's items; an
// empty dict or str iterates nothing; anything else cannot be.
std::vector<Json> dict_items(const Json& value, bool keep_only_dicts) {
    std::vector<Json> out;
    if (value.is_array()) {
        for (const auto& x : value) {
            if (x.is_object()) out.push_back(x);
            else if (!keep_only_dicts) throw UpgradeFailure{"TypeError: " + std::string(x.type_name()) + " is not a mapping"};
        }
        return out;
    }
    if (value.is_object() || pyjson::is_str(value)) {
        // Iterating a dict gives its keys, a str its characters: strings, never mappings.
        if (!keep_only_dicts && !value.empty() && !(value.is_string() && value.get_ref<const std::string&>().empty()))
            throw UpgradeFailure{"TypeError: str is not a mapping"};
        return out;
    }
    throw UpgradeFailure{"TypeError: " + std::string(value.type_name()) + " is not iterable"};
}

Json upgrade_schema_1(const Json& data) {
    const Json& d = key(data, "diffusion");
    const Json& interface = key(data, "interface");
    Json denoiser = Json::object();
    denoiser["inputs"] = key(interface, "inputs");
    denoiser["outputs"] = key(interface, "outputs");
    denoiser["batch_axis"] = 0;
    denoiser["batch_unit"] = "rows";
    const Json& rows = get_of(interface, "guidance_rows");
    denoiser["guidance_rows"] = interface.contains("guidance_rows") ? rows : Json("");
    denoiser["graphs"] = key(data, "graphs");
    Json diffusion = Json::object();
    for (const char* k : {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance", "null_class",
                          "guided_channels"})
        diffusion[k] = key(d, k);
    auto get_or = [&](const char* k, Json fallback) { return d.contains(k) ? d[k] : fallback; };
    Json defaults = Json::object();
    defaults["sampler"] = get_or("default_sampler", "ddpm");
    defaults["steps"] = get_or("default_steps", 250);
    defaults["cfg_scale"] = get_or("default_cfg_scale", 4.0);
    defaults["guidance"] = get_or("default_guidance", "official");
    Json upgraded = Json::object();
    for (auto it = data.begin(); it != data.end(); ++it)
        if (it.key() != "graphs" && it.key() != "interface" && it.key() != "diffusion") upgraded[it.key()] = *it;
    upgraded["schema_version"] = 2;
    upgraded["upgraded_from_schema"] = 1;
    diffusion["prediction"] = "epsilon";
    diffusion["clip_denoised"] = get_or("clip_denoised", false);
    upgraded["diffusion"] = diffusion;
    upgraded["defaults"] = defaults;
    upgraded["networks"] = Json::object({{"denoiser", denoiser}});
    Json engines = Json::array();
    for (Json e : dict_items(data.contains("engines") ? data["engines"] : Json::array(), true)) {
        e["network"] = "denoiser";
        engines.push_back(e);
    }
    upgraded["engines"] = engines;
    return upgraded;
}

// Schema 2 tensors had no role: runtime/artifact/manifest.py _SCHEMA_2_ROLES.
const std::map<std::string, std::string> kSchema2Roles = {{"latent", "latent"}, {"timestep", "time"},
                                                          {"class_label", "condition"}, {"model_output", "prediction"},
                                                          {"image", "image"}};

Json upgrade_schema_2(const Json& data) {
    Json d = key(data, "diffusion");
    if (!d.is_object()) throw UpgradeFailure{"TypeError: diffusion is not a dict"};
    const Json& model = key(data, "model");
    const Json null = key(d, "null_class");
    const Json guided = key(d, "guided_channels");
    d.erase("null_class");
    d.erase("guided_channels");
    const Json& networks_in = key(data, "networks");
    if (!networks_in.is_object()) throw UpgradeFailure{"AttributeError: networks has no attribute 'items'"};
    Json networks = Json::object();
    for (auto it = networks_in.begin(); it != networks_in.end(); ++it) {
        if (!it->is_object()) throw UpgradeFailure{"TypeError: networks." + it.key() + " is not a dict"};
        Json section = *it;
        for (const char* kind : {"inputs", "outputs"}) {
            Json tensors = Json::array();
            for (Json t : dict_items(key(section, kind), false)) {
                const Json& name = key(t, "name");
                if (name.is_array() || name.is_object()) throw UpgradeFailure{"TypeError: unhashable type"};
                Json role = get(t, "role");
                if (pyjson::is_str(name) && kSchema2Roles.count(name.get<std::string>())) role = kSchema2Roles.at(name.get<std::string>());
                t["role"] = role;
                if (pyjson::is_str(role) && role.get<std::string>() == "condition")
                    t["condition"] = Json::object({{"kind", "class"}, {"num_classes", key(model, "num_classes")}, {"null", null}});
                tensors.push_back(t);
            }
            section[kind] = tensors;
        }
        networks[it.key()] = section;
    }
    if (!model.is_object()) throw UpgradeFailure{"TypeError: model is not a mapping"};
    Json upgraded = Json::object();
    for (auto it = data.begin(); it != data.end(); ++it)
        if (it.key() != "diffusion" && it.key() != "networks") upgraded[it.key()] = *it;
    upgraded["schema_version"] = 3;
    upgraded["upgraded_from_schema"] = data.contains("upgraded_from_schema") ? data["upgraded_from_schema"] : Json(2);
    Json m = model;
    m["family"] = "dit";
    upgraded["model"] = m;
    upgraded["diffusion"] = d;
    upgraded["guidance"] = Json::object({{"guided_channels", guided}});
    upgraded["networks"] = networks;
    return upgraded;
}


// ---- engines (runtime/execution/trt/compat.py read_entry) -------------------------------------------------------

const Json& entry_field(const Json& root, const std::string& dotted) {
    const Json* j = &root;
    size_t start = 0;
    while (true) {
        const size_t dot = dotted.find('.', start);
        const std::string k = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        if (!j->is_object() || !j->contains(k)) fail("missing field " + dotted);
        j = &(*j)[k];
        if (dot == std::string::npos) return *j;
        start = dot + 1;
    }
}

std::string entry_string(const Json& e, const std::string& dotted) {
    const Json& j = entry_field(e, dotted);
    if (!pyjson::is_str(j)) fail(dotted + " must be a string, got " + pyjson::repr(j));
    return j.get<std::string>();
}

int64_t entry_int(const Json& e, const std::string& dotted, int64_t low) {
    const Json& j = entry_field(e, dotted);
    int64_t v = 0;
    if (!j.is_number_integer() || !pyjson::int64_value(j, &v) || v < low)
        fail(dotted + " must be an integer >= " + std::to_string(low) + ", got " + pyjson::repr(j));
    return v;
}

EngineEntry read_engine(const Json& e, size_t index) {
    EngineEntry out;
    try {
        if (!e.is_object()) fail("engines[" + std::to_string(index) + "] is not an object");
        out.file = entry_string(e, "file");
        out.network = e.contains("network") ? entry_string(e, "network") : "denoiser";
        if (e.contains("precision")) out.precision = pyjson::is_str(e["precision"]) ? e["precision"].get<std::string>() : "";
        if (e.contains("sha256") && pyjson::is_str(e["sha256"])) out.sha256 = e["sha256"].get<std::string>();
        out.trt_version = entry_string(e, "tensorrt.version");
        const Json& cc = entry_field(e, "gpu.compute_capability");
        out.compute_capability = pyjson::is_str(cc) ? cc.get<std::string>() : cc.dump();
        const Json& name = get(entry_field(e, "gpu"), "name");
        out.gpu_name = pyjson::is_str(name) ? name.get<std::string>() : "";
        out.hardware_compat = entry_string(e, "build.hardware_compat");
        const Json& vc = entry_field(e, "build.version_compatible");
        out.version_compatible = vc.is_boolean() ? vc.get<bool>() : (vc.is_number() && vc.get<double>() != 0);
        out.opt_level = entry_int(e, "build.opt_level", 0);
        out.min_rows = entry_int(e, "profile.min", 1);
        out.opt_rows = entry_int(e, "profile.opt", 1);
        out.max_rows = entry_int(e, "profile.max", 1);
        if (e.contains("built_utc") && pyjson::is_str(e["built_utc"])) out.built_utc = e["built_utc"].get<std::string>();
        const Json& graph = get(e, "graph");
        if (graph.is_object() && get(graph, "sha256").is_object()) {
            out.has_graph_sha256 = true;
            for (auto it = graph["sha256"].begin(); it != graph["sha256"].end(); ++it)
                if (pyjson::is_str(*it)) out.graph_sha256[it.key()] = it->get<std::string>();
        }
    } catch (const Error& err) {
        out.problem = "engines entry " + (out.file.empty() ? std::string("?") : out.file) + " lacks a field or has a bad one: " +
                      err.what();
    }
    return out;
}

// runtime/artifact/manifest.py read_manifest_json: stat before open (a FIFO would block, /dev/zero never
// ends), then read at most kMaxManifestBytes + 1 bytes from the descriptor that was checked.
std::string read_manifest_text(const std::string& directory, const std::string& path) {
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) {
        if (errno == ENOENT)
            fail(directory + " is not a ditrt artifact: no manifest.json (create one with `ditrt export`)");
        fail("unreadable manifest " + path + ": " + std::strerror(errno));
    }
    if (!S_ISREG(info.st_mode)) fail("unreadable manifest " + path + ": not a regular file");
    if (info.st_size > kMaxManifestBytes)
        fail("unreadable manifest " + path + ": " + std::to_string(info.st_size) + " bytes, above the " +
             std::to_string(kMaxManifestBytes >> 20) + " MiB a manifest can have");
    // O_NONBLOCK: were the file swapped for a FIFO since the stat, open would not wait for a writer.
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) fail("unreadable manifest " + path + ": " + std::strerror(errno));
    std::string text;
    struct stat opened {};
    if (::fstat(fd, &opened) != 0 || !S_ISREG(opened.st_mode)) {
        ::close(fd);
        fail("unreadable manifest " + path + ": not a regular file");
    }
    char buffer[1 << 16];
    while (int64_t(text.size()) <= kMaxManifestBytes) {
        const ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            const int err = errno;
            ::close(fd);
            fail("unreadable manifest " + path + ": " + std::strerror(err));
        }
        if (n == 0) break;
        text.append(buffer, size_t(n));
    }
    ::close(fd);
    if (int64_t(text.size()) > kMaxManifestBytes)
        fail("unreadable manifest " + path + ": above the " + std::to_string(kMaxManifestBytes >> 20) + " MiB a manifest can have");
    return text;
}

}  // namespace

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::Float32: return "float32";
        case DType::Float16: return "float16";
        case DType::Int64: return "int64";
        case DType::Int32: return "int32";
    }
    return "?";
}

size_t dtype_size(DType dtype) {
    return dtype == DType::Int64 ? 8 : dtype == DType::Float16 ? 2 : 4;
}

int64_t TensorSpec::per_row() const {
    int64_t n = 1;
    for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];  // dims <= 2^16; ranks of 4 at most where used
    return n;
}

const TensorSpec* NetworkSpec::input_with_role(const std::string& role) const {
    const TensorSpec* found = nullptr;
    for (const auto& t : inputs)
        if (t.role == role) {
            if (found) return nullptr;
            found = &t;
        }
    return found;
}

const GraphEntry* NetworkSpec::graph(const std::string& precision) const {
    for (const auto& [p, g] : graphs)
        if (p == precision) return &g;
    return nullptr;
}

Manifest parse_manifest(const std::string& text, const std::string& directory) {
    Json data = pyjson::parse(text);
    if (!data.is_object() || !pyjson::is_str(get(data, "schema")) || data["schema"].get<std::string>() != "ditrt.manifest")
        fail("not a ditrt manifest (schema " + pyjson::repr(data.is_object() ? get(data, "schema") : kNone) + ")");
    const Json version = get(data, "schema_version");
    Manifest m;
    m.directory = directory;
    int64_t v = 0;
    const bool small_int = version.is_number_integer() && pyjson::int64_value(version, &v);
    try {
        if (small_int && v == 1) data = upgrade_schema_2(upgrade_schema_1(data));
        else if (small_int && v == 2) data = upgrade_schema_2(data);
    } catch (const UpgradeFailure& e) {
        fail("schema " + pyjson::repr(version) + " manifest lacks a required field or has a bad one (" + e.what +
             "); re-export with this ditrt (ditrt export CHECKPOINT --out " + directory + " --force)");
    }
    if (!get(data, "schema_version").is_number_integer() || !pyjson::equals_int(data["schema_version"], 3))
        fail("manifest schema version " + pyjson::repr(version) + "; this ditrt reads versions 1 to 3: re-export the "
             "artifact with this ditrt (ditrt export CHECKPOINT --out " + directory + " --force)");
    m.schema_version_read = small_int ? v : 3;
    read_model(data, m);
    if (m.is_sit()) read_transport(data);  // the family's process section; the other one is not read
    else read_diffusion(data, m);
    read_guidance(data, m);
    read_defaults(data, m);
    read_labels(data, m);
    read_networks(data, m);
    if (data.contains("engines"))
        for (size_t i = 0; i < data["engines"].size(); ++i) m.engines.push_back(read_engine(data["engines"][i], i));
    return m;
}

Manifest load_manifest(const std::string& directory) {
    std::error_code ec;
    if (directory.empty() || !fs::is_directory(directory, ec)) fail("artifact directory not found: " + directory);
    const std::string path = (fs::path(directory) / "manifest.json").string();
    const std::string text = read_manifest_text(directory, path);
    try {
        return parse_manifest(text, directory);
    } catch (const Error& e) {
        throw Error(e.status(), path + ": " + e.what());
    }
}

EngineEntry parse_engine_entry(const std::string& json_text) { return read_engine(pyjson::parse(json_text), 0); }

std::vector<double> Manifest::base_betas() const { return linspace(beta_start, beta_end, num_train_timesteps); }

const NetworkSpec* Manifest::network(const std::string& name) const {
    for (const auto& n : networks)
        if (n.name == name) return &n;
    return nullptr;
}

const int64_t* Manifest::guided(const std::string& name) const {
    for (const auto& [g, channels] : guided_channels)
        if (g == name) return &channels;
    return nullptr;
}

std::string Manifest::file_path(const std::string& relative, const std::string& field) const {
    return confined(directory, Json(relative), field);
}

const GraphEntry& Manifest::graph(const std::string& network_name, const std::string& precision) const {
    const NetworkSpec* n = network(network_name);
    if (!n) {
        std::string have;
        for (const auto& x : networks) have += (have.empty() ? "" : ", ") + x.name;
        throw Error(Status::InvalidArgument, directory + " has no " + network_name + " network" +
                                                 (network_name == "decoder" ? " (export with --vae DIR to add a decoder)" : "") +
                                                 "; it has: " + have);
    }
    const GraphEntry* g = n->graph(precision);
    if (!g && (precision == "int8" || precision == "fp8") && network_name != "denoiser")  // runtime/artifact/manifest.py graph
        throw Error(Status::Artifact, directory + " has no " + precision + " " + network_name + " graph: quantized graphs are " +
                                          "made for the denoiser only, the " + network_name + " has no quantization recipe");
    if (!g)
        throw Error(Status::Artifact, directory + " has no " + precision + " " + network_name + " graph; re-export with --precision " +
                                          precision);
    return *g;
}

void verify_file(const Manifest& manifest, const std::string& relative, const std::string& sha256) {
    const std::string full = manifest.file_path(relative, "file");
    std::error_code ec;
    if (!fs::is_regular_file(full, ec)) throw Error(Status::Artifact, full + " is listed in the manifest but missing");
    if (sha256_file(full) != sha256)
        throw Error(Status::Artifact, full + " does not match its sha256 in the manifest (corrupt or replaced); re-export");
}

void verify_graph(const Manifest& manifest, const GraphEntry& graph) {
    for (const auto& [name, digest] : graph.sha256) verify_file(manifest, name, digest);
}

}  // namespace ditrt_core