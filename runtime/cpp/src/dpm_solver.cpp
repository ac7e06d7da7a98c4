#include "dpm_solver.hpp"

#include <cmath>
#include <limits>

#include "error.hpp"
#include "schedule.hpp"

namespace ditrt_core {
namespace {

bool digit(char c) { return c >= '0' && c <= '9'; }

// re.fullmatch(r"[ \t]*[0-9]+[ \t]*", s): the digits, or "" when it does not match.
std::string digits_only(const std::string& s) {
    const std::string stripped = strip_blanks(s);
    return all_digits(stripped) ? stripped : "";
}

// re.fullmatch(r"[ \t]*(ddim)?[0-9]+([ \t]*,[ \t]*[0-9]+)*[ \t]*", s): a DDPM/DDIM respacing spec.
bool respacing_spec(const std::string& s) {
    size_t i = 0;
    auto spaces = [&] { while (i < s.size() && is_blank(s[i])) ++i; };
    auto number = [&] {
        const size_t start = i;
        while (i < s.size() && digit(s[i])) ++i;
        return i > start;
    };
    spaces();
    if (s.compare(i, 4, "ddim") == 0) i += 4;
    if (!number()) return false;
    while (true) {
        const size_t before = i;
        spaces();
        if (i < s.size() && s[i] == ',') {
            ++i;
            spaces();
            if (!number()) return false;
        } else {
            i = before;
            break;
        }
    }
    spaces();
    return i == s.size();
}

int64_t saturated(const std::string& digits) {  // int(digits), saturated: a huge count is still out of range
    int64_t v = 0;
    for (char c : digits) v = v > (std::numeric_limits<int64_t>::max() - 9) / 10 ? std::numeric_limits<int64_t>::max() : v * 10 + (c - '0');
    return v;
}

}  // namespace

int64_t dpm_parse_steps(const std::string& steps, bool steps_is_int, int64_t num_timesteps) {
    const std::string accepted = "dpm++2m takes the number of model calls as an int (e.g. 25) or a string of digits "
                                 "(e.g. '25'), from 1 to " + std::to_string(num_timesteps - 1);
    int64_t count = 0;
    if (steps_is_int) {
        const bool negative = !steps.empty() && steps[0] == '-';
        count = negative ? -1 : saturated(steps);
        if (negative || count < 1 || count >= num_timesteps) throw Error(Status::Schedule, accepted + "; got " + steps);
        return count;
    }
    const std::string digits = digits_only(steps);
    if (digits.empty())
        throw Error(Status::Schedule, accepted + "; '" + steps + "' is " + (respacing_spec(steps) ? "a DDPM/DDIM respacing spec" : "not one"));
    count = saturated(digits);
    if (count < 1 || count >= num_timesteps) {
        const size_t first = digits.find_first_not_of('0');
        throw Error(Status::Schedule, accepted + "; got " + (first == std::string::npos ? "0" : digits.substr(first)));
    }
    return count;
}

DpmSchedule dpm_schedule(const std::vector<double>& ac, int64_t calls) {
    DpmSchedule s;
    const std::vector<double> grid = linspace(0.0, double(ac.size() - 1), calls + 1);
    for (int64_t k = 0; k < calls; ++k)  // reversed, the final 0 dropped; np.round is half to even
        s.model_timesteps.push_back(int64_t(std::nearbyint(grid[size_t(calls - k)])));
    for (int64_t t : s.model_timesteps) s.sigmas.push_back(std::sqrt((1 - ac[size_t(t)]) / ac[size_t(t)]));
    s.sigmas.push_back(0.0);
    for (double sigma : s.sigmas) {
        const double alpha = 1 / std::sqrt(1 + sigma * sigma);
        s.alpha_t.push_back(alpha);
        s.sigma_t.push_back(sigma * alpha);
        s.lambdas.push_back(sigma == 0 ? std::numeric_limits<double>::infinity() : -std::log(sigma));
    }
    for (int64_t k = 0; k < calls; ++k) s.orders.push_back(k == 0 || k == calls - 1 ? 1 : 2);
    return s;
}

void dpmpp_2m_step(const DpmSchedule& s, size_t k, int64_t n, int64_t c, int64_t hw, int64_t out_channels,
                   const float* x, const float* model_output, const float* state, float* x_next, float* x0) {
    const float sigma = float(s.sigma_t[k]), alpha = float(s.alpha_t[k]);
    const double h = s.lambdas[k + 1] - s.lambdas[k];
    const bool second_order = s.orders[k] == 2;
    const float half_over_r = second_order ? float(0.5 / ((s.lambdas[k] - s.lambdas[k - 1]) / h)) : 0.0f;
    const float ratio = float(s.sigma_t[k + 1] / s.sigma_t[k]), phi = float(s.alpha_t[k + 1] * std::expm1(-h));
    const int64_t per_image = c * hw;
    for (int64_t j = 0; j < n; ++j) {
        const float* eps = model_output + j * out_channels * hw;  // the first c channels
        for (int64_t e = 0; e < per_image; ++e) {
            const int64_t i = j * per_image + e;
            x0[i] = (x[i] - sigma * eps[e]) / alpha;
            const float d = second_order ? x0[i] + half_over_r * (x0[i] - state[i]) : x0[i];
            x_next[i] = ratio * x[i] - phi * d;
        }
    }
}

}  // namespace ditrt_core
