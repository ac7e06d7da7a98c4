#include "labels.hpp"

#include <cstring>

#include "error.hpp"

namespace ditrt_core {
namespace {

std::string strip(const std::string& s) {
    const char* space = " \t\n\r\v\f";
    const size_t first = s.find_first_not_of(space);
    if (first == std::string::npos) return "";
    return s.substr(first, s.find_last_not_of(space) - first + 1);
}

[[noreturn]] void refuse(const std::string& message) { throw Error(Status::InvalidArgument, message); }

}  // namespace

std::vector<std::string> label_synonyms(const std::string& entry) {
    std::vector<std::string> out;
    size_t start = 0;
    while (true) {
        const size_t comma = entry.find(',', start);
        const std::string name = strip(entry.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (!name.empty()) out.push_back(name);
        if (comma == std::string::npos) return out;
        start = comma + 1;
    }
}

void ClassNames::add(int64_t label, const std::string& entry) {
    id2label[label] = entry;
    for (const auto& name : label_synonyms(entry)) {
        auto& labels = by_name[name];
        if (labels.empty() || labels.back() != label) labels.push_back(label);
    }
}

int64_t label_of(const ClassNames& names, bool has_names, int64_t num_classes, const std::string& name) {
    const std::string item = strip(name);
    const size_t sign = !item.empty() && (item[0] == '+' || item[0] == '-');
    if (item.size() > sign && std::strspn(item.c_str() + sign, "0123456789") == item.size() - sign) {
        const std::string digits = item.substr(sign);
        const size_t nonzero = digits.find_first_not_of('0');
        const bool negative = item[0] == '-' && nonzero != std::string::npos;
        if (negative || (nonzero != std::string::npos && digits.size() - nonzero > 18) ||
            std::stoll(digits) >= num_classes)
            refuse("class label " + item + " out of range: this model has classes 0.." + std::to_string(num_classes - 1));
        return std::stoll(digits);
    }
    if (!has_names)
        refuse("class name '" + item + "' given, but this artifact has no class names (its manifest has no id2label); "
               "give class numbers");
    // The names are sorted (std::map), so the ambiguous one is rebuilt ordered as Python lists it.
    auto it = names.by_name.find(item);
    if (it == names.by_name.end()) refuse("unknown class name '" + item + "' (or give the class number)");
    if (it->second.size() > 1) {
        std::string entries;
        for (int64_t label : it->second)
            entries += (entries.empty() ? "" : "; ") + std::to_string(label) + " ('" + names.id2label.at(label) + "')";
        refuse("class name '" + item + "' is ambiguous: it names classes " + entries + "; give the class number");
    }
    return it->second.front();
}

}  // namespace ditrt_core
