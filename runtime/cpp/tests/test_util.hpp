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

// A tiny DiT's manifest (schema 3: 2x2 latents of 4 channels, 10 classes), no engines, a 3-byte
// fake fp32 graph; with a decoder to 3x16x16 images when `decoder`.
inline json minimal_manifest(bool decoder = false) {
    json m = json::parse(R"({
      "schema": "ditrt.manifest", "schema_version": 3,
      "model": {"family": "dit", "input_size": 2, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
                "num_heads": 4, "mlp_ratio": 4.0, "num_classes": 10, "learn_sigma": true, "out_channels": 8},
      "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                    "variance": "learned_range", "prediction": "epsilon", "clip_denoised": false},
      "guidance": {"guided_channels": {"official": 3, "standard": 4}},
      "defaults": {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "guidance": "official"},
      "networks": {"denoiser": {
          "inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, 2, 2], "role": "latent"},
                     {"name": "timestep", "dtype": "float32", "shape": ["batch"], "role": "time"},
                     {"name": "class_label", "dtype": "int64", "shape": ["batch"], "role": "condition",
                      "condition": {"kind": "class", "num_classes": 10, "null": 10}}],
          "outputs": [{"name": "model_output", "dtype": "float32", "shape": ["batch", 8, 2, 2], "role": "prediction"}],
          "batch_axis": 0, "batch_unit": "rows",
          "graphs": {"fp32": {"file": "denoiser.fp32.onnx", "files": ["denoiser.fp32.onnx"],
                              "sha256": {"denoiser.fp32.onnx": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}}}},
      "engines": []
    })");
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
