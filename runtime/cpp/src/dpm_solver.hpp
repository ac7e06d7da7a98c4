// DPM-Solver++(2M) as runtime/sampling/dpm_solver.py steps it (diffusers' DPMSolverMultistepScheduler with
// algorithm_type "dpmsolver++", solver_order 2 and its defaults: linspace timesteps, midpoint,
// lower-order final, final sigma 0). float64 tables, each coefficient cast to float32 when applied,
// in the Python runtime's float32 operation order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ditrt_core {

struct DpmSchedule {
    std::vector<int64_t> model_timesteps;  // (K,) noisiest first
    std::vector<double> sigmas, alpha_t, sigma_t, lambdas;  // (K + 1,), entry K: sigma 0 (lambda +inf)
    std::vector<int> orders;  // (K,): 1 at the first and the last call, 2 in between
    size_t size() const { return model_timesteps.size(); }
};

// The number of model calls: `steps` is an int (steps_is_int: the manifest's int default, digits
// of any size) or a string of digits; 1 .. num_timesteps - 1. Error(Status::Schedule) with
// dpm_solver.parse_steps' message otherwise.
int64_t dpm_parse_steps(const std::string& steps, bool steps_is_int, int64_t num_timesteps);

// diffusers' set_timesteps over the base alphas_cumprod (float64).
DpmSchedule dpm_schedule(const std::vector<double>& alphas_cumprod, int64_t calls);

// Call k (0 = noisiest) for n images of c channels and hw pixels: x_next and this call's x0 (the
// next call's state). model_output has out_channels channels per image (the first c are eps);
// state is the previous call's x0 (ignored at k = 0). x_next and x0 must not alias the inputs.
void dpmpp_2m_step(const DpmSchedule& s, size_t k, int64_t n, int64_t c, int64_t hw, int64_t out_channels,
                   const float* x, const float* model_output, const float* state, float* x_next, float* x0);

}  // namespace ditrt_core
