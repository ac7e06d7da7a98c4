// Test helpers: the Python runtime's values (written by tests/test_cpp_runtime.py) and a minimal
// schema-3 manifest.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>

namespace testutil {

using nlohmann::json;

// The JSON of Python values, or null (tests that need it skip) when DITRT_TEST_VALUES is unset.
inline const json& python_values() {
    static const json values = [] {
        const char* path = std::getenv("DITRT_TEST_VALUES");
        if (!path) return json();
        std::ifstream f(path);
        return json::parse(f);
    }();
    return values;
}

#define REQUIRE_PYTHON_VALUES()                                                                  \
    if (testutil::python_values().is_null())                                                     \
        GTEST_SKIP() << "DITRT_TEST_VALUES unset: run through tests/test_cpp_runtime.py";

inline const char* kDigest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";  // sha256("abc")

// A tiny DiT's manifest: tests/data/toy_dit_manifest.json (schema 3: 2x2 latents of 4 channels,
// 10 classes, no engines, a 3-byte fake fp32 graph), which tests/test_cpp_runtime.py reads too;
// with a decoder to 3x16x16 images when `decoder`.
inline json minimal_manifest(bool decoder = false) {
    static const json base = [] {
        std::ifstream f(DITRT_TOY_MANIFEST);
        return json::parse(f);
    }();
    json m = base;
    if (decoder)
        m["networks"]["decoder"] = json::parse(R"({
          "inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, 2, 2], "role": "latent"}],
          "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16], "role": "image"}],
          "batch_axis": 0, "batch_unit": "images", "scaling_factor": 0.18215,
          "graphs": {"fp32": {"file": "decoder.fp32.onnx", "files": ["decoder.fp32.onnx"],
                              "sha256": {"decoder.fp32.onnx": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}}})");
    return m;
}

// A fresh directory holding this manifest and the fake graphs ("abc").
inline std::string write_artifact(const json& manifest, const std::string& name) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("ditrt_test_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream(dir / "manifest.json") << manifest.dump(2);
    std::ofstream(dir / "denoiser.fp32.onnx") << "abc";
    std::ofstream(dir / "decoder.fp32.onnx") << "abc";
    return dir.string();
}

}  // namespace testutil
