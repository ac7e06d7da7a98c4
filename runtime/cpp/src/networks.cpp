// The manifest's networks (runtime/spec/networks.py, conditioning.py, files.py, and manifest.py's
// cross checks): tensor specs, the denoiser against the model section, the decoder, the segments,
// graph entries and their files. The per-field rules of conditions and networks come from
// manifest_schema.json (schema.cpp); tensor specs against the model config stay code.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "manifest_readers.hpp"
#include "schema.hpp"

namespace ditrt_core::reader {
namespace {

namespace fs = std::filesystem;

const std::map<std::string, DType> kDtypes = {{"float32", DType::Float32}, {"float16", DType::Float16},
                                              {"int64", DType::Int64}, {"int32", DType::Int32}};

// The optional id2label (runtime/artifact/labels.py read_id2label): keys canonical decimal class labels
// 0..num_classes-1, values non-empty strings of at most 4096 characters (code points).
Condition read_condition(const Json& c, const std::string& where) {
    const Json& kind = c.is_object() ? get(c, "kind") : c;
    if (!c.is_object() || !pyjson::is_str(kind) || kind.get<std::string>() != "class")
        fail(kField + where + ".kind is " + pyjson::repr(kind) + "; this runtime knows the conditioning kinds class");
    Condition out;
    out.kind = "class";
    const Json v = schema::check_object("condition", c, where);  // manifest_schema.json: ranges, null == num_classes
    out.num_classes = v["num_classes"].get<int64_t>();
    out.null = v["null"].get<int64_t>();
    return out;
}

TensorSpec read_tensor(const Json& t, const std::string& where, const std::vector<std::string>& roles) {
    if (!t.is_object() || !pyjson::is_str(get(t, "name")) || !pyjson::is_str(get(t, "dtype")) ||
        !kDtypes.count(t["dtype"].get<std::string>()))
        fail(kField + where + " must have a name and a dtype in float32, float16, int64, int32, got " + pyjson::repr(t));
    TensorSpec spec;
    spec.name = t["name"].get<std::string>();
    spec.dtype = kDtypes.at(t["dtype"].get<std::string>());
    const Json& shape = get(t, "shape");
    bool ok = shape.is_array() && !shape.empty() && pyjson::is_str(shape[0]) && shape[0].get<std::string>() == "batch";
    if (ok) {
        spec.shape.push_back(-1);
        for (size_t i = 1; i < shape.size() && ok; ++i) {
            int64_t d = 0;
            ok = pyjson::is_int(shape[i]) && pyjson::int64_value(shape[i], &d) && d > 0 && d <= (int64_t(1) << 16);
            spec.shape.push_back(d);
        }
    }
    if (!ok) fail(kField + where + ".shape must be [\"batch\", positive ints...], got " + pyjson::repr(shape));
    const Json& role = get(t, "role");
    if (!pyjson::is_str(role) || std::find(roles.begin(), roles.end(), role.get<std::string>()) == roles.end()) {
        std::string list;
        for (const auto& r : roles) list += (list.empty() ? "" : ", ") + r;
        fail(kField + where + ".role is " + pyjson::repr(role) + "; use one of " + list);
    }
    spec.role = role.get<std::string>();
    if (spec.role == "condition") {
        spec.condition = read_condition(get(t, "condition"), where + ".condition");
        spec.has_condition = true;
    }
    return spec;
}

NetworkSpec read_network(const std::string& name, const Json& data) {
    const std::string where = "networks." + name;
    if (!data.is_object()) fail(kField + where + " must be an object");
    NetworkSpec spec;
    spec.name = name;
    for (const char* kind : {"inputs", "outputs"}) {
        const Json& items = get(data, kind);
        if (!items.is_array() || items.empty()) fail(kField + where + "." + kind + " must be a non-empty list");
        const bool inputs = std::strcmp(kind, "inputs") == 0;
        // tokens / embedding: what the denoiser's segments (feature caching) pass between them
        const std::vector<std::string> roles = inputs ? std::vector<std::string>{"latent", "time", "condition", "tokens", "embedding"}
                                                      : std::vector<std::string>{"prediction", "image", "tokens", "embedding"};
        for (size_t i = 0; i < items.size(); ++i)
            (inputs ? spec.inputs : spec.outputs)
                .push_back(read_tensor(items[i], where + "." + kind + "[" + std::to_string(i) + "]", roles));
    }
    std::vector<std::string> names;
    for (const auto* list : {&spec.inputs, &spec.outputs})
        for (const auto& t : *list) names.push_back(t.name);
    std::vector<std::string> sorted = names;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
        std::string list;
        for (const auto& n : names) list += (list.empty() ? "" : ", ") + quoted(n);
        fail(kField + where + ": tensor names must be unique, got [" + list + "]");
    }
    const Json unit = schema::check_object("network", data, where)["batch_unit"];  // batch_axis, batch_unit
    spec.batch_unit = unit.get<std::string>();
    return spec;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + (shape[i] < 0 ? std::string("'batch'") : std::to_string(shape[i]));
    return s + "]";
}

// A tensor a network must have: name, dtype, shape (-1 the batch) and role (runtime/spec/networks.py).
struct WantTensor {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::string role;
};

// `have` is exactly `want`, in order; a condition input's classes are `classes` (null = classes).
bool tensors_match(const std::vector<TensorSpec>& have, const std::vector<WantTensor>& want, int64_t classes) {
    if (have.size() != want.size()) return false;
    for (size_t i = 0; i < want.size(); ++i) {
        const TensorSpec& t = have[i];
        if (t.name != want[i].name || t.dtype != want[i].dtype || t.shape != want[i].shape || t.role != want[i].role)
            return false;
        if (t.has_condition && (t.condition.num_classes != classes || t.condition.null != classes)) return false;
    }
    return true;
}

// runtime/artifact/manifest.py _check_denoiser: exactly the tensors denoiser_spec(model, family) has.
void check_denoiser(const NetworkSpec& spec, const Manifest& m) {
    const int64_t C = m.in_channels, S = m.input_size, K = m.num_classes;
    using Want = WantTensor;
    const std::vector<Want> inputs = {{"latent", DType::Float32, {-1, C, S, S}, "latent"},
                                      {"timestep", DType::Float32, {-1}, "time"},
                                      {"class_label", DType::Int64, {-1}, "condition"}};
    const std::vector<Want> outputs = {{"model_output", DType::Float32, {-1, m.out_channels, S, S}, "prediction"}};
    if (!tensors_match(spec.inputs, inputs, K) || !tensors_match(spec.outputs, outputs, K)) {
        std::string have;
        for (const auto* list : {&spec.inputs, &spec.outputs})
            for (const auto& t : *list)
                have += (have.empty() ? "" : ", ") + t.name + " " + dtype_name(t.dtype) + " " + shape_text(t.shape) + " " + t.role +
                        (t.has_condition ? " (class, " + std::to_string(t.condition.num_classes) + " classes)" : "");
        fail(kField + "networks.denoiser inputs/outputs [" + have + "] do not match the model section and family " + m.family +
             " ([latent float32 ['batch', " + std::to_string(C) + ", " + std::to_string(S) + ", " + std::to_string(S) +
             "] latent, timestep float32 ['batch'] time, class_label int64 ['batch'] condition (class, " + std::to_string(K) +
             " classes), model_output float32 ['batch', " + std::to_string(m.out_channels) + ", " + std::to_string(S) + ", " +
             std::to_string(S) + "] prediction])");
    }
}

// runtime/artifact/manifest.py _check_decoder.
void check_decoder(NetworkSpec& spec, const Json& data, const Manifest& m) {
    const std::vector<int64_t> want = {-1, m.in_channels, m.input_size, m.input_size};
    if (spec.inputs.size() != 1 || spec.inputs[0].shape != want)
        fail(kField + "networks.decoder.inputs " + shape_text(spec.inputs[0].shape) + " does not take the denoiser's latents " +
             shape_text(want));
    const std::vector<int64_t>& out = spec.outputs[0].shape;
    if (out.size() != 4 || out[1] != 3)
        fail(kField + "networks.decoder.outputs[0].shape " + shape_text(out) + " is not an RGB image batch");
    const Json& factor = get(data, "scaling_factor");
    double v = 0;
    if (!pyjson::is_number(factor) || !pyjson::float_value(factor, &v) || !(0 < v && v <= 1e3))  // Python: (0, 1000]
        fail(kField + "networks.decoder.scaling_factor must be a number in (0, 1000], got " + pyjson::repr(factor));
    spec.scaling_factor = v;
}

bool known_precision(const std::string& p) { return p == "fp32" || p == "fp16" || p == "int8" || p == "fp8"; }

GraphEntry read_graph(const Json& graph, const std::string& where, const std::string& directory) {
    if (!graph.is_object()) fail(kField + where + " must be an object");
    GraphEntry g;
    confined(directory, get(graph, "file"), where + ".file");
    g.file = graph["file"].get<std::string>();
    const Json& hashes = get(graph, "sha256");
    if (!hashes.is_object() || !hashes.contains(g.file))
        fail(kField + where + ".sha256 must map every file (the graph's included) to its sha256");
    for (auto it = hashes.begin(); it != hashes.end(); ++it) {
        confined(directory, Json(it.key()), where + ".sha256");
        if (!pyjson::is_str(*it) || pyjson::code_points(it->get<std::string>()) != 64)
            fail(kField + where + ".sha256[" + quoted(it.key()) + "] is not a sha256 hex digest");
        g.sha256[it.key()] = it->get<std::string>();
    }
    return g;
}

// runtime/spec/quantization.py read_quant_recipe: an int8 / fp8 graph carries its recipe, checked.
// runtime/artifact/manifest.py _check_segment: a segment of the denoiser (feature caching) is one that
// runtime/spec/networks.py segment_specs makes for the model section: its name, tensors, segment_of and
// blocks. This runtime samples with the monolithic denoiser; it reads the segments to accept them.
void check_segment(const NetworkSpec& spec, const Json& data, const Manifest& m) {
    const int64_t S = m.input_size, C = m.in_channels, D = m.hidden_size, K = m.num_classes;
    const int64_t T = (S / m.patch_size) * (S / m.patch_size);
    using Want = WantTensor;
    const Want hidden{"hidden_states", DType::Float32, {-1, T, D}, "tokens"};
    const Want conditioning{"conditioning", DType::Float32, {-1, D}, "embedding"};
    std::vector<Want> inputs{hidden, conditioning}, outputs{{"hidden_states_out", DType::Float32, {-1, T, D}, "tokens"}};
    std::vector<int64_t> blocks;  // empty: the segment has no blocks field
    if (spec.name == "embed") {
        inputs = {{"latent", DType::Float32, {-1, C, S, S}, "latent"}, {"timestep", DType::Float32, {-1}, "time"},
                  {"class_label", DType::Int64, {-1}, "condition"}};
        outputs = {hidden, conditioning};
    } else if (spec.name == "final") {
        outputs = {{"model_output", DType::Float32, {-1, m.out_channels, S, S}, "prediction"}};
    } else if (spec.name == "blocks_0_1") {
        blocks = {0, 1};
    } else if (m.depth > 1 && spec.name == "blocks_1_" + std::to_string(m.depth)) {
        blocks = {1, m.depth};
    } else {
        blocks = {-1};  // not a segment of this denoiser
    }
    bool ok = blocks != std::vector<int64_t>{-1} && tensors_match(spec.inputs, inputs, K) &&
              tensors_match(spec.outputs, outputs, K);
    const Json& of = get(data, "segment_of");
    ok = ok && pyjson::is_str(of) && of.get<std::string>() == "denoiser";
    if (blocks.empty()) {
        ok = ok && (!data.contains("blocks") || data["blocks"].is_null());  // Python: .get("blocks") == None
    } else if (ok) {
        const Json& have = get(data, "blocks");  // Python compares lists with ==: 1.0 and true equal 1
        ok = have.is_array() && have.size() == 2 && pyjson::equals_int(have[0], blocks[0]) &&
             pyjson::equals_int(have[1], blocks[1]);
    }
    if (!ok) {
        std::string names = "embed, blocks_0_1, " + (m.depth > 1 ? "blocks_1_" + std::to_string(m.depth) + ", " : std::string()) + "final";
        fail(kField + "networks." + spec.name + " is not a segment of this denoiser; the segments are " + names);
    }
}

}  // namespace

// runtime/core/files.py artifact_path: the name's rules, then the resolved path inside the directory.
std::string confined(const std::string& directory, const Json& name_json, const std::string& field) {
    const bool usable = pyjson::is_str(name_json) && !name_json.get_ref<const std::string&>().empty() &&
                        name_json.get_ref<const std::string&>().find_first_of(std::string("\\\0", 2)) == std::string::npos;
    if (!usable) fail(kField + field + " must be a file name inside the artifact, got " + pyjson::repr(name_json));
    const std::string& name = name_json.get_ref<const std::string&>();
    bool dotdot = false;
    for (size_t start = 0; start <= name.size();) {
        const size_t slash = std::min(name.find('/', start), name.size());
        dotdot |= name.compare(start, slash - start, "..") == 0 && slash - start == 2;
        start = slash + 1;
    }
    if (name[0] == '/' || dotdot)
        fail(kField + field + " (" + quoted(name) + ") points outside the artifact: files must be relative paths inside it");
    std::error_code ec;
    const fs::path root = fs::weakly_canonical(fs::absolute(directory, ec), ec);
    const fs::path full = fs::path(directory) / name;
    fs::path real = fs::weakly_canonical(fs::absolute(full, ec), ec);
    if (ec) fail(kField + field + " (" + quoted(name) + ") cannot be resolved: " + ec.message());
    auto r = root.begin();
    for (auto p = real.begin(); r != root.end(); ++r, ++p)
        if (p == real.end() || *p != *r)
            fail(kField + field + " (" + quoted(name) + ") resolves outside the artifact (" + real.string() +
                 "): files must live inside it");
    return full.string();
}

void read_networks(const Json& data, Manifest& m) {
    const Json& networks = get(data, "networks");
    if (!networks.is_object() || !networks.contains("denoiser"))
        fail(kField + "networks must be an object with at least a denoiser");
    for (auto it = networks.begin(); it != networks.end(); ++it) {
        NetworkSpec spec = read_network(it.key(), *it);
        if (it.key() == "denoiser") check_denoiser(spec, m);
        else if (it.key() == "decoder") check_decoder(spec, *it, m);
        else if (it->contains("segment_of")) check_segment(spec, *it, m);
        const std::string at = "networks." + it.key() + ".graphs";
        const Json& graphs = get(*it, "graphs");
        if (!graphs.is_object()) fail(kField + at + " must be an object");
        for (auto g = graphs.begin(); g != graphs.end(); ++g) {
            if (!known_precision(g.key())) fail(kField + at + "." + g.key() + ": unknown precision (use fp32, fp16, int8, fp8)");
            spec.graphs.emplace_back(g.key(), read_graph(*g, at + "." + g.key(), m.directory));
            if (g.key() == "int8" || g.key() == "fp8") read_quantization(*g, g.key(), at + "." + g.key());
        }
        m.networks.push_back(std::move(spec));
    }
    if (data.contains("engines") && !data["engines"].is_array()) fail(kField + "engines must be a list");
}

}  // namespace ditrt_core::reader
