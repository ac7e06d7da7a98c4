"""SiT sampling (Ma et al. 2024, willisma/SiT): the Linear path x_t = t * data + (1 - t) * noise
with a velocity model, as plain numpy loops that mirror the official float32 arithmetic
(transport/transport.py, transport/integrators.py, torchdiffeq 0.2.5).

Protocol. Each loop is a generator over the state x (float32, any number of rows):

    loop(x, grid, noise, **options) -> Generator[(x_eval, t), velocity, sample]

It yields (x_eval, t): the rows at which the model must be evaluated next and the model time t (a
Python float holding the value the official code feeds the model, float32 for SiT). The driver
sends back the velocity for x_eval (same shape; guided as the official forward_with_cfg) and must
not modify x_eval. The final sample is the generator's return value (StopIteration.value).
`noise(k)` gives the k-th stochastic draw (the shape of x); ODE loops never call it.

Guidance (sample.py): the batch is [z, z] with labels [y, null], and forward_with_cfg evaluates the
network on [x[:N]; x[:N]], guides output channels 0..2 in both halves and leaves channel 3
per-half. The null half's state never reaches the network, so the real rows do not depend on it,
except through dopri5's error norm over the whole state: only ode-dopri5 needs the 2N-row state
(`Sampler.integrates_null_half`); the other loops integrate the N real rows.
"""
from __future__ import annotations


from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from ..core.errors import InputError, StepError
from ..core.portable import rms
from ..core.validate import check_int, check_number, parse_count

Loop = Generator[tuple[np.ndarray, float], np.ndarray, np.ndarray]
Noise = Callable[[int], np.ndarray]


# ---- the transport ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SdeSettings:
    """SiT's SDE options (--diffusion-form, --diffusion-norm, --last-step, --last-step-size); only
    the defaults are implemented."""
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str | None = "Mean"
    last_step_size: float = 0.04

    def check(self) -> "SdeSettings":
        supported = SdeSettings()
        for name in ("diffusion_form", "diffusion_norm", "last_step", "last_step_size"):
            value, want = getattr(self, name), getattr(supported, name)
            if isinstance(value, bool) or value != want:
                raise InputError(f"SiT SDE {name}={value!r} is not supported: only {name}={want!r} (diffusion "
                                 "'sigma' form with norm 1.0, then a 'Mean' last step of 0.04)")
        return self


# ---- grids --------------------------------------------------------------------------------------

def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32, bit for bit (its CPU kernel): step = (end -
    start) / (steps - 1) in float32, then start + step * i for the first half and end - step *
    (steps - 1 - i) for the second, each one fused multiply-add (one rounding). float64 holds the
    product exactly (24 + 24 bits) and, for 0 <= start < end <= 1 and steps < 2**24, the sum too,
    so rounding it once to float32 is the FMA."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + np.float64(step) * i
    second = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def _check_num_steps(num_steps) -> int:
    return check_int(num_steps, "num_steps (SiT's --num-sampling-steps)", 2, 100_000)


@dataclass(frozen=True)
class OdeGrid:
    """torchdiffeq's output times: SiT's linspace(0, 1, num_steps), float32. The fixed-grid solvers
    step between consecutive times; dopri5 integrates from t[0] to t[-1] (the sample)."""
    t: np.ndarray


@dataclass(frozen=True)
class SdeGrid:
    """SiT's SDE times linspace(0, 1 - last_step_size, num_steps), float32: a stochastic step from
    each t[:-1], every one of size dt = t[1] - t[0], then the last step at t[-1]."""
    t: np.ndarray
    dt: np.float32
    last_step_size: float


def ode_grid(num_steps: int) -> OdeGrid:
    return OdeGrid(torch_linspace(0.0, 1.0, _check_num_steps(num_steps)))


def sde_grid(num_steps: int, settings: SdeSettings = SdeSettings()) -> SdeGrid:
    settings.check()
    t = torch_linspace(0.0, 1 - settings.last_step_size, _check_num_steps(num_steps))
    return SdeGrid(t, t[1] - t[0], settings.last_step_size)


# ---- helpers ------------------------------------------------------------------------------------

def _velocity(v, x: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.shape != x.shape:
        raise StepError(f"the model output has shape {v.shape} but was asked for {x.shape}: send back one "
                        "velocity per row of x_eval")
    return v.astype(x.dtype, copy=False)


def _draw(noise: Noise | None, k: int, x: np.ndarray) -> np.ndarray:
    if noise is None:
        raise InputError("SDE sampling draws noise at every step: pass noise(k)")
    w = np.asarray(noise(k))
    if w.shape != x.shape:
        raise InputError(f"noise({k}) has shape {w.shape}; the state has {x.shape}")
    return w.astype(x.dtype, copy=False)


def _check_state(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64) or x.ndim < 1:
        raise InputError(f"the state must be a float32 (or float64) array, got {x.dtype} with shape {x.shape}")
    return x


# ---- ODE: torchdiffeq's fixed-grid solvers --------------------------------------------------------

def ode_euler(x: np.ndarray, grid: OdeGrid, noise: Noise | None = None) -> Loop:
    """torchdiffeq 'euler': x += dt * v(x, t0) per interval, dt = t1 - t0 in the grid's dtype."""
    x = _check_state(x)
    for t0, t1 in zip(grid.t[:-1], grid.t[1:]):
        dt = t1 - t0
        v = _velocity((yield x, float(x.dtype.type(t0))), x)
        x = x + x.dtype.type(dt) * v
    return x


def ode_heun2(x: np.ndarray, grid: OdeGrid, noise: Noise | None = None) -> Loop:
    """torchdiffeq 'heun2': the trapezoid over an Euler predictor. Its second evaluation is at
    t0 + dt (as computed, not the grid's t1) and the update dt * (k1 / 2 + k2 / 2)."""
    x = _check_state(x)
    real = x.dtype.type
    for t0, t1 in zip(grid.t[:-1], grid.t[1:]):
        dt = t1 - t0
        k1 = _velocity((yield x, float(real(t0))), x)
        x_pred = x + real(dt) * k1
        k2 = _velocity((yield x_pred, float(real(t0 + dt))), x)
        x = x + real(dt) * (k1 * real(0.5) + k2 * real(0.5))
    return x


# ---- ODE: torchdiffeq 0.2.5's dopri5 --------------------------------------------------------------
# Dormand-Prince 5(4), written as torchdiffeq's _DORMAND_PRINCE_SHAMPINE_TABLEAU and DPS_C_MID (the
# same float64 expressions, so the same doubles); cast to the state's dtype where they are used.
_DP_ALPHA = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1., 1.)
_DP_BETA = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # the 5th-order weights (FSAL)
)
_DP_ERROR = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
             -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1. / 60.)
_DP_MID = (6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
           187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
_ORDER = 5
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2  # torchdiffeq's defaults, float64


@dataclass
class Dopri5Stats:
    """What one dopri5 run did: model calls (2 + 6 per attempted step), accepted and rejected steps."""
    function_evals: int = 0
    accepted_steps: int = 0
    rejected_steps: int = 0


def _rms(a: np.ndarray) -> np.float64:
    """torchdiffeq's _rms_norm (over the whole state), in float64, summed in the order the C++
    runtime follows (runtime/core/portable.py; np.mean's blocked pairwise order is numpy's own)."""
    return rms(a)


def _row_sum(terms: list[np.ndarray]) -> np.ndarray:
    """torch.sum over a short stage axis (< 64 terms) in its CPU order (ATen's row_sum): four
    interleaved partial sums, the leftover terms added to the first, then the partials in order."""
    lanes = len(terms) // 4
    if lanes == 0:
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total
    partial = list(terms[:4])
    for i in range(4, 4 * lanes):
        partial[i % 4] = partial[i % 4] + terms[i]
    for term in terms[4 * lanes:]:
        partial[0] = partial[0] + term
    return ((partial[0] + partial[1]) + partial[2]) + partial[3]


def _stage_sum(ks: list[np.ndarray], weights, dt) -> np.ndarray:
    """sum_j k_j * (w_j * dt) in the state's dtype, as torchdiffeq's torch.sum(k * (w * dt), -1)."""
    real = ks[0].dtype.type
    return _row_sum([k * (real(w) * dt) for k, w in zip(ks, weights)])


def ode_dopri5(x: np.ndarray, grid: OdeGrid, noise: Noise | None = None, *, atol: float = 1e-6,
               rtol: float = 1e-3, stats: Dopri5Stats | None = None) -> Loop:
    """SiT's default ODE sampler: torchdiffeq 0.2.5 odeint(method='dopri5') from grid.t[0] to
    grid.t[-1], the sample being its 4th-order dense output at t[-1].

    Mixed precision as torchdiffeq: times and step control in float64; inside a step the times,
    the tableau and the state arithmetic in the state's dtype; the last two stages at the float
    just below t1 (Perturb.PREV). SiT passes atol and rtol as 1-element lists, which makes the
    tolerances float64 tensors with a dimension: the error norms are float64 over the WHOLE state.
    With a float64 state this is plain float64 dopri5 (as torchdiffeq on float64 tensors)."""
    x = _check_state(x)
    atol, rtol = (check_tolerance(v, name) for name, v in (("atol", atol), ("rtol", rtol)))
    real = x.dtype.type
    stats = stats if stats is not None else Dopri5Stats()
    t_start, t_end = np.float64(grid.t[0]), np.float64(grid.t[-1])

    def call(y: np.ndarray, t) -> Generator:
        stats.function_evals += 1
        return _velocity((yield y, float(real(t))), y)

    def tolerance(y0: np.ndarray, y1: np.ndarray | None = None) -> np.ndarray:
        y = np.abs(y0) if y1 is None else np.maximum(np.abs(y0), np.abs(y1))
        return atol + y.astype(np.float64) * rtol

    # torchdiffeq's _select_initial_step (Hairer, Norsett & Wanner, II.4), with its dtypes.
    f0 = yield from call(x, t_start)
    scale = tolerance(x)
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    # h0 is a state-dtype tensor in the fallback branch, float64 otherwise; arithmetic keeps its type.
    h0 = real(1e-6) if d0 < 1e-5 or d1 < 1e-5 else np.float64(0.01) * d0 / d1
    h_type = type(h0)
    f1 = yield from call(x + real(h0) * f0, t_start + np.float64(h0))
    d2 = abs(_rms((f1 - f0) / scale) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(real(1e-6), h0 * h_type(1e-3))
    else:
        h1 = (np.float64(0.01) / max(d1, d2)) ** (1. / float(_ORDER))  # 1 / ((order - 1) + 1)
    dt = np.float64(min(h_type(100) * h0, h1))

    t, y, f = t_start, x, f0
    interval, coeffs = (t_start, t_start), [x] * 5
    while t_end > t:
        if not (np.isfinite(dt) and t + dt > t):  # torchdiffeq: a non-finite dt becomes 0, then underflows
            raise StepError(f"dopri5: step size underflow at t={float(t)} (dt={float(dt)}); the velocity "
                            "is probably not finite")
        if not np.isfinite(y).all():
            raise StepError(f"dopri5: non-finite values in the state at t={float(t)}")
        t_next = t + dt
        y_next, f_next, error, ks = yield from _dopri5_step(call, y, f, t, dt, t_next)
        error_ratio = _rms(error / tolerance(y, y_next))
        if error_ratio <= 1:
            stats.accepted_steps += 1
            interval, coeffs = (t, t_next), _interp_fit(y, y_next, ks, real(dt))
            t, y, f = t_next, y_next, f_next
        else:
            stats.rejected_steps += 1
        dt = max(_optimal_step_size(dt, error_ratio), np.float64(0))
    return _interp_evaluate(coeffs, *interval, t_end)


def _dopri5_step(call, y0: np.ndarray, f0: np.ndarray, t0, dt, t1) -> Generator:
    """One Dormand-Prince step (torchdiffeq's _runge_kutta_step): (y1, f1, error estimate, stages)."""
    real = y0.dtype.type
    t0, dt, t1 = real(t0), real(dt), real(t1)
    ks = [f0]
    for alpha, beta in zip(_DP_ALPHA, _DP_BETA):
        # torchdiffeq puts the stages with alpha == 1 just before t1, in case of discontinuities
        ti = np.nextafter(t1, real(-np.inf)) if alpha == 1 else t0 + real(alpha) * dt
        yi = y0 + _stage_sum(ks, beta, dt)
        ks.append((yield from call(yi, ti)))
    # The last stage's state is the 5th-order solution and its derivative the next f0 (FSAL).
    return yi, ks[-1], _stage_sum(ks, _DP_ERROR, dt), ks


def _optimal_step_size(dt: np.float64, error_ratio: np.float64) -> np.float64:
    """torchdiffeq's _optimal_step_size: grow up to x10, shrink down to x0.2 (never on accepted steps)."""
    if error_ratio == 0:
        return dt * _IFACTOR
    dfactor = np.float64(1) if error_ratio < 1 else np.float64(_DFACTOR)
    exponent = np.float64(1) / np.float64(_ORDER)
    return dt * np.minimum(_IFACTOR, np.maximum(_SAFETY / error_ratio ** exponent, dfactor))


def _interp_fit(y0, y1, ks, dt) -> list[np.ndarray]:
    """torchdiffeq's 4th-order interpolant through y0, y1, the midpoint estimate and both slopes:
    coefficients [e, d, c, b, a] of a x^4 + b x^3 + c x^2 + d x + e, x in [0, 1] across the step."""
    real = y0.dtype.type
    y_mid = y0 + _stage_sum(ks, _DP_MID, dt)
    f0, f1 = ks[0], ks[-1]
    a = real(2) * dt * (f1 - f0) - real(8) * (y1 + y0) + real(16) * y_mid
    b = dt * (real(5) * f0 - real(3) * f1) + real(18) * y0 + real(14) * y1 - real(32) * y_mid
    c = dt * (f1 - real(4) * f0) - real(11) * y0 - real(5) * y1 + real(16) * y_mid
    d = dt * f0
    return [y0, d, c, b, a]


def _interp_evaluate(coeffs: list[np.ndarray], t0, t1, t) -> np.ndarray:
    """The interpolant at t: the fraction x in float64, then x, x^2, .. x^4 in the state dtype."""
    real = coeffs[0].dtype.type
    x = real((t - t0) / (t1 - t0))
    total = coeffs[0] + x * coeffs[1]
    power = x
    for coeff in coeffs[2:]:
        power = power * x
        total = total + power * coeff
    return total


# ---- SDE: SiT's Euler-Maruyama and Heun, then the "Mean" last step --------------------------------
# np.sqrt is correctly rounded; torch's CPU float32 sqrt is 1 ulp off for some arguments, which is
# all that separates these loops from the official ones run on a CPU (~2e-7 on the golden runs).

def sde_drift(v: np.ndarray, x: np.ndarray, t) -> np.ndarray:
    """SiT's sde_drift for the Linear path: velocity + diffusion * score, with the score from the
    velocity (ICPlan.get_score_from_velocity: alpha_t = t, d_alpha_t = 1, sigma_t = 1 - t, d_sigma_t
    = -1) and the 'sigma' diffusion of norm 1 (1 - t). Official op order, state dtype."""
    real = x.dtype.type
    t = real(t)
    sigma_t = real(1) - t
    reverse_alpha_ratio = t  # alpha_t / d_alpha_t
    var = sigma_t * sigma_t - reverse_alpha_ratio * real(-1) * sigma_t
    score = (reverse_alpha_ratio * v - x) / var
    return v + sigma_t * score


def _mean_last_step(x: np.ndarray, grid: SdeGrid) -> Loop:
    """x + drift(x, t_last) * last_step_size, at t_last = 1 - last_step_size (= grid.t[-1])."""
    t = grid.t[-1]
    v = _velocity((yield x, float(t)), x)
    return x + sde_drift(v, x, t) * x.dtype.type(grid.last_step_size)


def sde_euler(x: np.ndarray, grid: SdeGrid, noise: Noise | None) -> Loop:
    """SiT's Euler-Maruyama: x = x + drift * dt + sqrt(2 * diffusion) * sqrt(dt) * w, one draw per
    step. The official code calls the model twice per drift (velocity, then score, on the same
    (x, t)); one call gives the same numbers."""
    x = _check_state(x)
    real = x.dtype.type
    dt = real(grid.dt)
    for k, t in enumerate(grid.t[:-1]):
        dw = _draw(noise, k, x) * np.sqrt(dt)
        v = _velocity((yield x, float(t)), x)
        mean_x = x + sde_drift(v, x, t) * dt
        x = mean_x + np.sqrt(real(2) * (real(1) - t)) * dw
    return (yield from _mean_last_step(x, grid))


def sde_heun(x: np.ndarray, grid: SdeGrid, noise: Noise | None) -> Loop:
    """SiT's Heun step: the noise first (xhat), then the trapezoid over an Euler predictor, the
    second drift at t + dt (as computed, not the grid's next time)."""
    x = _check_state(x)
    real = x.dtype.type
    dt = real(grid.dt)
    for k, t in enumerate(grid.t[:-1]):
        dw = _draw(noise, k, x) * np.sqrt(dt)
        x_hat = x + np.sqrt(real(2) * (real(1) - t)) * dw
        k1 = sde_drift(_velocity((yield x_hat, float(t)), x), x_hat, t)
        x_pred = x_hat + dt * k1
        t_next = t + dt
        k2 = sde_drift(_velocity((yield x_pred, float(t_next)), x), x_pred, t_next)
        x = x_hat + real(0.5) * dt * (k1 + k2)
    return (yield from _mean_last_step(x, grid))


# ---- what the sampler registry needs (runtime/sampling/samplers.py registers the five loops) -------------

def parse_num_steps(steps) -> int:
    """SiT's --num-sampling-steps: an int or a string of digits, >= 2 (the digits counted before the
    conversion: validate.parse_count)."""
    if isinstance(steps, str) and (count := parse_count(steps, "num_steps (SiT's --num-sampling-steps)")) is not None:
        steps = count
    return _check_num_steps(steps)


def check_sde_options(options: dict) -> dict:
    """The SDE options as SiT names them; only the defaults are implemented (refused otherwise,
    naming what is supported). They are consumed here: the loops take none."""
    SdeSettings(**options).check()
    return {}


# The smallest tolerance: the error norm divides by atol + rtol |y| >= atol and squares in float64, so
# a float32 state (|x| <= 3.4e38) over a tolerance >= 1e-100 stays below 3.4e138, whose square is finite
# (< 1.8e308). Below 2.6e-116 the norm overflows to inf and the step control turns NaN.
MIN_TOLERANCE = 1e-100


def check_tolerance(value, name: str) -> float:
    return check_number(value, name, MIN_TOLERANCE, 1)  # names the tolerance: atol must be a number in [1e-100, 1]


def check_dopri5_options(options: dict) -> dict:
    return {name: check_tolerance(options[name], name) for name in ("atol", "rtol")}
