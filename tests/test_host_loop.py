"""The sampling loop off the critical path (issue 29): the bits of every sampler stay what they
were before the loop was made faster, the noise prefetch computes each draw once and holds a
bounded number of draws, and a run that fails or is cancelled mid-loop leaves no thread behind.

The stored bits (tests/data/host_loop/bits.npz) were computed by the runtime of main at a397491,
before any change of issue 29, with the same deterministic stand-in network as here: its output is
elementwise float32 + and * of its inputs (correctly rounded, so the same bits on any CPU), and
the artifacts are manifest-only (tests/data/host_loop/{dit,sit}/manifest.json: a tiny 4x8x8 export
whose graph the stand-in never reads).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.execution.backends import BackendKind, register_backend
from ditrt.runtime.core.errors import BackendError

DATA = Path(__file__).resolve().parent / "data" / "host_loop"
BITS = DATA / "bits.npz"
LABELS = [3, 0, 9]
SEED = 7

# (case name, family, sampler, steps, sampler options): every sampler of the registry, and DDIM
# with eta 1 (its noise path).
CASES = [("ddpm", "dit", "ddpm", "10", {}), ("ddim", "dit", "ddim", "ddim10", {}),
         ("ddim-eta1", "dit", "ddim", "10", {"eta": 1.0}), ("dpm++2m", "dit", "dpm++2m", 10, {}),
         ("ode-euler", "sit", "ode-euler", 8, {}), ("ode-heun2", "sit", "ode-heun2", 8, {}),
         ("ode-dopri5", "sit", "ode-dopri5", 8, {}), ("sde-euler", "sit", "sde-euler", 8, {}),
         ("sde-heun", "sit", "sde-heun", 8, {})]


class AffineNetwork:
    """A deterministic stand-in denoiser: per row, output channel c is a float32 affine function of
    the latent (channel c mod C), the time and the label. Only * and + on float32: the same bits
    on every CPU. `fail_at` raises from that call (1-based); `delay_s` sleeps in every call."""

    def __init__(self, network, fail_at: int | None = None, delay_s: float = 0.0):
        self.network, self.name, self.max_batch, self.min_batch = network, "affine-fp32", None, 1
        self.precision = "fp32"
        self.fail_at, self.delay_s, self.calls = fail_at, delay_s, 0

    def __call__(self, feeds):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise BackendError(f"the stand-in fails at call {self.calls}")
        if self.delay_s:
            time.sleep(self.delay_s)
        x, t, label = feeds["latent"], feeds["timestep"], feeds["class_label"]
        rows, channels = x.shape[0], self.network.output.concrete(1)[1]
        scale = np.float32(1e-3) if t.max() > 1.5 else np.float32(0.5)  # DiT's timesteps 0..999, SiT's t in [0, 1]
        bias = (t * scale + label.astype(np.float32) * np.float32(0.01)).reshape(rows, 1, 1, 1)
        out = np.empty((rows, channels, *x.shape[2:]), np.float32)
        for c in range(channels):
            k = np.float32(0.9 if c < x.shape[1] else 0.05)  # the variance values stay in (-1, 1)
            out[:, c] = x[:, c % x.shape[1]] * k + bias[:, 0]
        return {"model_output": out}


_CREATED: list[AffineNetwork] = []


def _create(manifest, network, precision, **options):
    backend = AffineNetwork(manifest.network(network), **_OPTIONS)
    _CREATED.append(backend)
    return backend


_OPTIONS: dict = {}
register_backend(BackendKind("affine", "a deterministic float32 stand-in (tests)", ("fp32",), "fp32", _create))


def _pipe(family: str, **options):
    _OPTIONS.clear()
    _OPTIONS.update(options)
    return runtime.load(DATA / family, backend="affine", decoder=False)


def sample_case(family: str, sampler: str, steps, options: dict) -> np.ndarray:
    pipe = _pipe(family)
    return pipe.sample(LABELS, num_steps=steps, sampler=sampler, cfg_scale=4.0, seed=SEED, progress=False, **options)


def write_bits() -> None:
    """Regenerate tests/data/host_loop/bits.npz (only on purpose: the point is that it does not change)."""
    np.savez(BITS, **{name: sample_case(family, sampler, steps, options)
                      for name, family, sampler, steps, options in CASES})


@pytest.fixture(scope="module")
def stored_bits() -> dict[str, np.ndarray]:
    with np.load(BITS) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name,family,sampler,steps,options", CASES, ids=[c[0] for c in CASES])
def test_every_sampler_keeps_its_bits(stored_bits, name, family, sampler, steps, options):
    got = sample_case(family, sampler, steps, options)
    want = stored_bits[name]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---- the prefetch: each draw once, a bounded number held ---------------------------------------------

def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ditrt-noise-prefetch"}


def test_a_prefetch_computes_each_draw_once_and_holds_at_most_one():
    """A loop takes draws 0..K-1 in order, with 'engine time' in between: every draw is computed
    exactly once, the values are the stream's (noise.normal, the specification), and never more
    than one draw is queued, computing or held."""
    from ditrt.runtime.sampling.noise import SeededNoise, normal
    from ditrt.runtime.sampling.prefetch import NoisePrefetch
    noise = SeededNoise(11, 2, (4, 8, 8))
    prefetch = NoisePrefetch(noise.step, 6)
    prefetch.start()
    try:
        for k in range(6):
            time.sleep(0.002)  # the engine call during which draw k is computed
            np.testing.assert_array_equal(prefetch(k), normal(11, [0, 1], k + 1, (4, 8, 8)))
        assert dict(prefetch.computed) == {k: 1 for k in range(6)}
        assert prefetch.max_held == 1
    finally:
        prefetch.close()
    assert not prefetch.alive


def test_random_access_is_served_and_stale_draws_are_dropped():
    """Out of order (a retry goes back): the draw is the stream's, computed on the caller's thread,
    and what the worker keeps stays within depth of the last draw taken."""
    from ditrt.runtime.sampling.noise import SeededNoise
    from ditrt.runtime.sampling.prefetch import NoisePrefetch
    noise = SeededNoise(3, 1, (4, 8, 8))
    prefetch = NoisePrefetch(noise.step, 10, depth=2)
    try:
        for k in (0, 1, 5, 2, 3, 3):
            np.testing.assert_array_equal(prefetch(k), noise.step(k))
            assert prefetch.max_held <= 2 + 1  # depth, and one stale draw still computing after a jump
        assert prefetch.computed[9] == 0  # nothing past depth of the last draw taken
    finally:
        prefetch.close()


def test_a_sampling_run_prefetches_each_of_its_draws_exactly_once():
    """Through the pipeline: a DDPM run of 10 calls takes 9 step draws (none at the last call),
    each computed once, and its worker is gone when the run is done."""
    before = _threads()
    pipe = _pipe("dit", delay_s=0.002)
    run = pipe.start(LABELS, num_steps="10", sampler="ddpm", cfg_scale=4.0, seed=SEED)
    while not run.done:
        run.advance(pipe.backend(run.feeds())["model_output"])
    assert dict(run._prefetch.computed) == {k: 1 for k in range(9)}
    assert run._prefetch.max_held == 1
    assert _threads() == before


# ---- failing or cancelling mid-loop leaves no thread --------------------------------------------------

@pytest.mark.parametrize("sampler,steps,family", [("ddpm", "10", "dit"), ("sde-euler", 8, "sit")])
def test_a_backend_failing_mid_loop_leaves_no_thread(sampler, steps, family):
    before = set(threading.enumerate())
    pipe = _pipe(family, fail_at=4, delay_s=0.002)
    with pytest.raises(BackendError, match="fails at call 4") as failure:
        pipe.sample(LABELS, num_steps=steps, sampler=sampler, cfg_scale=4.0, progress=False)
    # the traceback still holds the run: its worker was stopped by the loop, not by the collector
    assert failure.traceback and set(threading.enumerate()) == before


def test_an_interrupt_from_the_progress_bar_leaves_no_thread(monkeypatch):
    """A cancel raised where the loop reports progress (Ctrl-C during the bar's update)."""
    from ditrt.runtime.execution import pipeline as pipeline_module
    calls = []

    def interrupt(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(pipeline_module.StepProgress, "update", interrupt)
    before = set(threading.enumerate())
    pipe = _pipe("sit", delay_s=0.002)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        pipe.sample(LABELS, num_steps=8, sampler="sde-heun", cfg_scale=4.0, progress=True)
    assert interrupted.traceback and set(threading.enumerate()) == before  # the run is alive, its worker is not


def test_a_run_dropped_early_stops_its_worker():
    """A driver that abandons a run (no close): the finaliser stops the worker when it is collected."""
    import gc
    before = _threads()
    pipe = _pipe("sit")
    run = pipe.start(LABELS, num_steps=8, sampler="sde-euler", cfg_scale=4.0, seed=SEED)
    run.advance(pipe.backend(run.feeds())["model_output"])
    assert _threads() - before  # the worker runs
    del run
    gc.collect()
    deadline = time.monotonic() + 5
    while _threads() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == before


def test_the_batcher_cancelling_a_request_leaves_no_thread():
    from ditrt.runtime.jobs.batching import StepBatcher
    pipe = _pipe("dit", delay_s=0.01)
    runs, start = [], pipe.start_spec
    pipe.start_spec = lambda *a, **k: runs.append(start(*a, **k)) or runs[-1]  # keeps the runs alive: no collector
    before = set(threading.enumerate())
    with StepBatcher(pipe, max_batch=16) as batcher:
        while not batcher.ready:
            time.sleep(0.01)
        running = set(threading.enumerate())
        future = batcher.submit(LABELS, num_steps="50", sampler="ddpm", cfg_scale=4.0)
        time.sleep(0.1)
        assert _threads()  # the request's prefetch works while it runs
        batcher.cancel(future)
        deadline = time.monotonic() + 5
        while _threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(threading.enumerate()) == running
    assert runs and set(threading.enumerate()) == before


def test_the_batcher_refusing_a_request_leaves_no_thread():
    """An SDE run draws its first step noise when it is made (its worker starts at once): refused
    at submit (the scheduler is closed), it is closed there."""
    from ditrt.runtime.core.errors import SchedulerClosed
    from ditrt.runtime.jobs.batching import StepBatcher
    pipe = _pipe("sit", delay_s=0.01)
    runs, start = [], pipe.start_spec
    pipe.start_spec = lambda *a, **k: runs.append(start(*a, **k)) or runs[-1]
    before = set(threading.enumerate())
    batcher = StepBatcher(pipe, max_batch=16)
    batcher.close()
    with pytest.raises(SchedulerClosed):
        batcher.submit(LABELS, num_steps=50, sampler="sde-euler", cfg_scale=4.0)
    assert runs[-1]._prefetch.computed and set(threading.enumerate()) == before


# ---- ONNX Runtime IOBinding with reused OrtValues ----------------------------------------------------

def _tiny_graph(path: Path) -> None:
    """The host-loop DiT's denoiser interface as a four-op ONNX graph: model_output = [x, x] (on
    channels) + t + label, broadcast per row."""
    import onnx
    from onnx import TensorProto, helper
    shape = lambda *dims: ["batch", *dims]  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Concat", ["latent", "latent"], ["xx"], axis=1),
         helper.make_node("Cast", ["class_label"], ["label_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["timestep", "label_f"], ["tl"]),
         helper.make_node("Reshape", ["tl", "rows"], ["tl4"]),
         helper.make_node("Add", ["xx", "tl4"], ["model_output"])],
        "tiny", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, shape(4, 8, 8)),
                 helper.make_tensor_value_info("timestep", TensorProto.FLOAT, shape()),
                 helper.make_tensor_value_info("class_label", TensorProto.INT64, shape())],
        [helper.make_tensor_value_info("model_output", TensorProto.FLOAT, shape(8, 8, 8))],
        [helper.make_tensor("rows", TensorProto.INT64, [4], [-1, 1, 1, 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_io_binding_reuses_its_ortvalues_and_returns_what_run_returns(tmp_path):
    """The IOBinding path (the CUDA EP's; here on the CPU EP, the same kernels as session.run):
    each row count's OrtValues are made once and reused, every output equals session.run's bit for
    bit and the graph's own arithmetic, and an output handed out earlier is not overwritten by a
    later call."""
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    spec = runtime.load_manifest(DATA / "dit").network("denoiser")
    _tiny_graph(tmp_path / "tiny.onnx")
    plain = OnnxRuntimeBackend(tmp_path / "tiny.onnx", spec, "fp32", "cpu", threads=1)
    bound = OnnxRuntimeBackend(tmp_path / "tiny.onnx", spec, "fp32", "cpu", threads=1, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    outputs, values = [], {}
    for call, rows in enumerate((2, 3, 2, 2)):
        feeds = spec.example_inputs(rows)
        feeds["latent"] = feeds["latent"] + np.float32(call)  # each call's own input
        got = bound(feeds)["model_output"]
        np.testing.assert_array_equal(got, plain(feeds)["model_output"])
        x, extra = feeds["latent"], (feeds["timestep"] + feeds["class_label"].astype(np.float32))[:, None, None, None]
        want = np.concatenate([x, x], axis=1) + extra  # the graph by hand: exact float32 adds
        np.testing.assert_array_equal(got, want)
        outputs.append((got, want))
        values.setdefault(rows, []).append(bound._bound[rows].inputs["latent"])
    assert sorted(bound._bound) == [2, 3]
    assert all(v is values[2][0] for v in values[2])  # one OrtValue per row count, reused
    for got, want in outputs:
        np.testing.assert_array_equal(got, want)


def test_the_fast_exp_is_the_series_to_the_bit():
    """portable.exp_float32 (numpy's exp where it decides the float32, the series elsewhere) gives the
    series' bits (the C++ runtime's) on random values of every scale, on every float32 in runs of
    bit patterns around the overflow, underflow and subnormal edges and near 0, and on the special
    values; in any shape, from several threads at once (their scratch buffers are their own)."""
    from ditrt.runtime.core.portable import exp_float32, exp_float32_series
    rng = np.random.default_rng(29)
    scale = rng.choice(np.float32([0.3, 3, 30, 120]), 400_000)
    random = (rng.standard_normal(400_000, dtype=np.float32) * scale).astype(np.float32)
    edges = [np.float32(v).view(np.uint32).astype(np.int64) + np.arange(-100_000, 100_000)
             for v in (88.72, -87.34, -103.97, -0.69, 1e-20)]
    walks = np.concatenate(edges).astype(np.uint32).view(np.float32)
    special = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 200, -200, 201, -201, 3e38, -3e38, 88.72284, -103.972])
    for x in (random, walks[np.isfinite(walks)], special, random.reshape(8, 50, 1000)[:, ::2], np.float32(-2.5)):
        fast, series = exp_float32(x), exp_float32_series(x)
        assert fast.shape == np.shape(x) and fast.dtype == np.float32
        assert np.array_equal(fast.view(np.uint32), series.view(np.uint32))
    assert np.isnan(exp_float32(special)[0])

    results, shapes = {}, [(16, 4, 32, 32), (3, 7), (1000,), (16, 4, 32, 32)]
    def run(k):
        x = np.random.default_rng(k).standard_normal(shapes[k], dtype=np.float32) * 4
        results[k] = all(np.array_equal(exp_float32(x).view(np.uint32), exp_float32_series(x).view(np.uint32))
                         for _ in range(20))
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(shapes))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == {k: True for k in range(len(shapes))}


def test_a_float32_rounding_near_a_midpoint_is_left_to_the_series():
    """The fast exp's decision: a float64 value on a float32, or far from a midpoint, is decided; one
    within EXP_MARGIN of the midpoint between two float32 neighbours, on either side, is not (the
    series then rounds it). Every float32 in [-200, 200] was checked once on this project's machines:
    there, numpy's float64 exp rounds as the series does; other numpy builds may not."""
    from ditrt.runtime.core.portable import EXP_MARGIN, rounded_float32
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal(1000, dtype=np.float32)) * np.float32(10) + np.float32(1e-3)
    b = np.nextafter(a, np.float32(np.inf))
    mid = (a.astype(np.float64) + b) / 2  # exact in float64
    above, below = mid * (1 + EXP_MARGIN / 4), mid * (1 - EXP_MARGIN / 4)
    far = mid * (1 + 2 ** -30)
    out, unsure = rounded_float32(np.concatenate([a.astype(np.float64), far, above, below, [np.nan]]))
    n = len(a)
    assert not unsure[:2 * n].any() and unsure[2 * n:].all()
    assert np.array_equal(out[:n], a) and np.array_equal(out[n:2 * n], b)
