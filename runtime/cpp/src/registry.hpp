// The built-in entries of the Python registries that the C++ reader needs, read from the manifest rules
// (runtime/spec/manifest_schema.json "registries", compiled in): each family's defaults and each
// sampler's family and option names. The Python registries are the source; a test holds the file
// equal to them, so no sampler list is written out here.
#pragma once

#include <string>
#include <vector>

#include "pyjson.hpp"

namespace ditrt_core::registry {

// The samplers of a family ("dit", "sit"), in registry order.
std::vector<std::string> samplers_of(const std::string& family);

// The family a sampler samples ("" for an unknown name).
std::string family_of(const std::string& sampler);

// Whether `sampler` takes the option `option` (eta, atol, ...).
bool takes(const std::string& sampler, const std::string& option);

// The samplers that take `option`, as the Python message names them: "sde-euler and sde-heun".
std::string option_takers(const std::string& option);

// A family's defaults: sampler, steps, cfg_scale, guidance.
const pyjson::Json& family_defaults(const std::string& family);

// "a, b, c": names joined as the Python messages join them.
std::string joined(const std::vector<std::string>& names, const std::string& separator = ", ");

}  // namespace ditrt_core::registry
