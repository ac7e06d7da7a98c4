"""Feature caching (runtime/execution/cache.py) on the tiny golden artifact's segments: the segments compose
to the monolithic graph, the forecasts and skip decisions match hand computations, cache state is
per row and per request (batcher, guidance, batches), bad options are refused."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.execution.backends import OnnxRuntimeBackend
from ditrt.runtime.jobs.batching import StepBatcher
from ditrt.runtime.execution.cache import (CACHES, FirstBlockState, TaylorSeerState, cache_settings, newton_forecast, refusal,
                                 relative_change, taylorseer_computes)
from ditrt.runtime.core.errors import InputError
from ditrt.runtime.sampling.samplers import get_sampler

from conftest import max_rel_err

LABELS = [3, 1, 4]


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return runtime.load(tiny_artifact, backend="onnxruntime", precision="fp32")


# ---- the segments -----------------------------------------------------------------------------------

def test_composed_segments_equal_the_monolithic_graph(tiny_artifact):
    m = runtime.load_manifest(tiny_artifact)
    names = [n for n, s in m.networks.items() if s.extra.get("segment_of") == "denoiser"]
    assert names == ["embed", "blocks_0_1", f"blocks_1_{m.model.depth}", "final"]
    for precision in ("fp32", "fp16"):  # every precision has its segments, hashed like any graph
        for name in names:
            m.verify_files(name, precision)
    whole = OnnxRuntimeBackend(m.graph_path("denoiser", "fp32"), m.network("denoiser"), "fp32")
    part = {n: OnnxRuntimeBackend(m.graph_path(n, "fp32"), m.network(n), "fp32") for n in names}
    feeds = m.network("denoiser").example_inputs(4, seed=11)
    embedded = part["embed"](feeds)
    hidden, c = embedded["hidden_states"], embedded["conditioning"]
    for name in names[1:-1]:
        hidden = part[name]({"hidden_states": hidden, "conditioning": c})["hidden_states_out"]
    composed = part["final"]({"hidden_states": hidden, "conditioning": c})["model_output"]
    assert max_rel_err(composed, whole(feeds)["model_output"]) <= 1e-6  # the export's composition bound
    record = m.graph("final", "fp32")["validation"]["composed_vs_denoiser"]
    assert record["max_rel_err"] <= record["bound"] == 1e-6


def test_a_segment_that_does_not_fit_the_model_is_refused(tiny_artifact, tmp_path):
    import json
    import shutil
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["networks"]["blocks_0_1"]["blocks"] = [0, 2]
    (art / "manifest.json").write_text(json.dumps(data))
    (art / "manifest.sha256").unlink(missing_ok=True)
    with pytest.raises(runtime.ArtifactError, match="networks.blocks_0_1 is not a segment of this denoiser"):
        runtime.load_manifest(art)


# ---- TaylorSeer: diffusers' schedule, the forecast ------------------------------------------------------

def test_taylorseer_full_calls_follow_diffusers_schedule():
    options = cache_settings("taylorseer", {"cache_interval": 3}).options
    # diffusers: step < 3, or (step - 3 - 1) % 3 == 0, counted by hand
    assert [s for s in range(12) if taylorseer_computes(s, options)] == [0, 1, 2, 4, 7, 10]
    late = {**options, "disable_cache_after_step": 8}
    assert [s for s in range(12) if taylorseer_computes(s, late)] == [0, 1, 2, 4, 7, 8, 9, 10, 11]
    assert cache_settings("taylorseer").options == {"cache_interval": 5, "disable_cache_before_step": 3,
                                                    "disable_cache_after_step": None, "max_order": 1}


def _quadratic(s):
    return np.array([2 - 3 * s + 0.5 * s * s, 1.0 + s * s], np.float32)


@pytest.mark.parametrize("max_order, expected", [
    (2, [22.0, 101.0]),   # exact: f(10) = 2 - 30 + 50, 1 + 100
    (1, [16.0, 89.0]),    # the line through s = 4, 8: 10 + 2 (10 - (-2)) / 4 and 65 + 2 (65 - 17) / 4
    (0, [10.0, 65.0]),    # f(8) reused
])
def test_taylorseer_forecast_is_exact_up_to_its_order(max_order, expected):
    state = TaylorSeerState(cache_settings("taylorseer", {"max_order": max_order}).options)
    for s in (0, 4, 8):  # full calls; only the last max_order + 1 are kept
        state.update(s, _quadratic(s))
    np.testing.assert_array_equal(state.predict(10), np.array(expected, np.float32))


def test_newton_forecast_on_a_cubic_with_uneven_steps():
    f = lambda s: 0.25 * s ** 3 - s + 3
    steps = [9, 6, 2, 1]
    assert float(newton_forecast(steps, [np.array(f(s)) for s in steps], 11)) == pytest.approx(f(11), abs=1e-4)


# ---- FirstBlockCache: the skip rule -----------------------------------------------------------------

def test_first_block_decisions_match_hand_computed_residual_changes():
    state = FirstBlockState(threshold=0.1)
    previous = np.array([1.0, -1.0, 2.0, -2.0], np.float32)  # mean |r_prev| = 1.5
    assert state.should_compute(previous)  # no full call yet
    state.head_residual = previous
    assert relative_change(np.array([1.1, -1, 2, -2.1], np.float32), previous) == pytest.approx(0.2 / 4 / 1.5, rel=1e-6)
    assert not state.should_compute(np.array([1.1, -1, 2, -2.1], np.float32))  # 0.033: skip
    assert not state.should_compute(np.array([1.5, -1, 2, -2], np.float32))  # 0.083: skip
    assert state.should_compute(np.array([2.0, -1, 2, -2], np.float32))  # 0.167: compute
    at = FirstBlockState(threshold=0.125, head_residual=np.ones(4, np.float32))
    assert not at.should_compute(np.array([1.5, 1, 1, 1], np.float32))  # exactly the threshold: skip, as diffusers


def test_first_block_counts_and_reuses_the_tail_residual(pipe):
    steps = 12
    never = pipe.sample(LABELS, num_steps=steps, sampler="ddim", cfg_scale=4.0, progress=False,
                        cache="first-block", cache_options={"threshold": 1e30})
    depth = pipe.manifest.model.depth
    assert pipe.last_stats.block_evaluations == depth + (steps - 1) * 1  # one full call, then block 0 only
    full = pipe.sample(LABELS, num_steps=steps, sampler="ddim", cfg_scale=4.0, progress=False,
                       cache="first-block", cache_options={"threshold": 0.0})
    assert pipe.last_stats.block_evaluations == depth * steps
    plain = pipe.sample(LABELS, num_steps=steps, sampler="ddim", cfg_scale=4.0, progress=False)
    assert max_rel_err(full, plain) <= 1e-5  # full calls: the segments, composed
    assert not np.array_equal(never, full)


# ---- the runtime ---------------------------------------------------------------------------------------

def test_cache_none_gives_todays_bits(pipe):
    plain = pipe.sample(LABELS, num_steps=10, sampler="ddim", cfg_scale=4.0, progress=False)
    none = pipe.sample(LABELS, num_steps=10, sampler="ddim", cfg_scale=4.0, progress=False, cache="none")
    assert np.array_equal(plain, none)
    assert pipe.last_stats.block_evaluations == pipe.manifest.model.depth * 10


def test_taylorseer_block_evaluations_and_accuracy(pipe):
    depth = pipe.manifest.model.depth
    plain = pipe.sample(LABELS, num_steps=20, sampler="ddim", cfg_scale=4.0, progress=False)
    cached = pipe.sample(LABELS, num_steps=20, sampler="ddim", cfg_scale=4.0, progress=False, cache="taylorseer",
                         cache_options={"cache_interval": 4})
    assert pipe.last_stats.block_evaluations == depth * 7  # full calls 0, 1, 2, 4, 8, 12, 16
    assert 0 < max_rel_err(cached, plain) < 0.05
    every = pipe.sample(LABELS, num_steps=20, sampler="ddim", cfg_scale=4.0, progress=False, cache="taylorseer",
                        cache_options={"cache_interval": 1, "disable_cache_before_step": 20})
    assert max_rel_err(every, plain) <= 1e-5


@pytest.mark.parametrize("cache, options", [("taylorseer", {"cache_interval": 3}), ("first-block", {"threshold": 0.02})])
def test_images_do_not_depend_on_the_batch(pipe, cache, options):
    """Per-row state: four images at once equal two calls of two (generate's batches), image_offset
    giving each image its noise."""
    labels = [2, 7, 1, 8]
    kw = dict(num_steps=15, sampler="dpm++2m", cfg_scale=4.0, progress=False, cache=cache, cache_options=options)
    whole = pipe.sample(labels, **kw)
    halves = np.concatenate([pipe.sample(labels[:2], **kw), pipe.sample(labels[2:], image_offset=2, **kw)])
    assert np.array_equal(whole, halves)


def test_guided_rows_keep_their_own_features(pipe):
    run = pipe.start([5], num_steps=6, sampler="ddim", cfg_scale=4.0, cache="taylorseer")
    while not run.done:
        run.advance(runtime.execution.cache.denoise(pipe, [run], run.feeds(), pipe.backend))
    conditional, unconditional = run.cache.states
    assert len(run.cache.states) == 2 and conditional.steps == unconditional.steps
    assert not np.array_equal(conditional.features[0], unconditional.features[0])


def test_two_concurrent_cached_requests_in_the_batcher_match_each_alone(pipe):
    requests = [dict(class_labels=[1, 2], num_steps=16, sampler="ddim", cfg_scale=4.0, seed=3, cache="taylorseer",
                     cache_options={"cache_interval": 3}),
                dict(class_labels=[6], num_steps=10, sampler="ddim", cfg_scale=2.0, seed=4, cache="first-block",
                     cache_options={"threshold": 0.02}),
                dict(class_labels=[0, 9], num_steps=12, sampler="ddim", cfg_scale=4.0, seed=5)]
    alone = [pipe.sample(progress=False, **r) for r in requests]
    with StepBatcher(pipe, policy="step") as batcher:
        first = batcher.submit(**requests[0])
        started = threading.Event()
        batcher.observer = lambda *a: started.set()
        started.wait(10)  # the others join at another step of the first
        futures = [first, *(batcher.submit(**r) for r in requests[1:])]
        together = [f.result(timeout=60) for f in futures]
        calls = batcher.stats()["backend_calls"]
    assert calls < 16 + 10 + 12  # they shared engine calls
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


# ---- samplers and bad options --------------------------------------------------------------------------

def test_samplers_that_cannot_cache_say_why():
    from ditrt.runtime.spec.config import Transport
    dopri5, heun = get_sampler("ode-dopri5"), get_sampler("ode-heun2")
    transport = Transport()
    for name in CACHES:
        assert "error estimate" in refusal(CACHES[name], dopri5, dopri5.schedule(transport, 10))
    assert "two model calls per step" in refusal(CACHES["taylorseer"], heun, heun.schedule(transport, 10))
    assert refusal(CACHES["first-block"], heun, heun.schedule(transport, 10)) is None
    for name in ("ode-euler", "sde-euler"):  # one call per step: both caches
        sampler = get_sampler(name)
        for cache in CACHES.values():
            assert refusal(cache, sampler, sampler.schedule(transport, 10)) is None


def test_dit_samplers_cache(pipe):
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        pipe.sample([1], num_steps=8, sampler=sampler, progress=False, cache="taylorseer")
        assert pipe.last_stats.block_evaluations < 8 * pipe.manifest.model.depth


@pytest.mark.parametrize("cache, options, message", [
    ("taylorseer", {"interval": 3}, "unknown cache option 'interval' for taylorseer; it takes cache_interval"),
    ("first-block", {"threshold": -0.1}, "threshold must be a number >= 0"),
    ("taylorseer", {"cache_interval": 0}, "cache_interval must be a positive integer, got 0"),
    ("taylorseer", {"cache_interval": "x"}, "cache_interval must be an integer >= 1"),
    ("magcache", {}, "cache must be one of 'none', 'first-block', 'taylorseer', got 'magcache'"),
    ("none", {"threshold": 0.1}, "but cache is 'none'"),
])
def test_bad_cache_options_are_refused_clearly(pipe, cache, options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        pipe.sample([1], num_steps=4, progress=False, cache=cache, cache_options=options)


def test_cli_refuses_a_bad_cache_option_with_exit_2(tiny_artifact, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "sample", str(tiny_artifact), "--labels", "1",
                        "--cache", "taylorseer", "--cache-option", "cache_interval=0", "--out", str(tmp_path / "x.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cache_interval must be a positive integer" in r.stderr
    assert not (tmp_path / "x.npy").exists()
