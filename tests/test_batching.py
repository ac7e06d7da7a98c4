"""The batching scheduler against real ONNX Runtime sessions on the tiny golden artifact."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.jobs.batching import (DecodedSample, Limits, Overloaded, StepBatcher, Work, admit_count, fit_line,
                                    simulate)
from ditrt.runtime.core.errors import BackendError, InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return runtime.load(tiny_artifact, backend="onnxruntime-fp32", threads=1)


def mixed_requests(pipe):
    c, h, w = pipe.latent_shape
    rng = np.random.default_rng(5)
    steps = 6
    noise = (rng.standard_normal((2, c, h, w)).astype(np.float32),
             rng.standard_normal((steps, 2, c, h, w)).astype(np.float32))
    return [
        dict(class_labels=[1, 2], num_steps=8, sampler="ddpm", cfg_scale=4.0, seed=1),
        dict(class_labels=[3], num_steps=5, sampler="ddim", eta=0.5, cfg_scale=1.5, seed=2),
        dict(class_labels=[0, 4, 5], num_steps=7, sampler="dpm++2m", cfg_scale=1.0, seed=3),
        dict(class_labels=[6], num_steps=4, sampler="ddim", eta=0.0, cfg_scale=0.5, guidance="standard", seed=4),
        dict(class_labels=[7, 8], num_steps=9, sampler="ddpm", cfg_scale=2.0, guidance="standard", seed=5),
        dict(class_labels=[9], num_steps=3, sampler="dpm++2m", cfg_scale=3.0, seed=6),
        dict(class_labels=[2, 2], num_steps=steps, sampler="ddpm", cfg_scale=4.0, noise=noise),
        dict(class_labels=[5], num_steps=10, sampler="ddim", eta=1.0, cfg_scale=4.0, seed=8),
        dict(class_labels=[1], num_steps=2, sampler="ddpm", cfg_scale=1.0, seed=9),
    ]


def alone(pipe, req):
    return pipe.sample(progress=False, **req)


def test_concurrent_pipeline_sample_matches_sequential(pipe):
    reqs = mixed_requests(pipe)
    expected = [alone(pipe, r) for r in reqs]
    with ThreadPoolExecutor(9) as ex:
        got = list(ex.map(lambda r: alone(pipe, r), reqs * 2))
    for e, g in zip(expected * 2, got):
        assert np.array_equal(e, g)


@pytest.mark.parametrize("policy,max_batch", [("step", None), ("step", 5), ("serial", None), ("request", 8)])
def test_threads_submit_mixed_requests_bit_identical(pipe, policy, max_batch):
    reqs = mixed_requests(pipe)
    expected = [alone(pipe, r) for r in reqs]
    with StepBatcher(pipe, max_batch=max_batch, policy=policy, max_images=3) as batcher:
        barrier = threading.Barrier(len(reqs))

        def client(r):
            barrier.wait()
            return batcher.submit(**r).result(timeout=60)
        with ThreadPoolExecutor(len(reqs)) as ex:
            got = list(ex.map(client, reqs))
        stats = batcher.stats()
    for e, g in zip(expected, got):
        assert g.shape == e.shape and np.array_equal(e, g)
    assert stats["completed"] == len(reqs) and stats["failed"] == 0
    if policy == "step" and max_batch is None:
        assert stats["rows_per_call_mean"] > 4  # rows of several requests shared calls
    if policy == "serial":
        assert stats["backend_calls"] == sum(r["num_steps"] for r in reqs)


def test_rows_at_their_own_timesteps_in_one_call(pipe):
    """Two requests of different lengths, submitted together, share calls at different timesteps."""
    seen = []
    backend = pipe.backend

    class Spy:
        name, network, max_batch, min_batch = backend.name, backend.network, None, 1

        def __call__(self, feeds):
            seen.append(np.unique(feeds["timestep"]).size)
            return backend(feeds)
    spy_pipe = runtime.Pipeline(Spy(), pipe.manifest)
    with StepBatcher(spy_pipe, policy="step") as b:
        f1 = b.submit([1], num_steps=10, sampler="ddpm", seed=1)
        f2 = b.submit([2], num_steps=4, sampler="ddim", seed=2)
        r1, r2 = f1.result(60), f2.result(60)
    assert np.array_equal(r1, alone(pipe, dict(class_labels=[1], num_steps=10, sampler="ddpm", seed=1)))
    assert np.array_equal(r2, alone(pipe, dict(class_labels=[2], num_steps=4, sampler="ddim", seed=2)))
    assert max(seen) == 2


def test_ort_cpu_rows_do_not_depend_on_batch(pipe):
    c, h, w = pipe.latent_shape
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8, 16):
        feeds = {"latent": rng.standard_normal((n, c, h, w)).astype(np.float32),
                 "timestep": rng.uniform(0, 999, n).astype(np.float32),
                 "class_label": rng.integers(0, 10, n).astype(np.int64)}
        whole = pipe.backend(feeds)["model_output"]
        for i in range(n):
            row = pipe.backend({k: v[i:i + 1] for k, v in feeds.items()})["model_output"]
            assert np.array_equal(whole[i:i + 1], row), (n, i)


def test_invalid_requests_raise_at_submit_with_pipeline_messages(pipe):
    with StepBatcher(pipe) as b:
        for bad in (dict(class_labels=[99]), dict(class_labels=[1], sampler="nope"),
                    dict(class_labels=[1], sampler="ddpm", eta=0.5), dict(class_labels=[1], cfg_scale="x")):
            with pytest.raises(InputError) as direct:
                pipe.sample(progress=False, **bad)
            with pytest.raises(InputError) as queued:
                b.submit(**bad)
            assert str(queued.value) == str(direct.value)
        assert b.stats()["queue_depth"] == 0


class Gate:
    """The real backend behind a gate the test opens (holds the worker inside a call); records the
    rows of each call; `delay` seconds per call make a slow engine."""

    def __init__(self, backend, fail_on: int | None = None, delay: float = 0.0):
        self.inner, self.name, self.network = backend, backend.name, backend.network
        self.max_batch, self.min_batch, self.device = None, 1, "cpu"
        self.open, self.calls, self.fail_on, self.delay = threading.Event(), 0, fail_on, delay
        self.rows: list[int] = []
        self.open.set()

    def __call__(self, feeds):
        self.open.wait(30)
        self.calls += 1
        self.rows.append(len(next(iter(feeds.values()))))
        if self.fail_on is not None and self.calls == self.fail_on:
            raise BackendError(f"injected failure on call {self.calls}")
        if self.delay:
            time.sleep(self.delay)
        return self.inner(feeds)


def test_queue_full(pipe):
    gate = Gate(pipe.backend)
    gate.open.clear()
    b = StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_queue=2, policy="serial")
    try:
        first = b.submit([1], num_steps=3, sampler="ddim")
        time.sleep(0.2)  # the worker holds the first in flight
        queued = [b.submit([1], num_steps=3, sampler="ddim") for _ in range(2)]
        with pytest.raises(QueueFull, match=r"queue is full \(2 requests"):
            b.submit([1], num_steps=3, sampler="ddim")
        assert b.stats()["queue_depth"] == 2 and b.stats()["in_flight"] == 1
    finally:
        gate.open.set()
        b.close()
    assert all(f.result(1).shape == (1, *pipe.latent_shape) for f in [first, *queued])


def test_cancel_leaves_at_next_tick(pipe):
    gate = Gate(pipe.backend)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest)) as b:
        gate.open.clear()
        long = b.submit([1], num_steps=50, sampler="ddim", seed=1)
        other = b.submit([2], num_steps=5, sampler="ddim", seed=2)
        time.sleep(0.2)
        assert b.cancel(long)
        calls_before = gate.calls
        gate.open.set()
        assert np.array_equal(other.result(30), alone(pipe, dict(class_labels=[2], num_steps=5, sampler="ddim", seed=2)))
        with pytest.raises(CancelledError):
            long.result(1)
        time.sleep(0.1)
        stats = b.stats()
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0
    assert gate.calls - calls_before <= 6  # the 50-step run did not keep the worker busy


def test_timeout_fails_future(pipe):
    gate = Gate(pipe.backend)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest)) as b:
        gate.open.clear()
        f = b.submit([1], num_steps=20, sampler="ddim", timeout=0.3)
        time.sleep(0.5)
        gate.open.set()
        with pytest.raises(RequestTimeout, match=r"timed out after 0.3 s"):
            f.result(10)
        assert isinstance(f.exception(), TimeoutError)
        ok = b.submit([1], num_steps=2, sampler="ddim")
        assert ok.result(10).shape[0] == 1
        assert b.stats()["timed_out"] == 1


def test_backend_failure_fails_only_its_call(pipe):
    gate = Gate(pipe.backend, fail_on=3)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest)) as b:
        gate.open.clear()
        a = b.submit([1], num_steps=6, sampler="ddim", seed=1)
        c = b.submit([2], num_steps=6, sampler="ddim", seed=2)
        gate.open.set()
        for f in (a, c):
            with pytest.raises(BackendError, match="injected failure on call 3"):
                f.result(30)
        later = b.submit([3], num_steps=4, sampler="ddim", seed=3)
        assert np.array_equal(later.result(30), alone(pipe, dict(class_labels=[3], num_steps=4, sampler="ddim", seed=3)))
        assert b.stats()["failed"] == 2 and b.stats()["completed"] == 1


def test_nan_fails_only_that_request(pipe):
    with StepBatcher(pipe) as b:
        bad = b.submit([1], num_steps=5, sampler="ddim", cfg_scale=3e38, seed=1)
        good = b.submit([2], num_steps=5, sampler="ddim", seed=2)
        with pytest.raises(StepError, match="NaN or inf"):
            bad.result(30)
        assert np.array_equal(good.result(30), alone(pipe, dict(class_labels=[2], num_steps=5, sampler="ddim", seed=2)))


@pytest.mark.parametrize("drain", [True, False])
def test_close_with_requests_in_flight(pipe, drain):
    gate = Gate(pipe.backend)
    b = StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_batch=2)
    gate.open.clear()
    futures = [b.submit([i], num_steps=4, sampler="ddim", seed=i) for i in range(4)]
    time.sleep(0.2)
    closer = threading.Thread(target=b.close, kwargs={"drain": drain})
    closer.start()
    time.sleep(0.1)
    with pytest.raises(SchedulerClosed):
        b.submit([1], num_steps=2, sampler="ddim")
    gate.open.set()
    closer.join(30)
    assert not closer.is_alive() and all(f.done() for f in futures)
    for i, f in enumerate(futures):
        if drain:
            assert np.array_equal(f.result(), alone(pipe, dict(class_labels=[i], num_steps=4, sampler="ddim", seed=i)))
        else:
            with pytest.raises(SchedulerClosed, match="closed without draining"):
                f.result()


def test_stats_values(pipe):
    with StepBatcher(pipe, policy="serial") as b:
        b.submit([1, 2], num_steps=3, sampler="ddim", cfg_scale=4.0).result(30)  # 4 rows x 3 calls
        b.submit([3], num_steps=2, sampler="ddim", cfg_scale=1.0).result(30)  # 1 row x 2 calls
        s = b.stats()
    assert s["backend_calls"] == 5 and s["rows_last_call"] == 1 and s["steps"] == 5
    assert s["rows_per_call_mean"] == pytest.approx((4 * 3 + 1 * 2) / 5)
    assert s["completed"] == 2 and s["queue_depth"] == 0 and s["in_flight"] == 0 and s["steps_per_s"] > 0


def test_async_helper(pipe):
    import asyncio
    with StepBatcher(pipe) as b:
        async def main():
            return await asyncio.gather(*(b.sample_async([i], num_steps=3, sampler="ddim", seed=i) for i in range(3)))
        got = asyncio.run(main())
    for i, g in enumerate(got):
        assert np.array_equal(g, alone(pipe, dict(class_labels=[i], num_steps=3, sampler="ddim", seed=i)))


def test_runtime_imports_without_fastapi():
    import subprocess
    import sys
    code = "import sys, ditrt.runtime, ditrt.runtime.jobs.batching; assert 'fastapi' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- limits, admission, the decode stage, adaptive samplers -----------------------------------------

_EXPORTED: dict = {}


def export_tiny_sit(tmp_path_factory):
    """The golden tiny checkpoint exported as a SiT (flow-matching) artifact, fp32 only; once per
    session (test_serve.py shares it)."""
    if "sit" in _EXPORTED:
        return _EXPORTED["sit"]
    from conftest import TINY_CHECKPOINT
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.checkpoints import load_checkpoint
    from ditrt.exporter.denoiser import source_from_checkpoint
    out = tmp_path_factory.mktemp("artifacts") / "tiny_sit"
    export_artifact(source_from_checkpoint(load_checkpoint(TINY_CHECKPOINT, num_heads=4), "sit"), out, ("fp32",),
                    log=lambda m: None)
    _EXPORTED["sit"] = out
    return out


@pytest.fixture(scope="module")
def sit_pipe(tmp_path_factory):
    return runtime.load(export_tiny_sit(tmp_path_factory), backend="onnxruntime-fp32", threads=1)


@pytest.fixture(scope="module")
def vae_pipe(tiny_artifact_with_vae):
    return runtime.load(tiny_artifact_with_vae, backend="onnxruntime-fp32", threads=1)


class FakeEngine:
    """A backend's identity only (name, device, batch limit): what Limits sizes from."""

    def __init__(self, name, max_batch=None, device="cpu"):
        self.name, self.max_batch, self.device = name, max_batch, device


def test_limits_sized_for_the_backend(pipe, vae_pipe):
    assert Limits.for_pipeline(pipe) == Limits(16, 16, 8, 1000, 64, 1)  # ORT CPU, no decoder
    assert Limits.for_pipeline(vae_pipe).decode_batch == 4
    gpu = runtime.Pipeline.__new__(runtime.Pipeline)
    gpu.backend = gpu.decoder = FakeEngine("onnxruntime-fp32", device="cuda")
    assert Limits.for_pipeline(gpu) == Limits(64, 64, 32, 1000, 64, 8)
    trt = runtime.Pipeline.__new__(runtime.Pipeline)
    trt.backend, trt.decoder = FakeEngine("tensorrt-fp16", 24), FakeEngine("tensorrt-fp32", 6)
    assert Limits.for_pipeline(trt) == Limits(24, 24, 12, 1000, 64, 6)  # the plans' profiles
    assert Limits.for_pipeline(trt, max_batch=8, max_rows=40, max_images=3, max_steps=50, max_queue=2,
                               decode_batch=2) == Limits(8, 40, 3, 50, 2, 2)
    with pytest.raises(InputError, match="above the tensorrt-fp16 engine's limit of 24 rows"):
        Limits.for_pipeline(trt, max_batch=32)
    with pytest.raises(InputError, match="above the tensorrt-fp32 decoder engine's limit of 6 images"):
        Limits.for_pipeline(trt, decode_batch=8)
    with pytest.raises(InputError, match=r"max_rows \(rows in flight\) must be an integer from 24"):
        Limits.for_pipeline(trt, max_rows=10)
    with pytest.raises(InputError, match="max_queue"):
        Limits.for_pipeline(pipe, max_queue=0)


def test_admit_count_by_hand():
    assert admit_count("step", [4], [4, 8, 2], 12) == 1  # 4 + 4 fit; + 8 would be 16 > 12: FIFO stops there
    assert admit_count("step", [], [4, 4, 2], 12) == 3
    assert admit_count("step", [], [20, 2], 16) == 1  # bigger than max_rows: it starts alone
    assert admit_count("step", [2], [20], 16) == 0  # ... but not beside others
    assert admit_count("serial", [], [2, 2], 16) == 1 and admit_count("serial", [2], [2], 16) == 0
    assert admit_count("request", [2], [2], 16) == 0  # nothing joins a running batch
    assert admit_count("request", [], [4, 4, 4, 8], 12) == 3


def test_simulate_by_hand():
    a, b, c = Work(4, 3, 0), Work(4, 5, 0), Work(4, 2, 2)
    one_second = lambda rows, requests: 1.0  # noqa: E731
    no_decode = lambda images: 0.0  # noqa: E731
    # step: A and B run (8 rows), C waits; A ends at 3, C joins; B and C end at 5.
    assert simulate([a], [b, c], "step", 8, one_second, no_decode) == [3, 5, 5]
    # ticks cost rows / 4 s; C's decode 0.5 s per image on the same worker.
    assert simulate([a], [b, c], "step", 8, lambda rows, q: rows / 4, lambda n: 0.5 * n) == [6, 10, 11]
    assert simulate([a], [b, c], "serial", 8, one_second, no_decode) == [3, 8, 10]
    assert simulate([a], [b, c], "request", 8, one_second, no_decode) == [3, 8, 5]  # B, C start together at 3
    assert simulate([], [Work(20, 2, 0)], "step", 8, one_second, no_decode, start=1.5) == [3.5]


def test_fit_line_by_hand():
    x, w = np.array([1.0, 2.0, 4.0]), np.ones(3)
    assert fit_line(x, 0.5 + 2 * x, w) == pytest.approx((0.5, 2.0))
    assert fit_line(x, np.array([1.0, 1.0, 1.0]) * 3, w) == pytest.approx((3.0, 0.0))
    assert fit_line(x, np.array([4.0, 3.0, 1.0]), w) == pytest.approx((8 / 3, 0.0))  # falling: the mean
    assert fit_line(x, np.array([0.1, 2.0, 6.0]), w)[0] == 0.0  # a negative intercept: through the origin
    assert fit_line(np.array([8.0]), np.array([4.0]), np.ones(1)) == pytest.approx((0.0, 0.5))


def test_request_bigger_than_max_rows_runs_alone(pipe):
    """A guided 2-image request is 4 rows; with 2 rows per call it starts alone, chunked (it must
    never wait for room that cannot come)."""
    gate = Gate(pipe.backend)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_batch=2, max_images=2) as b:
        got = b.submit([3, 7], num_steps=4, sampler="ddim", cfg_scale=4.0, seed=1).result(30)
    assert np.array_equal(got, alone(pipe, dict(class_labels=[3, 7], num_steps=4, sampler="ddim", cfg_scale=4.0,
                                                seed=1)))
    assert gate.rows == [2, 2] * 4  # each model call of 4 rows chunked at max_batch


def test_engine_calls_chunked_at_max_batch(pipe):
    """Rows running (max_rows 6) above rows per call (max_batch 2): each tick is chunked at 2 rows."""
    gate = Gate(pipe.backend)
    gate.open.clear()
    reqs = [dict(class_labels=[i, i + 1], num_steps=3, sampler="ddim", cfg_scale=1.0, seed=i) for i in range(3)]
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_batch=2, max_rows=6) as b:
        futures = [b.submit(**r) for r in reqs]
        gate.open.set()
        got = [f.result(30) for f in futures]
    for r, g in zip(reqs, got):
        assert np.array_equal(g, alone(pipe, r))
    assert max(gate.rows) == 2 and sum(gate.rows) == 3 * 2 * 3


@pytest.mark.parametrize("policy,expected", [("request", [1, 1, 1, 2, 2]), ("step", [1, 3, 3]),
                                             ("serial", [1, 1, 1, 1, 1, 1, 1])])
def test_policies_start_requests_as_they_say(pipe, policy, expected):
    """A (3 calls) runs; B and C (2 calls each) arrive during A's first call. request: B and C
    start together once A is done; step: they join at A's second call (all end on the third);
    serial: one at a time."""
    gate = Gate(pipe.backend)
    gate.open.clear()
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), policy=policy) as b:
        first = b.submit([1], num_steps=3, sampler="ddim", cfg_scale=1.0, seed=1)
        for _ in range(100):
            if b.stats()["running"] == 1:
                break
            time.sleep(0.01)
        later = [b.submit([i], num_steps=2, sampler="ddim", cfg_scale=1.0, seed=i) for i in (2, 3)]
        time.sleep(0.05)
        gate.open.set()
        results = [f.result(30) for f in [first, *later]]
    assert gate.rows == expected
    assert np.array_equal(results[1], alone(pipe, dict(class_labels=[2], num_steps=2, sampler="ddim", cfg_scale=1.0,
                                                       seed=2)))


def test_oversized_requests_refused_before_any_call(pipe):
    gate = Gate(pipe.backend)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_images=2, max_steps=10) as b:
        with pytest.raises(InputError, match=r"3 labels: this scheduler takes at most 2 images per request"):
            b.submit([1, 2, 3], num_steps=2, sampler="ddim")
        with pytest.raises(InputError, match=r"needs 11 model calls; this scheduler runs at most 10 per request"):
            b.submit([1], num_steps=11, sampler="ddim")
        with pytest.raises(InputError, match="max_calls applies to adaptive samplers only; ddim makes exactly 2"):
            b.submit([1], num_steps=2, sampler="ddim", max_calls=5)
        with pytest.raises(InputError, match=r"format 'png'\) need an artifact with a decoder network"):
            b.submit([1], num_steps=2, sampler="ddim", decode=True)
        assert b.submit([1], num_steps=10, sampler="ddim").result(30).shape == (1, *pipe.latent_shape)
        stats = b.stats()
    assert gate.calls == 10 and stats["completed"] == 1 and stats["queue_depth"] == 0


def wait_for_stats(batcher, key, value, timeout=30.0):
    deadline = time.monotonic() + timeout
    while batcher.stats()[key] != value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {batcher.stats()}"
        time.sleep(0.01)


class SpyDecoder:
    def __init__(self, decoder):
        self.inner, self.name, self.network, self.precision = decoder, decoder.name, decoder.network, decoder.precision
        self.max_batch, self.min_batch, self.device, self.images = None, 1, "cpu", []

    def __call__(self, feeds):
        self.images.append(len(next(iter(feeds.values()))))
        return self.inner(feeds)


@pytest.mark.parametrize("decode_batch,calls", [(4, [4]), (2, [1, 2, 1])])
def test_decode_stage_batches_across_requests(vae_pipe, decode_batch, calls):
    """Three requests finishing on the same tick are decoded together, up to decode_batch images
    per decoder call (whole requests, FIFO); each gets its latents and Pipeline.decode's images."""
    gate, spy = Gate(vae_pipe.backend), SpyDecoder(vae_pipe.decoder)
    gate.open.clear()
    reqs = [dict(class_labels=labels, num_steps=3, sampler="ddim", seed=i)
            for i, labels in enumerate([[1], [2, 3], [4]])]
    with StepBatcher(runtime.Pipeline(gate, vae_pipe.manifest, spy), decode_batch=decode_batch) as b:
        blocker = b.submit([0], num_steps=2, sampler="ddim")  # holds the worker in its call: the three start together
        wait_for_stats(b, "running", 1)
        futures = [b.submit(**r, decode=True) for r in reqs]
        gate.open.set()
        blocker.result(30)
        got = [f.result(30) for f in futures]
        stats = b.stats()
    assert spy.images == calls and stats["decoder_calls"] == len(calls) and stats["decoded_images"] == 4
    for r, g in zip(reqs, got):
        latents = alone(vae_pipe, r)
        assert isinstance(g, DecodedSample) and np.array_equal(g.latents, latents)
        np.testing.assert_allclose(g.images, vae_pipe.decode(latents), rtol=0, atol=1e-6)


def test_sit_samplers_served_together(sit_pipe):
    """Both SiT loop kinds in the same ticks: adaptive dopri5 (its own t per row) beside fixed-grid
    ODE and SDE runs; each result exactly Pipeline.sample's."""
    reqs = [dict(class_labels=[1, 2], num_steps=5, sampler="ode-dopri5", cfg_scale=4.0, seed=1, atol=1e-3, rtol=1e-2),
            dict(class_labels=[3], num_steps=6, sampler="ode-euler", cfg_scale=1.5, seed=2),
            dict(class_labels=[4], num_steps=5, sampler="sde-euler", cfg_scale=1.0, seed=3),
            dict(class_labels=[5], num_steps=4, sampler="ode-heun2", cfg_scale=2.0, seed=4)]
    expected = [alone(sit_pipe, r) for r in reqs]
    gate = Gate(sit_pipe.backend)
    gate.open.clear()
    with StepBatcher(runtime.Pipeline(gate, sit_pipe.manifest)) as b:
        blocker = b.submit([0], num_steps=2, sampler="ode-euler")  # holds the worker: the four start together
        wait_for_stats(b, "running", 1)
        futures = [b.submit(**r) for r in reqs]
        gate.open.set()
        got = [f.result(60) for f in futures]
        blocker.result(30)
    for e, g in zip(expected, got):
        assert np.array_equal(e, g)
    assert gate.rows[:2] == [2, 4 + 2 + 1 + 2]  # the blocker, then one call over all four runs' rows


def test_adaptive_run_stops_at_its_call_budget(sit_pipe):
    with StepBatcher(sit_pipe, max_steps=40) as b:
        with pytest.raises(InputError, match=r"max_calls \(model calls\) must be an integer from 1 to 40"):
            b.submit([1], sampler="ode-dopri5", max_calls=41)
        f = b.submit([1], sampler="ode-dopri5", max_calls=5, atol=1e-6, rtol=1e-6)
        with pytest.raises(InputError, match=r"ode-dopri5 made 5 model calls \(its max_calls\) without reaching"):
            f.result(30)
        assert b.stats()["backend_calls"] == 5


def test_deadline_admission_refuses_what_would_be_late(pipe):
    """A slow engine (50 ms a call) and identical 8-call requests, 1 s deadline, one row running at
    a time: the first ones are admitted, the rest refused at once (Overloaded, a 429, with a
    Retry-After), and every admitted one finishes in time; once idle, the scheduler admits again."""
    gate = Gate(pipe.backend, delay=0.05)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_batch=1, max_images=1, warm_up=True) as b:
        for _ in range(200):
            if b.ready:
                break
            time.sleep(0.05)
        admitted, refused = [], []
        for i in range(8):
            try:
                admitted.append(b.submit([i], num_steps=8, sampler="ddim", cfg_scale=1.0, timeout=1.0))
            except Overloaded as e:
                refused.append(e)
        assert 1 <= len(admitted) <= 3 and len(refused) == 8 - len(admitted)
        assert all(e.retry_after > 0 and "would not finish within its timeout of 1 s" in str(e) for e in refused)
        for f in admitted:
            assert f.result(10).shape == (1, *pipe.latent_shape)  # none timed out
        assert b.submit([1], num_steps=8, sampler="ddim", cfg_scale=1.0, timeout=1.0).result(10).shape[0] == 1
        assert b.stats()["rejected"] == len(refused) and b.stats()["timed_out"] == 0


def test_admission_protects_admitted_deadlines(pipe):
    """With 1 s per row per call (a model set by hand), A (3 calls, 10 s deadline) runs; B joining
    makes A's ticks 2 s (A done at 6 s, in time); C joining would make them 3 s (A at 9 s, x1.2
    margin > 10 s): C is refused for A's sake although C's own deadline is far."""
    gate = Gate(pipe.backend)
    gate.open.clear()
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_batch=4) as b:
        b.cost.engine.observe(1, 1.0)
        b.cost.engine.observe(2, 2.0)
        a = b.submit([1], num_steps=3, sampler="ddim", cfg_scale=1.0, timeout=10)
        bb = b.submit([2], num_steps=3, sampler="ddim", cfg_scale=1.0, timeout=100)
        with pytest.raises(Overloaded, match=r"would delay request 1 past its deadline"):
            b.submit([3], num_steps=3, sampler="ddim", cfg_scale=1.0, timeout=100)
        gate.open.set()
        assert a.result(30).shape[0] == 1 and bb.result(30).shape[0] == 1


def test_warm_up_then_ready(pipe):
    gate = Gate(pipe.backend)
    with StepBatcher(runtime.Pipeline(gate, pipe.manifest), warm_up=True) as b:
        for _ in range(200):
            if b.ready:
                break
            time.sleep(0.05)
        assert b.ready and b.cost.known and b.stats()["ready"] and gate.calls >= 4
        assert set(gate.rows) == {16, 1, 2}  # max_batch, one row, the warm-up run's guided image
    broken = Gate(pipe.backend, fail_on=1)
    with StepBatcher(runtime.Pipeline(broken, pipe.manifest), warm_up=True) as b:
        for _ in range(200):
            if b.stats()["warm_up_error"]:
                break
            time.sleep(0.05)
        assert not b.ready and "injected failure on call 1" in b.stats()["warm_up_error"]


def test_close_drain_timeout_fails_what_is_left(pipe):
    gate = Gate(pipe.backend, delay=0.05)
    b = StepBatcher(runtime.Pipeline(gate, pipe.manifest))
    short = b.submit([1], num_steps=2, sampler="ddim", cfg_scale=1.0)
    long = b.submit([2], num_steps=200, sampler="ddim", cfg_scale=1.0)
    assert b.close(drain=True, timeout=0.5) is False
    assert short.result(1).shape[0] == 1
    with pytest.raises(SchedulerClosed, match="closed without draining"):
        long.result(1)
