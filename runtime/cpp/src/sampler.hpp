// Sampler steps, guidance and the loop: the math and float32 operation order of
// runtime/samplers.py and runtime/pipeline.py. Every float64 table entry is cast to float32 at use;
// the build disables FMA contraction (-ffp-contract=off) so that a * x - b * y rounds as numpy does.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "executor.hpp"
#include "manifest.hpp"
#include "schedule.hpp"

namespace ditrt_core {

// Shapes of one step: n images of c latent channels and hw = H * W pixels; the model output has
// out_channels channels per image (eps first, then the variance values v when learned).
struct StepShape {
    int64_t n, c, hw, out_channels;
    bool learned_variance;  // v channels c..2c-1 drive the log-variance; else fixed large
};

// x_{t-1} into `out` (n, c, H, W); `out` must not alias x.
void ddpm_step(const Schedule& s, size_t i, const StepShape& shape, const float* x, const float* model_output,
               const float* noise, float* out);
void ddim_step(const Schedule& s, size_t i, const StepShape& shape, const float* x, const float* model_output,
               const float* noise, double eta, float* out);

// In place on the conditional rows: the first guided_channels channels become u + s (c - u).
void guide(float* cond, const float* uncond, int64_t n, int64_t out_channels, int64_t hw, double scale,
           int64_t guided_channels);

struct SampleRequest {
    std::vector<int64_t> labels;
    std::string steps, sampler, guidance;  // with_defaults() fills them from the manifest
    double eta = 0.0;
    double cfg_scale = 0.0;
    uint64_t seed = 0;
    const float* initial_noise = nullptr;  // both or neither
    const float* step_noise = nullptr;
};

// A request for these labels with the manifest's `defaults` (sampler, steps, cfg_scale, guidance).
SampleRequest with_defaults(const Manifest& m, std::vector<int64_t> labels);

// The loop: latents (N, C, H, W) into out (capacity in floats). Throws Error on bad requests.
void sample(const Manifest& m, Executor& executor, const SampleRequest& request, float* out, int64_t capacity);

}  // namespace ditrt_core
