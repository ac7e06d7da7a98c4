#include "sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "error.hpp"
#include "noise.hpp"
#include "portable.hpp"
#include "pyjson.hpp"
#include "registry.hpp"

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
            out[k] = mean + exp_float32(0.5f * log_var) * noise[k];  // portable.hpp: numpy's exp is not expf
        }
    }
}

void ddim_step(const Schedule& s, size_t i, const StepShape& shape, const float* x, const float* mo,
               const float* noise, double eta, float* out) {
    const float a = f32(s.sqrt_recip_alphas_cumprod, i), b = f32(s.sqrt_recipm1_alphas_cumprod, i);
    const float alpha_bar = f32(s.alphas_cumprod, i), alpha_bar_prev = f32(s.alphas_cumprod_prev, i);
    // eta 0: sigma is exactly 0 (never 0 * NaN), so no noise is needed (the loop draws none then).
    const float sigma = eta == 0.0 ? 0.0f : float(eta) * std::sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) *
                                                std::sqrt(1 - alpha_bar / alpha_bar_prev);
    const float mean_x0 = std::sqrt(alpha_bar_prev), mean_eps = std::sqrt(1 - alpha_bar_prev - sigma * sigma);
    const bool add_noise = !(i == 0 || sigma == 0);
    if (add_noise && noise == nullptr)  // the loop draws noise whenever eta != 0 and i != 0
        throw Error(Status::Internal, "ddim_step: sigma " + std::to_string(sigma) + " at index " + std::to_string(i) +
                                          " needs noise, none was drawn");
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

bool all_finite(const float* x, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
        if (!std::isfinite(x[i])) return false;
    return true;
}

SamplerKind sampler_kind(const std::string& name) {
    if (name == "ddpm") return SamplerKind::Ddpm;
    if (name == "ddim") return SamplerKind::Ddim;
    if (name == "dpm++2m") return SamplerKind::DpmSolver;
    const std::string family = registry::family_of(name);
    throw Error(Status::InvalidArgument, "unknown sampler '" + name + "' for a dit model" +
                                             (family.empty() ? "" : " (" + name + " samples " + family + " models)") +
                                             "; use " + registry::joined(registry::samplers_of("dit")));
}

// runtime/spec/conditioning.py ClassLabels.check, over the denoiser's condition input (its spec).
void check_labels(const Condition& c, const std::vector<int64_t>& labels) {
    std::vector<int64_t> bad;
    for (int64_t label : labels)
        if (label < 0 || label >= c.num_classes) bad.push_back(label);
    if (bad.empty()) return;
    std::sort(bad.begin(), bad.end());
    bad.erase(std::unique(bad.begin(), bad.end()), bad.end());
    std::string shown;
    for (size_t i = 0; i < bad.size() && i < 10; ++i) shown += (i ? ", " : "") + std::to_string(bad[i]);
    throw Error(Status::InvalidArgument, "class labels [" + shown + "]" + (bad.size() > 10 ? " ..." : "") +
                                             " out of range: this model has classes 0.." + std::to_string(c.num_classes - 1) +
                                             " (the null class " + std::to_string(c.null) + " is added by guidance)");
}

const TensorSpec& input_of(const NetworkSpec& spec, const std::string& role) {
    const TensorSpec* t = spec.input_with_role(role);
    if (!t)
        throw Error(Status::Artifact, "the " + spec.name + " network has no single input with role '" + role + "'");
    return *t;
}

// The denoiser's inputs (in its spec's order) and its output over a loop's buffers of `rows` rows.
struct DenoiserTensors {
    std::vector<TensorView> inputs, outputs;
};

DenoiserTensors denoiser_tensors(const NetworkSpec& net, int64_t rows, int64_t C, int64_t S, int64_t out_channels,
                                 float* latent, float* time, int64_t* condition, float* model_out) {
    const TensorView views_in[] = {{&input_of(net, "latent"), {rows, C, S, S}, latent},
                                   {&input_of(net, "time"), {rows}, time},
                                   {&input_of(net, "condition"), {rows}, condition}};
    DenoiserTensors tensors;
    for (const TensorSpec& t : net.inputs)
        for (const TensorView& v : views_in)
            if (v.spec == &t) tensors.inputs.push_back(v);
    tensors.outputs = {{&net.outputs[0], {rows, out_channels, S, S}, model_out}};
    return tensors;
}
}  // namespace

int64_t checked_count(std::initializer_list<int64_t> factors, const std::string& what) {
    int64_t count = 1;
    for (int64_t f : factors) {
        if (f < 0) throw Error(Status::InvalidArgument, what + ": a negative size");
        if (f != 0 && count > kMaxValues / f)
            throw Error(Status::InvalidArgument, what + " would hold more than 2^32 values (16 GiB of float32): refused; "
                                                        "ask for fewer images per call");
        count *= f;
    }
    return count;
}

void run_network(Executor& executor, const NetworkSpec& network, int64_t batch, const std::vector<TensorView>& inputs,
                 const std::vector<TensorView>& outputs) {
    const int64_t max = executor.max_batch(network.name);
    const int64_t limit = max > 0 ? max : batch;
    for (int64_t start = 0; start < batch; start += limit) {
        const int64_t count = std::min(limit, batch - start);
        auto chunk = [&](const std::vector<TensorView>& views) {
            std::vector<TensorView> out;
            for (const TensorView& v : views) {
                const int64_t row_bytes = v.spec->per_row() * int64_t(dtype_size(v.spec->dtype));
                TensorView c = v;
                c.shape[0] = count;
                c.data = static_cast<char*>(v.data) + start * row_bytes;
                out.push_back(c);
            }
            return out;
        };
        executor.run(network, chunk(inputs), chunk(outputs));
    }
}

void CallbackExecutor::run(const NetworkSpec& network, const std::vector<TensorView>& inputs,
                           const std::vector<TensorView>& outputs) {
    auto to_c = [](const std::vector<TensorView>& views) {
        std::vector<ditrt_tensor> out(views.size());
        for (size_t i = 0; i < views.size(); ++i) {
            ditrt_tensor& t = out[i];
            std::memset(&t, 0, sizeof t);
            t.name = views[i].spec->name.c_str();
            t.dtype = int32_t(views[i].spec->dtype);
            t.rank = int32_t(views[i].shape.size());
            for (size_t d = 0; d < views[i].shape.size() && d < DITRT_MAX_RANK; ++d) t.shape[d] = views[i].shape[d];
            t.data = views[i].data;
        }
        return out;
    };
    const std::vector<ditrt_tensor> in = to_c(inputs), out = to_c(outputs);
    const int rc = fn_(user_, network.name.c_str(), in.data(), int64_t(in.size()), out.data(), int64_t(out.size()));
    if (rc != 0)
        throw Error(Status::Executor, "the " + network.name + " callback failed (returned " + std::to_string(rc) + ")");
}

namespace {

// The guidance convention and scale of a request (either family).
void plan_guidance(const Manifest& m, const SampleOptions& o, Plan& p) {
    const std::string guidance = o.guidance ? *o.guidance : m.default_guidance;
    const int64_t* channels = m.guided(guidance);
    if (!channels) {
        std::string names;
        for (const auto& [name, _] : m.guided_channels) names += (names.empty() ? "" : " or ") + name;
        throw Error(Status::InvalidArgument, "unknown guidance '" + guidance + "'; use " + names);
    }
    p.guided_channels = *channels;
    p.cfg_scale = o.cfg_scale ? *o.cfg_scale : m.default_cfg_scale;
    if (!std::isfinite(p.cfg_scale) || !pyjson::fits_float32(p.cfg_scale))
        throw Error(Status::InvalidArgument, "cfg_scale must be a finite float32 number, got " +
                                                 (o.cfg_scale ? o.cfg_scale_text : pyjson::format_g(p.cfg_scale)));
}

Plan plan_flow_sampling(const Manifest& m, const SampleOptions& o) {
    Plan p;
    p.kind = SamplerKind::Flow;
    p.sampler = o.sampler ? *o.sampler : m.default_sampler;
    std::map<std::string, std::string> options = o.sampler_options;
    if (o.eta) options["eta"] = o.eta_text;  // refused by name: no SiT sampler takes eta
    p.flow = plan_flow(p.sampler, o.steps ? *o.steps : m.default_steps, !o.steps && m.default_steps_is_int, options);
    plan_guidance(m, o, p);
    return p;
}

}  // namespace

Plan plan_sampling(const Manifest& m, const SampleOptions& o) {
    if (m.is_sit()) return plan_flow_sampling(m, o);
    Plan p;
    p.sampler = o.sampler ? *o.sampler : m.default_sampler;
    p.kind = sampler_kind(p.sampler);
    // Sampler options (the registry's): given to a sampler that does not take them, refused, never ignored.
    if (o.eta && !registry::takes(p.sampler, "eta"))
        throw Error(Status::InvalidArgument, "eta applies to " + registry::option_takers("eta") + " only; " + p.sampler + " takes no eta");
    for (const auto& [name, value] : o.sampler_options)  // eta comes as o.eta: no other option is a DiT sampler's
        throw Error(Status::InvalidArgument, name + " applies to " + registry::option_takers(name) + " only; " + p.sampler + " takes no " + name);
    if (p.kind == SamplerKind::Ddim) {
        p.eta = o.eta ? *o.eta : m.has_default_eta ? m.default_eta : 0.0;
        if (!(p.eta >= 0.0 && p.eta <= 1.0))
            throw Error(Status::InvalidArgument, "eta must be a number in [0, 1], got " + (o.eta ? o.eta_text : pyjson::format_g(p.eta)));
    }
    const std::string steps = o.steps ? *o.steps : m.default_steps;
    const bool steps_is_int = !o.steps && m.default_steps_is_int;
    if (p.kind == SamplerKind::DpmSolver) {
        p.dpm = dpm_schedule(alphas_cumprod(m.base_betas()), dpm_parse_steps(steps, steps_is_int, m.num_train_timesteps));
        p.model_timesteps = p.dpm.model_timesteps;
    } else {
        p.respaced = respaced_schedule(m.base_betas(), steps);
        p.model_timesteps.assign(p.respaced.timesteps.rbegin(), p.respaced.timesteps.rend());
    }
    plan_guidance(m, o, p);
    return p;
}

// The step draws the loop takes, 0 .. n - 1 in order (the noise prefetch computes none past
// them): none at the last call (i = 0), none for eta-0 DDIM or DPM-Solver++.
static int64_t step_draws(const Plan& p, int64_t calls) {
    switch (p.kind) {
        case SamplerKind::Ddpm: return calls - 1;
        case SamplerKind::Ddim: return p.eta != 0.0 ? calls - 1 : 0;
        default: return 0;
    }
}

void sample(const Manifest& m, Executor& executor, const std::vector<int64_t>& labels, const SampleOptions& o, float* out,
            int64_t capacity) {
    if (labels.empty()) throw Error(Status::InvalidArgument, "class_labels must be a non-empty 1-D sequence of ints, got shape (0,)");
    // The conditioning comes from the denoiser's spec: its one condition input, of kind "class"
    // (the reader refuses other kinds, and more or fewer condition inputs than the model's).
    const NetworkSpec& net = m.denoiser();
    const TensorSpec& condition_input = input_of(net, "condition");
    check_labels(condition_input.condition, labels);
    const Plan p = plan_sampling(m, o);
    if (p.kind == SamplerKind::Flow) return sample_flow(m, executor, labels, o, p, out, capacity);
    const int64_t n = int64_t(labels.size()), C = m.in_channels, S = m.input_size, hw = S * S;
    const int64_t per_image = checked_count({C, S, S}, "one latent");
    const int64_t count = checked_count({n, C, S, S}, "the latents");
    const bool guided = p.cfg_scale > 1.0;  // as the official sample_ddp.py: no unconditional rows at scale <= 1
    const int64_t rows = guided ? 2 * n : n;
    checked_count({rows, C, S, S}, "the denoiser's input");
    const int64_t out_count = checked_count({rows, m.out_channels, S, S}, "the denoiser's output");
    const int64_t K = p.calls();

    // Noise: injected (checked as runtime/sampling/noise.py InjectedNoise) or the seeded stream.
    const bool injected = o.initial_noise != nullptr;
    if (injected) {
        if (o.image_offset)
            throw Error(Status::InvalidArgument, "image_offset selects seeded noise; it does not apply to injected noise");
        if (o.initial_count != count)
            throw Error(Status::InvalidArgument, "injected initial noise holds " + std::to_string(o.initial_count) +
                                                     " values; expected (N, C, H, W) = " + std::to_string(count));
        const bool optional_steps = p.kind == SamplerKind::DpmSolver && o.step_noise == nullptr;  // draws none
        const int64_t want = optional_steps ? 0 : checked_count({K, n, C, S, S}, "the injected step noise");
        if (!optional_steps && (o.step_noise == nullptr || o.step_count != want))
            throw Error(Status::InvalidArgument, "injected step noise holds " + std::to_string(o.step_noise ? o.step_count : 0) +
                                                     " values; expected (draws, images, C, H, W) = (" + std::to_string(K) + ", " +
                                                     std::to_string(n) + ", " + std::to_string(C) + ", " + std::to_string(S) +
                                                     ", " + std::to_string(S) + ") = " + std::to_string(want) +
                                                     (p.kind == SamplerKind::DpmSolver ? " (or none: dpm++2m draws no noise)" : ""));
        if (!all_finite(o.initial_noise, count))
            throw Error(Status::InvalidArgument, "injected initial noise contains NaN or inf (in float32)");
        if (o.step_noise && !all_finite(o.step_noise, want))
            throw Error(Status::InvalidArgument, "injected step noise contains NaN or inf (in float32)");
    } else if (o.image_offset && *o.image_offset + uint64_t(n - 1) < *o.image_offset) {
        throw Error(Status::InvalidArgument, "image_offset " + std::to_string(*o.image_offset) + " + " + std::to_string(n) +
                                                 " images passes the last image index 2^64 - 1");
    }
    if (capacity < count)
        throw Error(Status::BufferTooSmall, "the output buffer holds " + std::to_string(capacity) + " floats; " +
                                                std::to_string(n) + " latents need " + std::to_string(count));

    std::vector<float> latent_in(static_cast<size_t>(rows * per_image)), time_in(static_cast<size_t>(rows));
    std::vector<float> model_out(static_cast<size_t>(out_count)), next(static_cast<size_t>(count)), x0, state;
    std::vector<int64_t> condition(labels);
    if (guided) condition.insert(condition.end(), size_t(n), condition_input.condition.null);
    std::unique_ptr<NoiseSource> noise;
    if (injected) noise = std::make_unique<InjectedNoise>(o.initial_noise, o.step_noise, count);
    else noise = std::make_unique<PrefetchedNoise>(o.seed, n, per_image, o.image_offset.value_or(0), step_draws(p, K));
    if (p.kind == SamplerKind::DpmSolver) x0.resize(size_t(count)), state.resize(size_t(count));

    const DenoiserTensors tensors = denoiser_tensors(net, rows, C, S, m.out_channels, latent_in.data(), time_in.data(),
                                                     condition.data(), model_out.data());
    const StepShape shape{n, C, hw, m.out_channels, m.learned_variance()};

    float* x = latent_in.data();  // the conditional half of the model input is x itself
    noise->initial(x);
    for (int64_t k = 0; k < K; ++k) {
        const double t = double(p.model_timesteps[size_t(k)]);
        if (guided) std::copy(x, x + count, x + count);
        std::fill(time_in.begin(), time_in.end(), float(t));
        run_network(executor, net, rows, tensors.inputs, tensors.outputs);
        if (guided) guide(model_out.data(), model_out.data() + n * m.out_channels * hw, n, m.out_channels, hw, p.cfg_scale,
                          p.guided_channels);
        const size_t i = size_t(K - 1 - k);  // ddpm / ddim: from the noisiest index down to 0
        switch (p.kind) {
            case SamplerKind::Ddpm:
                ddpm_step(p.respaced, i, shape, x, model_out.data(), i == 0 ? nullptr : noise->step(k), next.data());
                break;
            case SamplerKind::Ddim: {
                const bool noisy = i != 0 && p.eta != 0.0;  // else the noise is not used: not drawn
                ddim_step(p.respaced, i, shape, x, model_out.data(), noisy ? noise->step(k) : nullptr, p.eta, next.data());
                break;
            }
            case SamplerKind::DpmSolver:
                dpmpp_2m_step(p.dpm, size_t(k), n, C, hw, m.out_channels, x, model_out.data(), state.data(), next.data(),
                              x0.data());
                std::swap(x0, state);
                break;
            case SamplerKind::Flow: break;  // sample_flow
        }
        if (!all_finite(next.data(), count))
            throw Error(Status::Step, "sampling produced NaN or inf at step " + std::to_string(k + 1) + "/" + std::to_string(K) +
                                          " (timestep " + pyjson::format_g(t) + ") on " + executor.describe(net.name) +
                                          "; the model output or cfg_scale " + pyjson::format_g(p.cfg_scale) + " overflows float32");
        std::copy(next.begin(), next.end(), x);
        if (o.progress && o.progress(k + 1, K, t) != 0)
            throw Error(Status::Cancelled, "cancelled by the progress callback after step " + std::to_string(k + 1) + "/" +
                                               std::to_string(K) + "; the output was not written");
    }
    std::copy(x, x + count, out);
}

namespace {

// Injected noise as runtime/sampling/noise.py InjectedNoise checks it: initial (N, C, H, W), step noise
// (draws, N, C, H, W); a sampler that draws nothing takes none (step NULL).
void check_injected_flow(const SampleOptions& o, const Plan& p, int64_t n, int64_t per_image, int64_t count) {
    if (o.image_offset)
        throw Error(Status::InvalidArgument, "image_offset selects seeded noise; it does not apply to injected noise");
    if (o.initial_count != count)
        throw Error(Status::InvalidArgument, "injected initial noise holds " + std::to_string(o.initial_count) +
                                                 " values; expected (N, C, H, W) = " + std::to_string(count));
    const int64_t draws = p.noise_draws();
    const int64_t want = checked_count({draws, n, per_image}, "the injected step noise");
    if ((draws == 0 && o.step_noise != nullptr) || (draws > 0 && (o.step_noise == nullptr || o.step_count != want)))
        throw Error(Status::InvalidArgument, "injected step noise holds " + std::to_string(o.step_noise ? o.step_count : 0) +
                                                 " values; expected (draws, images, C, H, W) = (" + std::to_string(draws) + ", " +
                                                 std::to_string(n) + ", ...) = " + std::to_string(want) +
                                                 (draws ? " (" + p.sampler + " draws num_steps - 1 times)" :
                                                          " or none: " + p.sampler + " draws no noise"));
    if (!all_finite(o.initial_noise, count))
        throw Error(Status::InvalidArgument, "injected initial noise contains NaN or inf (in float32)");
    if (o.step_noise && !all_finite(o.step_noise, want))
        throw Error(Status::InvalidArgument, "injected step noise contains NaN or inf (in float32)");
}

}  // namespace

// SiT: runtime/execution/pipeline.py SampleRun over a flow loop. Guidance is forward_with_cfg: the network
// sees [x; x] with labels [y; null]; ode-dopri5 integrates the whole guided batch [x; x_null] (the
// network still sees the real half twice), the other loops the N real rows.
void sample_flow(const Manifest& m, Executor& executor, const std::vector<int64_t>& labels, const SampleOptions& o,
                 const Plan& p, float* out, int64_t capacity) {
    const NetworkSpec& net = m.denoiser();
    const TensorSpec& condition_input = input_of(net, "condition");
    const int64_t n = int64_t(labels.size()), C = m.in_channels, S = m.input_size, hw = S * S;
    const int64_t per_image = checked_count({C, S, S}, "one latent");
    const int64_t count = checked_count({n, C, S, S}, "the latents");
    const bool guided = p.cfg_scale > 1.0;  // no unconditional rows at scale <= 1, as DiT
    const bool null_half = guided && p.flow.integrates_null_half();
    const int64_t rows = guided ? 2 * n : n;
    checked_count({rows, C, S, S}, "the denoiser's input");
    const int64_t out_count = checked_count({rows, m.out_channels, S, S}, "the denoiser's output");
    const bool injected = o.initial_noise != nullptr;
    if (injected) check_injected_flow(o, p, n, per_image, count);
    else if (o.image_offset && *o.image_offset + uint64_t(n - 1) < *o.image_offset)
        throw Error(Status::InvalidArgument, "image_offset " + std::to_string(*o.image_offset) + " + " + std::to_string(n) +
                                                 " images passes the last image index 2^64 - 1");
    if (capacity < count)
        throw Error(Status::BufferTooSmall, "the output buffer holds " + std::to_string(capacity) + " floats; " +
                                                std::to_string(n) + " latents need " + std::to_string(count));

    std::unique_ptr<NoiseSource> noise;
    if (injected) noise = std::make_unique<InjectedNoise>(o.initial_noise, o.step_noise, count);
    else  // the SDEs' draws on a worker thread, each while the engine runs the call before it (the same stream)
        noise = std::make_unique<PrefetchedNoise>(o.seed, n, per_image, o.image_offset.value_or(0), p.flow.noise_draws());
    std::vector<float> x(size_t(null_half ? 2 * count : count));
    noise->initial(x.data());
    if (null_half) std::copy(x.begin(), x.begin() + count, x.begin() + count);

    std::vector<float> latent_in(static_cast<size_t>(rows * per_image)), time_in(static_cast<size_t>(rows)),
        model_out(static_cast<size_t>(out_count));
    std::vector<int64_t> condition(labels);
    if (guided) condition.insert(condition.end(), size_t(n), condition_input.condition.null);
    const DenoiserTensors tensors = denoiser_tensors(net, rows, C, S, m.out_channels, latent_in.data(), time_in.data(),
                                                     condition.data(), model_out.data());
    const int64_t total = p.calls(), state = int64_t(x.size()), per_out = m.out_channels * hw;
    int64_t calls = 0;
    double last_t = 0.0;
    auto step_error = [&](const std::string& where) {
        return Error(Status::Step, "sampling produced NaN or inf " + where + " (t " + pyjson::format_g(last_t) + ") on " +
                                       executor.describe(net.name) + "; the model output or cfg_scale " +
                                       pyjson::format_g(p.cfg_scale) + " overflows float32");
    };
    const Velocity velocity = [&](const float* x_eval, float t, float* v) {
        if (!all_finite(x_eval, state)) throw step_error("before model call " + std::to_string(calls + 1));
        std::copy(x_eval, x_eval + count, latent_in.begin());  // the real rows (twice under guidance)
        if (guided) std::copy(x_eval, x_eval + count, latent_in.begin() + count);
        std::fill(time_in.begin(), time_in.end(), t);
        run_network(executor, net, rows, tensors.inputs, tensors.outputs);
        if (guided) guide(model_out.data(), model_out.data() + n * per_out, n, m.out_channels, hw, p.cfg_scale, p.guided_channels);
        std::copy(model_out.begin(), model_out.begin() + count, v);
        if (null_half) {  // forward_with_cfg's second half: the same guided channels, its own rest
            std::copy(model_out.begin() + count, model_out.begin() + 2 * count, v + count);
            for (int64_t j = 0; j < n; ++j)
                std::copy(v + j * per_out, v + j * per_out + p.guided_channels * hw, v + count + j * per_out);
        }
        last_t = t;
        ++calls;
        if (o.progress && o.progress(calls, total, double(t)) != 0)
            throw Error(Status::Cancelled, "cancelled by the progress callback after model call " + std::to_string(calls) +
                                               (total ? "/" + std::to_string(total) : "") + "; the output was not written");
    };
    const Draw draw = [&](int64_t k) { return noise->step(k); };
    flow_sample(p.flow, x, velocity, draw);
    if (!all_finite(x.data(), state)) throw step_error("in the sample after " + std::to_string(calls) + " model calls");
    std::copy(x.begin(), x.begin() + count, out);
}

std::vector<int64_t> image_shape(const Manifest& m) {
    const NetworkSpec* spec = m.network("decoder");
    if (!spec) throw Error(Status::Artifact, m.directory + " has no decoder network (export with --vae DIR to add a decoder)");
    const std::vector<int64_t>& shape = spec->outputs[0].shape;
    return {shape[1], shape[2], shape[3]};
}

void decode(const Manifest& m, Executor& executor, const float* latents, int64_t n, float* images, int64_t capacity) {
    const std::vector<int64_t> shape = image_shape(m);
    const NetworkSpec& net = *m.network("decoder");
    const TensorSpec& in = input_of(net, "latent");
    const TensorSpec& out = net.outputs[0];
    if (in.dtype != DType::Float32 || out.dtype != DType::Float32)
        throw Error(Status::Artifact, "the decoder network takes " + std::string(dtype_name(in.dtype)) + " and gives " +
                                          dtype_name(out.dtype) + "; this runtime decodes float32 latents to float32 images");
    if (n < 1) throw Error(Status::InvalidArgument, "latents hold no image (N = 0)");
    const int64_t in_count = checked_count({n, m.in_channels, m.input_size, m.input_size}, "the latents");
    const int64_t out_count = checked_count({n, shape[0], shape[1], shape[2]}, "the images");
    if (!all_finite(latents, in_count)) throw Error(Status::InvalidArgument, "latents contain NaN or inf");
    if (capacity < out_count)
        throw Error(Status::BufferTooSmall, "the image buffer holds " + std::to_string(capacity) + " floats; " +
                                                std::to_string(n) + " images need " + std::to_string(out_count));
    std::vector<float> staging(static_cast<size_t>(out_count));  // the caller's buffer is written only on success
    run_network(executor, net, n, {{&in, {n, m.in_channels, m.input_size, m.input_size}, const_cast<float*>(latents)}},
                {{&out, {n, shape[0], shape[1], shape[2]}, staging.data()}});
    const int64_t per_image = out_count / n;
    std::vector<int64_t> bad;
    int64_t values = 0;
    for (int64_t j = 0; j < n; ++j) {
        int64_t here = 0;
        for (int64_t e = 0; e < per_image; ++e) here += !std::isfinite(staging[size_t(j * per_image + e)]);
        if (here) bad.push_back(j);
        values += here;
    }
    if (!bad.empty()) {
        std::string shown;
        for (size_t i = 0; i < bad.size() && i < 10; ++i) shown += (i ? ", " : "") + std::to_string(bad[i]);
        throw Error(Status::Step, "the decoder network (" + executor.describe("decoder") + ") produced " + std::to_string(values) +
                                      " non-finite values (NaN/inf) in image(s) " + shown + (bad.size() > 10 ? " ..." : "") +
                                      "; float16 overflow is the usual cause (decode in float32), else check the latents");
    }
    std::copy(staging.begin(), staging.end(), images);
}

}  // namespace ditrt_core
