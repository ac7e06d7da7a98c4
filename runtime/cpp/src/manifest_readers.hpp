// The manifest reader's parts, split along the Python reader's seams (internal to the library;
// sampler.cpp and c_api.cpp use manifest.hpp only):
//   manifest.cpp      runtime/artifact/manifest.py: the file, the schema 1/2 upgrades, engines, the graph lookups
//   config.cpp        runtime/spec/config.py, labels.py: model, diffusion / transport, guidance, defaults, id2label
//   networks.cpp      runtime/spec/networks.py, conditioning.py, files.py: tensors, networks, segments, graphs
//   quantization.cpp  runtime/spec/quantization.py: a quantized graph's recipe
//   schema.cpp        runtime/spec/schema.py: the value rules of runtime/spec/manifest_schema.json
#pragma once

#include <cstdint>
#include <string>

#include "manifest.hpp"
#include "pyjson.hpp"

namespace ditrt_core::reader {

using pyjson::Json;

inline const std::string kField = "manifest field ";

[[noreturn]] void fail(const std::string& message);  // Error(Status::Artifact, message)
const Json& get(const Json& d, const std::string& key);  // d.get(key): null when missing
std::string quoted(const std::string& s);                // Python's repr of a str
const Json& section(const Json& data, const std::string& name);  // config._section
int64_t check_int(const Json& j, const std::string& what, int64_t low, int64_t high);

// config.cpp, in this order: the model decides the family, whose process section is read.
void read_model(const Json& data, Manifest& m);
void read_diffusion(const Json& data, Manifest& m);
void read_transport(const Json& data);
void read_guidance(const Json& data, Manifest& m);
void read_defaults(const Json& data, Manifest& m);
void read_labels(const Json& data, Manifest& m);

// networks.cpp
void read_networks(const Json& data, Manifest& m);
// runtime/core/files.py artifact_path: directory / name for a file the manifest names, refused naming `field`.
std::string confined(const std::string& directory, const Json& name, const std::string& field);

// quantization.cpp: the recipe of the graph at `where` (networks.<name>.graphs.<precision>).
void read_quantization(const Json& graph, const std::string& precision, const std::string& where);

}  // namespace ditrt_core::reader
