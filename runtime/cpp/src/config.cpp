// The manifest's model, process, guidance, defaults and id2label sections (runtime/spec/config.py,
// labels.py): the value rules come from manifest_schema.json (schema.cpp); what stays here is what
// cannot be data: the family registry, the DiT config's divisibility, out_channels of the family,
// the degenerate-schedule check, the sampler registry's eta, the class-label keys.
#include <cstring>
#include <iterator>
#include <limits>

#include "registry.hpp"
#include "manifest_readers.hpp"
#include "schedule.hpp"
#include "schema.hpp"

namespace ditrt_core::reader {
namespace {

void check_alphas_cumprod(const Manifest& m);

}  // namespace

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
    const Json& family = get(s, "family");  // the family registry (config.get_family)
    if (!pyjson::is_str(family) || (family.get<std::string>() != "dit" && family.get<std::string>() != "sit"))
        fail("unknown model family " + pyjson::repr(family) + "; ditrt knows dit, sit");
    m.family = family.get<std::string>();
    const Json v = schema::check_object("model", s, "model");
    m.input_size = v["input_size"].get<int64_t>();
    m.patch_size = v["patch_size"].get<int64_t>();
    m.in_channels = v["in_channels"].get<int64_t>();
    m.hidden_size = v["hidden_size"].get<int64_t>();
    m.depth = v["depth"].get<int64_t>();
    m.num_heads = v["num_heads"].get<int64_t>();
    m.num_classes = v["num_classes"].get<int64_t>();
    m.learn_sigma = v["learn_sigma"].get<bool>();
    m.mlp_ratio = v["mlp_ratio"].get<double>();
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

void read_diffusion(const Json& data, Manifest& m) {
    schema::Context context;
    context.refs["model.learn_sigma"] = m.learn_sigma;
    const Json v = schema::check_object("diffusion", section(data, "diffusion"), "diffusion", context);
    m.num_train_timesteps = v["num_train_timesteps"].get<int64_t>();
    m.beta_start = v["beta_start"].get<double>();
    m.beta_end = v["beta_end"].get<double>();
    m.variance = v["variance"].get<std::string>();
    check_alphas_cumprod(m);
}

void read_transport(const Json& data) { schema::check_object("transport", section(data, "transport"), "transport"); }

void read_guidance(const Json& data, Manifest& m) {
    schema::Context context;
    context.refs["model.in_channels"] = m.in_channels;
    const Json v = schema::check_object("guidance", section(data, "guidance"), "guidance", context);
    for (auto it = v["guided_channels"].begin(); it != v["guided_channels"].end(); ++it)
        m.guided_channels.emplace_back(it.key(), it->get<int64_t>());
}

void read_defaults(const Json& data, Manifest& m) {
    const Json& d = data.contains("defaults") ? data["defaults"] : Json::object();
    if (!d.is_object()) fail(kField + "defaults must be an object, got " + pyjson::repr(d));
    // The family's defaults and samplers (the registries, as data: manifest_schema.json "registries").
    const std::string family = m.is_sit() ? "sit" : "dit";
    schema::Context context;
    for (auto it = registry::family_defaults(family).begin(); it != registry::family_defaults(family).end(); ++it)
        context.defaults[it.key()] = *it;
    context.choices["samplers of the family"] = registry::samplers_of(family);
    for (const auto& [name, _] : m.guided_channels) context.choices["guidance.guided_channels"].push_back(name);
    const Json v = schema::check_object("defaults", d, "defaults", context);
    m.default_sampler = v["sampler"].get<std::string>();
    m.default_guidance = v["guidance"].get<std::string>();
    m.default_cfg_scale = v["cfg_scale"].get<double>();
    const Json& steps = v["steps"];
    m.default_steps_is_int = pyjson::is_int(steps);
    m.default_steps = m.default_steps_is_int ? pyjson::repr(steps) : steps.get<std::string>();  // an int's digits, of any size
    if (v.contains("eta")) {
        if (!registry::takes(m.default_sampler, "eta"))
            fail(kField + "defaults.eta is set, but the default sampler " + m.default_sampler + " takes no eta");
        m.default_eta = v["eta"].get<double>();
        m.has_default_eta = true;
    }
}

// The optional id2label (runtime/artifact/labels.py read_id2label): keys canonical decimal class labels
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

namespace {

// runtime/spec/config.py check_alphas_cumprod, on the same float64 table: ac falls monotonically from
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

}  // namespace
}  // namespace ditrt_core::reader
