#include "flow.hpp"

#include <cmath>
#include <cstdlib>
#include <limits>

#include "error.hpp"
#include "portable.hpp"
#include "pyjson.hpp"
#include "registry.hpp"

namespace ditrt_core {

const char* const kFlowSamplers[5] = {"ode-euler", "ode-heun2", "ode-dopri5", "sde-euler", "sde-heun"};

std::vector<float> torch_linspace(double start, double end, int64_t steps) {
    const float start32 = float(start), end32 = float(end);
    const float step = (end32 - start32) / float(steps - 1);
    std::vector<float> out(static_cast<size_t>(steps));
    for (int64_t i = 0; i < steps; ++i) {
        // torch's CPU kernel: one fused multiply-add per value; float64 holds the product and the sum exactly
        const double v = i < steps / 2 ? double(start32) + double(step) * double(i)
                                       : double(end32) - double(step) * double(steps - 1 - i);
        out[size_t(i)] = float(v);
    }
    return out;
}

int64_t FlowPlan::model_calls() const {
    const int64_t intervals = int64_t(t.size()) - 1;
    switch (sampler) {
        case FlowSampler::OdeEuler: return intervals;
        case FlowSampler::OdeHeun2: return 2 * intervals;
        case FlowSampler::OdeDopri5: return 0;
        case FlowSampler::SdeEuler: return intervals + 1;
        case FlowSampler::SdeHeun: return 2 * intervals + 1;
    }
    return 0;
}

// ---- options (runtime/sampling/samplers.py Sampler.bind, flow.check_dopri5_options / check_sde_options) ----

namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(Status::InvalidArgument, message); }


double number(const std::string& name, const std::string& text) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0') invalid(name + " must be a number, got '" + text + "'");
    return v;
}

// flow.check_dopri5_options: a finite number in (0, 1].
double tolerance(const std::string& name, const std::string& text) {
    const double v = number(name, text);
    if (!(std::isfinite(v) && v > 0 && v <= 1)) invalid(name + " must be a number in (0, 1], got " + text);
    return v;
}

// flow.SdeSettings.check: only SiT's defaults are implemented.
void check_sde_option(const std::string& name, const std::string& text) {
    const std::string want = name == "diffusion_form" ? "'sigma'" : name == "last_step" ? "'Mean'"
                             : name == "diffusion_norm" ? "1.0" : "0.04";
    const bool ok = name == "diffusion_form" ? text == "sigma"
                    : name == "last_step"    ? text == "Mean"
                    : name == "diffusion_norm" ? number(name, text) == 1.0 : number(name, text) == 0.04;
    if (!ok)
        invalid("SiT SDE " + name + "='" + text + "' is not supported: only " + name + "=" + want + " (diffusion 'sigma' "
                "form with norm 1.0, then a 'Mean' last step of 0.04)");
}

// flow.parse_num_steps: digits (spaces and tabs around them allowed), 2 .. 100000.
int64_t num_steps(const std::string& steps) {
    const size_t first = steps.find_first_not_of(" \t"), last = steps.find_last_not_of(" \t");
    const std::string digits = first == std::string::npos ? "" : steps.substr(first, last - first + 1);
    const bool is_digits = !digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos;
    const size_t nonzero = digits.find_first_not_of('0');
    const bool small = is_digits && (nonzero == std::string::npos || digits.size() - nonzero <= 7);
    const int64_t n = small ? std::strtoll(digits.c_str(), nullptr, 10) : -1;
    if (!is_digits || !(2 <= n && n <= 100000))
        throw Error(Status::Schedule, "num_steps (SiT's --num-sampling-steps) must be an int in [2, 100000], got '" + steps + "'");
    return n;
}

}  // namespace

FlowPlan plan_flow(const std::string& sampler, const std::string& steps, bool /*steps_is_int*/,
                   const std::map<std::string, std::string>& options) {
    FlowPlan p;
    p.name = sampler;
    bool known = false;
    for (int i = 0; i < 5; ++i)
        if (sampler == kFlowSamplers[i]) p.sampler = FlowSampler(i), known = true;
    if (!known) {
        const std::string family = registry::family_of(sampler);
        invalid("unknown sampler '" + sampler + "' for a sit model" +
                (family.empty() ? "" : " (" + sampler + " samples " + family + " models)") + "; use " +
                registry::joined(registry::samplers_of("sit")));
    }
    for (const auto& [name, value] : options)
        if (!registry::takes(sampler, name))
            invalid(name + " applies to " + registry::option_takers(name) + " only; " + sampler + " takes no " + name);
    for (const auto& [name, value] : options) {
        if (name == "atol") p.atol = tolerance(name, value);
        else if (name == "rtol") p.rtol = tolerance(name, value);
        else check_sde_option(name, value);
    }
    const int64_t n = num_steps(steps);
    p.t = p.is_sde() ? torch_linspace(0.0, 1 - 0.04, n) : torch_linspace(0.0, 1.0, n);
    return p;
}

// ---- the loops ------------------------------------------------------------------------------------

namespace {

using Buffer = std::vector<float>;

void ode_euler(const FlowPlan& p, Buffer& x, const Velocity& velocity) {
    Buffer v(x.size());
    for (size_t i = 0; i + 1 < p.t.size(); ++i) {
        const float dt = p.t[i + 1] - p.t[i];
        velocity(x.data(), p.t[i], v.data());
        for (size_t e = 0; e < x.size(); ++e) x[e] = x[e] + dt * v[e];
    }
}

void ode_heun2(const FlowPlan& p, Buffer& x, const Velocity& velocity) {
    Buffer k1(x.size()), k2(x.size()), pred(x.size());
    for (size_t i = 0; i + 1 < p.t.size(); ++i) {
        const float t0 = p.t[i], dt = p.t[i + 1] - t0;
        velocity(x.data(), t0, k1.data());
        for (size_t e = 0; e < x.size(); ++e) pred[e] = x[e] + dt * k1[e];
        velocity(pred.data(), t0 + dt, k2.data());  // at t0 + dt as computed, not the grid's t1
        for (size_t e = 0; e < x.size(); ++e) x[e] = x[e] + dt * (k1[e] * 0.5f + k2[e] * 0.5f);
    }
}

// ---- dopri5: torchdiffeq 0.2.5, as flow.py writes it ---------------------------------------------
// The tableau as the same float64 expressions (so the same doubles), cast to float32 where used.
const double kAlpha[6] = {1. / 5, 3. / 10, 4. / 5, 8. / 9, 1., 1.};
const double kBeta[6][6] = {
    {1. / 5},
    {3. / 40, 9. / 40},
    {44. / 45, -56. / 15, 32. / 9},
    {19372. / 6561, -25360. / 2187, 64448. / 6561, -212. / 729},
    {9017. / 3168, -355. / 33, 46732. / 5247, 49. / 176, -5103. / 18656},
    {35. / 384, 0, 500. / 1113, 125. / 192, -2187. / 6784, 11. / 84},
};
const double kError[7] = {35. / 384 - 1951. / 21600, 0, 500. / 1113 - 22642. / 50085, 125. / 192 - 451. / 720,
                          -2187. / 6784 - -12231. / 42400, 11. / 84 - 649. / 6300, -1. / 60.};
const double kMid[7] = {6025192743. / 30085553152. / 2, 0, 51252292925. / 65400821598. / 2,
                        -2691868925. / 45128329728. / 2, 187940372067. / 1594534317056. / 2,
                        -1776094331. / 19743644256. / 2, 11237099. / 235043384. / 2};
constexpr double kSafety = 0.9, kIfactor = 10.0, kDfactor = 0.2;
constexpr int kOrder = 5;

// numpy's np.maximum / np.minimum: NaN in either gives NaN.
double np_max(double a, double b) { return std::isnan(a) || std::isnan(b) ? std::nan("") : a > b ? a : b; }
double np_min(double a, double b) { return std::isnan(a) || std::isnan(b) ? std::nan("") : a < b ? a : b; }

// sum_j k_j * (w_j * dt) in float32, in ATen's row_sum order (flow._row_sum): four interleaved
// partial sums, the leftover terms added to the first, then the partials in order.
void stage_sum(const std::vector<const float*>& ks, const double* weights, size_t terms, float dt, size_t count,
               const float* base, float* out) {
    float w[7];
    for (size_t j = 0; j < terms; ++j) w[j] = float(weights[j]) * dt;
    const size_t lanes = terms / 4;
    for (size_t e = 0; e < count; ++e) {
        float total;
        if (lanes == 0) {
            total = ks[0][e] * w[0];
            for (size_t j = 1; j < terms; ++j) total = total + ks[j][e] * w[j];
        } else {
            float partial[4];
            for (size_t j = 0; j < 4; ++j) partial[j] = ks[j][e] * w[j];
            for (size_t j = 4; j < 4 * lanes; ++j) partial[j % 4] = partial[j % 4] + ks[j][e] * w[j];
            for (size_t j = 4 * lanes; j < terms; ++j) partial[0] = partial[0] + ks[j][e] * w[j];
            total = ((partial[0] + partial[1]) + partial[2]) + partial[3];
        }
        out[e] = base ? base[e] + total : total;
    }
}

class Dopri5 {
public:
    Dopri5(const FlowPlan& p, const Velocity& velocity, Dopri5Stats& stats, size_t count)
        : p_(p), velocity_(velocity), stats_(stats), n_(count), scratch_(count) {}

    void run(Buffer& x) {
        const double t_start = p_.t.front(), t_end = p_.t.back();
        Buffer f0(n_), f1(n_), probe(n_);
        std::vector<double> scale(n_), tol(n_);
        call(x.data(), t_start, f0.data());
        tolerance(x.data(), nullptr, scale.data());
        const double d0 = rms_over(x.data(), scale.data()), d1 = rms_over(f0.data(), scale.data());
        // h0 is a float32 in the fallback branch, a float64 otherwise; its arithmetic keeps its type.
        const bool h0_is_f32 = d0 < 1e-5 || d1 < 1e-5;
        const double h0 = h0_is_f32 ? double(float(1e-6)) : 0.01 * d0 / d1;
        const float h0_f = float(h0);
        for (size_t e = 0; e < n_; ++e) probe[e] = x[e] + h0_f * f0[e];
        call(probe.data(), t_start + h0, f1.data());
        for (size_t e = 0; e < n_; ++e) probe[e] = f1[e] - f0[e];
        const double d2 = std::fabs(rms_over(probe.data(), scale.data()) / h0);
        double h1;
        if (d1 <= 1e-15 && d2 <= 1e-15) {
            if (h0_is_f32) {
                const float b = h0_f * float(1e-3);
                h1 = b > float(1e-6) ? b : float(1e-6);  // Python max(a, b): a unless b > a
            } else {
                const double b = h0 * 1e-3;
                h1 = b > double(float(1e-6)) ? b : double(float(1e-6));
            }
        } else {
            h1 = std::pow(0.01 / (d2 > d1 ? d2 : d1), 1. / double(kOrder));
        }
        const double first = h0_is_f32 ? double(100.0f * h0_f) : 100.0 * h0;
        double dt = h1 < first ? h1 : first;  // Python min(a, b): a unless b < a

        double t = t_start, t0 = t_start, t1 = t_start;
        Buffer y = x, f = f0, y_next(n_), error(n_);
        std::vector<Buffer> ks(7, Buffer(n_)), coeffs(5, x);
        while (t_end > t) {
            if (!(std::isfinite(dt) && t + dt > t))
                throw Error(Status::Step, "dopri5: step size underflow at t=" + pyjson::format_g(t) + " (dt=" +
                                              pyjson::format_g(dt) + "); the velocity is probably not finite");
            for (float value : y)
                if (!std::isfinite(value))
                    throw Error(Status::Step, "dopri5: non-finite values in the state at t=" + pyjson::format_g(t));
            const double t_next = t + dt;
            step(y, f, t, dt, t_next, ks, y_next, error);
            tolerance(y.data(), y_next.data(), tol.data());
            const double error_ratio = rms_over(error.data(), tol.data());
            if (error_ratio <= 1) {
                ++stats_.accepted_steps;
                t0 = t, t1 = t_next;
                interp_fit(y, y_next, ks, float(dt), coeffs);
                t = t_next;
                y.swap(y_next);
                f = ks[6];
            } else {
                ++stats_.rejected_steps;
            }
            const double next = optimal_step_size(dt, error_ratio);
            dt = 0.0 > next ? 0.0 : next;  // Python max(next, 0): next unless 0 > next (NaN stays)
        }
        interp_evaluate(coeffs, t0, t1, t_end, x);
    }

private:
    void call(const float* y, double t, float* out) {
        ++stats_.function_evals;
        velocity_(y, float(t), out);
    }

    // atol + max(|y0|, |y1|) rtol in float64 (|y0| alone without y1).
    void tolerance(const float* y0, const float* y1, double* out) const {
        for (size_t e = 0; e < n_; ++e) {
            const float a = std::fabs(y0[e]);
            const float m = y1 ? np_max(a, std::fabs(y1[e])) : a;
            out[e] = p_.atol + double(m) * p_.rtol;
        }
    }
    // rms(a / scale) over the whole state: float64 quotients, squares, the pairwise sum, / n, sqrt.
    double rms_over(const float* a, const double* scale) {
        for (size_t e = 0; e < n_; ++e) {
            const double q = double(a[e]) / scale[e];
            scratch_[e] = q * q;
        }
        return std::sqrt(pairwise_sum(scratch_.data(), int64_t(n_)) / double(n_));
    }

    // One Dormand-Prince step (torchdiffeq's _runge_kutta_step); ks[0] = f0, ks[6] the new f (FSAL).
    void step(const Buffer& y0, const Buffer& f0, double t0d, double dtd, double t1d, std::vector<Buffer>& ks, Buffer& y1,
              Buffer& error) {
        const float t0 = float(t0d), dt = float(dtd), t1 = float(t1d);
        ks[0] = f0;
        std::vector<const float*> views = {ks[0].data()};
        for (size_t s = 0; s < 6; ++s) {
            // torchdiffeq puts the stages with alpha == 1 just before t1, in case of discontinuities
            const float ti = kAlpha[s] == 1. ? std::nextafter(t1, -std::numeric_limits<float>::infinity())
                                             : t0 + float(kAlpha[s]) * dt;
            stage_sum(views, kBeta[s], s + 1, dt, n_, y0.data(), y1.data());
            call(y1.data(), ti, ks[s + 1].data());
            views.push_back(ks[s + 1].data());
        }
        // y1 holds the last stage's state: the 5th-order solution.
        stage_sum(views, kError, 7, dt, n_, nullptr, error.data());
    }

    // The step's 4th-order interpolant: coefficients [y0, d, c, b, a] (flow._interp_fit).
    void interp_fit(const Buffer& y0, const Buffer& y1, const std::vector<Buffer>& ks, float dt, std::vector<Buffer>& c) {
        std::vector<const float*> views;
        for (const Buffer& k : ks) views.push_back(k.data());
        Buffer& y_mid = scratch_f_;
        y_mid.resize(n_);
        stage_sum(views, kMid, 7, dt, n_, y0.data(), y_mid.data());
        const float* f0 = ks[0].data();
        const float* f1 = ks[6].data();
        c[0] = y0;
        for (size_t e = 0; e < n_; ++e) {
            c[4][e] = (2.0f * dt * (f1[e] - f0[e]) - 8.0f * (y1[e] + y0[e])) + 16.0f * y_mid[e];
            c[3][e] = ((dt * (5.0f * f0[e] - 3.0f * f1[e]) + 18.0f * y0[e]) + 14.0f * y1[e]) - 32.0f * y_mid[e];
            c[2][e] = ((dt * (f1[e] - 4.0f * f0[e]) - 11.0f * y0[e]) - 5.0f * y1[e]) + 16.0f * y_mid[e];
            c[1][e] = dt * f0[e];
        }
    }

    void interp_evaluate(const std::vector<Buffer>& c, double t0, double t1, double t, Buffer& out) const {
        const float x = float((t - t0) / (t1 - t0));
        for (size_t e = 0; e < n_; ++e) {
            float total = c[0][e] + x * c[1][e], power = x;
            for (size_t j = 2; j < 5; ++j) {
                power = power * x;
                total = total + power * c[j][e];
            }
            out[e] = total;
        }
    }

    static double optimal_step_size(double dt, double error_ratio) {
        if (error_ratio == 0) return dt * kIfactor;
        const double dfactor = error_ratio < 1 ? 1.0 : kDfactor;
        const double exponent = 1.0 / double(kOrder);
        return dt * np_min(kIfactor, np_max(kSafety / std::pow(error_ratio, exponent), dfactor));
    }

    const FlowPlan& p_;
    const Velocity& velocity_;
    Dopri5Stats& stats_;
    size_t n_;
    std::vector<double> scratch_;
    Buffer scratch_f_;
};

// ---- SDE: SiT's Euler-Maruyama and Heun, then the "Mean" last step --------------------------------

// velocity + diffusion * score for the Linear path, 'sigma' diffusion of norm 1 (flow.sde_drift).
inline float sde_drift(float v, float x, float t) {
    const float sigma_t = 1.0f - t;
    const float reverse_alpha_ratio = t;
    const float var = sigma_t * sigma_t - reverse_alpha_ratio * -1.0f * sigma_t;
    const float score = (reverse_alpha_ratio * v - x) / var;
    return v + sigma_t * score;
}

void mean_last_step(const FlowPlan& p, Buffer& x, const Velocity& velocity, Buffer& v) {
    const float t = p.t.back();
    velocity(x.data(), t, v.data());
    for (size_t e = 0; e < x.size(); ++e) x[e] = x[e] + sde_drift(v[e], x[e], t) * FlowPlan::kLastStepSize;
}

void sde_euler(const FlowPlan& p, Buffer& x, const Velocity& velocity, const Draw& noise) {
    const float dt = p.t[1] - p.t[0], sqrt_dt = std::sqrt(dt);
    Buffer v(x.size());
    for (size_t k = 0; k + 1 < p.t.size(); ++k) {
        const float t = p.t[k];
        const float* w = noise(int64_t(k));
        velocity(x.data(), t, v.data());
        const float diffusion = std::sqrt(2.0f * (1.0f - t));
        for (size_t e = 0; e < x.size(); ++e) {
            const float dw = w[e] * sqrt_dt;
            const float mean_x = x[e] + sde_drift(v[e], x[e], t) * dt;
            x[e] = mean_x + diffusion * dw;
        }
    }
    mean_last_step(p, x, velocity, v);
}

void sde_heun(const FlowPlan& p, Buffer& x, const Velocity& velocity, const Draw& noise) {
    const float dt = p.t[1] - p.t[0], sqrt_dt = std::sqrt(dt), half_dt = 0.5f * dt;
    Buffer v(x.size()), x_hat(x.size()), k1(x.size()), x_pred(x.size());
    for (size_t k = 0; k + 1 < p.t.size(); ++k) {
        const float t = p.t[k], t_next = t + dt;  // the second drift at t + dt as computed
        const float* w = noise(int64_t(k));
        const float diffusion = std::sqrt(2.0f * (1.0f - t));
        for (size_t e = 0; e < x.size(); ++e) x_hat[e] = x[e] + diffusion * (w[e] * sqrt_dt);
        velocity(x_hat.data(), t, v.data());
        for (size_t e = 0; e < x.size(); ++e) {
            k1[e] = sde_drift(v[e], x_hat[e], t);
            x_pred[e] = x_hat[e] + dt * k1[e];
        }
        velocity(x_pred.data(), t_next, v.data());
        for (size_t e = 0; e < x.size(); ++e) {
            const float k2 = sde_drift(v[e], x_pred[e], t_next);
            x[e] = x_hat[e] + half_dt * (k1[e] + k2);
        }
    }
    mean_last_step(p, x, velocity, v);
}

}  // namespace

void flow_sample(const FlowPlan& p, std::vector<float>& x, const Velocity& velocity, const Draw& noise, Dopri5Stats* stats) {
    Dopri5Stats local;
    switch (p.sampler) {
        case FlowSampler::OdeEuler: return ode_euler(p, x, velocity);
        case FlowSampler::OdeHeun2: return ode_heun2(p, x, velocity);
        case FlowSampler::OdeDopri5: {
            Dopri5 solver(p, velocity, stats ? *stats : local, x.size());
            return solver.run(x);
        }
        case FlowSampler::SdeEuler: return sde_euler(p, x, velocity, noise);
        case FlowSampler::SdeHeun: return sde_heun(p, x, velocity, noise);
    }
}

}  // namespace ditrt_core
