// The C ABI and the C++ wrapper, with a toy denoiser callback: every bad input returns a status
// and a message.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <thread>

#include "ditrt/ditrt.h"
#include "ditrt/ditrt.hpp"
#include "test_util.hpp"

using testutil::json;

namespace {

constexpr int64_t kPerImage = 4 * 2 * 2, kOutPerRow = 8 * 2 * 2;

// A denoiser that is a fixed function of its inputs; user points at a call counter.
int toy_denoiser(void* user, const float* x, const float* t, const int64_t* y, int64_t rows, float* out) {
    if (user) ++*static_cast<int*>(user);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = 0; e < kOutPerRow; ++e)
            out[r * kOutPerRow + e] = 0.1f * x[r * kPerImage + e % kPerImage] + 1e-4f * t[r] - 0.01f * float(y[r]);
    return 0;
}

int failing_denoiser(void*, const float*, const float*, const int64_t*, int64_t, float*) { return 7; }

class CApi : public ::testing::Test {
protected:
    void SetUp() override {
        dir = testutil::write_artifact(testutil::minimal_manifest(), "capi");
        ASSERT_EQ(ditrt_executor_create_callback(toy_denoiser, &calls, 0, &executor), DITRT_OK);
        ASSERT_EQ(ditrt_open(dir.c_str(), executor, DITRT_OPEN_DEFAULT, &pipe), DITRT_OK) << ditrt_last_error();
    }
    void TearDown() override {
        ditrt_close(pipe);
        ditrt_executor_release(executor);
        std::filesystem::remove_all(dir);
    }
    ditrt_status sample(const int64_t* labels, int64_t n, const char* steps = "5", const char* sampler = "ddpm",
                        double eta = 0.0, double cfg = 4.0, const char* guidance = "official", int64_t capacity = -1) {
        out.assign(size_t(std::max<int64_t>(n, 1) * kPerImage), -1.0f);
        return ditrt_sample(pipe, labels, n, steps, sampler, eta, cfg, guidance, 0, nullptr, nullptr, out.data(),
                            capacity < 0 ? int64_t(out.size()) : capacity);
    }
    std::string dir;
    int calls = 0;
    ditrt_executor* executor = nullptr;
    ditrt_pipeline* pipe = nullptr;
    std::vector<float> out;
};

#define EXPECT_STATUS(call, status, text)                                                     \
    do {                                                                                      \
        EXPECT_EQ((call), (status)) << ditrt_last_error();                                    \
        EXPECT_NE(std::string(ditrt_last_error()).find(text), std::string::npos) << ditrt_last_error(); \
    } while (0)

}  // namespace

TEST_F(CApi, SamplesAndClearsTheLastError) {
    const int64_t labels[] = {1, 2};
    EXPECT_STATUS(sample(labels, 2, "ddim300"), DITRT_SCHEDULE_ERROR, "no integer stride");
    EXPECT_EQ(sample(labels, 2), DITRT_OK);
    EXPECT_STREQ(ditrt_last_error(), "");
    EXPECT_EQ(calls, 5);
    for (float v : out) EXPECT_TRUE(std::isfinite(v) && v != -1.0f);
    int64_t k = 0, shape[3] = {0, 0, 0}, classes = 0;
    EXPECT_EQ(ditrt_num_steps(pipe, "ddim50", &k), DITRT_OK);
    EXPECT_EQ(k, 50);
    EXPECT_EQ(ditrt_num_steps(pipe, nullptr, &k), DITRT_OK);
    EXPECT_EQ(k, 250);  // the manifest default
    EXPECT_EQ(ditrt_latent_shape(pipe, shape), DITRT_OK);
    EXPECT_EQ(shape[0] * shape[1] * shape[2], kPerImage);
    EXPECT_EQ(ditrt_num_classes(pipe, &classes), DITRT_OK);
    EXPECT_EQ(classes, 10);
}

TEST_F(CApi, DefaultsComeFromTheManifest) {
    const int64_t labels[] = {3};
    ASSERT_EQ(ditrt_sample(pipe, labels, 1, nullptr, nullptr, 0.0, NAN, nullptr, 5, nullptr, nullptr, (out.resize(kPerImage), out.data()), kPerImage), DITRT_OK);
    EXPECT_EQ(calls, 250);
    const auto defaults = out;
    ASSERT_EQ(ditrt_sample(pipe, labels, 1, "250", "ddpm", 0.0, 4.0, "official", 5, nullptr, nullptr, out.data(), kPerImage), DITRT_OK);
    EXPECT_EQ(out, defaults);
}

TEST_F(CApi, InjectedNoiseIsUsedAndSeedsAreReproducible) {
    const int64_t labels[] = {4, 4};
    std::vector<float> initial(2 * kPerImage, 0.5f), steps(5 * 2 * kPerImage, 0.25f), a(2 * kPerImage), b(a.size());
    ASSERT_EQ(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 0, initial.data(), steps.data(), a.data(), 32), DITRT_OK);
    steps[2 * kPerImage] = 3.0f;  // step 1's noise of image 0
    ASSERT_EQ(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 0, initial.data(), steps.data(), b.data(), 32), DITRT_OK);
    EXPECT_NE(a[0], b[0]);
    EXPECT_EQ(a[kPerImage], b[kPerImage]);  // image 1 untouched
    EXPECT_EQ(a[0 + 1], b[0 + 1]);
    ASSERT_EQ(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 9, nullptr, nullptr, a.data(), 32), DITRT_OK);
    ASSERT_EQ(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 9, nullptr, nullptr, b.data(), 32), DITRT_OK);
    EXPECT_EQ(a, b);
    EXPECT_TRUE(std::equal(a.begin(), a.begin() + kPerImage, a.begin() + kPerImage) == false);  // per-image streams
}

TEST_F(CApi, BadArgumentsReturnStatusesNeverCrash) {
    const int64_t labels[] = {1, 2};
    const int64_t bad_label[] = {1, 10}, negative[] = {-1};
    EXPECT_STATUS(sample(bad_label, 2), DITRT_INVALID_ARGUMENT, "class label 10 out of range");
    EXPECT_STATUS(sample(negative, 1), DITRT_INVALID_ARGUMENT, "class label -1 out of range");
    EXPECT_STATUS(sample(labels, 0), DITRT_INVALID_ARGUMENT, "num_labels");
    EXPECT_STATUS(sample(labels, 2, "0"), DITRT_SCHEDULE_ERROR, "must be positive");
    EXPECT_STATUS(sample(labels, 2, "1001"), DITRT_SCHEDULE_ERROR, "cannot take 1001");
    EXPECT_STATUS(sample(labels, 2, "1"), DITRT_SCHEDULE_ERROR, "at least 2 steps");
    EXPECT_STATUS(sample(labels, 2, ""), DITRT_SCHEDULE_ERROR, "step spec");
    EXPECT_STATUS(sample(labels, 2, "5", "euler"), DITRT_INVALID_ARGUMENT, "unknown sampler \"euler\"");
    EXPECT_STATUS(sample(labels, 2, "5", "ddim", 2.0), DITRT_INVALID_ARGUMENT, "eta must be in [0, 1]");
    EXPECT_STATUS(sample(labels, 2, "5", "ddim", NAN), DITRT_INVALID_ARGUMENT, "eta must be in [0, 1]");
    EXPECT_STATUS(sample(labels, 2, "5", "ddpm", 0, INFINITY), DITRT_INVALID_ARGUMENT, "cfg_scale must be finite");
    EXPECT_STATUS(sample(labels, 2, "5", "ddpm", 0, 4, "all"), DITRT_INVALID_ARGUMENT, "unknown guidance \"all\"");
    EXPECT_STATUS(sample(labels, 2, "5", "ddpm", 0, 4, "official", 2 * kPerImage - 1), DITRT_BUFFER_TOO_SMALL, "need 32");
    EXPECT_STATUS(ditrt_sample(nullptr, labels, 2, "5", "ddpm", 0, 4, "official", 0, nullptr, nullptr, out.data(), 32),
                  DITRT_INVALID_ARGUMENT, "pipeline must not be NULL");
    EXPECT_STATUS(ditrt_sample(pipe, nullptr, 2, "5", "ddpm", 0, 4, "official", 0, nullptr, nullptr, out.data(), 32),
                  DITRT_INVALID_ARGUMENT, "labels must not be NULL");
    EXPECT_STATUS(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 0, nullptr, nullptr, nullptr, 32),
                  DITRT_INVALID_ARGUMENT, "out must not be NULL");
    EXPECT_STATUS(ditrt_sample(pipe, labels, 2, "5", "ddpm", 0, 4, "official", 0, out.data(), nullptr, out.data(), 32),
                  DITRT_INVALID_ARGUMENT, "both initial_noise and step_noise");
    EXPECT_EQ(calls, 0);  // every check happens before the first model call
    EXPECT_STATUS(ditrt_latent_shape(nullptr, nullptr), DITRT_INVALID_ARGUMENT, "must not be NULL");
    EXPECT_STATUS(ditrt_num_steps(pipe, "abc", nullptr), DITRT_INVALID_ARGUMENT, "num_steps must not be NULL");
    EXPECT_STATUS(ditrt_graph_file(pipe, "denoiser", "fp16", out.size() ? reinterpret_cast<char*>(out.data()) : nullptr, 8),
                  DITRT_ARTIFACT_ERROR, "no fp16 graph");
    char small[4];
    EXPECT_STATUS(ditrt_graph_file(pipe, "denoiser", "fp32", small, sizeof small), DITRT_BUFFER_TOO_SMALL, "bytes");
    EXPECT_STATUS(ditrt_graph_file(pipe, "decoder", "fp32", small, sizeof small), DITRT_INVALID_ARGUMENT, "no network");
}

TEST_F(CApi, CallbackFailureIsAnExecutorError) {
    ditrt_executor* failing = nullptr;
    ditrt_pipeline* p = nullptr;
    ASSERT_EQ(ditrt_executor_create_callback(failing_denoiser, nullptr, 0, &failing), DITRT_OK);
    ASSERT_EQ(ditrt_open(dir.c_str(), failing, 0, &p), DITRT_OK);
    ditrt_executor_release(failing);  // the pipeline keeps its own reference
    const int64_t labels[] = {1};
    std::vector<float> o(kPerImage);
    EXPECT_STATUS(ditrt_sample(p, labels, 1, "5", "ddpm", 0, 4, "official", 0, nullptr, nullptr, o.data(), kPerImage),
                  DITRT_EXECUTOR_ERROR, "returned 7");
    ditrt_close(p);
}

TEST_F(CApi, GraphFileIsVerifiedUnlessOptedOut) {
    std::vector<char> path(4096);
    ASSERT_EQ(ditrt_graph_file(pipe, "denoiser", "fp32", path.data(), path.size()), DITRT_OK) << ditrt_last_error();
    EXPECT_EQ(std::string(path.data()), dir + "/denoiser.fp32.onnx");
    std::ofstream(dir + "/denoiser.fp32.onnx") << "corrupt";
    EXPECT_STATUS(ditrt_graph_file(pipe, "denoiser", "fp32", path.data(), path.size()), DITRT_ARTIFACT_ERROR,
                  "does not match its sha256");
    ditrt_pipeline* unchecked = nullptr;
    ASSERT_EQ(ditrt_open(dir.c_str(), executor, DITRT_OPEN_NO_VERIFY, &unchecked), DITRT_OK);
    EXPECT_EQ(ditrt_graph_file(unchecked, "denoiser", "fp32", path.data(), path.size()), DITRT_OK);
    ditrt_close(unchecked);
}

TEST(CApiOpen, BadArtifactsAndArguments) {
    ditrt_executor* ex = nullptr;
    ditrt_pipeline* p = reinterpret_cast<ditrt_pipeline*>(0x1);
    ASSERT_EQ(ditrt_executor_create_callback(toy_denoiser, nullptr, 0, &ex), DITRT_OK);
    EXPECT_STATUS(ditrt_open("/nonexistent/ditrt", ex, 0, &p), DITRT_ARTIFACT_ERROR, "artifact directory not found");
    EXPECT_EQ(p, nullptr);  // outputs are reset on failure
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "open");
    std::filesystem::remove(dir + "/manifest.json");
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 0, &p), DITRT_ARTIFACT_ERROR, "no manifest.json");
    std::ofstream(dir + "/manifest.json") << "{\"schema\": \"ditrt.manifest\", ";
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 0, &p), DITRT_ARTIFACT_ERROR, "not valid JSON");
    json m = testutil::minimal_manifest();
    m["schema_version"] = 1;
    std::ofstream(dir + "/manifest.json") << m.dump();
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 0, &p), DITRT_ARTIFACT_ERROR, "schema_version is 1");
    std::ofstream(dir + "/manifest.json") << std::string(100, '\0');
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 0, &p), DITRT_ARTIFACT_ERROR, "manifest.json");
    EXPECT_STATUS(ditrt_open(nullptr, ex, 0, &p), DITRT_INVALID_ARGUMENT, "artifact_dir must not be NULL");
    EXPECT_STATUS(ditrt_open(dir.c_str(), nullptr, 0, &p), DITRT_INVALID_ARGUMENT, "executor must not be NULL");
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 0, nullptr), DITRT_INVALID_ARGUMENT, "out must not be NULL");
    EXPECT_STATUS(ditrt_open(dir.c_str(), ex, 8, &p), DITRT_INVALID_ARGUMENT, "unknown flags");
    ditrt_executor* none = reinterpret_cast<ditrt_executor*>(0x1);
    EXPECT_STATUS(ditrt_executor_create_callback(nullptr, nullptr, 0, &none), DITRT_INVALID_ARGUMENT, "fn must not be NULL");
    EXPECT_EQ(none, nullptr);
    EXPECT_STATUS(ditrt_executor_create_callback(toy_denoiser, nullptr, -1, &none), DITRT_INVALID_ARGUMENT, "max_batch");
    ditrt_executor_release(ex);
    ditrt_executor* trt = nullptr;
    if (!ditrt_has_tensorrt())
        EXPECT_STATUS(ditrt_executor_create_tensorrt(0, 0, &trt), DITRT_UNAVAILABLE, "without TensorRT");
    ditrt_close(nullptr);
    ditrt_executor_release(nullptr);
    std::filesystem::remove_all(dir);
}

TEST(CApiErrors, LastErrorIsPerThread) {
    ditrt_pipeline* p = nullptr;
    EXPECT_NE(ditrt_open(nullptr, nullptr, 0, &p), DITRT_OK);
    std::string other_thread = "unset";
    std::thread([&] { other_thread = ditrt_last_error(); }).join();
    EXPECT_EQ(other_thread, "");
    EXPECT_NE(std::string(ditrt_last_error()), "");
    EXPECT_STREQ(ditrt_status_name(DITRT_BUFFER_TOO_SMALL), "DITRT_BUFFER_TOO_SMALL");
    EXPECT_STREQ(ditrt_status_name(ditrt_status(99)), "DITRT_UNKNOWN_STATUS");
}

TEST(CppWrapper, RaiiAndExceptions) {
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(), "hpp");
    int calls = 0;
    ditrt::Executor ex = ditrt::Executor::callback(toy_denoiser, &calls, 3);
    ditrt::Pipeline pipe(dir, ex);
    ditrt::SampleOptions o;
    o.steps = "ddim5";
    o.sampler = "ddim";
    const auto latents = pipe.sample({1, 2}, o);
    EXPECT_EQ(latents.size(), size_t(2 * kPerImage));
    EXPECT_EQ(calls, 10);  // 4 rows per step in chunks of 3
    EXPECT_EQ(pipe.graph_file(), dir + "/denoiser.fp32.onnx");
    try {
        pipe.sample({11});
        FAIL();
    } catch (const ditrt::Exception& e) {
        EXPECT_EQ(e.status(), DITRT_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find("out of range"), std::string::npos);
    }
    EXPECT_THROW(ditrt::Pipeline(dir + "/none", ex), ditrt::Exception);
    std::filesystem::remove_all(dir);
}
