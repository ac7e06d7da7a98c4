// Sampler steps, guidance and the loop: the math and float32 operation order of
// runtime/sampling/samplers.py, runtime/sampling/dpm_solver.py and runtime/execution/pipeline.py, with the Python runtime's
// checks and messages. Every float64 table entry is cast to float32 at use; the build disables
// FMA contraction (-ffp-contract=off) so that a * x - b * y rounds as numpy does.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dpm_solver.hpp"
#include "executor.hpp"
#include "flow.hpp"
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

// A request's options (ditrt_options): unset ones take the manifest's defaults.
struct SampleOptions {
    std::optional<std::string> sampler, steps, guidance;
    std::optional<double> cfg_scale, eta;
    std::string cfg_scale_text, eta_text;  // as given, for messages
    // SiT's sampler options as given (atol, rtol; diffusion_form, diffusion_norm, last_step,
    // last_step_size), checked against the sampler when the plan is made (flow.hpp plan_flow).
    std::map<std::string, std::string> sampler_options;
    uint64_t seed = 0;
    std::optional<uint64_t> image_offset;
    const float* initial_noise = nullptr;  // injected noise: initial (N, C, H, W), steps (K, N, C, H, W)
    int64_t initial_count = 0;
    const float* step_noise = nullptr;
    int64_t step_count = 0;
    // Called after every model call with (calls done, total calls, that call's timestep); a
    // non-zero return cancels the loop (Error(Status::Cancelled)).
    std::function<int(int64_t, int64_t, double)> progress;
};

enum class SamplerKind { Ddpm, Ddim, DpmSolver, Flow };  // Flow: SiT's ODE / SDE loops (flow.hpp)

// A request's sampler, schedule, guidance and scale, checked (runtime/execution/pipeline.py SampleRun).
struct Plan {
    SamplerKind kind = SamplerKind::Ddpm;
    std::string sampler;
    Schedule respaced;   // ddpm, ddim
    DpmSchedule dpm;     // dpm++2m
    FlowPlan flow;       // SiT
    std::vector<int64_t> model_timesteps;  // per model call, noisiest first (DiT)
    int64_t guided_channels = 0;
    double cfg_scale = 0, eta = 0;
    // Model calls; 0 for ode-dopri5 (adaptive: known only after the run).
    int64_t calls() const { return kind == SamplerKind::Flow ? flow.model_calls() : int64_t(model_timesteps.size()); }
    // Stochastic draws: the leading axis of injected step noise (DiT: one row per model call).
    int64_t noise_draws() const { return kind == SamplerKind::Flow ? flow.noise_draws() : calls(); }
};

Plan plan_sampling(const Manifest& m, const SampleOptions& options);

// The loop: latents (N, C, H, W) for these class labels into out (capacity in floats), written
// only when every step succeeded. Throws Error on bad requests, a failed executor, NaN/inf, or
// a cancel.
void sample(const Manifest& m, Executor& executor, const std::vector<int64_t>& labels, const SampleOptions& options,
            float* out, int64_t capacity);

// sample() for a SiT artifact (p.kind == Flow).
void sample_flow(const Manifest& m, Executor& executor, const std::vector<int64_t>& labels, const SampleOptions& options,
                 const Plan& p, float* out, int64_t capacity);

// Images (N, 3, H, W) float32 from DiT-scale latents (N, C, h, w) through the decoder network.
void decode(const Manifest& m, Executor& executor, const float* latents, int64_t n, float* images, int64_t capacity);

// The decoder's image shape (3, H, W); Error(Artifact) when the artifact has no decoder.
std::vector<int64_t> image_shape(const Manifest& m);

// a * b * ... as the number of values of one buffer, refused (Error(InvalidArgument) naming
// `what`) beyond kMaxValues: sizes never overflow and never reach an absurd allocation.
inline constexpr int64_t kMaxValues = int64_t(1) << 32;  // 16 GiB of float32
int64_t checked_count(std::initializer_list<int64_t> factors, const std::string& what);

}  // namespace ditrt_core
