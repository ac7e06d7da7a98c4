#include "registry.hpp"

#include "schema.hpp"

namespace ditrt_core::registry {
namespace {

const pyjson::Json& samplers() { return schema::rules()["registries"]["samplers"]; }

}  // namespace

std::vector<std::string> samplers_of(const std::string& family) {
    std::vector<std::string> names;
    for (auto it = samplers().begin(); it != samplers().end(); ++it)
        if ((*it)["family"] == family) names.push_back(it.key());
    return names;
}

std::string family_of(const std::string& sampler) {
    return samplers().contains(sampler) ? samplers()[sampler]["family"].get<std::string>() : std::string();
}

bool takes(const std::string& sampler, const std::string& option) {
    if (!samplers().contains(sampler)) return false;
    for (const auto& name : samplers()[sampler]["options"])
        if (name == option) return true;
    return false;
}

std::string option_takers(const std::string& option) {
    std::vector<std::string> names;
    for (auto it = samplers().begin(); it != samplers().end(); ++it)
        if (takes(it.key(), option)) names.push_back(it.key());
    return names.empty() ? "no sampler" : joined(names, " and ");
}

const pyjson::Json& family_defaults(const std::string& family) {
    return schema::rules()["registries"]["families"][family]["defaults"];
}

std::string joined(const std::vector<std::string>& names, const std::string& separator) {
    std::string out;
    for (size_t i = 0; i < names.size(); ++i) out += (i ? separator : "") + names[i];
    return out;
}

}  // namespace ditrt_core::registry
