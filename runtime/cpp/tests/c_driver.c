/* The C ABI (version 2) from C99 (built with -std=c99 -Wall -Wextra -Werror -pedantic): writes a
 * small schema-3 manifest, samples through a C callback over named tensors, and checks a few
 * error statuses. Exit 0 on success. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ditrt/ditrt.h"

static const char* kManifest =
    "{\"schema\": \"ditrt.manifest\", \"schema_version\": 3,"
    " \"model\": {\"family\": \"dit\", \"input_size\": 2, \"patch_size\": 2, \"in_channels\": 4, \"hidden_size\": 64,"
    "   \"depth\": 2, \"num_heads\": 4, \"mlp_ratio\": 4.0, \"num_classes\": 10, \"learn_sigma\": true, \"out_channels\": 8},"
    " \"diffusion\": {\"num_train_timesteps\": 1000, \"beta_schedule\": \"linear\", \"beta_start\": 0.0001,"
    "   \"beta_end\": 0.02, \"variance\": \"learned_range\", \"prediction\": \"epsilon\", \"clip_denoised\": false},"
    " \"guidance\": {\"guided_channels\": {\"official\": 3, \"standard\": 4}},"
    " \"defaults\": {\"sampler\": \"ddpm\", \"steps\": 250, \"cfg_scale\": 4.0, \"guidance\": \"official\"},"
    " \"networks\": {\"denoiser\": {"
    "   \"inputs\": [{\"name\": \"latent\", \"dtype\": \"float32\", \"shape\": [\"batch\", 4, 2, 2], \"role\": \"latent\"},"
    "              {\"name\": \"timestep\", \"dtype\": \"float32\", \"shape\": [\"batch\"], \"role\": \"time\"},"
    "              {\"name\": \"class_label\", \"dtype\": \"int64\", \"shape\": [\"batch\"], \"role\": \"condition\","
    "               \"condition\": {\"kind\": \"class\", \"num_classes\": 10, \"null\": 10}}],"
    "   \"outputs\": [{\"name\": \"model_output\", \"dtype\": \"float32\", \"shape\": [\"batch\", 8, 2, 2], \"role\": \"prediction\"}],"
    "   \"batch_axis\": 0, \"batch_unit\": \"rows\","
    "   \"graphs\": {\"fp32\": {\"file\": \"d.onnx\", \"sha256\": {\"d.onnx\": "
    "     \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"}}}}}}";

static int64_t max_rows_seen = 0;

static int run(void* user, const char* network, const ditrt_tensor* in, int64_t n_in, const ditrt_tensor* out,
               int64_t n_out) {
    const float* x = (const float*)in[0].data;
    const float* t = (const float*)in[1].data;
    const int64_t* y = (const int64_t*)in[2].data;
    float* o = (float*)out[0].data;
    int64_t r, e, rows = in[0].shape[0];
    (void)user;
    if (strcmp(network, "denoiser") != 0 || n_in != 3 || n_out != 1 || in[2].dtype != DITRT_INT64) return 1;
    if (rows > max_rows_seen) max_rows_seen = rows;
    for (r = 0; r < rows; ++r)
        for (e = 0; e < 32; ++e) o[r * 32 + e] = 0.1f * x[r * 16 + e % 16] + 1e-4f * t[r] - 0.01f * (float)y[r];
    return 0;
}

static int cancel_at_two(void* user, int64_t done, int64_t total, double timestep) {
    (void)user, (void)total, (void)timestep;
    return done == 2;
}

#define CHECK(cond, what)                                                   \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "FAILED: %s (%s)\n", what, ditrt_last_error()); \
            return 1;                                                       \
        }                                                                   \
    } while (0)

int main(void) {
    char dir[] = "/tmp/ditrt_c_driver_XXXXXX", path[512];
    ditrt_executor* ex = NULL;
    ditrt_pipeline* pipe = NULL;
    ditrt_options* options = NULL;
    int64_t labels[2] = {3, 7}, bad[1] = {10}, k = 0;
    float out[32];
    uint8_t pixels[2 * 2 * 3], *png = NULL;
    int64_t png_size = 0;
    FILE* f;
    int i;
    CHECK(ditrt_abi_version() == DITRT_ABI_VERSION, "ABI version");
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    f = fopen(path, "w");
    CHECK(f != NULL, "write manifest");
    fputs(kManifest, f);
    fclose(f);

    CHECK(ditrt_executor_create_callback(run, NULL, 2, &ex) == DITRT_OK, "create executor");
    CHECK(ditrt_open(dir, ex, DITRT_OPEN_DEFAULT, &pipe) == DITRT_OK, "open");
    CHECK(ditrt_options_create(&options) == DITRT_OK, "options");
    CHECK(ditrt_options_set(options, "sampler", "ddim") == DITRT_OK, "sampler");
    CHECK(ditrt_options_set(options, "steps", "ddim10") == DITRT_OK, "steps");
    CHECK(ditrt_options_set(options, "seed", "1") == DITRT_OK, "seed");
    CHECK(ditrt_num_steps(pipe, options, &k) == DITRT_OK && k == 10, "num_steps");
    CHECK(ditrt_sample(pipe, labels, 2, options, out, 32) == DITRT_OK, "sample");
    for (i = 0; i < 32; ++i) CHECK(isfinite(out[i]), "finite latents");
    CHECK(max_rows_seen == 2, "max_batch 2: the 4 guided rows come in chunks of 2");
    CHECK(ditrt_sample(pipe, bad, 1, options, out, 32) == DITRT_INVALID_ARGUMENT, "label out of range");
    CHECK(strstr(ditrt_last_error(), "out of range") != NULL, "message");
    CHECK(ditrt_sample(pipe, labels, 2, options, out, 31) == DITRT_BUFFER_TOO_SMALL, "small buffer");
    CHECK(ditrt_options_set_progress(options, cancel_at_two, NULL) == DITRT_OK, "progress");
    CHECK(ditrt_sample(pipe, labels, 2, options, out, 32) == DITRT_CANCELLED, "cancel");
    CHECK(ditrt_decode(pipe, out, 2, out, 32) == DITRT_ARTIFACT_ERROR, "no decoder");
    CHECK(ditrt_images_to_uint8(out, 1, 2, 2, pixels, (int64_t)sizeof pixels) == DITRT_OK, "to_uint8");
    CHECK(ditrt_png_encode(pixels, 2, 2, 3, &png, &png_size) == DITRT_OK && png_size > 8, "png");
    ditrt_free(png);
    CHECK(ditrt_noise_normal(7, 0, 1, out, 5) == DITRT_OK, "noise");
    for (i = 0; i < 5; ++i) CHECK(isfinite(out[i]) && fabsf(out[i]) < 7.0f, "finite noise");
    CHECK(ditrt_noise_normal(7, 0, 1, NULL, 5) == DITRT_INVALID_ARGUMENT, "noise into NULL");
    CHECK(strncmp(ditrt_noise_version(), "philox4x32-10", 13) == 0, "noise version");
    ditrt_options_release(options);
    ditrt_close(pipe);
    ditrt_executor_release(ex);
    remove(path);
    rmdir(dir);
    printf("c_driver: ok (ditrt %s, ABI %u)\n", ditrt_version(), (unsigned)ditrt_abi_version());
    return 0;
}
