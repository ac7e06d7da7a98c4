/* The C ABI from C99: writes a small schema-2 manifest, samples through a C callback, and checks a
 * few error statuses. Exit 0 on success. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ditrt/ditrt.h"

static const char* kManifest =
    "{\"schema\": \"ditrt.manifest\", \"schema_version\": 2,"
    " \"model\": {\"input_size\": 2, \"in_channels\": 4, \"out_channels\": 8, \"num_classes\": 10},"
    " \"diffusion\": {\"num_train_timesteps\": 1000, \"beta_schedule\": \"linear\", \"beta_start\": 0.0001,"
    "   \"beta_end\": 0.02, \"prediction\": \"epsilon\", \"variance\": \"learned_range\", \"clip_denoised\": false,"
    "   \"null_class\": 10, \"guided_channels\": {\"official\": 3, \"standard\": 4}},"
    " \"defaults\": {\"sampler\": \"ddpm\", \"steps\": 250, \"cfg_scale\": 4.0, \"guidance\": \"official\"},"
    " \"networks\": {\"denoiser\": {\"graphs\": {\"fp32\": {\"file\": \"d.onnx\", \"files\": [\"d.onnx\"],"
    "   \"sha256\": {\"d.onnx\": \"00\"}}}}}}";

static int denoiser(void* user, const float* x, const float* t, const int64_t* y, int64_t rows, float* out) {
    int64_t r, e;
    (void)user;
    for (r = 0; r < rows; ++r)
        for (e = 0; e < 32; ++e) out[r * 32 + e] = 0.1f * x[r * 16 + e % 16] + 1e-4f * t[r] - 0.01f * (float)y[r];
    return 0;
}

#define CHECK(cond, what)                                              \
    do {                                                               \
        if (!(cond)) {                                                 \
            fprintf(stderr, "FAILED: %s (%s)\n", what, ditrt_last_error()); \
            return 1;                                                  \
        }                                                              \
    } while (0)

int main(void) {
    char dir[] = "/tmp/ditrt_c_driver_XXXXXX", path[512];
    ditrt_executor* ex = NULL;
    ditrt_pipeline* pipe = NULL;
    int64_t labels[2] = {3, 7}, bad[1] = {10};
    float out[32];
    FILE* f;
    int i;
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    f = fopen(path, "w");
    CHECK(f != NULL, "write manifest");
    fputs(kManifest, f);
    fclose(f);

    CHECK(ditrt_executor_create_callback(denoiser, NULL, 0, &ex) == DITRT_OK, "create executor");
    CHECK(ditrt_open(dir, ex, DITRT_OPEN_DEFAULT, &pipe) == DITRT_OK, "open");
    CHECK(ditrt_sample(pipe, labels, 2, "ddim10", "ddim", 0.0, 4.0, "official", 1, NULL, NULL, out, 32) == DITRT_OK,
          "sample");
    for (i = 0; i < 32; ++i) CHECK(isfinite(out[i]), "finite latents");
    CHECK(ditrt_sample(pipe, bad, 1, "10", "ddpm", 0.0, 4.0, "official", 1, NULL, NULL, out, 32) == DITRT_INVALID_ARGUMENT,
          "label out of range");
    CHECK(strstr(ditrt_last_error(), "out of range") != NULL, "message");
    CHECK(ditrt_sample(pipe, labels, 2, "10", "ddpm", 0.0, 4.0, "official", 1, NULL, NULL, out, 31) == DITRT_BUFFER_TOO_SMALL,
          "small buffer");
    CHECK(ditrt_noise_normal(7, 0, 1, out, 5) == DITRT_OK, "noise");
    for (i = 0; i < 5; ++i) CHECK(isfinite(out[i]) && fabsf(out[i]) < 7.0f, "finite noise");
    CHECK(ditrt_noise_normal(7, 0, 1, NULL, 5) == DITRT_INVALID_ARGUMENT, "noise into NULL");
    CHECK(strncmp(ditrt_noise_version(), "philox4x32-10", 13) == 0, "noise version");
    ditrt_close(pipe);
    ditrt_executor_release(ex);
    remove(path);
    rmdir(dir);
    printf("c_driver: ok (ditrt %s)\n", ditrt_version());
    return 0;
}
