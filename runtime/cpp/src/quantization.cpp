// runtime/spec/quantization.py read_quant_recipe: an int8 / fp8 graph carries its recipe, checked by
// manifest_schema.json's quantization and calibration rules (schema.cpp); its presence and the
// precision it must name stay here.
#include "manifest_readers.hpp"
#include "schema.hpp"

namespace ditrt_core::reader {

void read_quantization(const Json& graph, const std::string& precision, const std::string& graph_where) {
    const Json& recipe = get(graph, "quantization");
    if (!recipe.is_object())
        fail(kField + graph_where + ".quantization must be an object (the recipe): a " + precision +
             " graph without its recipe cannot be trusted; re-export it with --precision " + precision);
    schema::Context context;
    context.choices["the graph's precision"] = {precision};
    schema::check_object("quantization", recipe, graph_where + ".quantization", context);
}

}  // namespace ditrt_core::reader
