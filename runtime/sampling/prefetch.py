"""Noise draws computed ahead, off the sampling loop's critical path.

The seeded stream is counter-based (noise.py: draw k is a pure function of the seed, the images and
k), so the draw the loop will ask for next can be computed while the engine runs the current model
call: one worker thread per run computes draw k + 1 as soon as the loop has taken draw k (numpy
releases the GIL inside its kernels, and an engine call releases it while it waits). The bits are
the stream's: the worker calls the same function the loop would have called.

Bounded: at most `depth` draws are queued or held, those just after the last one taken (after an
out-of-order request, one more: the stale draw the worker was computing, dropped when it is done).
Taken in order, each draw is computed once (a draw asked for while the worker computes it is
waited for, not recomputed); a draw that was not prefetched (random access, a retry) is computed
on the caller's thread and kept nowhere. `close()` stops and joins the worker (a finished, failed or cancelled
run calls it; the run's finaliser does too if nobody did), so no thread outlives its run.
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter, deque
from typing import Callable

import numpy as np

Draw = Callable[[int], np.ndarray]
THREAD_NAME = "ditrt-noise-prefetch"


class _Worker:
    """The state the worker thread shares with the prefetcher (the thread holds this, not the
    prefetcher, so an abandoned prefetcher is collected and its finaliser stops the thread)."""

    def __init__(self, draw: Draw):
        self.draw = draw
        self.cond = threading.Condition()
        self.queue: deque[int] = deque()
        self.ready: dict[int, tuple[np.ndarray | None, BaseException | None]] = {}
        self.busy: int | None = None
        self.closed = False
        self.computed: Counter[int] = Counter()  # draw -> times computed (any thread)
        self.max_held = 0  # most draws queued, computing or ready at once

    def held(self) -> int:
        return len(self.queue) + len(self.ready) + (self.busy is not None)

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                k = self.busy = self.queue.popleft()
                self.computed[k] += 1
            try:
                value, error = self.draw(k), None
            except BaseException as e:  # handed to the caller that asks for draw k
                value, error = None, e
            with self.cond:
                self.busy = None
                if not self.closed:
                    self.ready[k] = (value, error)
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.ready.clear()
            self.cond.notify_all()


def _stop(worker: _Worker, thread: threading.Thread | None) -> None:
    worker.close()
    if thread is not None and thread is not threading.current_thread():
        thread.join()


class NoisePrefetch:
    """`prefetch(k)` returns `draw(k)`; taking draw k queues draws k + 1 .. k + depth (below
    `count`, the number of step draws the loop will take) for the worker thread."""

    def __init__(self, draw: Draw, count: int, depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.count, self.depth = count, depth
        self._worker = _Worker(draw)
        self._thread: threading.Thread | None = None
        self._finalizer = None
        self._served = False  # a draw was asked for: start() has nothing left to do

    @property
    def computed(self) -> Counter:
        return self._worker.computed

    @property
    def max_held(self) -> int:
        return self._worker.max_held

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, first: int = 0) -> None:
        """Queue draws first .. first + depth - 1, unless the loop has asked for a draw already
        (then the draws after it are queued)."""
        with self._worker.cond:
            if not self._served:
                self._schedule(range(first, min(first + self.depth, self.count)))

    def __call__(self, k: int) -> np.ndarray:
        w = self._worker
        with w.cond:
            if w.closed:
                raise RuntimeError("this noise prefetch is closed")
            self._served = True
            mine = k in w.ready or k in w.queue or w.busy == k
            if k in w.queue:  # not started yet: the caller computes it now rather than wait for the worker
                w.queue.remove(k)
                mine = False
            while mine and k not in w.ready:
                w.cond.wait()
                if w.closed:
                    raise RuntimeError(f"this noise prefetch was closed while draw {k} was computed")
            value, error = w.ready.pop(k) if mine else (None, None)
            # keep only what comes next: stale draws (a retry went back) are dropped
            w.queue = deque(j for j in w.queue if k < j <= k + self.depth)
            for j in [j for j in w.ready if not k < j <= k + self.depth]:
                del w.ready[j]
            self._schedule(range(k + 1, min(k + 1 + self.depth, self.count)))
        if error is not None:
            raise error
        if not mine:
            with w.cond:
                w.computed[k] += 1
            value = w.draw(k)
        return value

    def _schedule(self, draws) -> None:
        """Queue the draws not queued, computing or ready (called with the lock held)."""
        w = self._worker
        if w.closed:
            return
        for j in draws:
            if j not in w.ready and j not in w.queue and w.busy != j:
                w.queue.append(j)
        w.max_held = max(w.max_held, w.held())
        if w.queue:
            if self._thread is None:
                self._thread = threading.Thread(target=w.run, name=THREAD_NAME, daemon=True)
                self._finalizer = weakref.finalize(self, _stop, w, self._thread)
                self._thread.start()
            w.cond.notify_all()

    def close(self) -> None:
        """Stop the worker and wait for it (a draw in progress finishes first); idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        else:
            self._worker.close()
