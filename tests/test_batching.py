"""The batching scheduler against real ONNX Runtime sessions on the tiny golden artifact."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.batching import StepBatcher
from ditrt.runtime.errors import BackendError, InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError


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
    with StepBatcher(pipe, max_batch=max_batch, policy=policy) as batcher:
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
    """The real backend behind a gate the test opens (holds the worker inside a call)."""

    def __init__(self, backend, fail_on: int | None = None):
        self.inner, self.name, self.network = backend, backend.name, backend.network
        self.max_batch, self.min_batch = None, 1
        self.open, self.calls, self.fail_on = threading.Event(), 0, fail_on
        self.open.set()

    def __call__(self, feeds):
        self.open.wait(30)
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise BackendError(f"injected failure on call {self.calls}")
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
    code = "import sys, ditrt.runtime, ditrt.runtime.batching; assert 'fastapi' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
