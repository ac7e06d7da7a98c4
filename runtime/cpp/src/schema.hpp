// The manifest's value rules as data: runtime/spec/manifest_schema.json, compiled into the library
// (CMake embeds it in manifest_schema_text.hpp: a service needs no extra file), and this
// interpreter of it. The Python reader interprets the same file (runtime/spec/schema.py) with the same
// messages: per object its fields (type, range, choices, default, what a missing one means) and
// the rules between fields (ordered, needs, equal); what cannot be data stays in the readers.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "pyjson.hpp"

namespace ditrt_core::schema {

using pyjson::Json;

// What a rule refers to outside its object (runtime/spec/schema.py Context).
struct Context {
    std::map<std::string, Json> refs;                        // "model.in_channels" -> its value
    std::map<std::string, std::vector<std::string>> choices;  // a values_from name -> the allowed strings
    std::map<std::string, Json> defaults;                    // the family's values of default_from fields
};

// The parsed rules (the embedded manifest_schema.json).
const Json& rules();

// The fields of `data` (an object) by the rules of object `name` at `where` (a dotted path),
// then its checks; field -> value (ints as int64, numbers as double), defaults filled in.
// Throws Error(Status::Artifact) with the message runtime/spec/schema.py gives.
Json check_object(const std::string& name, const Json& data, const std::string& where, const Context& context = {});

}  // namespace ditrt_core::schema
