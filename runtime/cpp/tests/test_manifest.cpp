// The manifest reader: the fields it reads, its rules and messages, the schema upgrades and
// Python's JSON. (tests/test_cpp_runtime.py checks that thousands of mutated manifests get the
// Python reader's verdict.)
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "error.hpp"
#include "manifest.hpp"
#include "pyjson.hpp"
#include "schema.hpp"
#include "test_util.hpp"

using testutil::json;

namespace {

// The message of the Error parsing this manifest raises ("" when it parses).
std::string error_of_text(const std::string& text, ditrt_core::Status want = ditrt_core::Status::Artifact) {
    try {
        ditrt_core::parse_manifest(text, ".");
    } catch (const ditrt_core::Error& e) {
        EXPECT_EQ(e.status(), want) << e.what();
        return e.what();
    }
    return "";
}

std::string with(const std::function<void(json&)>& edit, bool decoder = false) {
    json m = testutil::minimal_manifest(decoder);
    edit(m);
    return error_of_text(m.dump());
}

#define EXPECT_MENTIONS(message, text) EXPECT_NE((message).find(text), std::string::npos) << "message: " << (message)

}  // namespace

TEST(Manifest, ReadsTheFieldsItUses) {
    const auto m = ditrt_core::parse_manifest(testutil::minimal_manifest(true).dump(), "/art");
    EXPECT_EQ(m.in_channels, 4);
    EXPECT_EQ(m.out_channels, 8);
    EXPECT_EQ(m.null_class(), 10);
    EXPECT_EQ(*m.guided("official"), 3);
    EXPECT_EQ(m.guided("none"), nullptr);
    EXPECT_EQ(m.default_steps, "250");
    EXPECT_TRUE(m.default_steps_is_int);
    EXPECT_EQ(m.default_cfg_scale, 4.0);
    EXPECT_EQ(m.graph("denoiser", "fp32").file, "denoiser.fp32.onnx");
    EXPECT_TRUE(m.learned_variance());
    EXPECT_EQ(m.base_betas().size(), 1000u);
    const auto& d = m.denoiser();
    EXPECT_EQ(d.input_with_role("condition")->name, "class_label");
    EXPECT_EQ(d.input_with_role("condition")->condition.num_classes, 10);
    EXPECT_EQ(m.network("decoder")->scaling_factor, 0.18215);
    EXPECT_EQ(m.network("decoder")->outputs[0].shape, (std::vector<int64_t>{-1, 3, 16, 16}));
}

TEST(Manifest, DefaultsAreTheFamilysWhenAbsent) {
    json j = testutil::minimal_manifest();
    j.erase("defaults");
    const auto m = ditrt_core::parse_manifest(j.dump(), ".");
    EXPECT_EQ(m.default_sampler, "ddpm");
    EXPECT_EQ(m.default_steps, "250");
    EXPECT_EQ(m.default_cfg_scale, 4.0);
    EXPECT_EQ(m.default_guidance, "official");
    EXPECT_FALSE(m.has_default_eta);
}

TEST(Manifest, SchemaAndVersionAreChecked) {
    EXPECT_MENTIONS(with([](json& m) { m["schema"] = "other"; }), "not a ditrt manifest");
    EXPECT_MENTIONS(with([](json& m) { m.erase("schema"); }), "not a ditrt manifest");
    for (json v : {json(4), json(0), json(true), json(3.0), json("3")})
        EXPECT_MENTIONS(with([&](json& m) { m["schema_version"] = v; }), "this ditrt reads versions 1 to 3");
    EXPECT_MENTIONS(error_of_text("[]"), "not a ditrt manifest");
    EXPECT_MENTIONS(error_of_text("{not json"), "not valid JSON");
}

TEST(Manifest, ErrorsNameTheField) {
    EXPECT_MENTIONS(with([](json& m) { m["model"].erase("in_channels"); }), "manifest field model.in_channels is missing");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["num_classes"] = "10"; }),
                    "manifest field model.num_classes must be an integer from 1 to 1048576, got '10'");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["input_size"] = int64_t(1) << 31; }),
                    "model.input_size must be an integer from 1 to 1048576, got 2147483648");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["beta_end"] = "x"; }), "diffusion.beta_end must be a number > 0");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["num_train_timesteps"] = 1000000; }),
                    "diffusion.num_train_timesteps must be an integer from 2 to 100000, got 1000000");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["guidance"] = "none"; }), "defaults.guidance must be one of 'official', 'standard'");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["cfg_scale"] = 1e39; }), "defaults.cfg_scale must be a finite float32 number");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["eta"] = 0.5; }), "defaults.eta is set, but the default sampler ddpm takes no eta");
    EXPECT_MENTIONS(with([](json& m) { m["defaults"]["seed"] = 1; }), "defaults has unknown keys ['seed']");
    EXPECT_MENTIONS(with([](json& m) { m["networks"].erase("denoiser"); }), "networks must be an object with at least a denoiser");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["graphs"]["fp32"]["sha256"] = json::object(); }),
                    "networks.denoiser.graphs.fp32.sha256 must map every file");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["graphs"]["fp32"]["sha256"]["denoiser.fp32.onnx"] = "00"; }),
                    "is not a sha256 hex digest");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["inputs"][2]["condition"]["kind"] = "text"; }),
                    "condition.kind is 'text'; this runtime knows the conditioning kinds class");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["outputs"][0]["shape"][1] = 4; }),
                    "networks.denoiser inputs/outputs");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["decoder"]["scaling_factor"] = 0; }, true),
                    "networks.decoder.scaling_factor must be a number in (0, 1000]");
    EXPECT_EQ(with([](json& m) { m["defaults"]["steps"] = "ddim300"; }), "");  // checked when sampling, as Python
}

// The tiny DiT's manifest as a SiT one: transport, the velocity channels, SiT's defaults.
static void to_sit(json& m) {
    m["model"]["family"] = "sit";
    m["model"]["out_channels"] = 4;
    m.erase("diffusion");
    m["transport"] = {{"path_type", "Linear"}, {"prediction", "velocity"}, {"train_eps", 0.0}, {"sample_eps", 0.0}};
    m["networks"]["denoiser"]["outputs"][0]["shape"][1] = 4;
    m["defaults"] = {{"sampler", "sde-euler"}, {"steps", 250}, {"cfg_scale", 1.5}, {"guidance", "official"}};
}

TEST(Manifest, SitArtifactsAreReadWithTheTransport) {
    EXPECT_EQ(with(to_sit), "");
    EXPECT_EQ(with([](json& m) { to_sit(m); m["diffusion"] = "the other family's section: not read"; }), "");
    EXPECT_EQ(with([](json& m) { to_sit(m); m.erase("defaults"); }), "");  // SiT's defaults
    EXPECT_MENTIONS(with([](json& m) { m["model"]["family"] = "sit"; }), "manifest field model.out_channels is 8, but a sit");
    EXPECT_MENTIONS(with([](json& m) { to_sit(m); m["transport"]["path_type"] = "VP"; }), "only the Linear path is implemented");
    EXPECT_MENTIONS(with([](json& m) { to_sit(m); m["transport"]["prediction"] = "score"; }), "only velocity prediction");
    EXPECT_MENTIONS(with([](json& m) { to_sit(m); m["transport"]["train_eps"] = 0.1; }), "transport.train_eps");
    EXPECT_MENTIONS(with([](json& m) { to_sit(m); m["defaults"]["sampler"] = "ddim"; }), "defaults.sampler must be one of 'ode-euler'");
    EXPECT_MENTIONS(with([](json& m) { to_sit(m); m["defaults"]["eta"] = 0.0; }), "defaults.eta is set");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["family"] = "flux"; }), "unknown model family 'flux'");
    const ditrt_core::Manifest sit = ditrt_core::parse_manifest([] { json m = testutil::minimal_manifest(); to_sit(m); return m.dump(); }(), "/tmp");
    EXPECT_TRUE(sit.is_sit());
    EXPECT_EQ(sit.default_sampler, "sde-euler");
    EXPECT_EQ(sit.default_cfg_scale, 1.5);
    EXPECT_EQ(sit.out_channels, 4);
}

TEST(Manifest, ReaderRules) {
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["inputs"][2]["condition"]["null"] = 9; }),
                    "condition.null is 9, but it must equal num_classes = 10");
    EXPECT_MENTIONS(with([](json& m) { m["guidance"]["guided_channels"]["official"] = 0; }), "guidance.guided_channels.official");
    EXPECT_MENTIONS(with([](json& m) { m["guidance"]["guided_channels"]["standard"] = 5; }),
                    "guidance.guided_channels.standard must be an integer from 1 to 4, got 5");
    EXPECT_MENTIONS(with([](json& m) { m["model"]["out_channels"] = 4; }), "model.out_channels is 4");
    EXPECT_EQ(with([](json& m) { m["model"]["out_channels"] = 8.0; }), "");  // Python: 8.0 == 8
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["beta_schedule"] = "cosine"; }), "diffusion.beta_schedule must be one of 'linear'");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["prediction"] = "v"; }), "diffusion.prediction must be one of 'epsilon'");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["variance"] = "learned"; }), "diffusion.variance must be one of");
    EXPECT_MENTIONS(with([](json& m) { m["diffusion"]["clip_denoised"] = true; }), "diffusion.clip_denoised is True");
    EXPECT_EQ(with([](json& m) { m["diffusion"].erase("clip_denoised"); m["diffusion"].erase("prediction"); }), "");
    EXPECT_MENTIONS(with([](json& m) { m["networks"]["denoiser"]["batch_axis"] = 1; }), "batch_axis must be 0");
    EXPECT_EQ(with([](json& m) { m["networks"]["denoiser"]["batch_axis"] = false; }), "");  // Python: False == 0
    EXPECT_MENTIONS(with([](json& m) { m["engines"] = json::object(); }), "engines must be a list");
    EXPECT_EQ(with([](json& m) { m["engines"] = {{{"file", "/abs.plan"}}, 3}; }), "");  // entries are read when used
}

TEST(Manifest, PythonsJsonIsTheContract) {
    using ditrt_core::pyjson::parse;
    EXPECT_TRUE(std::isnan(parse("NaN").get<double>()));
    EXPECT_EQ(parse("[Infinity, -Infinity]")[1].get<double>(), -INFINITY);
    EXPECT_TRUE(std::isinf(parse("1e400").get<double>()));
    EXPECT_TRUE(ditrt_core::pyjson::is_int(parse("123456789012345678901234567890")));
    EXPECT_FALSE(ditrt_core::pyjson::is_str(parse("123456789012345678901234567890")));
    EXPECT_EQ(parse("\"\\ud800x\"").get<std::string>(), "\xEF\xBF\xBDx");  // a lone surrogate is a character
    EXPECT_EQ(parse("{\"a\": 1, \"a\": 2}")["a"], 2);                        // the last duplicate wins
    EXPECT_MENTIONS(error_of_text("\xEF\xBB\xBF{}"), "byte order mark");
    EXPECT_MENTIONS(error_of_text(std::string(5000, '[') + std::string(5000, ']')), "nested deeper than");
    EXPECT_MENTIONS(error_of_text("[" + std::string(4301, '7') + "]"), "4300");
    EXPECT_MENTIONS(error_of_text("NaNx"), "not valid JSON");
    EXPECT_MENTIONS(error_of_text(testutil::minimal_manifest().dump() + std::string("\0 x", 3)), "NUL byte");  // Python: extra data
    // Where Python's reader accepts a NaN (a field it does not read), so does this one; where it
    // checks a number, NaN fails the check.
    json m = testutil::minimal_manifest();
    std::string text = m.dump();
    text.insert(text.size() - 1, ", \"created_utc\": NaN, \"parameters\": 1" + std::string(40, '0'));
    EXPECT_EQ(error_of_text(text), "");
    text = m.dump();
    text.replace(text.find("\"cfg_scale\":4.0"), 15, "\"cfg_scale\":NaN");
    EXPECT_MENTIONS(error_of_text(text), "defaults.cfg_scale must be a finite float32 number, got nan");
    text = m.dump();
    text.replace(text.find("\"steps\":250"), 11, "\"steps\":1" + std::string(30, '0'));
    EXPECT_EQ(error_of_text(text), "");  // an int of any size is an int (sampling refuses it)
}

TEST(Manifest, OlderSchemasAreUpgradedInMemory) {
    json v2 = testutil::minimal_manifest();
    v2["schema_version"] = 2;
    v2["model"].erase("family");
    v2["diffusion"]["null_class"] = 10;
    v2["diffusion"]["guided_channels"] = v2["guidance"]["guided_channels"];
    v2.erase("guidance");
    for (auto& t : v2["networks"]["denoiser"]["inputs"]) t.erase("role"), t.erase("condition");
    v2["networks"]["denoiser"]["outputs"][0].erase("role");
    const auto m = ditrt_core::parse_manifest(v2.dump(), ".");
    EXPECT_EQ(m.schema_version_read, 2);
    EXPECT_EQ(m.denoiser().input_with_role("condition")->name, "class_label");
    EXPECT_EQ(*m.guided("standard"), 4);
    v2["diffusion"]["null_class"] = 9;
    EXPECT_MENTIONS(error_of_text(v2.dump()), "condition.null is 9");
    v2["diffusion"].erase("null_class");
    EXPECT_MENTIONS(error_of_text(v2.dump()), "schema 2 manifest lacks a required field or has a bad one (KeyError: 'null_class')");
}

TEST(Manifest, FilesMustStayInsideTheArtifact) {
    auto graph_file = [](const std::string& f) {
        return with([&](json& m) {
            auto& g = m["networks"]["denoiser"]["graphs"]["fp32"];
            g["file"] = f;
            g["sha256"] = {{f, testutil::kDigest}};
        });
    };
    EXPECT_MENTIONS(graph_file("/etc/passwd"), "points outside the artifact");
    EXPECT_MENTIONS(graph_file("../other/denoiser.onnx"), "points outside the artifact");
    EXPECT_MENTIONS(graph_file("sub/../../x.onnx"), "points outside the artifact");
    EXPECT_MENTIONS(graph_file("a\\b"), "must be a file name inside the artifact");
    EXPECT_EQ(graph_file("sub/./x.onnx"), "");

    namespace fs = std::filesystem;
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "symlink");
    fs::remove(fs::path(dir) / "denoiser.fp32.onnx");
    fs::create_symlink("/etc/hostname", fs::path(dir) / "denoiser.fp32.onnx");
    try {
        ditrt_core::load_manifest(dir);
        ADD_FAILURE() << "a symbolic link out of the artifact was accepted";
    } catch (const ditrt_core::Error& e) {
        EXPECT_MENTIONS(std::string(e.what()), "resolves outside the artifact");
    }
    fs::remove_all(dir);
}

TEST(Manifest, NonRegularManifestFilesAreRefusedBeforeReading) {
    namespace fs = std::filesystem;
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "fifo");
    const std::string path = dir + "/manifest.json";
    fs::remove(path);
    ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
    EXPECT_THROW(ditrt_core::load_manifest(dir), ditrt_core::Error);  // returns: never opened for reading
    fs::remove(path);
    fs::create_symlink("/dev/zero", path);
    try {
        ditrt_core::load_manifest(dir);
        ADD_FAILURE();
    } catch (const ditrt_core::Error& e) {
        EXPECT_MENTIONS(std::string(e.what()), "not a regular file");
    }
    fs::remove_all(dir);
}

TEST(Manifest, LoadAndVerifyFiles) {
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "verify");
    const auto m = ditrt_core::load_manifest(dir);
    EXPECT_NO_THROW(ditrt_core::verify_graph(m, m.graph("denoiser", "fp32")));
    std::ofstream(dir + "/denoiser.fp32.onnx") << "abd";
    EXPECT_THROW(ditrt_core::verify_graph(m, m.graph("denoiser", "fp32")), ditrt_core::Error);
    std::filesystem::remove(dir + "/denoiser.fp32.onnx");
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

// The rules compiled into the library are runtime/spec/manifest_schema.json, the Python package's file.
TEST(Schema, TheEmbeddedRulesAreThePackagesFile) {
    std::ifstream in(DITRT_SCHEMA_FILE);
    ASSERT_TRUE(in) << DITRT_SCHEMA_FILE;
    std::stringstream text;
    text << in.rdbuf();
    EXPECT_EQ(ditrt_core::schema::rules().dump(), ditrt_core::pyjson::parse(text.str()).dump());
    EXPECT_EQ(ditrt_core::schema::rules()["objects"]["model"]["fields"]["input_size"]["max"], 1 << 20);
}

// A rule between fields, as the schema states it (0 < beta_start <= beta_end < 1), with Python's message.
TEST(Schema, CrossFieldRulesNameBothFields) {
    ditrt_core::schema::Context sigma;
    sigma.refs["model.learn_sigma"] = true;
    const auto diffusion = ditrt_core::pyjson::parse(
        R"({"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.5, "beta_end": 0.1, "variance": "fixed_large"})");
    try {
        ditrt_core::schema::check_object("diffusion", diffusion, "diffusion", sigma);
        FAIL() << "accepted beta_start > beta_end";
    } catch (const ditrt_core::Error& e) {
        EXPECT_STREQ(e.what(), "manifest fields diffusion.beta_start 0.5 and beta_end 0.1 need 0 < beta_start <= beta_end < 1");
    }
}
