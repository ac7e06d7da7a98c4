"""Continuous (step-level) batching of sampling requests over one pipeline's backends.

`StepBatcher(pipeline)` takes requests from any thread (`submit` -> `concurrent.futures.Future`)
or asyncio task (`await batcher.sample_async(...)`). Requests are validated at submit, in the
caller's thread (`pipeline.start`), so bad ones raise `InputError` with the same messages as
`Pipeline.sample`. One worker thread runs every network call:

- a *tick*: one denoiser call over the rows of every running request (their `feeds()`
  concatenated, each row at its own timestep; chunked at `limits.max_batch` rows), then each run
  advances with its rows of the output; new requests join at the next tick, finished ones leave;
- a *decode batch*: finished requests that asked for images (`decode=True`) wait in a decode
  queue; after each tick the worker decodes the queue's head requests together, up to
  `limits.decode_batch` images per decoder call.

Policies: "step" (continuous batching, above), "serial" (FIFO, one request at a time) and
"request" (whole-request batching: start the requests that fit together, admit nothing until
all of them finish). Starting is FIFO and by whole requests (`admit_count`): the head starts when
its rows fit beside the running rows under `limits.max_rows`; a request bigger than that starts
alone (its calls chunked).

Bounded by default (`Limits`, sized for the backend): rows per engine call, rows running, images
per request, model calls per request, requests waiting, images per decoder call. Admission is by
deadline: `submit` estimates when the request would finish (`simulate`: the policy played forward
over the running and waiting requests, with tick and decode times from a `CostModel` measured on
this backend) and refuses at once (`Overloaded`, a `QueueFull`: HTTP 429 + Retry-After) a
request that would miss its deadline, or that would push an admitted request past its own. The
estimate needs measurements: `warm_up=True` makes the worker's first calls (the denoiser at 1 and
`max_batch` rows, a few ticks of a one-image run, the decoder at one image) before `ready` turns
true; until the model has measurements, only the queue length bounds admission, and an idle
scheduler whose measurements are older than STALE_S takes any request (running it measures).

Adaptive samplers (SiT's ode-dopri5: `SampleRun.total_steps` is None) are served: each row of a
tick carries its own t, so a dopri5 run steps beside fixed-step runs. Their cost is the bound the
scheduler enforces: at most `max_calls` model calls (the request's, else `limits.max_steps`),
charged in full by admission; a run that has not finished by then fails with an InputError
naming the tolerances.

Results are bit-identical to `Pipeline.sample` where the backend's rows do not depend on the
batch they run in (ONNX Runtime CPU: see README); TensorRT picks kernels per batch shape, so
there a row's bits can differ (within fp16 parity) with the company it runs in.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..execution.cache import denoise
from ..execution.chunking import MAX_ROWS_PER_CALL, run_chunked
from ..core.errors import InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError
from ..sampling import request
from ..execution.pipeline import decode as run_decoder
from ..sampling.request import SampleSpec
from ..core.validate import check_int, check_number

POLICIES = ("step", "serial", "request")
ADMISSION_MARGIN = 1.2  # a request is admitted when 1.2 x its estimated finish meets its deadline
STALE_S = 10.0  # an idle scheduler whose last measurement is older takes any request (running it measures)
FORCE_JOIN_S = 30.0  # close(): how long to wait for the worker after failing what is left


# ---- limits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one scheduler takes on. Every field is a `ditrt serve` flag and shows in GET /v1/model."""
    max_batch: int  # rows per denoiser call (a larger tick is chunked)
    max_rows: int  # rows of the running requests together (admission keeps under it)
    max_images: int  # images (labels) per request
    max_steps: int  # model calls per request (the cap an adaptive sampler runs under)
    max_queue: int  # requests admitted but not started
    decode_batch: int  # images per decoder call, across requests

    @classmethod
    def for_pipeline(cls, pipeline, max_batch=None, max_rows=None, max_images=None, max_steps=None, max_queue=None,
                     decode_batch=None) -> "Limits":
        """The given limits, the rest sized for the pipeline's backends: rows per call the engine's
        limit (a TensorRT plan's profile), else 64 on a GPU and 16 on a CPU; rows running = rows
        per call (each tick one call); images per request = half of that (a guided request fits
        a call); 1000 model calls (DiT's full chain); 64 waiting requests; images per decoder call
        the decoder engine's limit, else 8 on a GPU, 4 on a CPU."""
        backend, decoder = pipeline.backend, getattr(pipeline, "decoder", None)
        engine_rows = backend.max_batch or (64 if _on_gpu(backend) else 16)
        if max_batch is not None:  # 0 is "a positive integer"; the range is for a typo like 1e20
            check_int(max_batch, "max_batch (rows per engine call)", 1)
        max_batch = engine_rows if max_batch is None else check_int(max_batch, "max_batch (rows per engine call)", 1,
                                                                    MAX_ROWS_PER_CALL)
        if backend.max_batch is not None and max_batch > backend.max_batch:
            raise InputError(f"max_batch {max_batch} is above the {backend.name} engine's limit of "
                             f"{backend.max_batch} rows per call")
        max_rows = max_batch if max_rows is None else check_int(max_rows, "max_rows (rows in flight)", max_batch,
                                                                1 << 20)
        max_images = (max(1, max_rows // 2) if max_images is None
                      else check_int(max_images, "max_images (images per request)", 1, 1 << 16))
        max_steps = 1000 if max_steps is None else check_int(max_steps, "max_steps (model calls per request)", 1,
                                                              1_000_000)
        max_queue = 64 if max_queue is None else check_int(max_queue, "max_queue (waiting requests)", 1, 1 << 20)
        decoder_images = None if decoder is None else decoder.max_batch or (8 if _on_gpu(decoder) else 4)
        if decode_batch is None:
            decode_batch = decoder_images or 1
        elif decoder is None:  # nothing would read it: refused, not ignored
            raise InputError("decode_batch (images per decoder call) applies to an artifact with a decoder network; "
                             "this one has none")
        else:
            decode_batch = check_int(decode_batch, "decode_batch (images per decoder call)", 1, 1 << 16)
            if decoder is not None and decoder.max_batch is not None and decode_batch > decoder.max_batch:
                raise InputError(f"decode_batch {decode_batch} is above the {decoder.name} decoder engine's limit "
                                 f"of {decoder.max_batch} images per call")
        return cls(max_batch, max_rows, max_images, max_steps, max_queue, decode_batch)

    def to_dict(self) -> dict:
        return asdict(self)


def _on_gpu(backend) -> bool:
    return backend.name.startswith("tensorrt") or getattr(backend, "device", "cpu") != "cpu"


class _AtMost:
    """A backend seen through a lower batch limit: `run_chunked` (the one chunker) splits at it."""

    def __init__(self, backend, max_batch: int):
        self.inner, self.name, self.network = backend, backend.name, backend.network
        self.precision = getattr(backend, "precision", None)
        self.min_batch = getattr(backend, "min_batch", 1)
        self.max_batch = min(max_batch, backend.max_batch or max_batch)

    def __call__(self, feeds):
        return self.inner(feeds)


# ---- the cost model and the admission simulation -----------------------------------------------

class _Line:
    """Seconds for n units as a + b n (a, b >= 0): the mean of the last `window` times per n (the
    mean, not the median: on a shared machine the slow calls are real and a request pays for all
    of its calls), and the least-squares line through those means weighted by how many times each
    has. A count of units not seen in the last `memory` observations is forgotten (warm-up points
    give way to the load's own)."""

    def __init__(self, window: int = 50, memory: int = 1000):
        self.window, self.memory = window, memory
        self.recent: dict[int, deque[float]] = {}
        self._last_seen: dict[int, int] = {}
        self._observed = 0
        self._fit: tuple[float, float] | None = None

    def observe(self, n: int, seconds: float) -> None:
        self._observed += 1
        self.recent.setdefault(n, deque(maxlen=self.window)).append(seconds)
        self._last_seen[n] = self._observed
        for stale in [k for k, seen in self._last_seen.items() if self._observed - seen > self.memory]:
            del self.recent[stale], self._last_seen[stale]
        self._fit = None

    def seconds(self, n: int) -> float | None:
        if not self.recent:
            return None
        if self._fit is None:
            xs = np.array(list(self.recent), dtype=np.float64)
            ys = np.array([np.mean(times) for times in self.recent.values()])
            self._fit = fit_line(xs, ys, np.array([len(times) for times in self.recent.values()], dtype=np.float64))
        intercept, slope = self._fit
        return intercept + slope * n


def fit_line(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y = a + b x with a, b >= 0 (a cost never falls with size nor starts
    below zero): the free line when it qualifies, else the line through the origin (b >= 0 from
    positive data), or the weighted mean when the free slope is negative."""
    total = weight.sum()
    mean_x, mean_y = (weight * x).sum() / total, (weight * y).sum() / total
    spread = (weight * (x - mean_x) ** 2).sum()
    if spread > 0:
        slope = (weight * (x - mean_x) * (y - mean_y)).sum() / spread
        intercept = mean_y - slope * mean_x
        if slope < 0:
            return float(mean_y), 0.0
        if intercept >= 0:
            return float(intercept), float(slope)
    return 0.0, float((weight * x * y).sum() / (weight * x * x).sum())


class CostModel:
    """Measured speed of this scheduler's worker. A tick of r rows over q requests takes
    engine(r) (the denoiser call(s): a line in rows) + q x the mean per-request time outside the
    engine (feeds, guidance, the sampler's step, noise); a decoder batch of n images decode(n).
    Written and read under the batcher's lock."""

    def __init__(self, window: int = 50):
        self.engine, self.decode = _Line(window), _Line(window)
        self._overhead: deque[float] = deque(maxlen=window)
        self._overhead_mean: float | None = None
        self.measured_at = -math.inf  # time.monotonic() of the last tick measured

    def age(self) -> float:
        """Seconds since the last tick was measured."""
        return time.monotonic() - self.measured_at

    @property
    def known(self) -> bool:
        return bool(self.engine.recent)

    def observe_tick(self, rows: int, requests: int, engine_s: float, total_s: float) -> None:
        self.engine.observe(rows, engine_s)
        self._overhead.append(max(0.0, total_s - engine_s) / requests)
        self._overhead_mean = None
        self.measured_at = time.monotonic()

    def tick_seconds(self, rows: int, requests: int) -> float:
        if self._overhead_mean is None:
            self._overhead_mean = float(np.mean(self._overhead)) if self._overhead else 0.0
        return (self.engine.seconds(rows) or 0.0) + requests * self._overhead_mean

    def decode_seconds(self, images: int) -> float:
        return (self.decode.seconds(images) or 0.0) if images else 0.0


class Work(NamedTuple):
    """One request as the admission simulation sees it."""
    rows: int  # rows per model call
    calls: int  # model calls left (an adaptive run: its cap minus the calls made)
    images: int  # images to decode when it finishes (0: latents only)


def admit_count(policy: str, running_rows: Sequence[int], waiting_rows: Sequence[int], max_rows: int) -> int:
    """How many requests at the head of the queue start now: FIFO, whole requests, while their rows
    fit beside the running ones under max_rows; one that fits nowhere starts alone. "serial" starts
    one request when none runs; "request" starts a batch only when none runs."""
    if policy in ("serial", "request") and running_rows:
        return 0
    rows, started = sum(running_rows), 0
    for head in waiting_rows:
        if (running_rows or started) and rows + head > max_rows:
            break
        rows += head
        started += 1
        if policy == "serial":
            break
    return started


def simulate(running: Sequence[Work], waiting: Sequence[Work], policy: str, max_rows: int,
             tick_seconds: Callable[[int, int], float], decode_seconds: Callable[[int], float],
             start: float = 0.0) -> list[float]:
    """Estimated finish time (seconds from now) of each request, running ones first, then the
    waiting ones in order: the policy played forward, event by event (a request finishing); ticks
    of r rows over q requests take tick_seconds(r, q); a finished request's decode takes decode_seconds(images) on the
    same worker. `start`: work already queued for the worker (decodes)."""
    work = list(running) + list(waiting)
    left = [max(1, w.calls) for w in work]
    active, queue = list(range(len(running))), deque(range(len(running), len(work)))
    finish = [math.inf] * len(work)
    now = start
    while active or queue:
        for _ in range(admit_count(policy, [work[i].rows for i in active], [work[i].rows for i in queue], max_rows)):
            active.append(queue.popleft())
        calls = min(left[i] for i in active)
        now += calls * tick_seconds(sum(work[i].rows for i in active), len(active))
        for i in active:
            left[i] -= calls
        for i in [i for i in active if left[i] == 0]:
            active.remove(i)
            now += decode_seconds(work[i].images)
            finish[i] = now
    return finish


class Overloaded(QueueFull):
    """The request would not finish within its deadline (or would push another past its own): a
    429 with `retry_after` seconds, decided at submit."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DecodedSample(NamedTuple):
    """What a `decode=True` request's future holds."""
    latents: np.ndarray  # (N, C, H, W) float32, Pipeline.sample's
    images: np.ndarray  # (N, 3, H, W) float32 in about [-1, 1], pipeline.decode's


# ---- the scheduler --------------------------------------------------------------------------------

class _Request:
    __slots__ = ("id", "run", "future", "deadline", "timeout", "submitted", "decode", "max_calls")

    def __init__(self, id, run, timeout, decode, max_calls):
        self.id, self.run, self.future, self.timeout = id, run, Future(), timeout
        self.decode, self.max_calls = decode, max_calls
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout

    @property
    def images(self) -> int:
        return len(self.run.labels)

    def work(self) -> Work:
        return Work(self.run.rows, self.max_calls - self.run.steps_done, self.images if self.decode else 0)


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it is already done (cancelled by its caller meanwhile)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class StepBatcher:
    """Shared: the pipeline (read-only), the queues and the worker. Per request: its SampleRun.

    `observer(kind, count, seconds)`, if given, is called by the worker after each tick ("step",
    rows) and decode batch ("decode", images), outside the lock (metrics)."""

    def __init__(self, pipeline, max_batch: int | None = None, max_queue: int | None = None, policy: str = "step",
                 timeout: float | None = None, *, max_rows: int | None = None, max_images: int | None = None,
                 max_steps: int | None = None, decode_batch: int | None = None, warm_up: bool = False,
                 observer: Callable[[str, int, float], None] | None = None, name: str = "ditrt-batcher"):
        if policy not in POLICIES:
            raise InputError(f"unknown batching policy {policy!r}; use {', '.join(POLICIES)}")
        self.pipeline, self.policy = pipeline, policy
        self.limits = Limits.for_pipeline(pipeline, max_batch, max_rows, max_images, max_steps, max_queue, decode_batch)
        self.default_timeout = _check_timeout(timeout)
        self.cost = CostModel()
        self._denoiser = _AtMost(pipeline.backend, self.limits.max_batch)
        decoder = getattr(pipeline, "decoder", None)
        self._decoder = None if decoder is None else _AtMost(decoder, self.limits.decode_batch)
        self.observer = observer
        self._queue: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._decoding: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._drain = True
        self._ready = not warm_up
        self._warm_up_error: str | None = None
        self._started = time.monotonic()
        self._calls = self._rows_total = self._last_rows = self._steps = 0
        self._decode_calls = self._decoded_images = 0
        self._completed = self._failed = self._cancelled = self._timed_out = self._rejected = 0
        self._abandoned = 0  # failed by close() (not drained in time, or drain=False)
        self._worker = threading.Thread(target=self._loop, args=(warm_up,), name=name, daemon=True)
        self._worker.start()

    @property
    def max_batch(self) -> int:
        return self.limits.max_batch

    @property
    def max_queue(self) -> int:
        return self.limits.max_queue

    @property
    def ready(self) -> bool:
        """True once warmed up (at once without warm_up), while the worker runs."""
        return self._ready and self._worker.is_alive()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def closed(self) -> bool:
        """True once `close` was called: no new requests are taken."""
        return self._closed

    # ---- the caller's side ----------------------------------------------------------------------

    def submit(self, class_labels, num_steps=None, sampler=None, cfg_scale=None, guidance=None, seed=0, eta=None,
               noise=None, timeout: float | None = None, decode: bool = False, max_calls: int | None = None,
               image_offset: int = 0, max_model_calls: int | None = None, cache: str = "none",
               cache_options: dict | None = None, **sampler_options) -> Future:
        """`submit_spec` with the keywords of `Pipeline.start`."""
        spec = SampleSpec(class_labels, sampler, num_steps, guidance, cfg_scale, seed, image_offset,
                          request.sampler_options(eta, sampler_options), max_model_calls, cache, cache_options or {})
        return self.submit_spec(spec, noise, timeout=timeout, decode=decode, max_calls=max_calls)

    def submit_spec(self, spec: SampleSpec, noise=None, timeout: float | None = None, decode: bool = False,
                    max_calls: int | None = None) -> Future:
        """A future of the latents (N, C, H, W) float32 (with decode=True: a DecodedSample, latents
        and images); raises at once InputError (a bad or oversized request), QueueFull (the queue
        is full), Overloaded (it would miss its deadline) or SchedulerClosed. timeout (s, from
        submit; None: the batcher's default) fails the future with RequestTimeout. max_calls caps
        an adaptive sampler's model calls (default limits.max_steps); fixed-step samplers refuse it."""
        limits = self.limits
        class_labels = spec.labels
        count = len(class_labels) if hasattr(class_labels, "__len__") else None
        if count is not None and count > limits.max_images:
            raise InputError(f"{count} labels: this scheduler takes at most {limits.max_images} images per request "
                             "(max_images); split the request")
        if decode and self._decoder is None:
            raise InputError("images (format 'png') need an artifact with a decoder network (this one has only "
                             f"{', '.join(self.pipeline.manifest.networks)}); ask for the latents (format 'npy')")
        run = self.pipeline.start_spec(spec, noise)
        try:
            return self._enqueue(run, max_calls, timeout, decode)
        except BaseException:
            run.close()  # refused: no prefetch thread outlives it
            raise

    def _enqueue(self, run, max_calls, timeout, decode) -> Future:
        limits = self.limits
        max_calls = self._call_budget(run, max_calls)
        timeout = self.default_timeout if timeout is None else _check_timeout(timeout)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the batching scheduler is closed; it takes no new requests")
            if len(self._queue) >= limits.max_queue:
                self._rejected += 1
                raise QueueFull(f"the request queue is full ({limits.max_queue} requests waiting, the limit); "
                                f"retry later")
            request = _Request(next(self._ids), run, timeout, bool(decode), max_calls)
            self._check_deadlines(request)
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def _call_budget(self, run, max_calls) -> int:
        """The model calls a run may make: a fixed-step sampler's count (refused above max_steps),
        an adaptive one's budget (the run itself stops there: SampleRun.limit_model_calls)."""
        limit = self.limits.max_steps
        if run.total_steps is not None and max_calls is None:
            if run.total_steps > limit:
                raise InputError(f"this request needs {run.total_steps} model calls; this scheduler runs at most "
                                 f"{limit} per request (max_steps)")
            return run.total_steps
        run.limit_model_calls(limit if max_calls is None else max_calls, "max_calls", limit, "the server's max_steps")
        return run.max_model_calls

    def _check_deadlines(self, request: _Request) -> None:
        """Overloaded unless the request, and every admitted request that would meet its deadline
        without it, is estimated to finish in time (under the lock). An idle scheduler whose last
        measurement is older than STALE_S takes any request: the machine may have changed speed,
        and running the request measures it."""
        if not self.cost.known or (not self._waiting() and self.cost.age() > STALE_S) or \
                (request.deadline is None and all(r.deadline is None for r in self._waiting())):
            return
        now = time.monotonic()
        running, waiting = list(self._active), list(self._queue)
        pending_decode = self.cost.decode_seconds(sum(r.images for r in self._decoding))

        def finish_times(extra: list[_Request]) -> list[float]:
            return simulate([r.work() for r in running], [r.work() for r in waiting + extra], self.policy,
                            self.limits.max_rows, self.cost.tick_seconds, self.cost.decode_seconds, pending_decode)

        def late(r: _Request, finish: float) -> float:
            return 0.0 if r.deadline is None else now + ADMISSION_MARGIN * finish - r.deadline

        with_it = finish_times([request])
        miss = late(request, with_it[-1])
        if miss > 0:
            alone = ADMISSION_MARGIN * simulate([], [request.work()], self.policy, self.limits.max_rows,
                                                self.cost.tick_seconds, self.cost.decode_seconds)[0]
            why = (f"it needs about {alone:.1f} s even on an idle server (raise timeout, or ask for fewer steps "
                   "or images)" if alone > request.timeout else
                   f"{len(running)} requests running and {len(waiting)} waiting")
            self._rejected += 1
            raise Overloaded(f"this request would not finish within its timeout of {request.timeout:g} s (estimated "
                             f"{now + ADMISSION_MARGIN * with_it[-1] - request.submitted:.1f} s: {why}); retry later",
                             retry_after=miss)
        without = finish_times([])
        for r, before, after in zip(running + waiting, without, with_it):
            if late(r, before) <= 0 < late(r, after):
                self._rejected += 1
                raise Overloaded(f"the server is at capacity: this request would delay request {r.id} past its "
                                 "deadline; retry later", retry_after=late(r, after))

    def _waiting(self) -> list[_Request]:
        return [*self._active, *self._queue, *self._decoding]

    async def sample_async(self, *args, **kwargs):
        """`submit` awaited from asyncio; cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def cancel(self, future: Future) -> bool:
        """Cancel a request (as future.cancel()): its run leaves at the next tick."""
        cancelled = future.cancel()
        with self._cond:
            self._cond.notify_all()
        return cancelled

    def stats(self) -> dict:
        with self._cond:
            elapsed = time.monotonic() - self._started
            return {"policy": self.policy, "max_batch": self.limits.max_batch, "max_queue": self.limits.max_queue,
                    "queue_depth": len(self._queue), "in_flight": len(self._active) + len(self._decoding),
                    "running": len(self._active), "decode_queue": len(self._decoding),
                    "in_flight_rows": sum(r.run.rows for r in self._active),
                    "backend_calls": self._calls, "rows_last_call": self._last_rows,
                    "rows_per_call_mean": self._rows_total / self._calls if self._calls else 0.0,
                    "steps": self._steps, "steps_per_s": self._steps / elapsed if elapsed else 0.0,
                    "decoder_calls": self._decode_calls, "decoded_images": self._decoded_images,
                    "completed": self._completed, "failed": self._failed, "cancelled": self._cancelled,
                    "timed_out": self._timed_out, "rejected": self._rejected, "closed": self._closed,
                    "ready": self.ready, "warm_up_error": self._warm_up_error}

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests. drain=True finishes every waiting and running request first (within
        `timeout` seconds, after which what is left fails with SchedulerClosed); drain=False fails
        them all at once. Returns True when everything admitted was finished (not failed)."""
        with self._cond:
            self._closed = True
            self._drain = self._drain and drain
            self._cond.notify_all()
        self._worker.join(timeout if self._drain else FORCE_JOIN_S)
        if self._worker.is_alive():
            with self._cond:
                self._drain = False
                self._cond.notify_all()
            self._worker.join(FORCE_JOIN_S)
        return self._abandoned == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(drain=exc[0] is None)

    # ---- the worker -----------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests by the policy (admit_count: FIFO, whole requests)."""
        count = admit_count(self.policy, [r.run.rows for r in self._active], [r.run.rows for r in self._queue],
                            self.limits.max_rows)
        for _ in range(count):
            self._active.append(self._queue.popleft())

    def _take_decodes(self) -> list[_Request]:
        """The decode queue's head requests, up to decode_batch images (at least one request)."""
        taken, images = [], 0
        while self._decoding and (not taken or images + self._decoding[0].images <= self.limits.decode_batch):
            taken.append(self._decoding.popleft())
            images += taken[-1].images
        return taken

    def _sweep(self, now: float) -> None:
        """Drop cancelled and timed-out requests, waiting, running or waiting for their decode."""
        for container in (self._queue, self._active, self._decoding):
            keep = []
            for r in container:
                if r.future.cancelled() or r.deadline is not None and now >= r.deadline:
                    r.run.close()  # its noise prefetch thread stops with it
                if r.future.cancelled():
                    self._cancelled += 1
                elif r.deadline is not None and now >= r.deadline:
                    self._timed_out += 1
                    where = ("waiting for the decoder" if container is self._decoding else
                             f"{r.run.steps_done} of {r.run.total_steps or 'an adaptive number of'} model calls done")
                    _settle(r.future, error=RequestTimeout(f"request {r.id} timed out after {r.timeout:g} s ({where})"))
                else:
                    keep.append(r)
            container.clear()
            container.extend(keep)

    def _loop(self, warm_up: bool) -> None:
        if warm_up:
            self._warm_up()
        while True:
            with self._cond:
                while True:
                    self._sweep(time.monotonic())
                    if self._closed and not self._drain:
                        self._fail_all(SchedulerClosed("the batching scheduler was closed without draining "
                                                       "before this request finished"))
                        return
                    self._admit()
                    decodes = self._take_decodes()
                    if self._active or decodes:
                        break
                    if self._closed:
                        return
                    deadlines = [r.deadline for r in self._queue if r.deadline is not None]
                    self._cond.wait(None if not deadlines else max(0.0, min(deadlines) - time.monotonic()) + 1e-3)
                batch = list(self._active)
            if batch:
                self._tick(batch)
            if decodes:
                self._decode(decodes)

    def _warm_up(self, budget_s: float = 2.0, rounds: int = 10) -> None:
        """The first engine calls, before `ready`: the denoiser at max_batch rows (allocations),
        then rounds of timed calls at 1 and max_batch rows and a tick of a one-image run with the
        manifest's defaults (the sampler's own time per request), for about `budget_s` (at least
        one round, at most `rounds`); the decoder at one image, twice. The cost model starts from
        these. A failure is kept (stats, readiness); requests then fail on their own calls."""
        try:
            spec = self.pipeline.backend.network
            run_chunked(self._denoiser, spec.example_inputs(self.limits.max_batch))
            run, until = self.pipeline.start([0]), time.perf_counter() + budget_s
            for _ in range(rounds):
                for rows in (1, self.limits.max_batch):
                    feeds = spec.example_inputs(rows)
                    start = time.perf_counter()
                    run_chunked(self._denoiser, feeds)
                    with self._cond:
                        self.cost.engine.observe(rows, time.perf_counter() - start)
                if not run.done:
                    (error,), engine_s, total_s = self._step_runs([run])
                    if error is not None:
                        raise error
                    with self._cond:
                        self.cost.observe_tick(run.rows, 1, engine_s, total_s)
                if time.perf_counter() > until:
                    break
            run.close()
            if self._decoder is not None:
                latent = self._decoder.network.input("latent")
                latents = self._decoder.network.example_inputs(1)[latent.name]
                for _ in range(2):
                    start = time.perf_counter()
                    run_decoder(self._decoder, latents)
                    with self._cond:
                        self.cost.decode.observe(1, time.perf_counter() - start)
            self._ready = True
        except Exception as e:  # the engine cannot run: say why instead of turning ready
            self._warm_up_error = f"{type(e).__name__}: {e}"

    def _step_runs(self, runs: list) -> tuple[list[BaseException | None], float, float]:
        """One denoiser call over the runs' rows (their feeds concatenated), then each run advanced
        with its rows of the output: (each run's error or None, engine seconds, tick seconds).
        Raises what the backend raises."""
        start = time.perf_counter()
        feeds_list = [run.feeds() for run in runs]
        feeds = {k: np.concatenate([f[k] for f in feeds_list]) for k in feeds_list[0]} if len(runs) > 1 \
            else feeds_list[0]
        engine_start = time.perf_counter()
        output = denoise(self.pipeline, runs, feeds, self._denoiser)  # cached runs: their segments, own state
        engine_s = time.perf_counter() - engine_start
        errors, offset = [], 0
        for run in runs:
            part = output[offset:offset + run.rows]
            offset += run.rows
            try:
                run.advance(part)
                errors.append(None)
            except Exception as e:  # NaN (StepError) or a bug: only this run fails
                errors.append(e)
        return errors, engine_s, time.perf_counter() - start

    def _tick(self, batch: list[_Request]) -> None:
        rows = sum(r.run.rows for r in batch)
        try:
            errors, engine_s, seconds = self._step_runs([r.run for r in batch])
        except Exception as e:  # the backend failed: every request in this call fails with it
            error = e if isinstance(e, StepError) else StepError(f"the backend failed: {type(e).__name__}: {e}")
            with self._cond:
                self._count_call(rows)
                for r in batch:
                    self._finish(r, error=error)
            return
        done = []
        for r, error in zip(batch, errors):
            if error is not None or r.run.done:
                done.append((r, error))
        with self._cond:
            self.cost.observe_tick(rows, len(batch), engine_s, seconds)
            self._count_call(rows)
            self._steps += len(batch)
            for r, error in done:
                self._finish(r, error=error)
        if self.observer is not None:
            self.observer("step", rows, seconds)

    def _decode(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        latents = np.concatenate([r.run.result for r in batch])
        try:
            images = run_decoder(self._decoder, latents)
        except Exception as e:
            error = e if isinstance(e, (StepError, InputError)) else StepError(
                f"the decoder failed: {type(e).__name__}: {e}")
            with self._cond:
                for r in batch:
                    self._failed += 1
                    _settle(r.future, error=error)
            return
        seconds = time.perf_counter() - start
        with self._cond:
            self.cost.decode.observe(len(latents), seconds)
            self._decode_calls += 1
            self._decoded_images += len(latents)
            offset = 0
            for r in batch:
                self._completed += 1
                _settle(r.future, result=DecodedSample(r.run.result, images[offset:offset + r.images]))
                offset += r.images
        if self.observer is not None:
            self.observer("decode", len(latents), seconds)

    def _count_call(self, rows: int) -> None:
        self._calls += 1
        self._rows_total += rows
        self._last_rows = rows

    def _finish(self, r: _Request, error: BaseException | None = None) -> None:
        r.run.close()
        if r in self._active:
            self._active.remove(r)
        if r.future.cancelled():
            self._cancelled += 1
        elif error is not None:
            self._failed += 1
            _settle(r.future, error=error)
        elif r.decode:
            self._decoding.append(r)
        else:
            self._completed += 1
            _settle(r.future, result=r.run.result)

    def _fail_all(self, error: BaseException) -> None:
        for r in self._waiting():
            r.run.close()
            self._failed += 1
            self._abandoned += 1
            _settle(r.future, error=error)
        self._queue.clear()
        self._active.clear()
        self._decoding.clear()


def _check_timeout(timeout):
    return None if timeout is None else check_number(timeout, "timeout (seconds)", 0, 86400 * 365, low_open=True)
