#include "sampler.hpp"

#include <cmath>
#include <memory>

#include "error.hpp"
#include "noise.hpp"

namespace ditrt_core {
namespace {

float f32(const std::vector<double>& table, size_t i) { return float(table[i]); }

// x0 = sqrt(1/ac) x - sqrt(1/ac - 1) eps (no clipping: clip_denoised is refused by the reader)
float predict_x0(float a, float b, float x, float eps) { return a * x - b * eps; }

// Pointers to image j's eps and v channels in a (n, out_channels, H, W) model output.
const float* eps_of(const StepShape& s, const float* mo, int64_t j) { return mo + j * s.out_channels * s.hw; }

}  // namespace

void ddpm_step(const Schedule& s, size_t i, const StepShape& shape, const float* x, const float* mo,
               const float* noise, float* out) {
    const float a = f32(s.sqrt_recip_alphas_cumprod, i), b = f32(s.sqrt_recipm1_alphas_cumprod, i);
    const float c1 = f32(s.posterior_mean_coef1, i), c2 = f32(s.posterior_mean_coef2, i);
    const float min_log = f32(s.posterior_log_variance_clipped, i), max_log = f32(s.log_betas, i);
    const float fixed_log = f32(s.fixed_large_log_variance, i);
    const int64_t per_image = shape.c * shape.hw;
    for (int64_t j = 0; j < shape.n; ++j) {
        const float* eps = eps_of(shape, mo, j);
        const float* v = eps + per_image;  // read only when learned
        for (int64_t e = 0; e < per_image; ++e) {
            const int64_t k = j * per_image + e;
            const float x0 = predict_x0(a, b, x[k], eps[e]);
            const float mean = c1 * x0 + c2 * x[k];
            if (i == 0) {  // no noise at the last step
                out[k] = mean;
                continue;
            }
            float log_var = fixed_log;
            if (shape.learned_variance) {
                const float frac = (v[e] + 1.0f) / 2.0f;  // learned range, no clamp
                log_var = frac * max_log + (1.0f - frac) * min_log;
            }
            out[k] = mean + std::exp(0.5f * log_var) * noise[k];
        }
    }
}

void ddim_step(const Schedule& s, size_t i, const StepShape& shape, const float* x, const float* mo,
               const float* noise, double eta, float* out) {
    const float a = f32(s.sqrt_recip_alphas_cumprod, i), b = f32(s.sqrt_recipm1_alphas_cumprod, i);
    const float alpha_bar = f32(s.alphas_cumprod, i), alpha_bar_prev = f32(s.alphas_cumprod_prev, i);
    const float sigma = float(eta) * std::sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) *
                        std::sqrt(1 - alpha_bar / alpha_bar_prev);
    const float mean_x0 = std::sqrt(alpha_bar_prev), mean_eps = std::sqrt(1 - alpha_bar_prev - sigma * sigma);
    const bool add_noise = !(i == 0 || sigma == 0);
    const int64_t per_image = shape.c * shape.hw;
    for (int64_t j = 0; j < shape.n; ++j) {
        const float* eps_in = eps_of(shape, mo, j);
        for (int64_t e = 0; e < per_image; ++e) {
            const int64_t k = j * per_image + e;
            const float x0 = predict_x0(a, b, x[k], eps_in[e]);
            const float eps = (a * x[k] - x0) / b;  // re-derived from x0, as the official code
            const float mean = x0 * mean_x0 + mean_eps * eps;
            out[k] = add_noise ? mean + sigma * noise[k] : mean;
        }
    }
}

void guide(float* cond, const float* uncond, int64_t n, int64_t out_channels, int64_t hw, double scale,
           int64_t guided_channels) {
    const float s = float(scale);
    for (int64_t j = 0; j < n; ++j) {
        float* c = cond + j * out_channels * hw;
        const float* u = uncond + j * out_channels * hw;
        for (int64_t e = 0; e < guided_channels * hw; ++e) c[e] = u[e] + s * (c[e] - u[e]);
    }
}

namespace {

// A request with the manifest's defaults filled in and every argument checked.
struct Checked {
    Schedule schedule;
    bool ddim;
    int64_t guided_channels;
    double cfg_scale;
};

Checked check(const Manifest& m, const SampleRequest& r, int64_t capacity) {
    if (r.labels.empty()) throw Error(Status::InvalidArgument, "need at least one class label");
    for (int64_t label : r.labels)
        if (label < 0 || label >= m.num_classes)
            throw Error(Status::InvalidArgument,
                        "class label " + std::to_string(label) + " out of range: this model has classes 0.." +
                            std::to_string(m.num_classes - 1) + " (the null class " + std::to_string(m.null_class) +
                            " is added by guidance)");
    const std::string& sampler = r.sampler;
    if (sampler != "ddpm" && sampler != "ddim")
        throw Error(Status::InvalidArgument, "unknown sampler \"" + sampler + "\"; use ddpm or ddim");
    const std::string& guidance = r.guidance;
    auto gc = m.guided_channels.find(guidance);
    if (gc == m.guided_channels.end()) {
        std::string names;
        for (const auto& [name, _] : m.guided_channels) names += (names.empty() ? "" : " or ") + name;
        throw Error(Status::InvalidArgument, "unknown guidance \"" + guidance + "\"; use " + names);
    }
    const double scale = r.cfg_scale;
    if (!std::isfinite(scale)) throw Error(Status::InvalidArgument, "cfg_scale must be finite, got " + std::to_string(scale));
    if (sampler == "ddim" && !(r.eta >= 0.0 && r.eta <= 1.0))
        throw Error(Status::InvalidArgument, "eta must be in [0, 1], got " + std::to_string(r.eta));
    if ((r.initial_noise == nullptr) != (r.step_noise == nullptr))
        throw Error(Status::InvalidArgument, "injected noise needs both initial_noise and step_noise (or neither)");
    const int64_t need = int64_t(r.labels.size()) * m.in_channels * m.input_size * m.input_size;
    if (capacity < need)
        throw Error(Status::BufferTooSmall, "the output buffer holds " + std::to_string(capacity) + " floats; " +
                                                std::to_string(r.labels.size()) + " latents need " + std::to_string(need));
    return {respaced_schedule(m.base_betas(), r.steps), sampler == "ddim", gc->second, scale};
}

// One model call for all rows, split into chunks of the executor's max batch.
void run_batched(Executor& ex, const float* latent, const float* timestep, const int64_t* labels, int64_t rows,
                 int64_t in_per_row, int64_t out_per_row, float* out) {
    const int64_t limit = ex.max_batch() > 0 ? ex.max_batch() : rows;
    for (int64_t start = 0; start < rows; start += limit) {
        const int64_t count = std::min(limit, rows - start);
        ex.run(latent + start * in_per_row, timestep + start, labels + start, count, out + start * out_per_row);
    }
}

}  // namespace

SampleRequest with_defaults(const Manifest& m, std::vector<int64_t> labels) {
    SampleRequest r;
    r.labels = std::move(labels);
    r.steps = m.default_steps;
    r.sampler = m.default_sampler;
    r.guidance = m.default_guidance;
    r.cfg_scale = m.default_cfg_scale;
    return r;
}

void sample(const Manifest& m, Executor& executor, const SampleRequest& r, float* out, int64_t capacity) {
    const Checked c = check(m, r, capacity);
    const int64_t n = int64_t(r.labels.size()), hw = m.input_size * m.input_size, per_image = m.in_channels * hw;
    const bool guided = c.cfg_scale > 1.0;  // as the official sample_ddp.py: no unconditional rows at scale <= 1
    const int64_t rows = guided ? 2 * n : n, steps = int64_t(c.schedule.size());
    const StepShape shape{n, m.in_channels, hw, m.out_channels, m.learned_variance()};

    std::vector<int64_t> labels(r.labels);
    if (guided) labels.insert(labels.end(), size_t(n), m.null_class);
    std::vector<float> latent_in(size_t(rows * per_image)), timestep_in(static_cast<size_t>(rows));
    std::vector<float> model_out(size_t(rows * m.out_channels * hw)), next(size_t(n * per_image));
    std::unique_ptr<NoiseSource> noise;
    if (r.initial_noise) noise = std::make_unique<InjectedNoise>(r.initial_noise, r.step_noise, n * per_image);
    else noise = std::make_unique<SeededNoise>(r.seed, n, per_image);

    float* x = latent_in.data();  // the conditional half of the model input is x itself
    noise->initial(x);
    for (int64_t k = 0; k < steps; ++k) {
        const size_t i = size_t(steps - 1 - k);  // from the noisiest index down to 0
        if (guided) std::copy(x, x + n * per_image, x + n * per_image);
        std::fill(timestep_in.begin(), timestep_in.end(), float(c.schedule.timesteps[i]));
        run_batched(executor, latent_in.data(), timestep_in.data(), labels.data(), rows, per_image,
                    m.out_channels * hw, model_out.data());
        if (guided)
            guide(model_out.data(), model_out.data() + n * m.out_channels * hw, n, m.out_channels, hw, c.cfg_scale,
                  c.guided_channels);
        const float* step_noise = noise->step(k);
        if (c.ddim) ddim_step(c.schedule, i, shape, x, model_out.data(), step_noise, r.eta, next.data());
        else ddpm_step(c.schedule, i, shape, x, model_out.data(), step_noise, next.data());
        std::copy(next.begin(), next.end(), x);
    }
    std::copy(x, x + n * per_image, out);
}

void CallbackExecutor::run(const float* latent, const float* timestep, const int64_t* class_label, int64_t rows,
                           float* model_output) {
    const int rc = fn_(user_, latent, timestep, class_label, rows, model_output);
    if (rc != 0) throw Error(Status::Executor, "the denoiser callback failed (returned " + std::to_string(rc) + ")");
}

}  // namespace ditrt_core
