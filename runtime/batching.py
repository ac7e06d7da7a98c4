"""Continuous (step-level) batching of sampling requests over one pipeline's backend.

`StepBatcher(pipeline)` takes requests from any thread (`submit` -> `concurrent.futures.Future`)
or asyncio task (`await batcher.sample_async(...)`). Requests are validated at submit, in the
caller's thread (`pipeline.start`), so bad ones raise `InputError` with the same messages as
`Pipeline.sample`. One worker thread runs one backend call per tick over the rows of every
in-flight request (their `feeds()` concatenated, each row at its own timestep), splits the
output and advances each run; new requests join at the next tick and finished ones leave.

Policies: "step" (continuous batching, above), "serial" (FIFO, one request at a time) and
"request" (whole-request batching: start the requests that fit together, admit nothing until
all of them finish). Admission is FIFO and whole requests only: the head waits until its rows
fit beside the in-flight rows under `max_batch`; a request bigger than `max_batch` alone runs
chunked by `run_chunked`.

Results are bit-identical to `Pipeline.sample` where the backend's rows do not depend on the
batch they run in (ONNX Runtime CPU: see README); TensorRT picks kernels per batch shape, so
there a row's bits can differ (within fp16 parity) with the company it runs in.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError

import numpy as np

from .chunking import check_max_batch, run_chunked
from .errors import InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError
from .validate import check_int, check_number

POLICIES = ("step", "serial", "request")


class _Request:
    __slots__ = ("id", "run", "future", "deadline", "timeout", "submitted")

    def __init__(self, id, run, timeout):
        self.id, self.run, self.future, self.timeout = id, run, Future(), timeout
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout


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
    """Shared: the pipeline (read-only), the queue and the worker. Per request: its SampleRun."""

    def __init__(self, pipeline, max_batch: int | None = None, max_queue: int = 64, policy: str = "step",
                 timeout: float | None = None, name: str = "ditrt-batcher"):
        if policy not in POLICIES:
            raise InputError(f"unknown batching policy {policy!r}; use {', '.join(POLICIES)}")
        check_int(max_queue, "max_queue", 1, 1 << 20)
        self.pipeline, self.policy, self.max_queue = pipeline, policy, max_queue
        self.max_batch = check_max_batch(max_batch if max_batch is not None else pipeline.backend.max_batch)
        self.default_timeout = _check_timeout(timeout)
        self._queue: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._drain = True
        self._started = time.monotonic()
        self._calls = self._rows_total = self._last_rows = self._steps = 0
        self._completed = self._failed = self._cancelled = self._timed_out = 0
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    # ---- the caller's side ----------------------------------------------------------------------

    def submit(self, class_labels, num_steps=None, sampler=None, cfg_scale=None, guidance=None, seed=0, eta=None,
               noise=None, timeout: float | None = None, **sampler_options) -> Future:
        """A future of the latents (N, C, H, W) float32; raises InputError (bad request),
        QueueFull or SchedulerClosed at once. timeout (s, from submit; None: the batcher's default)
        fails the future with RequestTimeout."""
        run = self.pipeline.start(class_labels, num_steps, sampler, cfg_scale, guidance, seed, eta, noise,
                                  **sampler_options)
        timeout = self.default_timeout if timeout is None else _check_timeout(timeout)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the batching scheduler is closed; it takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} requests waiting, the limit); "
                                f"retry later")
            request = _Request(next(self._ids), run, timeout)
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    async def sample_async(self, *args, **kwargs) -> np.ndarray:
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
            return {"policy": self.policy, "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "queue_depth": len(self._queue), "in_flight": len(self._active),
                    "in_flight_rows": sum(r.run.rows for r in self._active),
                    "backend_calls": self._calls, "rows_last_call": self._last_rows,
                    "rows_per_call_mean": self._rows_total / self._calls if self._calls else 0.0,
                    "steps": self._steps, "steps_per_s": self._steps / elapsed if elapsed else 0.0,
                    "completed": self._completed, "failed": self._failed, "cancelled": self._cancelled,
                    "timed_out": self._timed_out, "closed": self._closed}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. drain=True finishes every queued and in-flight request first;
        drain=False fails them all with SchedulerClosed. Returns when the worker has stopped."""
        with self._cond:
            self._closed, self._drain = True, drain
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(drain=exc[0] is None)

    # ---- the worker -----------------------------------------------------------------------------

    def _admit(self) -> None:
        """Move queued requests into the in-flight set by the policy (FIFO, whole requests)."""
        if self.policy in ("serial", "request") and self._active:
            return
        rows = sum(r.run.rows for r in self._active)
        while self._queue:
            head = self._queue[0]
            if self._active and self.max_batch is not None and rows + head.run.rows > self.max_batch:
                return
            self._active.append(self._queue.popleft())
            rows += head.run.rows
            if self.policy == "serial":
                return

    def _sweep(self, now: float) -> None:
        """Drop cancelled and timed-out requests, queued or in flight."""
        for container in (self._queue, self._active):
            keep = []
            for r in container:
                if r.future.cancelled():
                    self._cancelled += 1
                elif r.deadline is not None and now >= r.deadline:
                    self._timed_out += 1
                    _settle(r.future, error=RequestTimeout(
                        f"request {r.id} timed out after {r.timeout:g} s ({r.run.steps_done} of "
                        f"{r.run.total_steps} steps done)"))
                else:
                    keep.append(r)
            container.clear()
            container.extend(keep)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._sweep(time.monotonic())
                    if self._closed and not self._drain:
                        self._fail_all(SchedulerClosed("the batching scheduler was closed without draining "
                                                       "before this request finished"))
                        return
                    self._admit()
                    if self._active:
                        break
                    if self._closed:
                        return
                    deadlines = [r.deadline for r in self._queue if r.deadline is not None]
                    self._cond.wait(None if not deadlines else max(0.0, min(deadlines) - time.monotonic()) + 1e-3)
                batch = list(self._active)
            self._tick(batch)

    def _tick(self, batch: list[_Request]) -> None:
        feeds_list = [r.run.feeds() for r in batch]
        feeds = {k: np.concatenate([f[k] for f in feeds_list]) for k in feeds_list[0]} if len(batch) > 1 \
            else feeds_list[0]
        rows = sum(r.run.rows for r in batch)
        try:
            output = run_chunked(self.pipeline.backend, feeds)[self.pipeline.backend.network.output.name]
        except Exception as e:  # the backend failed: every request in this call fails with it
            error = e if isinstance(e, StepError) else StepError(f"the backend failed: {type(e).__name__}: {e}")
            with self._cond:
                self._count_call(rows)
                for r in batch:
                    self._finish(r, error=error)
            return
        done, start = [], 0
        for r in batch:
            part = output[start:start + r.run.rows]
            start += r.run.rows
            try:
                r.run.advance(part)
            except Exception as e:  # NaN (StepError) or a bug: only this request fails
                done.append((r, e))
                continue
            if r.run.done:
                done.append((r, None))
        with self._cond:
            self._count_call(rows)
            self._steps += len(batch)
            for r, error in done:
                self._finish(r, error=error)

    def _count_call(self, rows: int) -> None:
        self._calls += 1
        self._rows_total += rows
        self._last_rows = rows

    def _finish(self, r: _Request, error: BaseException | None = None) -> None:
        if r in self._active:
            self._active.remove(r)
        if error is None:
            self._completed += 1
            _settle(r.future, result=r.run.result)
        else:
            self._failed += 1
            _settle(r.future, error=error)

    def _fail_all(self, error: BaseException) -> None:
        for r in list(self._queue) + list(self._active):
            self._failed += 1
            _settle(r.future, error=error)
        self._queue.clear()
        self._active.clear()


def _check_timeout(timeout):
    return None if timeout is None else check_number(timeout, "timeout (seconds)", 0, 86400 * 365, low_open=True)
