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
#include "flow.hpp"
#include "pyjson.hpp"
#include "schedule.hpp"
#include "sha256.hpp"

namespace ditrt_core {
namespace {

using pyjson::Json;
namespace fs = std::filesystem;

const std::string kField = "manifest field ";

[[noreturn]] void fail(const std::string& message) { throw Error(Status::Artifact, message); }

const Json kNone;  // Python's None: what dict.get returns for a missing key

// d.get(key) of a dict (None when missing).
const Json& get(const Json& d, const std::string& key) {
    auto it = d.find(key);
    return it == d.end() ? kNone : *it;
}

std::string quoted(const std::string& s) { return pyjson::repr(Json(s)); }

// ---- schema upgrades (runtime/manifest.py upgrade_schema_1 / upgrade_schema_2, on JSON) ----------

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

// Schema 2 tensors had no role: runtime/manifest.py _SCHEMA_2_ROLES.
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

// ---- the sections (runtime/config.py) --------------------------------------------------------------

const Json& section(const Json& data, const std::string& name) {  // config._section
    const Json& s = get(data, name);
    if (!s.is_object()) fail(kField + name + " is missing or not an object");
    return s;
}

int64_t check_int(const Json& j, const std::string& what, int64_t low, int64_t high) {
    return pyjson::check_int(j, what, true, low, true, high);
}

void read_model(const Json& data, Manifest& m) {
    const Json& s = section(data, "model");
    const Json& family = get(s, "family");
    if (!pyjson::is_str(family) || (family.get<std::string>() != "dit" && family.get<std::string>() != "sit"))
        fail("unknown model family " + pyjson::repr(family) + "; ditrt knows dit, sit");
    m.family = family.get<std::string>();
    for (const char* f : {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                          "num_classes", "learn_sigma"})
        if (!s.contains(f)) fail(kField + "model." + f + " is missing");
    const int64_t max = int64_t(1) << 20;
    m.input_size = check_int(s["input_size"], kField + "model.input_size", 1, max);
    m.patch_size = check_int(s["patch_size"], kField + "model.patch_size", 1, max);
    m.in_channels = check_int(s["in_channels"], kField + "model.in_channels", 1, max);
    m.hidden_size = check_int(s["hidden_size"], kField + "model.hidden_size", 1, max);
    m.depth = check_int(s["depth"], kField + "model.depth", 1, max);
    m.num_heads = check_int(s["num_heads"], kField + "model.num_heads", 1, max);
    m.num_classes = check_int(s["num_classes"], kField + "model.num_classes", 1, max);
    if (!s["learn_sigma"].is_boolean())
        fail(kField + "model.learn_sigma must be true or false, got " + pyjson::repr(s["learn_sigma"]));
    m.learn_sigma = s["learn_sigma"].get<bool>();
    pyjson::Range ratio;
    ratio.has_low = ratio.has_high = ratio.low_open = true;
    ratio.low = 0;
    ratio.high = 1e3;
    m.mlp_ratio = pyjson::check_number(s["mlp_ratio"], kField + "model.mlp_ratio", ratio);
    std::vector<std::string> problems;  // DiTConfig.validate
    if (m.input_size % m.patch_size)
        problems.push_back("input_size " + std::to_string(m.input_size) + " is not a multiple of patch_size " +
                           std::to_string(m.patch_size));
    if (m.hidden_size % m.num_heads)
        problems.push_back("hidden_size " + std::to_string(m.hidden_size) + " is not divisible by num_heads " +
                           std::to_string(m.num_heads));
    if (m.hidden_size % 4)
        problems.push_back("hidden_size " + std::to_string(m.hidden_size) + " must be divisible by 4 (2-D sin-cos pos_embed)");
    if (!problems.empty()) {
        std::string all;
        for (const auto& p : problems) all += (all.empty() ? "" : "; ") + p;
        fail(kField + "model: invalid DiT config: " + all);
    }
    // The family's output channels: DiT's graph keeps the learned-variance half, SiT's drops it.
    m.out_channels = m.learn_sigma && !m.is_sit() ? 2 * m.in_channels : m.in_channels;
    if (s.contains("out_channels") && !pyjson::equals_int(s["out_channels"], m.out_channels))
        fail(kField + "model.out_channels is " + pyjson::repr(s["out_channels"]) + ", but a " + m.family + " with in_channels " +
             std::to_string(m.in_channels) + " and learn_sigma " + (m.learn_sigma ? "True" : "False") + " outputs " +
             std::to_string(m.out_channels));
}

void check_alphas_cumprod(const Manifest& m);

void read_diffusion(const Json& data, Manifest& m) {
    const Json& d = section(data, "diffusion");
    const std::string f = kField + "diffusion.";
    m.num_train_timesteps = check_int(get(d, "num_train_timesteps"), f + "num_train_timesteps", 2, 100000);
    pyjson::check_choice(get(d, "beta_schedule"), f + "beta_schedule", {"linear"});
    pyjson::Range positive;
    positive.has_low = positive.low_open = true;
    m.beta_start = pyjson::check_number(get(d, "beta_start"), f + "beta_start", positive);
    m.beta_end = pyjson::check_number(get(d, "beta_end"), f + "beta_end", positive);
    if (!(m.beta_start <= m.beta_end && m.beta_end < 1))
        fail("manifest fields diffusion.beta_start " + pyjson::repr(Json(m.beta_start)) + " and beta_end " +
             pyjson::repr(Json(m.beta_end)) + " need 0 < beta_start <= beta_end < 1");
    m.variance = pyjson::check_choice(get(d, "variance"), f + "variance", {"learned_range", "fixed_large"});
    if (m.variance == "learned_range" && !m.learn_sigma)
        fail(f + "variance is learned_range, but the model has " + std::to_string(m.out_channels) +
             " output channels (learned range needs 2 x in_channels = " + std::to_string(2 * m.in_channels) + ")");
    pyjson::check_choice(d.contains("prediction") ? d["prediction"] : Json("epsilon"), f + "prediction", {"epsilon"});
    if (d.contains("clip_denoised") && !(d["clip_denoised"].is_boolean() && !d["clip_denoised"].get<bool>()))
        fail(f + "clip_denoised is " + pyjson::repr(d["clip_denoised"]) + ": this runtime samples as the official "
             "sample.py does (clip_denoised false) and cannot clip");
    check_alphas_cumprod(m);
}

// runtime/config.py check_alphas_cumprod, on the same float64 table: ac falls monotonically from
// 1 - beta_start; float32(ac[0]) must be below 1 and float32(ac[-1]) a normal float32 (>= 2^-126),
// else the samplers' float32 coefficients divide by 0 or overflow (ddim_step's 0/0).
void check_alphas_cumprod(const Manifest& m) {
    const std::vector<double> ac = alphas_cumprod(m.base_betas());
    if (!(float(ac.front()) < 1.0f))
        fail("manifest field diffusion.beta_start " + pyjson::repr(Json(m.beta_start)) + " makes a degenerate "
             "schedule: alphas_cumprod[0] = 1 - beta_start rounds to 1 in float32, where the samplers divide by "
             "1 - alphas_cumprod; beta_start must be at least about 6e-8");
    if (!(float(ac.back()) >= std::numeric_limits<float>::min())) {
        size_t first = 0;
        while (float(ac[first]) >= std::numeric_limits<float>::min()) ++first;
        fail("manifest fields diffusion.beta_end " + pyjson::repr(Json(m.beta_end)) + " and diffusion.num_train_timesteps " +
             std::to_string(m.num_train_timesteps) + " make a degenerate schedule: alphas_cumprod falls to " +
             pyjson::format_g(ac.back()) + ", below float32's smallest normal number 2^-126 from timestep " +
             std::to_string(first) + " on, where the samplers' float32 coefficients overflow (1/sqrt(alphas_cumprod)) "
             "or divide 0 by 0; lower beta_end or num_train_timesteps");
    }
}

// config.read_transport: only the Linear path with velocity prediction and eps 0 is implemented.
void read_transport(const Json& data) {
    const Json& d = section(data, "transport");
    const std::string f = kField + "transport.";
    const Json& path = get(d, "path_type");
    const Json& prediction = get(d, "prediction");
    if (pyjson::is_str(path) && (path.get<std::string>() == "GVP" || path.get<std::string>() == "VP"))
        fail(f + "path_type is " + pyjson::repr(path) + ": only the Linear path is implemented (SiT's released models); "
             "GVP and VP have no golden reference here");
    pyjson::check_choice(path, f + "path_type", {"Linear"});
    if (pyjson::is_str(prediction) && (prediction.get<std::string>() == "score" || prediction.get<std::string>() == "noise"))
        fail(f + "prediction is " + pyjson::repr(prediction) + ": only velocity prediction is implemented (SiT's released models)");
    pyjson::check_choice(prediction, f + "prediction", {"velocity"});
    pyjson::Range zero;
    zero.has_low = zero.has_high = true;
    zero.low = zero.high = 0;
    for (const char* k : {"train_eps", "sample_eps"})
        pyjson::check_number(d.contains(k) ? d[k] : Json(0.0), f + k, zero);
}

void read_guidance(const Json& data, Manifest& m) {
    const Json& guided = get(section(data, "guidance"), "guided_channels");
    if (!guided.is_object() || guided.empty())
        fail(kField + "guidance.guided_channels must be an object like {\"official\": 3, \"standard\": " +
             std::to_string(m.in_channels) + "}, got " + pyjson::repr(guided));
    for (auto it = guided.begin(); it != guided.end(); ++it)
        m.guided_channels.emplace_back(it.key(), check_int(*it, kField + "guidance.guided_channels." + it.key(), 1, m.in_channels));
}

void read_defaults(const Json& data, Manifest& m) {
    const Json& d = data.contains("defaults") ? data["defaults"] : Json::object();
    if (!d.is_object()) fail(kField + "defaults must be an object, got " + pyjson::repr(d));
    const std::vector<std::string> known = {"sampler", "steps", "cfg_scale", "guidance", "eta"};
    std::vector<std::string> unknown;
    for (auto it = d.begin(); it != d.end(); ++it)
        if (std::find(known.begin(), known.end(), it.key()) == known.end()) unknown.push_back(it.key());
    if (!unknown.empty()) {
        std::sort(unknown.begin(), unknown.end());
        std::string list;
        for (const auto& u : unknown) list += (list.empty() ? "" : ", ") + quoted(u);
        fail(kField + "defaults has unknown keys [" + list + "]; it takes sampler, steps, cfg_scale, guidance, eta");
    }
    // The family's defaults (config.py: dit ddpm, 250, 4.0, official; sit sde-euler, 250, 1.5,
    // official), then the manifest's values.
    const Json sampler = d.contains("sampler") ? d["sampler"] : Json(m.is_sit() ? "sde-euler" : "ddpm");
    const Json steps = d.contains("steps") ? d["steps"] : Json(250);
    const Json cfg = d.contains("cfg_scale") ? d["cfg_scale"] : Json(m.is_sit() ? 1.5 : 4.0);
    const Json guidance = d.contains("guidance") ? d["guidance"] : Json("official");
    const Json eta = d.contains("eta") ? d["eta"] : Json();
    const std::vector<std::string> samplers = m.is_sit() ? std::vector<std::string>(std::begin(kFlowSamplers), std::end(kFlowSamplers))
                                                         : std::vector<std::string>{"ddpm", "ddim", "dpm++2m"};
    m.default_sampler = pyjson::check_choice(sampler, kField + "defaults.sampler", samplers);
    std::vector<std::string> names;
    for (const auto& [name, _] : m.guided_channels) names.push_back(name);
    m.default_guidance = pyjson::check_choice(guidance, kField + "defaults.guidance", names);
    m.default_cfg_scale = pyjson::check_number(cfg, kField + "defaults.cfg_scale", {}, /*float32=*/true);
    if (pyjson::is_int(steps)) {
        m.default_steps = pyjson::repr(steps);  // the digits, of any size
        m.default_steps_is_int = true;
    } else if (pyjson::is_str(steps)) {
        m.default_steps = steps.get<std::string>();
        m.default_steps_is_int = false;
    } else {
        fail(kField + "defaults.steps must be an int or a step spec string, got " + pyjson::repr(steps));
    }
    if (!eta.is_null()) {
        if (m.default_sampler != "ddim")
            fail(kField + "defaults.eta is set, but the default sampler " + m.default_sampler + " takes no eta");
        pyjson::Range unit;
        unit.has_low = unit.has_high = true;
        unit.low = 0;
        unit.high = 1;
        m.default_eta = pyjson::check_number(eta, kField + "defaults.eta", unit);
        m.has_default_eta = true;
    }
}

// ---- networks (runtime/networks.py, conditioning.py) -----------------------------------------------

const std::map<std::string, DType> kDtypes = {{"float32", DType::Float32}, {"float16", DType::Float16},
                                              {"int64", DType::Int64}, {"int32", DType::Int32}};

// The optional id2label (runtime/labels.py read_id2label): keys canonical decimal class labels
// 0..num_classes-1, values non-empty strings of at most 4096 characters (code points).
void read_labels(const Json& data, Manifest& m) {
    if (!data.contains("id2label")) return;
    const Json& raw = data["id2label"];
    if (!raw.is_object()) fail(kField + "id2label must be an object (class label -> its names)");
    for (auto it = raw.begin(); it != raw.end(); ++it) {
        const std::string& k = it.key();
        const bool canonical = !k.empty() && std::strspn(k.c_str(), "0123456789") == k.size() && (k == "0" || k[0] != '0');
        if (!canonical || k.size() > 18 || std::stoll(k) >= m.num_classes)
            fail(kField + "id2label key " + quoted(k) + " is not a class label 0.." + std::to_string(m.num_classes - 1) +
                 " (a decimal integer without leading zeros)");
        const Json& v = *it;
        if (!pyjson::is_str(v) || v.get_ref<const std::string&>().empty() ||
            pyjson::code_points(v.get_ref<const std::string&>()) > 4096)
            fail(kField + "id2label[" + quoted(k) + "] must be a non-empty string of at most 4096 characters");
        m.labels.add(std::stoll(k), v.get<std::string>());
    }
    m.has_labels = true;
}

Condition read_condition(const Json& c, const std::string& where) {
    const Json& kind = c.is_object() ? get(c, "kind") : c;
    if (!c.is_object() || !pyjson::is_str(kind) || kind.get<std::string>() != "class")
        fail(kField + where + ".kind is " + pyjson::repr(kind) + "; this runtime knows the conditioning kinds class");
    Condition out;
    out.kind = "class";
    out.num_classes = check_int(get(c, "num_classes"), kField + where + ".num_classes", 1, int64_t(1) << 30);
    out.null = check_int(get(c, "null"), kField + where + ".null", 0, int64_t(1) << 30);
    if (out.null != out.num_classes)
        fail(kField + where + ".null is " + std::to_string(out.null) + ", but a class-conditional DiT's null class is "
             "num_classes = " + std::to_string(out.num_classes) + " (classes 0.." + std::to_string(out.num_classes - 1) +
             " are real)");
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
    if (data.contains("batch_axis") && !pyjson::equals_int(data["batch_axis"], 0))
        fail(kField + where + ".batch_axis must be 0, got " + pyjson::repr(data["batch_axis"]));
    const Json& unit = get(data, "batch_unit");
    if (!pyjson::is_str(unit) || (unit.get<std::string>() != "rows" && unit.get<std::string>() != "images"))
        fail(kField + where + ".batch_unit must be 'rows' or 'images', got " + pyjson::repr(unit));
    spec.batch_unit = unit.get<std::string>();
    return spec;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + (shape[i] < 0 ? std::string("'batch'") : std::to_string(shape[i]));
    return s + "]";
}

// runtime/manifest.py _check_denoiser: exactly the tensors denoiser_spec(model, family) has.
void check_denoiser(const NetworkSpec& spec, const Manifest& m) {
    const int64_t C = m.in_channels, S = m.input_size, K = m.num_classes;
    struct Want {
        const char* name;
        DType dtype;
        std::vector<int64_t> shape;
        const char* role;
    };
    const std::vector<Want> inputs = {{"latent", DType::Float32, {-1, C, S, S}, "latent"},
                                      {"timestep", DType::Float32, {-1}, "time"},
                                      {"class_label", DType::Int64, {-1}, "condition"}};
    const std::vector<Want> outputs = {{"model_output", DType::Float32, {-1, m.out_channels, S, S}, "prediction"}};
    auto same = [](const std::vector<TensorSpec>& have, const std::vector<Want>& want, int64_t classes) {
        if (have.size() != want.size()) return false;
        for (size_t i = 0; i < want.size(); ++i) {
            const TensorSpec& t = have[i];
            if (t.name != want[i].name || t.dtype != want[i].dtype || t.shape != want[i].shape || t.role != want[i].role)
                return false;
            if (t.has_condition && (t.condition.num_classes != classes || t.condition.null != classes)) return false;
        }
        return true;
    };
    if (!same(spec.inputs, inputs, K) || !same(spec.outputs, outputs, K)) {
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

// runtime/manifest.py _check_decoder.
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

// runtime/files.py artifact_path: the name's rules, then the resolved path inside the directory.
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

// runtime/quantization.py read_quant_recipe: an int8 / fp8 graph carries its recipe, checked.
std::string recipe_text(const Json& section, const std::string& key, const std::string& where) {
    const Json& v = get(section, key);
    if (!pyjson::is_str(v) || v.get_ref<const std::string&>().empty())
        fail(kField + where + "." + key + " must be a non-empty string, got " + pyjson::repr(v));
    return v.get<std::string>();
}

void read_quantization(const Json& graph, const std::string& precision, const std::string& graph_where) {
    const Json& recipe = get(graph, "quantization");
    if (!recipe.is_object())
        fail(kField + graph_where + ".quantization must be an object (the recipe): a " + precision +
             " graph without its recipe cannot be trusted; re-export it with --precision " + precision);
    const std::string where = graph_where + ".quantization";
    const Json& p = get(recipe, "precision");
    if (!pyjson::is_str(p) || p.get<std::string>() != precision)
        fail(kField + where + ".precision must be '" + precision + "', got " + pyjson::repr(p));
    const Json& calibration = get(recipe, "calibration");
    if (!calibration.is_object()) fail(kField + where + ".calibration must be an object");
    const std::string at = where + ".calibration";
    const int64_t max_count = int64_t(1) << 62;
    check_int(get(calibration, "steps"), kField + at + ".steps", 1, max_count);
    check_int(get(calibration, "images"), kField + at + ".images", 1, max_count);
    check_int(get(calibration, "seed"), kField + at + ".seed", 0, max_count);
    const Json& excluded = get(recipe, "excluded_layers");
    bool strings = excluded.is_array();
    if (strings)
        for (const auto& pattern : excluded) strings = strings && pyjson::is_str(pattern);
    if (!strings) fail(kField + where + ".excluded_layers must be a list of strings");
    recipe_text(recipe, "config", where);
    recipe_text(recipe, "modelopt_version", where);
    recipe_text(calibration, "sampler", at);
}

bool known_precision(const std::string& p) { return p == "fp32" || p == "fp16" || p == "int8" || p == "fp8"; }

// runtime/manifest.py _check_segment: a segment of the denoiser (feature caching) is one that
// runtime/networks.py segment_specs makes for the model section: its name, tensors, segment_of and
// blocks. This runtime samples with the monolithic denoiser; it reads the segments to accept them.
void check_segment(const NetworkSpec& spec, const Json& data, const Manifest& m) {
    const int64_t S = m.input_size, C = m.in_channels, D = m.hidden_size, K = m.num_classes;
    const int64_t T = (S / m.patch_size) * (S / m.patch_size);
    struct Want {
        std::string name;
        DType dtype;
        std::vector<int64_t> shape;
        std::string role;
    };
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
    auto same = [K](const std::vector<TensorSpec>& have, const std::vector<Want>& want) {
        if (have.size() != want.size()) return false;
        for (size_t i = 0; i < want.size(); ++i) {
            const TensorSpec& t = have[i];
            if (t.name != want[i].name || t.dtype != want[i].dtype || t.shape != want[i].shape || t.role != want[i].role)
                return false;
            if (t.has_condition && (t.condition.num_classes != K || t.condition.null != K)) return false;
        }
        return true;
    };
    bool ok = blocks != std::vector<int64_t>{-1} && same(spec.inputs, inputs) && same(spec.outputs, outputs);
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

// ---- engines (runtime/trt/compat.py read_entry) -------------------------------------------------------

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

// runtime/manifest.py read_manifest_json: stat before open (a FIFO would block, /dev/zero never
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
    if (!g && (precision == "int8" || precision == "fp8") && network_name != "denoiser")  // runtime/manifest.py graph
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
