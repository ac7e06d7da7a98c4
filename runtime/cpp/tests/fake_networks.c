/* A ditrt-sample executor plugin for tests (ditrt-sample --executor PLUGIN.so): fixed float32
 * functions of the inputs standing in for the denoiser and the decoder, simple enough that
 * tests/test_cpp_runtime.py computes them in numpy in the same operation order.
 *   denoiser: model_output[r, e] = 0.1 latent[r, e mod (C H W)] + 1e-4 timestep[r] - 0.01 class_label[r]
 *   decoder:  image[j, e] = 0.5 latent[j, e mod (C H W)] - 0.1 */
#include <stdint.h>
#include <string.h>

#include "ditrt/ditrt.h"

static int64_t per_row(const ditrt_tensor* t) {
    int64_t n = 1, d;
    for (d = 1; d < t->rank; ++d) n *= t->shape[d];
    return n;
}

__attribute__((visibility("default"))) int ditrt_plugin_run(void* user, const char* network, const ditrt_tensor* in,
                                                            int64_t n_in, const ditrt_tensor* out, int64_t n_out) {
    int64_t r, e, rows = in[0].shape[0], in_row = per_row(&in[0]), out_row = per_row(&out[0]);
    const float* x = (const float*)in[0].data;
    float* o = (float*)out[0].data;
    (void)user;
    if (n_out != 1) return 1;
    if (strcmp(network, "denoiser") == 0 && n_in == 3) {
        const float* t = (const float*)in[1].data;
        const int64_t* y = (const int64_t*)in[2].data;
        for (r = 0; r < rows; ++r)
            for (e = 0; e < out_row; ++e) o[r * out_row + e] = 0.1f * x[r * in_row + e % in_row] + 1e-4f * t[r] - 0.01f * (float)y[r];
        return 0;
    }
    if (strcmp(network, "decoder") == 0 && n_in == 1) {
        for (r = 0; r < rows; ++r)
            for (e = 0; e < out_row; ++e) o[r * out_row + e] = 0.5f * x[r * in_row + e % in_row] - 0.1f;
        return 0;
    }
    return 2;
}
