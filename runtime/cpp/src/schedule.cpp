#include "schedule.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "error.hpp"

namespace ditrt_core {
namespace {

// runtime/sampling/schedule.py _parse_count: 1 to 7 ASCII digits with optional blanks (space, tab) around them.
int64_t parse_count(const std::string& text, const std::string& spec) {
    const std::string digits = strip_blanks(text);
    if (!all_digits(digits) || digits.size() > 7)
        throw Error(Status::Schedule, "step spec '" + spec + "' is not 'N', 'ddimN' or comma-separated section counts");
    const int64_t count = std::stoll(digits);
    if (count < 1) throw Error(Status::Schedule, "step spec '" + spec + "': step counts must be positive");
    return count;
}

std::vector<std::string> split_commas(const std::string& s) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t comma; (comma = s.find(',', start)) != std::string::npos; start = comma + 1)
        parts.push_back(s.substr(start, comma - start));
    parts.push_back(s.substr(start));
    return parts;
}

std::vector<int64_t> ddim_steps(int64_t num_timesteps, const std::string& spec) {
    const int64_t count = parse_count(spec.substr(4), spec);
    for (int64_t stride = 1; stride < num_timesteps; ++stride) {
        if ((num_timesteps + stride - 1) / stride == count) {  // len(range(0, N, stride))
            std::vector<int64_t> steps;
            for (int64_t t = 0; t < num_timesteps; t += stride) steps.push_back(t);
            return steps;
        }
    }
    throw Error(Status::Schedule, "'" + spec + "': no integer stride gives exactly " + std::to_string(count) +
                                      " of " + std::to_string(num_timesteps) + " steps");
}

}  // namespace

bool is_blank(char c) { return c == ' ' || c == '\t'; }

std::string strip_blanks(const std::string& s) {
    size_t b = 0, e = s.size();
    while (b < e && is_blank(s[b])) ++b;
    while (e > b && is_blank(s[e - 1])) --e;
    return s.substr(b, e - b);
}

bool all_digits(const std::string& s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::vector<int64_t> space_timesteps(int64_t num_timesteps, const std::string& raw_spec) {
    std::string spec = raw_spec;
    const std::string stripped = strip_blanks(raw_spec);
    if (all_digits(stripped)) {  // str(int(spec)): "  007 " is "7"
        const size_t first = stripped.find_first_not_of('0');
        spec = first == std::string::npos ? "0" : stripped.substr(first);
    }
    spec = strip_blanks(spec);
    if (spec.empty())
        throw Error(Status::Schedule, "step spec must be an int or a string like '250', 'ddim50' or '10,20,30'; got '" +
                                          raw_spec + "'");
    if (spec.rfind("ddim", 0) == 0) return ddim_steps(num_timesteps, spec);
    std::vector<int64_t> sections;
    for (const auto& part : split_commas(spec)) sections.push_back(parse_count(part, spec));
    const int64_t n = int64_t(sections.size());
    const int64_t size_per = num_timesteps / n, extra = num_timesteps % n;
    std::set<int64_t> steps;  // sorted(set(...)) as the official code
    int64_t start = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t size = size_per + (i < extra ? 1 : 0), count = sections[size_t(i)];
        if (size < count)
            throw Error(Status::Schedule, "'" + spec + "': cannot take " + std::to_string(count) +
                                              " steps from a section of " + std::to_string(size) + " timesteps");
        const double stride = count <= 1 ? 1.0 : double(size - 1) / double(count - 1);
        double position = 0.0;  // accumulated, not multiplied: the official rounding
        for (int64_t j = 0; j < count; ++j) {
            // Python's round(): half to even, which nearbyint gives in the default rounding mode.
            steps.insert(start + int64_t(std::nearbyint(position)));
            position += stride;
        }
        start += size;
    }
    return {steps.begin(), steps.end()};
}

std::vector<double> linspace(double start, double stop, int64_t num) {
    std::vector<double> y(size_t(std::max<int64_t>(num, 0)));
    if (num == 1) y[0] = start;
    if (num < 2) return y;
    const double step = (stop - start) / double(num - 1);
    for (int64_t i = 0; i < num; ++i) y[size_t(i)] = double(i) * step + start;
    y.back() = stop;
    return y;
}

std::vector<double> alphas_cumprod(const std::vector<double>& betas) {
    std::vector<double> ac(betas.size());
    double product = 1.0;
    for (size_t i = 0; i < betas.size(); ++i) ac[i] = product *= (1.0 - betas[i]);
    return ac;
}

Schedule schedule_from_betas(const std::vector<double>& betas, const std::vector<int64_t>& timesteps) {
    const size_t n = betas.size();
    if (n < 2)
        throw Error(Status::Schedule, "the official sampler needs at least 2 steps (its clipped posterior "
                                      "variance is taken from step 1)");
    Schedule s;
    s.timesteps = timesteps;
    s.betas = betas;
    auto table = [n](auto f) { std::vector<double> v(n); for (size_t i = 0; i < n; ++i) v[i] = f(i); return v; };
    std::vector<double> alphas = table([&](size_t i) { return 1.0 - betas[i]; });
    s.alphas_cumprod = alphas_cumprod(betas);
    const auto& ac = s.alphas_cumprod;
    s.alphas_cumprod_prev = table([&](size_t i) { return i == 0 ? 1.0 : ac[i - 1]; });
    const auto& prev = s.alphas_cumprod_prev;
    // Each expression keeps numpy's left-to-right evaluation order, so the float64 values agree.
    s.posterior_variance = table([&](size_t i) { return betas[i] * (1.0 - prev[i]) / (1.0 - ac[i]); });
    const auto& pv = s.posterior_variance;
    s.sqrt_recip_alphas_cumprod = table([&](size_t i) { return std::sqrt(1.0 / ac[i]); });
    s.sqrt_recipm1_alphas_cumprod = table([&](size_t i) { return std::sqrt(1.0 / ac[i] - 1); });
    s.posterior_log_variance_clipped = table([&](size_t i) { return std::log(i == 0 ? pv[1] : pv[i]); });
    s.posterior_mean_coef1 = table([&](size_t i) { return betas[i] * std::sqrt(prev[i]) / (1.0 - ac[i]); });
    s.posterior_mean_coef2 = table([&](size_t i) { return (1.0 - prev[i]) * std::sqrt(alphas[i]) / (1.0 - ac[i]); });
    s.log_betas = table([&](size_t i) { return std::log(betas[i]); });
    s.fixed_large_log_variance = table([&](size_t i) { return std::log(i == 0 ? pv[1] : betas[i]); });
    return s;
}

Schedule respaced_schedule(const std::vector<double>& base_betas, const std::string& spec) {
    const std::vector<int64_t> keep = space_timesteps(int64_t(base_betas.size()), spec);
    const std::vector<double> base_ac = alphas_cumprod(base_betas);
    std::vector<double> betas;
    double last = 1.0;
    for (int64_t t : keep) {
        betas.push_back(1 - base_ac[size_t(t)] / last);
        last = base_ac[size_t(t)];
    }
    return schedule_from_betas(betas, keep);
}

}  // namespace ditrt_core
