// Class names (the manifest's optional `id2label`, runtime/artifact/labels.py): each entry's comma-separated
// synonyms, surrounding whitespace stripped, name its class, as diffusers' DiTPipeline.get_label_ids
// reads them. A name shared by two classes is ambiguous and refused.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ditrt_core {

struct ClassNames {
    std::map<int64_t, std::string> id2label;              // class label -> its entry
    std::map<std::string, std::vector<int64_t>> by_name;  // synonym -> its labels, ascending

    void add(int64_t label, const std::string& entry);    // records the entry and indexes its synonyms
};

// The synonyms of one entry (split at commas, ASCII whitespace stripped, empty names dropped).
std::vector<std::string> label_synonyms(const std::string& entry);

// The class label `name` stands for: a decimal number (0..num_classes-1), or a synonym of exactly
// one class. Error(InvalidArgument) for an unknown or ambiguous name, or a number out of range.
int64_t label_of(const ClassNames& names, bool has_names, int64_t num_classes, const std::string& name);

}  // namespace ditrt_core
