

# ---- the prefetch: each draw once, a bounded number held ---------------------------------------------

def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ditrt-noise-prefetch"}


def test_a_prefetch_computes_each_draw_once_and_holds_at_most_one():
    """A loop takes draws 0..K-1 in order, with 'engine time' in between: every draw is computed
    exactly once, the values are the stream's (noise.normal, the specification), and never more
    than one draw is queued, computing or held."""
    from ditrt.runtime.noise import SeededNoise, normal
    from ditrt.runtime.prefetch import NoisePrefetch
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
    from ditrt.runtime.noise import SeededNoise
    from ditrt.runtime.prefetch import NoisePrefetch
    noise = SeededNoise(3, 1, (4, 8, 8))
    prefetch = NoisePrefetch(noise.step, 10, depth=2)
    try:
        for k in (0, 1, 5, 2, 3, 3):
            np.testing.assert_array_equal(prefetch(k), noise.step(k))
            assert prefetch.max_held <= 2
        assert max(prefetch.computed.values()) <= 2  # 3 was asked twice: computed at most once per ask
        assert prefetch.computed[9] == 0  # nothing past depth was computed
    finally:
        prefetch.close()


def test_a_sampling_run_prefetches_each_of_its_draws_exactly_once():
    """Through the pipeline: a DDPM run of 10 calls takes 9 step draws (none at the last call),
    each computed once, and its worker is gone when sample returns."""
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
    with pytest.raises(BackendError, match="fails at call 4"):
        pipe.sample(LABELS, num_steps=steps, sampler=sampler, cfg_scale=4.0, progress=False)
    assert set(threading.enumerate()) == before


def test_an_interrupt_from_the_progress_bar_leaves_no_thread(monkeypatch):
    """A cancel raised where the loop reports progress (Ctrl-C in the bar's update)."""
    from ditrt.runtime import pipeline as pipeline_module
    calls = []

    def interrupt(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(pipeline_module._Progress, "update", interrupt)
    before = set(threading.enumerate())
    pipe = _pipe("sit", delay_s=0.002)
    with pytest.raises(KeyboardInterrupt):
        pipe.sample(LABELS, num_steps=8, sampler="sde-heun", cfg_scale=4.0, progress=True)
    assert set(threading.enumerate()) == before


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
    from ditrt.runtime.batching import StepBatcher
    pipe = _pipe("dit", delay_s=0.01)
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
    assert set(threading.enumerate()) == before
