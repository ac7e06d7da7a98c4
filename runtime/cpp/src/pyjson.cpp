#include "pyjson.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "error.hpp"

namespace ditrt_core::pyjson {
namespace {

// Values nlohmann::json cannot carry as Python does travel through its parser as strings with
// this prefix (a raw control character: no JSON text can hold it unescaped), then become numbers
// (NaN, +-inf) or stay marked (big integers, "\x01ditrt-int:<digits>").
const std::string kMark = std::string("\x01") + "ditrt-";  // (not "\x01d...": a hex escape takes every hex digit)
const std::string kNan = kMark + "nan", kInf = kMark + "inf", kNegInf = kMark + "-inf", kBigInt = kMark + "int:";

// A marker as a JSON string literal (the control character escaped, as JSON requires).
std::string marker_literal(const std::string& marker) { return "\"\\u0001" + marker.substr(1) + "\""; }
constexpr size_t kMaxIntDigits = 4300;  // Python's sys.int_info.default_max_str_digits

[[noreturn]] void fail(const std::string& why) { throw Error(Status::Artifact, "not valid JSON (" + why + ")"); }

bool is_digit(char c) { return c >= '0' && c <= '9'; }

unsigned hex4(const std::string& s, size_t at) {  // the 4 hex digits at s[at..at+3], or 0x110000 when not hex
    if (at + 4 > s.size()) return 0x110000;
    unsigned v = 0;
    for (size_t i = at; i < at + 4; ++i) {
        const char c = s[i];
        const int d = is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return 0x110000;
        v = v * 16 + unsigned(d);
    }
    return v;
}

// Copies the string literal starting at text[i] (the opening quote) to out; lone surrogate
// escapes become \ufffd. Returns the index after the closing quote (or text.size(): the parser
// reports the unterminated string).
size_t copy_string(const std::string& text, size_t i, std::string& out) {
    out += '"';
    ++i;
    while (i < text.size()) {
        const char c = text[i];
        if (c == '"') {
            out += '"';
            return i + 1;
        }
        if (c != '\\' || i + 1 >= text.size()) {
            out += c;
            ++i;
            continue;
        }
        if (text[i + 1] != 'u') {
            out.append(text, i, 2);
            i += 2;
            continue;
        }
        const unsigned u = hex4(text, i + 2);
        if (u >= 0xD800 && u <= 0xDBFF) {  // a high surrogate: paired only when a low one follows
            const bool paired = i + 12 <= text.size() && text.compare(i + 6, 2, "\\u") == 0 &&
                                hex4(text, i + 8) >= 0xDC00 && hex4(text, i + 8) <= 0xDFFF;
            if (paired) {
                out.append(text, i, 12);
                i += 12;
            } else {
                out += "\\ufffd";
                i += 6;
            }
        } else if (u >= 0xDC00 && u <= 0xDFFF) {  // a low surrogate without its high one
            out += "\\ufffd";
            i += 6;
        } else {
            out.append(text, i, 2);  // \u and the rest as they are: the parser checks the digits
            i += 2;
        }
    }
    return i;
}

// The number literal at text[i] (Python's -?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?); appends it, or
// its marker, to out. Returns the index after it; i itself when there is no number there.
size_t copy_number(const std::string& text, size_t i, std::string& out) {
    size_t j = i;
    if (j < text.size() && text[j] == '-') ++j;
    if (j >= text.size() || !is_digit(text[j])) return i;
    if (text[j] == '0') ++j;
    else
        while (j < text.size() && is_digit(text[j])) ++j;
    const size_t int_end = j;
    bool is_float = false;
    if (j + 1 < text.size() && text[j] == '.' && is_digit(text[j + 1])) {
        is_float = true;
        for (j += 1; j < text.size() && is_digit(text[j]);) ++j;
    }
    if (j + 1 < text.size() && (text[j] == 'e' || text[j] == 'E')) {
        size_t k = j + 1;
        if (k < text.size() && (text[k] == '+' || text[k] == '-')) ++k;
        if (k < text.size() && is_digit(text[k])) {
            is_float = true;
            for (j = k; j < text.size() && is_digit(text[j]);) ++j;
        }
    }
    const std::string token = text.substr(i, j - i);
    if (is_float) {
        const double v = std::strtod(token.c_str(), nullptr);  // Python's float(): +-inf past the range
        if (std::isinf(v)) out += marker_literal(v > 0 ? kInf : kNegInf);
        else out += token;
        return j;
    }
    const bool negative = token[0] == '-';
    const size_t digits = int_end - i - (negative ? 1 : 0);
    if (digits > kMaxIntDigits)
        fail("an integer literal of " + std::to_string(digits) + " digits: Python's limit for converting one is " +
             std::to_string(kMaxIntDigits));
    errno = 0;
    if (negative) {
        std::strtoll(token.c_str(), nullptr, 10);
    } else {
        std::strtoull(token.c_str(), nullptr, 10);
    }
    if (errno == ERANGE) out += marker_literal(kBigInt + token);  // beyond int64 / uint64: keep the digits
    else out += token;
    return j;
}

// The text with Python's extensions turned into markers nlohmann parses (see kMark).
std::string python_extensions(const std::string& text) {
    std::string out;
    out.reserve(text.size() + 16);
    size_t i = 0;
    while (i < text.size()) {
        const char c = text[i];
        if (c == '"') {
            i = copy_string(text, i, out);
        } else if (c == '-' || is_digit(c)) {
            if (text.compare(i, 9, "-Infinity") == 0) {
                out += marker_literal(kNegInf);
                i += 9;
                continue;
            }
            const size_t next = copy_number(text, i, out);
            if (next == i) out += text[i++];  // a lone '-': the parser reports it
            else i = next;
        } else if (text.compare(i, 3, "NaN") == 0) {
            out += marker_literal(kNan);
            i += 3;
        } else if (text.compare(i, 8, "Infinity") == 0) {
            out += marker_literal(kInf);
            i += 8;
        } else if (c == '\0') {
            fail("a NUL byte outside a string");  // nlohmann would take it for the end of the input
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
            // A word (true, false, null or garbage): copied whole, so "xNaN" stays garbage.
            while (i < text.size() && ((text[i] >= 'a' && text[i] <= 'z') || (text[i] >= 'A' && text[i] <= 'Z')))
                out += text[i++];
        } else {
            out += text[i++];
        }
    }
    return out;
}

bool is_marked(const Json& j, const std::string& mark) {
    if (!j.is_string()) return false;
    const std::string& s = j.get_ref<const std::string&>();
    return s.compare(0, mark.size(), mark) == 0;
}

bool is_bigint(const Json& j) { return is_marked(j, kBigInt); }

std::string integers(bool has_low, int64_t low, bool has_high, int64_t high) {  // validate._integers
    std::string base = !has_low ? "an integer" : low == 1 ? "a positive integer" : low == 0 ? "a non-negative integer"
                                                                                           : "an integer >= " + std::to_string(low);
    if (!has_high) return base;
    if (high >= (int64_t(1) << 31) && ((high + 1) & high) == 0) {
        int bits = 0;
        for (int64_t h = high; h; h >>= 1) ++bits;
        return base + " below 2^" + std::to_string(bits);
    }
    return has_low ? "an integer from " + std::to_string(low) + " to " + std::to_string(high)
                   : "an integer <= " + std::to_string(high);
}

std::string range_text(const Range& r) {  // validate._range
    if (r.has_low && r.has_high) return std::string(" in ") + (r.low_open ? "(" : "[") + format_g(r.low) + ", " + format_g(r.high) + "]";
    if (r.has_low) return r.low == 0 && r.low_open ? " > 0" : (r.low_open ? " > " : " >= ") + format_g(r.low);
    if (r.has_high) return " <= " + format_g(r.high);
    return "";
}

}  // namespace

Json parse(const std::string& text) {
    if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) fail("it starts with a UTF-8 byte order mark, which JSON does not allow");
    const std::string rewritten = python_extensions(text);
    const Json::parser_callback_t markers = [](int depth, Json::parse_event_t event, Json& parsed) {
        if ((event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) && depth >= kMaxDepth)
            fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
        if (event == Json::parse_event_t::value && parsed.is_string()) {
            const std::string& s = parsed.get_ref<const std::string&>();
            if (s == kNan) parsed = std::numeric_limits<double>::quiet_NaN();
            else if (s == kInf) parsed = std::numeric_limits<double>::infinity();
            else if (s == kNegInf) parsed = -std::numeric_limits<double>::infinity();
        }
        return true;
    };
    try {
        return Json::parse(rewritten, markers);
    } catch (const Json::exception& e) {
        fail(e.what());
    }
}

std::string format_g(double v) {
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, "%g", v);
    return buffer;
}

bool fits_float32(double v) { return std::abs(v) < 0x1.ffffffp127; }

bool is_str(const Json& j) { return j.is_string() && !is_marked(j, kMark); }
bool is_int(const Json& j) { return j.is_number_integer() || is_bigint(j); }
bool is_number(const Json& j) { return j.is_number() || is_bigint(j); }

bool int64_value(const Json& j, int64_t* out) {
    if (is_bigint(j)) return false;
    if (j.is_number_unsigned()) {
        const uint64_t u = j.get<uint64_t>();
        if (u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
        *out = int64_t(u);
        return true;
    }
    *out = j.get<int64_t>();
    return true;
}

bool float_value(const Json& j, double* out) {
    if (is_bigint(j)) {
        const std::string digits = j.get_ref<const std::string&>().substr(kBigInt.size());
        const double v = std::strtod(digits.c_str(), nullptr);
        if (std::isinf(v)) return false;  // OverflowError: int too large to convert to float
        *out = v;
        return true;
    }
    *out = j.get<double>();  // ints convert with round-to-nearest, as Python's float(int)
    return true;
}

bool equals_int(const Json& j, int64_t n) {
    if (j.is_boolean()) return int64_t(j.get<bool>()) == n;
    if (!is_number(j)) return false;
    int64_t v;
    if (is_int(j)) return int64_value(j, &v) && v == n;
    return j.get<double>() == double(n) && std::abs(n) < (int64_t(1) << 53);  // exact for the small n compared
}

size_t code_points(const std::string& utf8) {
    size_t n = 0;
    for (unsigned char c : utf8) n += (c & 0xC0) != 0x80;
    return n;
}

std::string repr(const Json& j) {
    if (is_bigint(j)) return j.get_ref<const std::string&>().substr(kBigInt.size());
    if (j.is_null()) return "None";
    if (j.is_boolean()) return j.get<bool>() ? "True" : "False";
    if (j.is_number_float()) {
        const double v = j.get<double>();
        if (std::isnan(v)) return "nan";
        if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
        return j.dump();
    }
    if (j.is_string()) {
        std::string s = j.dump();  // JSON escapes; Python's quotes
        if (s.find('\'') == std::string::npos) s = "'" + s.substr(1, s.size() - 2) + "'";
        return s.size() > 200 ? s.substr(0, 200) + "..." : s;
    }
    if (j.is_array() || j.is_object()) {
        std::string s = j.is_array() ? "[" : "{";
        size_t count = 0;
        for (auto it = j.begin(); it != j.end(); ++it) {
            if (count++) s += ", ";
            if (s.size() > 200) return s + "...";
            if (j.is_object()) s += repr(Json(it.key())) + ": ";
            s += repr(*it);
        }
        return s + (j.is_array() ? "]" : "}");
    }
    return j.dump();
}

int64_t check_int(const Json& j, const std::string& what, bool has_low, int64_t low, bool has_high, int64_t high) {
    const std::string wanted = what + " must be " + integers(has_low, low, has_high, high);
    if (!is_int(j)) throw Error(Status::Artifact, wanted + ", got " + repr(j));
    int64_t v;
    const bool fits = int64_value(j, &v);
    if (!fits || (has_low && v < low) || (has_high && v > high)) throw Error(Status::Artifact, wanted + ", got " + repr(j));
    return v;
}

double check_number(const Json& j, const std::string& what, const Range& r, bool float32) {
    const std::string range = range_text(r);
    if (!is_number(j)) throw Error(Status::Artifact, what + " must be a number" + range + ", got " + repr(j));
    double v;
    if (!float_value(j, &v))
        throw Error(Status::Artifact, what + " must be a finite number" + range + ", got a value beyond the float range");
    if (!std::isfinite(v) || (float32 && !fits_float32(v)))
        throw Error(Status::Artifact, what + " must be a " + (float32 ? "finite float32" : "finite") + " number" + range +
                                          ", got " + repr(j));
    if ((r.has_low && (r.low_open ? v <= r.low : v < r.low)) || (r.has_high && v > r.high))
        throw Error(Status::Artifact, what + " must be a number" + range + ", got " + repr(j));
    return v;
}

std::string check_choice(const Json& j, const std::string& what, const std::vector<std::string>& choices) {
    if (is_str(j))
        for (const auto& c : choices)
            if (j.get_ref<const std::string&>() == c) return c;
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "'" : ", '") + c + "'";
    throw Error(Status::Artifact, what + " must be one of " + list + ", got " + repr(j));
}

}  // namespace ditrt_core::pyjson
