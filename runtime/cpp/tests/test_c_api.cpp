// The C ABI (version 2) and the C++ wrapper, with a toy callback executor: options, named
// tensors, chunking, progress and cancel, NaN checks, re-entrancy, decode, images; every bad
// input returns a status and a message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "ditrt/ditrt.h"
#include "ditrt/ditrt.hpp"
#include "test_util.hpp"

using testutil::json;

namespace capi_test {  // named: the fixture is a base of the TEST_F classes

constexpr int64_t kPerImage = 4 * 2 * 2, kOutPerRow = 8 * 2 * 2, kImage = 3 * 16 * 16;

// What the toy executor saw and what it should do.
struct Toy {
    std::vector<int64_t> denoiser_rows, decoder_images;
    std::vector<std::vector<std::string>> names;  // per call: network, then the tensor names
    float poison = 0.0f;                          // written into the output when non-zero (NaN tests)
    int fail = 0;
    ditrt_pipeline* reenter = nullptr;  // a pipeline to call ditrt_sample on from inside the callback
    int reentry_status = -1;
};

std::mutex toy_lock;  // concurrent ditrt_sample calls run the callback concurrently (ditrt.h, Threads)

const ditrt_tensor* by_name(const ditrt_tensor* t, int64_t n, const char* name) {
    for (int64_t i = 0; i < n; ++i)
        if (std::strcmp(t[i].name, name) == 0) return &t[i];
    return nullptr;
}

// A denoiser and a decoder that are fixed functions of their inputs.
int toy_run(void* user, const char* network, const ditrt_tensor* in, int64_t n_in, const ditrt_tensor* out, int64_t n_out) {
    Toy& toy = *static_cast<Toy*>(user);
    std::vector<std::string> names{network};
    for (int64_t i = 0; i < n_in; ++i) names.push_back(in[i].name);
    for (int64_t i = 0; i < n_out; ++i) names.push_back(out[i].name);
    {
        std::lock_guard<std::mutex> hold(toy_lock);
        toy.names.push_back(names);
    }
    if (toy.fail) return toy.fail;
    if (toy.reenter) {
        const int64_t label = 1;
        float buffer[kPerImage];
        toy.reentry_status = ditrt_sample(toy.reenter, &label, 1, nullptr, buffer, kPerImage);
    }
    if (std::strcmp(network, "denoiser") == 0) {
        const ditrt_tensor *x = by_name(in, n_in, "latent"), *t = by_name(in, n_in, "timestep"),
                           *y = by_name(in, n_in, "class_label");
        const int64_t rows = x->shape[0];
        {
            std::lock_guard<std::mutex> hold(toy_lock);
            toy.denoiser_rows.push_back(rows);
        }
        auto* o = static_cast<float*>(out[0].data);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t e = 0; e < kOutPerRow; ++e)
                o[r * kOutPerRow + e] = 0.1f * static_cast<const float*>(x->data)[r * kPerImage + e % kPerImage] +
                                        1e-4f * static_cast<const float*>(t->data)[r] -
                                        0.01f * float(static_cast<const int64_t*>(y->data)[r]) + toy.poison;
    } else {
        const int64_t images = in[0].shape[0];
        {
            std::lock_guard<std::mutex> hold(toy_lock);
            toy.decoder_images.push_back(images);
        }
        auto* o = static_cast<float*>(out[0].data);
        for (int64_t j = 0; j < images; ++j)
            for (int64_t e = 0; e < kImage; ++e)
                o[j * kImage + e] = 0.5f * static_cast<const float*>(in[0].data)[j * kPerImage + e % kPerImage] + toy.poison;
    }
    return 0;
}

class CApi : public ::testing::Test {
protected:
    void SetUp() override { open(0); }
    void open(int64_t max_batch) {
        TearDown();
        toy = Toy{};
        dir = testutil::write_artifact(testutil::minimal_manifest(true), "capi");
        ASSERT_EQ(ditrt_executor_create_callback(toy_run, &toy, max_batch, &executor), DITRT_OK);
        ASSERT_EQ(ditrt_open(dir.c_str(), executor, DITRT_OPEN_DEFAULT, &pipe), DITRT_OK) << ditrt_last_error();
        ASSERT_EQ(ditrt_options_create(&options), DITRT_OK);
    }
    void TearDown() override {
        ditrt_options_release(options);
        ditrt_close(pipe);
        ditrt_executor_release(executor);
        options = nullptr, pipe = nullptr, executor = nullptr;
        if (!dir.empty()) std::filesystem::remove_all(dir);
    }
    void set(const char* key, const char* value) { ASSERT_EQ(ditrt_options_set(options, key, value), DITRT_OK) << ditrt_last_error(); }
    ditrt_status sample(std::vector<int64_t> labels, int64_t capacity = -1) {
        out.assign(size_t(std::max<size_t>(labels.size(), 1) * kPerImage), -1.0f);
        return ditrt_sample(pipe, labels.data(), int64_t(labels.size()), options, out.data(),
                            capacity < 0 ? int64_t(out.size()) : capacity);
    }
    std::string dir;
    Toy toy;
    ditrt_executor* executor = nullptr;
    ditrt_pipeline* pipe = nullptr;
    ditrt_options* options = nullptr;
    std::vector<float> out;
};

#define EXPECT_STATUS(call, status, text)                                                               \
    do {                                                                                                \
        EXPECT_EQ((call), (status)) << ditrt_last_error();                                              \
        EXPECT_NE(std::string(ditrt_last_error()).find(text), std::string::npos) << ditrt_last_error(); \
    } while (0)

}  // namespace capi_test

using namespace capi_test;

TEST(Abi, VersionAtRunTime) {
    EXPECT_EQ(ditrt_abi_version(), uint32_t(DITRT_ABI_VERSION));
    EXPECT_EQ(DITRT_ABI_VERSION, 2);
    EXPECT_NO_THROW(ditrt::check_abi());
    EXPECT_STREQ(ditrt_status_name(DITRT_CANCELLED), "DITRT_CANCELLED");
    EXPECT_STREQ(ditrt_status_name(ditrt_status(99)), "DITRT_UNKNOWN_STATUS");
}

TEST_F(CApi, OneCallbackServesEveryNetworkByName) {
    set("steps", "5");
    ASSERT_EQ(sample({1, 2}), DITRT_OK) << ditrt_last_error();
    EXPECT_STREQ(ditrt_last_error(), "");
    EXPECT_EQ(toy.denoiser_rows, std::vector<int64_t>(5, 4));  // guided: 2 rows per image
    EXPECT_EQ(toy.names[0], (std::vector<std::string>{"denoiser", "latent", "timestep", "class_label", "model_output"}));
    for (float v : out) EXPECT_TRUE(std::isfinite(v) && v != -1.0f);
    std::vector<float> images(2 * kImage, NAN);
    ASSERT_EQ(ditrt_decode(pipe, out.data(), 2, images.data(), int64_t(images.size())), DITRT_OK) << ditrt_last_error();
    EXPECT_EQ(toy.names.back(), (std::vector<std::string>{"decoder", "latent", "image"}));
    EXPECT_EQ(images[kImage + 17], 0.5f * out[kPerImage + 17 % kPerImage]);
    int64_t shape[3];
    ASSERT_EQ(ditrt_image_shape(pipe, shape), DITRT_OK);
    EXPECT_EQ(shape[0] * shape[1] * shape[2], kImage);
    EXPECT_EQ(ditrt_has_network(pipe, "decoder"), 1);
    EXPECT_EQ(ditrt_has_network(pipe, "text_encoder"), 0);
}

TEST_F(CApi, DefaultsComeFromTheManifest) {
    int64_t k = 0, shape[3] = {0, 0, 0}, classes = 0;
    EXPECT_EQ(ditrt_num_steps(pipe, nullptr, &k), DITRT_OK);
    EXPECT_EQ(k, 250);
    set("steps", "ddim50");
    EXPECT_EQ(ditrt_num_steps(pipe, options, &k), DITRT_OK);
    EXPECT_EQ(k, 50);
    set("sampler", "dpm++2m");
    EXPECT_STATUS(ditrt_num_steps(pipe, options, &k), DITRT_SCHEDULE_ERROR, "'ddim50' is a DDPM/DDIM respacing spec");
    set("steps", "25");
    EXPECT_EQ(ditrt_num_steps(pipe, options, &k), DITRT_OK);
    EXPECT_EQ(k, 25);
    EXPECT_EQ(ditrt_latent_shape(pipe, shape), DITRT_OK);
    EXPECT_EQ(shape[0] * shape[1] * shape[2], kPerImage);
    EXPECT_EQ(ditrt_num_classes(pipe, &classes), DITRT_OK);
    EXPECT_EQ(classes, 10);
    const int64_t label = 3;
    std::vector<float> a(kPerImage), b(kPerImage);
    ASSERT_EQ(ditrt_sample(pipe, &label, 1, nullptr, a.data(), kPerImage), DITRT_OK);
    EXPECT_EQ(toy.denoiser_rows.size(), 250u);
    ditrt_options* explicit_defaults = nullptr;
    ASSERT_EQ(ditrt_options_create(&explicit_defaults), DITRT_OK);
    for (auto [key, value] : {std::pair{"sampler", "ddpm"}, {"steps", "250"}, {"cfg_scale", "4"}, {"guidance", "official"}, {"seed", "0"}})
        ASSERT_EQ(ditrt_options_set(explicit_defaults, key, value), DITRT_OK);
    ASSERT_EQ(ditrt_sample(pipe, &label, 1, explicit_defaults, b.data(), kPerImage), DITRT_OK);
    ditrt_options_release(explicit_defaults);
    EXPECT_EQ(a, b);
}

TEST_F(CApi, AnExecutorDeclaringMaxBatchOneOnlyGetsOneRowCalls) {
    open(1);
    set("steps", "3");
    ASSERT_EQ(sample({1, 2, 5}), DITRT_OK) << ditrt_last_error();
    EXPECT_EQ(toy.denoiser_rows, std::vector<int64_t>(3 * 6, 1));
    const auto chunked = out;
    open(4);
    set("steps", "3");
    ASSERT_EQ(sample({1, 2, 5}), DITRT_OK);
    EXPECT_EQ(toy.denoiser_rows, (std::vector<int64_t>{4, 2, 4, 2, 4, 2}));
    EXPECT_EQ(out, chunked);  // the toy is row-wise: chunking changes nothing
    std::vector<float> images(3 * kImage);
    ASSERT_EQ(ditrt_decode(pipe, out.data(), 3, images.data(), int64_t(images.size())), DITRT_OK);
    EXPECT_EQ(toy.decoder_images, (std::vector<int64_t>{3}));
}

TEST_F(CApi, ProgressReportsEveryStepAndANonZeroReturnCancelsWithinOneStep) {
    struct Seen {
        std::vector<int64_t> done;
        int64_t total = 0, cancel_at = 0;
        std::vector<double> timesteps;
    } seen;
    seen.cancel_at = 2;
    auto progress = [](void* user, int64_t done, int64_t total, double t) {
        Seen& s = *static_cast<Seen*>(user);
        s.done.push_back(done);
        s.total = total;
        s.timesteps.push_back(t);
        return done == s.cancel_at ? 1 : 0;
    };
    set("steps", "ddim10");
    set("sampler", "ddim");
    ASSERT_EQ(ditrt_options_set_progress(options, progress, &seen), DITRT_OK);
    EXPECT_STATUS(sample({1}), DITRT_CANCELLED, "cancelled by the progress callback after step 2/10");
    EXPECT_EQ(toy.denoiser_rows.size(), 2u);  // no model call after the cancel
    EXPECT_EQ(seen.done, (std::vector<int64_t>{1, 2}));
    EXPECT_EQ(seen.total, 10);
    EXPECT_EQ(seen.timesteps, (std::vector<double>{900, 800}));
    for (float v : out) EXPECT_EQ(v, -1.0f);  // nothing written
    seen = {};
    ASSERT_EQ(sample({1}), DITRT_OK);
    EXPECT_EQ(seen.done.size(), 10u);
}

// ditrt.h, Errors: a progress callback that makes a failing ditrt call of its own.
struct NestedCalls {
    ditrt_options* scratch = nullptr;  // the callback sets an unknown key on these
    float* poison = nullptr;           // set to NaN after step 1 when given: step 2 fails (the outer call's own error)
    int64_t cancel_at = 0;             // cancel after this step (0: never)
    std::vector<std::string> on_entry, nested_error;  // ditrt_last_error() before and after the callback's call
    std::vector<ditrt_status> nested_status;
};

int progress_with_a_failing_call(void* user, int64_t done, int64_t, double) {
    NestedCalls& s = *static_cast<NestedCalls*>(user);
    s.on_entry.push_back(ditrt_last_error());
    s.nested_status.push_back(ditrt_options_set(s.scratch, "no_such_key", "1"));
    s.nested_error.push_back(ditrt_last_error());
    if (s.poison && done == 1) *s.poison = NAN;
    return done == s.cancel_at ? 1 : 0;
}

TEST_F(CApi, TheErrorOfTheOuterCallSurvivesTheCallsOfItsCallbacks) {
    NestedCalls s;
    ASSERT_EQ(ditrt_options_create(&s.scratch), DITRT_OK);
    set("steps", "5");
    ASSERT_EQ(ditrt_options_set_progress(options, progress_with_a_failing_call, &s), DITRT_OK);
    const std::string nested = "unknown option key 'no_such_key'";
    // The application's last call failed: its message must not leak into the callback's level.
    EXPECT_STATUS(ditrt_options_set(options, "stale_key", "1"), DITRT_INVALID_ARGUMENT, "unknown option key 'stale_key'");

    s.cancel_at = 2;  // fails for its own reason: a cancel
    EXPECT_STATUS(sample({1}), DITRT_CANCELLED, "cancelled by the progress callback after step 2/5");
    EXPECT_EQ(s.nested_status, (std::vector<ditrt_status>{DITRT_INVALID_ARGUMENT, DITRT_INVALID_ARGUMENT}));
    ASSERT_EQ(s.on_entry.size(), 2u);
    EXPECT_EQ(s.on_entry[0], "");  // nothing yet at the callback's level (not the application's stale message)
    EXPECT_NE(s.on_entry[1].find(nested), std::string::npos) << s.on_entry[1];  // the callbacks' own latest call
    for (const std::string& e : s.nested_error) EXPECT_NE(e.find(nested), std::string::npos) << e;

    s = NestedCalls{s.scratch, &toy.poison};  // fails for its own reason: NaN at step 2
    EXPECT_STATUS(sample({1}), DITRT_STEP_ERROR, "sampling produced NaN or inf at step 2/5");
    EXPECT_EQ(s.nested_status.size(), 1u);
    EXPECT_EQ(s.on_entry, (std::vector<std::string>{""}));
    toy.poison = 0.0f;

    s = NestedCalls{s.scratch};  // succeeds: "" (this call's), not the failure of a call inside it
    ASSERT_EQ(sample({1}), DITRT_OK) << ditrt_last_error();
    EXPECT_STREQ(ditrt_last_error(), "");
    EXPECT_EQ(s.nested_status, std::vector<ditrt_status>(5, DITRT_INVALID_ARGUMENT));
    EXPECT_NE(s.nested_error.back().find(nested), std::string::npos);

    // The C++ wrapper reads the same slot: its exception carries the outer call's message.
    s = NestedCalls{s.scratch};
    s.cancel_at = 1;
    try {
        ditrt::check(sample({1}));
        ADD_FAILURE() << "no exception";
    } catch (const ditrt::Exception& e) {
        EXPECT_EQ(e.status(), DITRT_CANCELLED);
        EXPECT_NE(std::string(e.what()).find("DITRT_CANCELLED: cancelled by the progress callback after step 1/5"),
                  std::string::npos) << e.what();
    }
    ditrt_options_release(s.scratch);  // a call without a status: the message stays
    EXPECT_NE(std::string(ditrt_last_error()).find("cancelled by the progress callback"), std::string::npos);
}

TEST_F(CApi, NanOrInfStopsTheLoopWithPythonsMessage) {
    toy.poison = NAN;
    set("steps", "5");
    EXPECT_STATUS(sample({1}), DITRT_STEP_ERROR,
                  "sampling produced NaN or inf at step 1/5 (timestep 999) on callback executor; the model output or "
                  "cfg_scale 4 overflows float32");
    EXPECT_EQ(toy.denoiser_rows.size(), 1u);
    for (float v : out) EXPECT_EQ(v, -1.0f);
    toy.poison = 0.0f;
    set("cfg_scale", "3e38");  // finite in float32; the guided difference overflows
    EXPECT_STATUS(sample({1}), DITRT_STEP_ERROR, "cfg_scale 3e+38 overflows float32");
    set("cfg_scale", "1e39");  // infinite as float32
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "cfg_scale must be a finite float32 number, got 1e39");
    set("cfg_scale", "nan");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "cfg_scale must be a finite float32 number");
}

TEST_F(CApi, InjectedNoiseIsCheckedAndUsed) {
    set("steps", "5");
    std::vector<float> initial(2 * kPerImage, 0.5f), steps(5 * 2 * kPerImage, 0.25f), a, b;
    ASSERT_EQ(ditrt_options_set_noise(options, initial.data(), int64_t(initial.size()), steps.data(), int64_t(steps.size())), DITRT_OK);
    ASSERT_EQ(sample({4, 4}), DITRT_OK) << ditrt_last_error();
    a = out;
    steps[2 * kPerImage] = 3.0f;  // step 1's noise of image 0
    ASSERT_EQ(sample({4, 4}), DITRT_OK);
    b = out;
    EXPECT_NE(a[0], b[0]);
    EXPECT_EQ(a[kPerImage], b[kPerImage]);  // image 1 untouched
    steps[7] = NAN;
    EXPECT_STATUS(sample({4, 4}), DITRT_INVALID_ARGUMENT, "injected step noise contains NaN or inf");
    initial[3] = INFINITY;
    EXPECT_STATUS(sample({4, 4}), DITRT_INVALID_ARGUMENT, "injected initial noise contains NaN or inf");
    EXPECT_STATUS(sample({4}), DITRT_INVALID_ARGUMENT, "injected initial noise holds 32 values; expected (N, C, H, W) = 16");
    set("image_offset", "3");
    EXPECT_STATUS(sample({4, 4}), DITRT_INVALID_ARGUMENT, "image_offset selects seeded noise");
    ASSERT_EQ(ditrt_options_set_noise(options, nullptr, 0, nullptr, 0), DITRT_OK);
    ASSERT_EQ(sample({4, 4}), DITRT_OK);  // seeded again, image offset 3
    EXPECT_EQ(toy.denoiser_rows.size(), 15u);
}

TEST_F(CApi, SeededNoiseIsPerImageAndReproducible) {
    set("steps", "5");
    set("seed", "9");
    ASSERT_EQ(sample({4, 4}), DITRT_OK);
    const auto a = out;
    ASSERT_EQ(sample({4, 4}), DITRT_OK);
    EXPECT_EQ(out, a);
    EXPECT_FALSE(std::equal(a.begin(), a.begin() + kPerImage, a.begin() + kPerImage));  // per-image streams
    set("image_offset", "1");
    ASSERT_EQ(sample({4}), DITRT_OK);
    EXPECT_TRUE(std::equal(out.begin(), out.begin() + kPerImage, a.begin() + kPerImage));  // image 1 of the job
    set("image_offset", "18446744073709551615");
    EXPECT_STATUS(sample({4, 4}), DITRT_INVALID_ARGUMENT, "passes the last image index");
}

TEST_F(CApi, AReentrantSampleFromACallbackReturnsBusy) {
    toy.reenter = pipe;
    set("steps", "2");
    ASSERT_EQ(sample({1}), DITRT_OK) << ditrt_last_error();
    EXPECT_EQ(toy.reentry_status, DITRT_BUSY);
    toy.reenter = nullptr;
    toy.reentry_status = -1;
    ASSERT_EQ(sample({1}), DITRT_OK);  // the flag is cleared after the outer call
}

TEST_F(CApi, ConcurrentSamplesOnOnePipelineAgreeWithSequentialOnes) {
    set("steps", "4");
    set("seed", "5");
    ASSERT_EQ(sample({1, 7}), DITRT_OK);
    const auto want = out;
    std::vector<std::vector<float>> got(4, std::vector<float>(2 * kPerImage));
    std::vector<ditrt_status> status(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i)
        threads.emplace_back([&, i] {
            const int64_t labels[] = {1, 7};
            status[size_t(i)] = ditrt_sample(pipe, labels, 2, options, got[size_t(i)].data(), 2 * kPerImage);
        });
    for (auto& t : threads) t.join();
    for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(status[size_t(i)], DITRT_OK);
        EXPECT_EQ(got[size_t(i)], want);
    }
}

TEST_F(CApi, BadArgumentsReturnStatusesNeverCrash) {
    EXPECT_STATUS(sample({1, 10}), DITRT_INVALID_ARGUMENT, "class labels [10] out of range: this model has classes 0..9");
    EXPECT_STATUS(sample({-1, 12, -1}), DITRT_INVALID_ARGUMENT, "class labels [-1, 12] out of range");
    EXPECT_STATUS(sample({}), DITRT_INVALID_ARGUMENT, "num_labels must be at least 1");
    set("steps", "0");
    EXPECT_STATUS(sample({1}), DITRT_SCHEDULE_ERROR, "must be positive");
    set("steps", "1001");
    EXPECT_STATUS(sample({1}), DITRT_SCHEDULE_ERROR, "cannot take 1001");
    set("steps", "1");
    EXPECT_STATUS(sample({1}), DITRT_SCHEDULE_ERROR, "at least 2 steps");
    set("steps", "5");
    set("sampler", "euler");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "unknown sampler 'euler' for a dit model; use ddpm, ddim, dpm++2m");
    set("sampler", "sde-euler");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "(sde-euler samples sit models)");
    set("sampler", "ddpm");
    set("eta", "0.5");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "eta applies to ddim only; ddpm takes no eta");
    set("sampler", "ddim");
    set("eta", "2");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "eta must be a number in [0, 1], got 2");
    set("eta", nullptr);
    set("guidance", "all");
    EXPECT_STATUS(sample({1}), DITRT_INVALID_ARGUMENT, "unknown guidance 'all'; use official or standard");
    set("guidance", "official");
    EXPECT_STATUS(sample({1, 2}, 2 * kPerImage - 1), DITRT_BUFFER_TOO_SMALL, "latents need 32");
    EXPECT_STATUS(ditrt_options_set(options, "cfg", "4"), DITRT_INVALID_ARGUMENT, "unknown option key 'cfg'");
    EXPECT_STATUS(ditrt_options_set(options, "cfg_scale", "4x"), DITRT_INVALID_ARGUMENT, "cfg_scale must be a number");
    // Python's float() and nothing more (issue 30): strtod's hexadecimal and nan(...) are refused.
    for (const char* bad : {"0x1p2", "nan(1)", "1__0", "_1", "1e", ".", "4\x1c"})
        EXPECT_STATUS(ditrt_options_set(options, "cfg_scale", bad), DITRT_INVALID_ARGUMENT, "as Python's float() reads it");
    for (const char* good : {" 4\n", "\f4\v", "1_0", "-Infinity", "nan", ".5e-0_1"})
        EXPECT_EQ(ditrt_options_set(options, "cfg_scale", good), DITRT_OK) << good;
    ASSERT_EQ(ditrt_options_set(options, "cfg_scale", nullptr), DITRT_OK);
    EXPECT_STATUS(ditrt_options_set(options, "seed", "-1"), DITRT_INVALID_ARGUMENT, "seed must be a decimal integer");
    EXPECT_STATUS(ditrt_options_set(options, "seed", "18446744073709551616"), DITRT_INVALID_ARGUMENT, "seed must be");
    const int64_t labels[] = {1};
    EXPECT_STATUS(ditrt_sample(nullptr, labels, 1, options, out.data(), 16), DITRT_INVALID_ARGUMENT, "pipeline must not be NULL");
    EXPECT_STATUS(ditrt_sample(pipe, nullptr, 1, options, out.data(), 16), DITRT_INVALID_ARGUMENT, "labels must not be NULL");
    EXPECT_STATUS(ditrt_sample(pipe, labels, 1, options, nullptr, 16), DITRT_INVALID_ARGUMENT, "out must not be NULL");
    EXPECT_EQ(toy.names.size(), 0u);  // every check happens before the first model call
    EXPECT_STATUS(ditrt_latent_shape(nullptr, nullptr), DITRT_INVALID_ARGUMENT, "must not be NULL");
    EXPECT_STATUS(ditrt_num_steps(pipe, nullptr, nullptr), DITRT_INVALID_ARGUMENT, "num_steps must not be NULL");
    char small[4];
    EXPECT_STATUS(ditrt_graph_file(pipe, "denoiser", "fp16", small, sizeof small), DITRT_ARTIFACT_ERROR, "no fp16 denoiser graph");
    EXPECT_STATUS(ditrt_graph_file(pipe, "denoiser", "fp32", small, sizeof small), DITRT_BUFFER_TOO_SMALL, "bytes");
    EXPECT_STATUS(ditrt_graph_file(pipe, "vae", "fp32", small, sizeof small), DITRT_INVALID_ARGUMENT, "no vae network");
    std::vector<float> latents(kPerImage, NAN), images(kImage);
    EXPECT_STATUS(ditrt_decode(pipe, latents.data(), 1, images.data(), kImage), DITRT_INVALID_ARGUMENT, "latents contain NaN or inf");
    EXPECT_STATUS(ditrt_decode(pipe, latents.data(), 0, images.data(), kImage), DITRT_INVALID_ARGUMENT, "latents hold no image");
    latents.assign(kPerImage, 0.0f);
    EXPECT_STATUS(ditrt_decode(pipe, latents.data(), 1, images.data(), kImage - 1), DITRT_BUFFER_TOO_SMALL, "images need 768");
    toy.poison = INFINITY;
    EXPECT_STATUS(ditrt_decode(pipe, latents.data(), 1, images.data(), kImage), DITRT_STEP_ERROR,
                  "the decoder network (callback executor) produced 768 non-finite values (NaN/inf) in image(s) 0");
    ditrt_executor* none = executor;
    EXPECT_STATUS(ditrt_executor_create_callback(nullptr, nullptr, 0, &none), DITRT_INVALID_ARGUMENT, "fn must not be NULL");
    EXPECT_EQ(none, nullptr);  // out is NULL after a failure
}

TEST_F(CApi, CallbackFailureIsAnExecutorError) {
    toy.fail = 7;
    set("steps", "5");
    EXPECT_STATUS(sample({1}), DITRT_EXECUTOR_ERROR, "the denoiser callback failed (returned 7)");
}

TEST_F(CApi, ImagesAndPng) {
    // One 2x2 image: values spanning the clamps.
    const std::vector<float> img = {-2.0f, -1.0f, 0.0f, 1.0f, 0.5f, -0.5f, 0.25f, 2.0f, NAN, 0.999f, -0.999f, 0.1f};
    uint8_t pixels[12];
    ASSERT_EQ(ditrt_images_to_uint8(img.data(), 1, 2, 2, pixels, 12), DITRT_OK);
    // (N, H, W, 3): pixel p's channel c at p * 3 + c; clamp(127.5 x + 128, 0, 255) truncated.
    EXPECT_EQ(pixels[0], 0);     // -2 -> -127
    EXPECT_EQ(pixels[3], 0);     // -1 -> 0.5
    EXPECT_EQ(pixels[6], 128);   // 0
    EXPECT_EQ(pixels[9], 255);   // 1 -> 255.5
    EXPECT_EQ(pixels[1], 191);   // 0.5 -> 191.75
    EXPECT_EQ(pixels[11], 140);  // 0.1 -> 140.75
    EXPECT_EQ(pixels[2], 0);     // NaN: 0, never undefined
    int64_t hw[2];
    ASSERT_EQ(ditrt_grid_shape(5, 8, 8, 4, 2, hw), DITRT_OK);
    EXPECT_EQ(hw[0], 2 * 10 + 2);  // ceil(5 / 4) rows
    EXPECT_EQ(hw[1], 4 * 10 + 2);
    ASSERT_EQ(ditrt_grid_shape(1, 8, 8, 4, 2, hw), DITRT_OK);
    EXPECT_EQ(hw[0], 8);  // a single image: unpadded
    EXPECT_STATUS(ditrt_grid_shape(2, 8, 8, 0, 2, hw), DITRT_INVALID_ARGUMENT, "nrow must be >= 1");
    uint8_t* png = nullptr;
    int64_t size = 0;
    ASSERT_EQ(ditrt_png_encode(pixels, 2, 2, 3, &png, &size), DITRT_OK);
    ASSERT_GT(size, 8);
    EXPECT_EQ(std::memcmp(png, "\x89PNG\r\n\x1a\n", 8), 0);
    ditrt_free(png);
    EXPECT_STATUS(ditrt_png_encode(pixels, 2, 2, 4, &png, &size), DITRT_INVALID_ARGUMENT, "1 (gray) or 3 (RGB) channels");
    const std::string path = std::filesystem::temp_directory_path() / ("ditrt_png_" + std::to_string(::getpid()) + ".png");
    ASSERT_EQ(ditrt_png_write(path.c_str(), pixels, 2, 2, 3), DITRT_OK) << ditrt_last_error();
    EXPECT_EQ(std::filesystem::file_size(path), uint64_t(size));
    std::filesystem::remove(path);
    std::filesystem::create_directory(path);
    EXPECT_STATUS(ditrt_png_write(path.c_str(), pixels, 2, 2, 3), DITRT_INVALID_ARGUMENT, "exists and is not a regular file");
    std::filesystem::remove(path);
    std::filesystem::create_symlink("/dev/null", path);
    EXPECT_STATUS(ditrt_png_write(path.c_str(), pixels, 2, 2, 3), DITRT_INVALID_ARGUMENT, "exists and is not a regular file");
    std::filesystem::remove(path);
    EXPECT_STATUS(ditrt_png_write("/nonexistent-dir/x.png", pixels, 2, 2, 3), DITRT_IO_ERROR, "cannot write");
}

TEST(CppWrapper, RaiiAndExceptions) {
    const std::string dir = testutil::write_artifact(testutil::minimal_manifest(true), "wrapper");
    Toy toy;
    auto executor = ditrt::Executor::callback(toy_run, &toy, 0);
    ditrt::Pipeline pipe(dir, executor);
    ditrt::Options options;
    options.set("sampler", "dpm++2m").set("steps", "4").set("seed", "1");
    const auto latents = pipe.sample({1, 2}, &options);
    EXPECT_EQ(latents.size(), size_t(2 * kPerImage));
    EXPECT_EQ(pipe.num_steps(&options), 4);
    const auto images = pipe.decode(latents);
    const auto shape = pipe.image_shape();
    const ditrt::Image grid = ditrt::grid(images, 2, shape[1], shape[2]);
    EXPECT_EQ(grid.width, 2 * 18 + 2);
    EXPECT_GT(ditrt::png_encode(grid).size(), 8u);
    try {
        pipe.sample({11}, &options);
        FAIL();
    } catch (const ditrt::Exception& e) {
        EXPECT_EQ(e.status(), DITRT_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find("DITRT_INVALID_ARGUMENT: class labels [11]"), std::string::npos);
    }
    EXPECT_THROW(ditrt::Pipeline(dir + "/none", executor), ditrt::Exception);
    std::filesystem::remove_all(dir);
}

TEST(Executors, TensorRtIsUnavailableWithoutIt) {
    if (ditrt_has_tensorrt()) GTEST_SKIP() << "built with TensorRT";
    ditrt_executor* e = nullptr;
    EXPECT_STATUS(ditrt_executor_create_tensorrt(0, 0, &e), DITRT_UNAVAILABLE, "built without TensorRT");
    EXPECT_EQ(e, nullptr);
}
