// Diffusion schedules exactly as runtime/sampling/schedule.py (the official DiT `diffusion/` package):
// float64 tables, one entry per kept step; index i runs over the respaced chain and
// timesteps[i] is the original-scale timestep the model is called with.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ditrt_core {

// Step specs as Python reads them: only blanks (space, tab) around a spec or a count, as
// runtime/sampling/schedule.py's strip(" \t") and dpm_solver.py's [ \t]* (a newline, \r, \v or \f is
// refused, not stripped), and one or more ASCII digits.
bool is_blank(char c);
std::string strip_blanks(const std::string& s);
bool all_digits(const std::string& s);

// The official space_timesteps: "N", "ddimN" or "a,b,c". Throws Error(Status::Schedule).
std::vector<int64_t> space_timesteps(int64_t num_timesteps, const std::string& spec);

// numpy.linspace(start, stop, num) in float64, same arithmetic (i * step + start, last = stop).
std::vector<double> linspace(double start, double stop, int64_t num);

// numpy.cumprod(1 - betas) in float64.
std::vector<double> alphas_cumprod(const std::vector<double>& betas);

struct Schedule {
    std::vector<int64_t> timesteps;
    std::vector<double> betas, alphas_cumprod, alphas_cumprod_prev, sqrt_recip_alphas_cumprod,
        sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1,
        posterior_mean_coef2, log_betas, fixed_large_log_variance;
    size_t size() const { return timesteps.size(); }
};

// schedule_from_betas: every table of GaussianDiffusion for a beta sequence (at least 2 steps).
Schedule schedule_from_betas(const std::vector<double>& betas, const std::vector<int64_t>& timesteps);

// SpacedDiffusion over base betas: keep space_timesteps(len(base), spec), beta_i = 1 - ac[t_i] / ac[t_{i-1}].
Schedule respaced_schedule(const std::vector<double>& base_betas, const std::string& spec);

}  // namespace ditrt_core
