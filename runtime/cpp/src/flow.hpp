// SiT sampling (runtime/sampling/flow.py): the Linear path's ODE and SDE loops in runtime/sampling/flow.py's float32
// and float64 operation order, so that the same inputs give the same bits in both languages.
// The loops call `velocity` for each model evaluation (the guided model output for the rows of
// x_eval) and `noise(k)` for the k-th stochastic draw (SDEs only).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace ditrt_core {

// torch.linspace(start, end, steps) in float32, bit for bit (flow.py torch_linspace).
std::vector<float> torch_linspace(double start, double end, int64_t steps);

enum class FlowSampler { OdeEuler, OdeHeun2, OdeDopri5, SdeEuler, SdeHeun };

// SiT's sampler names, in the Python registry's order.
extern const char* const kFlowSamplers[5];

// One request's SiT loop: the sampler, its grid and options, checked as runtime/sampling/samplers.py
// binds them (Error(InvalidArgument) for a bad option, Error(Schedule) for bad steps).
struct FlowPlan {
    FlowSampler sampler = FlowSampler::SdeEuler;
    std::string name;
    std::vector<float> t;  // ODE: linspace(0, 1, steps); SDE: linspace(0, 1 - 0.04, steps)
    double atol = 1e-6, rtol = 1e-3;  // ode-dopri5
    static constexpr float kLastStepSize = float(0.04);  // rounded from the double, as numpy does  // the SDEs' "Mean" last step (flow.SdeSettings)

    bool is_sde() const { return sampler == FlowSampler::SdeEuler || sampler == FlowSampler::SdeHeun; }
    // Model calls of the loop; 0 for ode-dopri5, whose count is known only after the run.
    int64_t model_calls() const;
    // Stochastic draws (the leading axis of injected step noise): steps - 1 for the SDEs, else 0.
    int64_t noise_draws() const { return is_sde() ? int64_t(t.size()) - 1 : 0; }
    // ode-dopri5 integrates the whole guided batch [x; x_null] (its error norm covers both halves).
    bool integrates_null_half() const { return sampler == FlowSampler::OdeDopri5; }
};

// `options`: the sampler options given (name -> value as text): atol, rtol (ode-dopri5);
// diffusion_form, diffusion_norm, last_step, last_step_size (the SDEs: only SiT's defaults).
FlowPlan plan_flow(const std::string& sampler, const std::string& steps, bool steps_is_int,
                   const std::map<std::string, std::string>& options);

// The sampler options of each family's samplers, for the "X applies to ... only" refusals.

// v = the guided velocity at (x_eval, t) for the state's rows; x_eval must not be modified.
using Velocity = std::function<void(const float* x_eval, float t, float* v)>;
// The k-th stochastic draw, the state's shape.
using Draw = std::function<const float*(int64_t k)>;

struct Dopri5Stats {
    int64_t function_evals = 0, accepted_steps = 0, rejected_steps = 0;
};

// Runs the plan's loop from the state x (count floats) to the sample, in x.
void flow_sample(const FlowPlan& plan, std::vector<float>& x, const Velocity& velocity, const Draw& noise,
                 Dopri5Stats* stats = nullptr);

}  // namespace ditrt_core
