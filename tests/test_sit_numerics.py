"""SiT numerics (runtime/sampling/flow.py, the torch SiT in exporter/model.py): the golden forward and the
seven golden loops of the official code (tests/golden/sit/, copied from shared/golden/sit/) driven
through the numpy loops with the torch SiT's forward_with_cfg; the solvers against torchdiffeq
0.2.5 itself on analytic ODEs (values, function evaluations, accepted and rejected steps); the grids
against torch.linspace; the refused paths, predictions and options; the generator protocol."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import max_rel_err, read_npz
from ditrt.exporter.model import SiT
from ditrt.runtime.sampling import flow
from ditrt.runtime.spec.config import DiTConfig, Transport, read_transport
from ditrt.runtime.core.errors import ArtifactError, InputError, StepError
from ditrt.runtime.sampling.samplers import SAMPLERS, get_sampler

SIT_SAMPLERS = sorted(name for name, s in SAMPLERS.items() if s.family == "sit")
TRANSPORT = Transport()


def drive(loop, velocity):
    """Run a loop to the end with velocity(x_eval, t) as the model; the final sample."""
    x_eval, t = next(loop)
    while True:
        try:
            x_eval, t = loop.send(velocity(x_eval, t))
        except StopIteration as done:
            return done.value


def schedule(sampler, num_steps):
    return sampler.schedule(TRANSPORT, num_steps)


def official_model_calls(sampler, num_steps):
    """The official code calls the model twice per SDE drift (velocity, then inside the score)."""
    calls = sampler.model_calls(schedule(sampler, num_steps))
    return None if calls is None else calls * (2 if sampler.uses_noise else 1)

GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "sit"
META = json.loads((GOLDEN_DIR / "sit_vectors.json").read_text())
RUNS = {run["key"]: run for run in META["runs"]}
SAMPLER_OF = {("ODE", "euler"): "ode-euler", ("ODE", "heun2"): "ode-heun2", ("ODE", "dopri5"): "ode-dopri5",
              ("SDE", "Euler"): "sde-euler", ("SDE", "Heun"): "sde-heun"}
# The official code run on two machines agrees to ~1e-6 per forward; dopri5's step control
# amplifies that the most (see tests/golden/README.md).
BOUND = {"ode-dopri5": 5e-4}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The model is tiny: a second intra-op thread only contends for the shared cores (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sit_golden() -> dict[str, np.ndarray]:
    return read_npz(GOLDEN_DIR / "sit_vectors.npz")


@pytest.fixture(scope="module")
def sit_model() -> SiT:
    state_dict = torch.load(GOLDEN_DIR / "sit_official_layout.pt", weights_only=True)
    return SiT.from_state_dict(DiTConfig(**META["model"]), state_dict)


class OfficialVelocity:
    """The model as sample.py calls it: forward_with_cfg on [x[:N]; x[:N]] with labels [y; null],
    channels 0..2 guided in both halves, channel 3 per half (also at cfg 1.0: sample.py always
    builds [z, z]). With `full_state` the loop integrates the 2N-row state and gets both halves;
    otherwise it integrates the N real rows and gets their (cond-half) outputs."""

    def __init__(self, model: SiT, cfg_scale: float, full_state: bool):
        labels = META["labels"]
        self.model, self.cfg_scale, self.full_state, self.n = model, cfg_scale, full_state, len(labels)
        self.y = torch.tensor(labels + [META["null_class"]] * len(labels))
        self.times: list[float] = []

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        assert type(t) is float and float(np.float32(t)) == t  # the float32 time the official code feeds
        self.times.append(t)
        batch = torch.from_numpy(x if self.full_state else np.concatenate([x, x]))
        with torch.no_grad():
            out = self.model.forward_with_cfg(batch, torch.full((len(batch),), t), self.y, self.cfg_scale).numpy()
        return out if self.full_state else out[: self.n]


def official_sde_times(method: str, num_steps: int) -> list[float]:
    """The model times of SiT's SDE sampler (transport/integrators.py), in torch float32: a step at
    each t_i (Heun's second drift at t_i + dt, dt = t[1] - t[0]), then the last step at 1 - 0.04."""
    t = torch.linspace(0, 1 - 0.04, num_steps)
    dt = t[1] - t[0]
    steps = [[ti] if method == "Euler" else [ti, ti + dt] for ti in t[:-1]]
    return [time.item() for step in steps for time in step] + [(torch.ones(1) * (1 - 0.04)).item()]


def run_golden(model, golden, key: str, real_rows_only: bool = False, null_noise=None):
    """Drive the numpy loop of golden run `key`; (sample, model times, dopri5 stats)."""
    run = RUNS[key]
    sampler = get_sampler(SAMPLER_OF[run["mode"], run["method"]])
    full_state = sampler.integrates_null_half and not real_rows_only or null_noise is not None
    z = golden["initial_noise"]
    x = np.concatenate([z, z]) if full_state else z
    noise = None
    if sampler.uses_noise:
        # The golden keeps only the real rows of each draw. The official loop also draws noise for
        # the null half, but that half's state never reaches the network (forward_with_cfg feeds
        # x[:N] twice) and the SDE steps act row by row, so the real rows do not depend on it.
        steps = golden[f"{key}_step_noise"]
        noise = (lambda k: np.concatenate([steps[k], null_noise[k]])) if full_state else (lambda k: steps[k])
    velocity = OfficialVelocity(model, run["cfg_scale"], full_state)
    stats = flow.Dopri5Stats()
    options = {"stats": stats} if sampler.name == "ode-dopri5" else {}
    sample = drive(sampler.loop(x, schedule(sampler, run["num_steps"]), noise, **options), velocity)
    return sample[: len(z)], velocity.times, stats


# ---- the network and the golden loops ---------------------------------------------------------

def test_sit_forward_matches_golden(sit_model, sit_golden):
    with torch.no_grad():
        out = sit_model(*(torch.from_numpy(sit_golden[f"forward_{k}"]) for k in "xty")).numpy()
    assert out.shape == sit_golden["forward_out"].shape  # learn_sigma: the first half of the channels
    assert max_rel_err(out, sit_golden["forward_out"]) <= 1e-5


@pytest.mark.parametrize("key", sorted(RUNS))
def test_golden_run(sit_model, sit_golden, key):
    run = RUNS[key]
    sampler = get_sampler(SAMPLER_OF[run["mode"], run["method"]])
    sample, times, stats = run_golden(sit_model, sit_golden, key)
    err = max_rel_err(sample, sit_golden[f"{key}_samples"])
    assert err <= BOUND.get(sampler.name, 1e-5), f"{key} {sampler.name}: max rel err {err:.3g}"
    assert sampler.noise_draws(schedule(sampler, run["num_steps"])) == run["noise_draws"]
    if sampler.name == "ode-dopri5":
        assert len(times) == stats.function_evals == run["model_calls"]  # one forward_with_cfg per evaluation
        assert stats.function_evals == 2 + 6 * (stats.accepted_steps + stats.rejected_steps)
    else:
        assert len(times) == sampler.model_calls(schedule(sampler, run["num_steps"]))
        assert official_model_calls(sampler, run["num_steps"]) == run["model_calls"]
    if sampler.uses_noise:  # the ODE solvers' times are checked against torchdiffeq below
        assert times == official_sde_times(run["method"], run["num_steps"])


def test_dopri5_error_norm_covers_the_null_half(sit_model, sit_golden):
    """The official dopri5 integrates [z, z]: the null half (whose channel 3 is unconditional) is in
    the step-size control, so integrating the real rows alone takes other steps and lands elsewhere.

    Asserted in float64 (the model and the state), where it is a property of the math, not of a
    CPU's float32 kernels: float32 rounding, amplified by the step control, moves the sample by up
    to ~1e-4 from one CPU to another (BOUND), far more than the null half's effect (~4e-7 here). In
    float64 the rounding is ~1e-16 per operation; even amplified 1e4 times (float32's observed
    amplification is ~1e3: ulps of 6e-8 become 7e-5) it stays below 1e-12, so 1e-9 separates the
    two integrations on any CPU."""
    model64 = copy.deepcopy(sit_model).double()
    run = RUNS["run2"]
    sampler = get_sampler(SAMPLER_OF[run["mode"], run["method"]])
    z = sit_golden["initial_noise"].astype(np.float64)
    grid = schedule(sampler, run["num_steps"])

    def integrate(full_state: bool):
        velocity = Float64Velocity(model64, run["cfg_scale"], full_state=full_state)
        x = np.concatenate([z, z]) if full_state else z
        return drive(sampler.loop(x, grid, None), velocity)[: len(z)], np.array(velocity.times)

    (full, full_times), (alone, alone_times) = integrate(sampler.integrates_null_half), integrate(False)
    steps_differ = len(full_times) != len(alone_times) or \
        np.abs(full_times - alone_times).max() > 1e-9 * np.abs(alone_times).max()
    assert steps_differ, "the step-size control does not see the null half"
    assert max_rel_err(full, alone) > 1e-9


class Float64Velocity(OfficialVelocity):
    """OfficialVelocity on a float64 model: the state, the time and the labels' rows in float64."""

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        self.times.append(t)
        batch = torch.from_numpy(x if self.full_state else np.concatenate([x, x]))
        with torch.no_grad():
            out = self.model.forward_with_cfg(batch, torch.full((len(batch),), t, dtype=torch.float64), self.y,
                                              self.cfg_scale).numpy()
        return out if self.full_state else out[: self.n]


def test_sde_null_half_noise_does_not_reach_the_real_rows(sit_model, sit_golden):
    """The official state is [z, z], with noise drawn for both halves: any null-half noise gives
    the same real rows as integrating those rows alone."""
    rows, _, _ = run_golden(sit_model, sit_golden, "run6")
    other = np.random.default_rng(1).standard_normal(sit_golden["run6_step_noise"].shape, dtype=np.float32)
    both, _, _ = run_golden(sit_model, sit_golden, "run6", null_noise=other)
    np.testing.assert_array_equal(both, rows)


# ---- the solvers against torchdiffeq ------------------------------------------------------------

class Counted:
    """A torchdiffeq function that counts its evaluations and the solver's accepted/rejected steps."""

    def __init__(self, f):
        self.f, self.accepted, self.rejected, self.times = f, 0, 0, []

    def __call__(self, t, y):
        self.times.append(t.item())  # the model time, in the state's dtype
        return self.f(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def ours(method: str, f, y0: np.ndarray, t: np.ndarray, **options):
    """(final state, dopri5 stats, model times)."""
    stats, times = flow.Dopri5Stats(), []
    if method == "dopri5":
        options["stats"] = stats
    loop = {"dopri5": flow.ode_dopri5, "euler": flow.ode_euler, "heun2": flow.ode_heun2}[method]
    return drive(loop(y0, flow.OdeGrid(t), None, **options), lambda y, s: times.append(s) or f(s, y)), stats, times


def theirs(method: str, f, y0: np.ndarray, t: np.ndarray, **options):
    torchdiffeq = pytest.importorskip("torchdiffeq")  # 0.2.5, the version SiT's golden used (dev extra)
    counted = Counted(f)
    out = torchdiffeq.odeint(counted, torch.from_numpy(y0), torch.from_numpy(t), method=method, **options)
    return out[-1].numpy(), counted


RNG = np.random.default_rng(0)
A = RNG.standard_normal((6, 6)) * 0.8
Y_LINEAR = RNG.standard_normal((4, 6)) * np.array([[1.0], [1.0], [3.0], [3.0]])  # halves differ

# (name, numpy f(t, y), torch f(t, y), y0, t); float64
ANALYTIC = [
    ("linear system", lambda t, y: y @ A.T, lambda t, y: y @ torch.from_numpy(A).T, Y_LINEAR, np.array([0.0, 2.0])),
    ("decay", lambda t, y: -0.7 * y, lambda t, y: -0.7 * y, np.array([[1.0, -2.0], [0.5, 4.0]]), np.linspace(0, 3, 11)),
    # stiff enough to force rejected steps
    ("stiff", lambda t, y: -50 * (y - np.cos(t)), lambda t, y: -50 * (y - torch.cos(t)),
     np.array([[1.5, -2.0, 0.3]]), np.linspace(0, 3, 7)),
    # y0 = 0: the initial step's 1e-6 fallback
    ("zero start", lambda t, y: np.cos(3 * t) + 0 * y, lambda t, y: torch.cos(3 * t) + 0 * y,
     np.zeros((2, 3)), np.array([0.0, 1.0])),
    # f = 0: both initial-step fallbacks and the zero error ratio (dt x 10 per step)
    ("constant", lambda t, y: 0 * y, lambda t, y: 0 * y, np.ones((2, 2)), np.array([0.0, 1.0])),
]


@pytest.mark.parametrize("tolerances", [(1e-6, 1e-3), (1e-9, 1e-7)], ids=["sit", "tight"])
@pytest.mark.parametrize("name,f_np,f_torch,y0,t", ANALYTIC, ids=[case[0] for case in ANALYTIC])
def test_dopri5_float64_matches_torchdiffeq(name, f_np, f_torch, y0, t, tolerances):
    atol, rtol = tolerances
    mine, stats, times = ours("dopri5", f_np, y0, t, atol=atol, rtol=rtol)
    ref, counted = theirs("dopri5", f_torch, y0, t, atol=atol, rtol=rtol)
    assert np.abs(mine - ref).max() <= 1e-12 * max(1.0, np.abs(ref).max())
    assert (stats.function_evals, stats.accepted_steps, stats.rejected_steps) == \
        (len(counted.times), counted.accepted, counted.rejected)
    # f differs between numpy and torch by an ulp, and error estimates cancel: dt agrees to ~1e-11
    np.testing.assert_allclose(times, counted.times, rtol=1e-9, atol=0)
    if name == "stiff":
        assert stats.rejected_steps > 0


def test_dopri5_float32_is_torchdiffeq_bit_for_bit():
    """SiT's mixed precision: a float32 state, the SiT grid, tolerances passed as 1-element lists
    (float64 norms over the whole state). An elementwise ODE (no reduction in f), so both sides
    evaluate f identically and every other operation must match torchdiffeq's exactly."""
    rng = np.random.default_rng(1)
    rate = -rng.uniform(0.5, 3.0, (4, 4, 3, 3)).astype(np.float32)
    drive = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    rate[2:] *= 4  # the halves differ: both count in the error norm
    y0 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    grid = flow.ode_grid(50)
    mine, stats, times = ours("dopri5", lambda t, y: rate * y + np.float32(t) * drive, y0, grid.t)
    ref, counted = theirs("dopri5", lambda t, y: torch.from_numpy(rate) * y + t * torch.from_numpy(drive), y0,
                          grid.t, atol=[1e-6], rtol=[1e-3])
    np.testing.assert_array_equal(mine, ref)
    assert times == counted.times  # incl. the last two stages at the float32 just below t1
    assert (stats.function_evals, stats.accepted_steps, stats.rejected_steps) == \
        (len(counted.times), counted.accepted, counted.rejected)


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_fixed_grid_solvers_match_torchdiffeq(method):
    name, f_np, f_torch, y0, _ = ANALYTIC[0]
    t = np.linspace(0.0, 1.0, 13)
    mine, _, times = ours(method, f_np, y0, t)
    ref, counted = theirs(method, f_torch, y0, t)
    assert np.abs(mine - ref).max() <= 1e-12 * np.abs(ref).max()
    assert times == counted.times and len(times) == get_sampler(f"ode-{method}").model_calls(flow.OdeGrid(t))
    # float32, bit for bit: on SiT's grid, and on one where t0 + (t1 - t0) != t1 (heun2's second time)
    rate = np.linspace(-2, 1, 8, dtype=np.float32).reshape(2, 4)
    y32 = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    for grid in (flow.ode_grid(10).t, np.array([0.0, 0.1, 0.23, 1.0], np.float32)):
        mine, _, times = ours(method, lambda s, y: rate * y + np.float32(s), y32, grid)
        ref, counted = theirs(method, lambda s, y: torch.from_numpy(rate) * y + s, y32, grid)
        np.testing.assert_array_equal(mine, ref)
        assert times == counted.times


# ---- grids ----------------------------------------------------------------------------------------

def test_grids_are_torch_linspace_bit_for_bit():
    for n in range(2, 1101):
        for end, grid in ((1.0, flow.ode_grid), (1 - 0.04, flow.sde_grid)):
            expected = torch.linspace(0, end, n).numpy()
            np.testing.assert_array_equal(grid(n).t.view(np.int32), expected.view(np.int32), err_msg=f"n={n}")
    sde = flow.sde_grid(20)
    torch_t = torch.linspace(0, 1 - 0.04, 20)
    assert sde.dt == (torch_t[1] - torch_t[0]).item() and sde.dt.dtype == np.float32
    assert sde.t[-1] == np.float32(1 - 0.04)  # the last step's time, torch.ones(n) * t1 in the official


# ---- registry, options and refusals ---------------------------------------------------------------

def test_registry_counts():
    counts = {name: (s.model_calls(schedule(s, 20)), official_model_calls(s, 20), s.noise_draws(schedule(s, 20)),
                     s.integrates_null_half) for name, s in SAMPLERS.items() if s.family == "sit"}
    assert counts == {"ode-euler": (19, 19, 0, False), "ode-heun2": (38, 38, 0, False),
                      "ode-dopri5": (None, None, 0, True), "sde-euler": (20, 40, 19, False),
                      "sde-heun": (39, 78, 19, False)}
    assert get_sampler("ode-dopri5").bind() == {"atol": 1e-6, "rtol": 1e-3}
    assert get_sampler("ode-dopri5").bind(rtol=1e-4) == {"atol": 1e-6, "rtol": 1e-4}
    assert get_sampler("sde-euler").bind(diffusion_form="sigma", last_step_size=0.04) == {}  # the defaults, spelt out


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), True, "1e-3", 2.0])
def test_tolerances_refused(bad):
    with pytest.raises(InputError, match="atol must be a"):
        get_sampler("ode-dopri5").bind(atol=bad)


def test_options_refused():
    with pytest.raises(InputError, match="atol applies to ode-dopri5 only; sde-euler takes no atol"):
        get_sampler("sde-euler").bind(atol=1e-5)
    with pytest.raises(InputError, match="eta applies to ddim only; ode-dopri5 takes no eta"):
        get_sampler("ode-dopri5").bind(eta=0.5)
    with pytest.raises(InputError, match="unknown sampler 'dopri8'"):
        get_sampler("dopri8")
    with pytest.raises(InputError, match="unknown sampler 'ddpm' for a sit model \\(ddpm samples dit models\\)"):
        get_sampler("ddpm", "sit")
    for bad in (1, 0, 2.0, True, "1x"):
        with pytest.raises(InputError, match="num_steps"):
            schedule(get_sampler("ode-euler"), bad)
        with pytest.raises(InputError, match="num_steps"):
            schedule(get_sampler("sde-euler"), bad)
    assert len(schedule(get_sampler("ode-euler"), "10").t) == 10  # the CLI's string form


@pytest.mark.parametrize("section,match", [
    ({"path_type": "GVP", "prediction": "velocity"}, "only the Linear path"),
    ({"path_type": "VP", "prediction": "velocity"}, "only the Linear path"),
    ({"path_type": "Linear", "prediction": "score"}, "only velocity prediction"),
    ({"path_type": "Linear", "prediction": "noise"}, "only velocity prediction"),
    ({"path_type": "Linear", "prediction": "velocity", "sample_eps": 1e-3}, "sample_eps must be"),
    ({"path_type": "Bridge", "prediction": "velocity"}, "path_type must be one of 'Linear'"),
])
def test_transport_refused(section, match):
    config = DiTConfig(**META["model"])
    with pytest.raises(ArtifactError, match=match):
        read_transport(section, config)
    assert read_transport(META["transport"], config) == Transport()


@pytest.mark.parametrize("settings", [
    dict(diffusion_form="SBDM"), dict(diffusion_form="linear"), dict(diffusion_norm=0.5), dict(last_step="Tweedie"),
    dict(last_step_size=0.01),
])
@pytest.mark.parametrize("name", ["sde-euler", "sde-heun"])
def test_sde_settings_refused(settings, name):
    with pytest.raises(InputError, match="only .* \\(diffusion 'sigma' form with norm 1.0"):
        get_sampler(name).bind(**settings)


# ---- the generator protocol -----------------------------------------------------------------------

X = np.zeros((2, 4, 2, 2), np.float32)


@pytest.mark.parametrize("name", SIT_SAMPLERS)
def test_wrong_shaped_model_output_is_a_step_error(name):
    sampler = get_sampler(name)
    loop = sampler.loop(X, schedule(sampler, 5), lambda k: X, **sampler.bind())
    next(loop)
    with pytest.raises(StepError, match="send back one velocity per row"):
        loop.send(np.zeros((1, 4, 2, 2), np.float32))


def test_sde_noise_is_checked():
    with pytest.raises(InputError, match="pass noise"):
        next(flow.sde_euler(X, flow.sde_grid(5), None))
    with pytest.raises(InputError, match=r"noise\(0\) has shape \(1, 4, 2, 2\)"):
        next(flow.sde_heun(X, flow.sde_grid(5), lambda k: X[:1]))


def test_dopri5_non_finite_velocity_is_a_step_error():
    with pytest.raises(StepError, match="dopri5"):
        drive(flow.ode_dopri5(X + 1, flow.ode_grid(5)), lambda x, t: np.full_like(x, np.nan))


def test_flow_is_torch_free():
    code = """
import sys
sys.modules['torch'] = None  # any torch import now fails
import numpy as np
from ditrt.runtime.spec.config import Transport
from ditrt.runtime.sampling.samplers import SAMPLERS
x = np.ones((2, 4, 2, 2), np.float32)
for sampler in SAMPLERS.values():
    if sampler.family == "sit":
        loop = sampler.loop(x, sampler.schedule(Transport(), 4), lambda k: x, **sampler.bind())
        x_eval, t = next(loop)
        try:
            while True:
                x_eval, t = loop.send(-x_eval)
        except StopIteration as done:
            assert done.value.shape == x.shape
print('torch-free ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "torch-free ok" in r.stdout, r.stderr
