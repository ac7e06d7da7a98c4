// JSON as the Python runtime reads it (json.loads), and the checks of runtime/core/validate.py over it.
//
// One contract, two readers: a manifest the Python runtime accepts must be accepted here and one
// it refuses refused, so the parse follows Python's json module where it is more lenient than
// RFC 8259 or than nlohmann::json:
//   - NaN, Infinity and -Infinity literals are numbers (they fail every numeric check, as in Python);
//   - a float literal beyond the double range is +-inf, not an error;
//   - an integer literal of any size is an integer (kept as its digits beyond int64/uint64:
//     a range check refuses it, a type check accepts it, as Python's int);
//   - an escaped lone surrogate (\ud800) is a string character (read as U+FFFD);
// and where it is stricter: a UTF-8 byte order mark is refused (json.loads raises on it), as is an
// integer literal of more than 4300 digits (Python's int conversion limit). Nesting deeper than
// kMaxDepth is refused (Python refuses from about 1000 levels, its recursion limit; nothing
// between the two occurs in a manifest).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ditrt_core::pyjson {

using Json = nlohmann::ordered_json;  // insertion order, duplicate keys: the last wins (as Python's dict)

inline constexpr int kMaxDepth = 800;

// Parses `text` (UTF-8 bytes); throws Error(Status::Artifact, reason) when Python's json.loads
// would raise.
Json parse(const std::string& text);

// Types as Python sees the parsed value.
bool is_str(const Json& j);     // a str (not one of the parse's internal markers)
bool is_int(const Json& j);     // an int of any size (not a bool)
bool is_number(const Json& j);  // an int or a float (not a bool)

// The value of an int that fits int64; false for bigger ints (is_int(j) required).
bool int64_value(const Json& j, int64_t* out);
// float(value) of a number; false when Python's float() would overflow (an int beyond 1.8e308).
bool float_value(const Json& j, double* out);
// Python's value == n for an int n: ints, floats and bools compare by value, nothing else equals.
bool equals_int(const Json& j, int64_t n);
// float(v) is finite: |v| below FLT_MAX + half an ulp (numpy's float32(v) rounds to nearest).
bool fits_float32(double v);
// The number of Unicode code points of a str (Python's len()).
size_t code_points(const std::string& utf8);
// An approximation of Python's repr(value), for messages.
std::string repr(const Json& j);
// Python's f"{v:g}", for messages.
std::string format_g(double v);

// The checks of runtime/core/validate.py (check_int, check_number, check_choice), with its messages;
// `what` names the field ("manifest field model.input_size"). They throw Error(status, message).
struct Range {
    bool has_low = false, has_high = false, low_open = false;
    double low = 0, high = 0;
};
int64_t check_int(const Json& j, const std::string& what, bool has_low, int64_t low, bool has_high, int64_t high);
double check_number(const Json& j, const std::string& what, const Range& range, bool float32 = false);
std::string check_choice(const Json& j, const std::string& what, const std::vector<std::string>& choices);

}  // namespace ditrt_core::pyjson
