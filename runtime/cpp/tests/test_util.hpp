// Test helpers: the Python runtime's values (written by tests/test_cpp_runtime.py) and a minimal
// schema-2 manifest.
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

// The tiny golden model's manifest, schema 2, with no engines and a 3-byte fake fp32 graph.
inline json minimal_manifest() {
    return json::parse(R"({
      "schema": "ditrt.manifest", "schema_version": 2,
      "model": {"input_size": 2, "in_channels": 4, "out_channels": 8, "num_classes": 10},
      "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                    "prediction": "epsilon", "variance": "learned_range", "clip_denoised": false, "null_class": 10,
                    "guided_channels": {"official": 3, "standard": 4}},
      "defaults": {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "guidance": "official"},
      "networks": {"denoiser": {"graphs": {"fp32": {"file": "denoiser.fp32.onnx", "files": ["denoiser.fp32.onnx"],
          "sha256": {"denoiser.fp32.onnx": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}}}},
      "engines": []
    })");
}

// A fresh directory holding this manifest and the fake graph ("abc").
inline std::string write_artifact(const json& manifest, const std::string& name) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("ditrt_test_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream(dir / "manifest.json") << manifest.dump(2);
    std::ofstream(dir / "denoiser.fp32.onnx") << "abc";
    return dir.string();
}

}  // namespace testutil
