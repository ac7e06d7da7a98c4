#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "error.hpp"
#include "manifest.hpp"
#include "test_util.hpp"

using testutil::json;

namespace {

// The message of the Error parsing this manifest raises ("" when it parses).
std::string error_of(const json& manifest, ditrt_core::Status want = ditrt_core::Status::Artifact) {
    try {
        ditrt_core::parse_manifest(manifest.dump(), ".");
    } catch (const ditrt_core::Error& e) {
        EXPECT_EQ(e.status(), want) << e.what();
        return e.what();
    }
    return "";
}

std::string with(const std::function<void(json&)>& edit, ditrt_core::Status want = ditrt_core::Status::Artifact) {
    json m = testutil::minimal_manifest();
    edit(m);
    return error_of(m, want);
}

#define EXPECT_MENTIONS(message, text) EXPECT_NE((message).find(text), std::string::npos) << "message: " << (message)

}  // namespace

TEST(Manifest, ReadsTheFieldsItUses) {
    const auto m = ditrt_core::parse_manifest(testutil::minimal_manifest().dump(), "/art");
    EXPECT_EQ(m.in_channels, 4);
    EXPECT_EQ(m.out_channels, 8);
    EXPECT_EQ(m.null_class, 10);
    EXPECT_EQ(m.guided_channels.at("official"), 3);
    EXPECT_EQ(m.default_steps, "250");
    EXPECT_EQ(m.default_cfg_scale, 4.0);
    EXPECT_EQ(m.graph("denoiser", "fp32").file, "denoiser.fp32.onnx");
    EXPECT_TRUE(m.learned_variance());
    EXPECT_EQ(m.base_betas().size(), 1000u);
}

TEST(Manifest, SchemaAndVersionAreChecked) {
    EXPECT_MENTIONS(with([](json& m) { m["schema"] = "other"; }), "schema must be \"ditrt.manifest\"");
    EXPECT_MENTIONS(with([](json& m) { m.erase("schema"); }), "schema must be");
    for (json v : {json(1), json(3), json(true), json(2.0), json("2")})
        EXPECT_MENTIONS(with([&](json& m) { m["schema_version"] = v; }), "schema_version is " + v.dump());
    EXPECT_MENTIONS(error_of(json::array()), "not a ditrt manifest");
    try {
        ditrt_core::parse_manifest("{not json", ".");
        FAIL();
    } catch (const ditrt_core::Error& e) {
        EXPECT_MENTIONS(std::string(e.what()), "not valid JSON");
    }
}

TEST(Manifest, ErrorsNameTheField) {
    EXPECT_MENTIONS(with([](json& m) { m["model"].erase("in_channels"); }), "missing field model.in_channels");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["num_classes"] = "10"; }), "model.num_classes must be an integer");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["beta_end"] = "x"; }), "diffusion.beta_end must be a finite number");
    EXPECT_MENTIONS(with([](json& m) { m.erase("defaults"); }), "missing field defaults.sampler");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["guidance"] = "none"; }), "defaults.guidance");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["steps"] = "ddim300"; }, ditrt_core::Status::Schedule), "no integer stride");
    EXPECT_MENTIONS(with([](json& m) { m["networks"].erase("denoiser"); }), "networks.denoiser");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["graphs"]["fp32"]["sha256"] = json::object(); }),
                    "networks.denoiser.graphs.fp32.sha256 lacks the digest");
}

TEST(Manifest, ReaderRules) {
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["null_class"] = 9; }), "diffusion.null_class (9) must equal model.num_classes");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["guided_channels"]["official"] = 0; }), "diffusion.guided_channels.official");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["guided_channels"]["standard"] = 5; }), "diffusion.guided_channels.standard = 5");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["out_channels"] = 4; }), "needs model.out_channels == 2 * model.in_channels");
    EXPECT_EQ(with([](json& m) { m["model"]["out_channels"] = 4; m["diffusion"]["variance"] = "fixed_large"; }), "");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["beta_schedule"] = "cosine"; }), "diffusion.beta_schedule is \"cosine\"");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["prediction"] = "v"; }), "diffusion.prediction is \"v\"");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["variance"] = "learned"; }), "diffusion.variance is \"learned\"");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["clip_denoised"] = true; }), "diffusion.clip_denoised is true");
}

TEST(Manifest, FilesMustStayInsideTheArtifact) {
    auto graph_file = [](const std::string& f) {
        return with([&](json& m) {
            auto& g = m["networks"]["denoiser"]["graphs"]["fp32"];
            g["file"] = f;
            g["files"] = {f};
            g["sha256"] = {{f, "00"}};
        });
    };
    EXPECT_MENTIONS(graph_file("/etc/passwd"), "must be a relative path");
    EXPECT_MENTIONS(graph_file("../other/denoiser.onnx"), "must not contain '..'");
    EXPECT_MENTIONS(graph_file("sub/../../x.onnx"), "must not contain '..'");
    EXPECT_MENTIONS(with([](json& m) { m["engines"] = {{{"file", "/abs.plan"}}}; }), "engines[0].file");

    namespace fs = std::filesystem;
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "symlink");
    fs::remove(fs::path(dir) / "denoiser.fp32.onnx");
    fs::create_symlink("/etc/hostname", fs::path(dir) / "denoiser.fp32.onnx");
    try {
        ditrt_core::load_manifest(dir);
        ADD_FAILURE() << "a symbolic link out of the artifact was accepted";
    } catch (const ditrt_core::Error& e) {
        EXPECT_MENTIONS(std::string(e.what()), "leads out of the artifact directory");
    }
    fs::remove_all(dir);
}

TEST(Manifest, LoadAndVerifyFiles) {
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "verify");
    const auto m = ditrt_core::load_manifest(dir);
    EXPECT_NO_THROW(ditrt_core::verify_graph(m, m.graph("denoiser", "fp32")));
    std::ofstream(m.path("denoiser.fp32.onnx")) << "abd";
    EXPECT_THROW(ditrt_core::verify_graph(m, m.graph("denoiser", "fp32")), ditrt_core::Error);
    std::filesystem::remove(m.path("denoiser.fp32.onnx"));
    try {
        ditrt_core::verify_graph(m, m.graph("denoiser", "fp32"));
        ADD_FAILURE();
    } catch (const ditrt_core::Error& e) {
        EXPECT_MENTIONS(std::string(e.what()), "listed in the manifest but missing");
    }
    EXPECT_THROW(m.graph("denoiser", "fp16"), ditrt_core::Error);
    EXPECT_THROW(ditrt_core::load_manifest(dir + "/nowhere"), ditrt_core::Error);
    std::filesystem::remove_all(dir);
}
