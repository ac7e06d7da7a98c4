"""Progress on stderr without dependencies, one helper for every bar: a redrawn bar on a terminal,
plain lines elsewhere (CI logs). `StepProgress` is a sampling loop's (Pipeline.sample),
`JobProgress` a generate run's (runtime/jobs/generate.py's Progress reports).
"""
from __future__ import annotations

import sys
import time

import numpy as np

BAR_WIDTH = 30


class ProgressLine:
    """`show(fraction, text)`: on a terminal the line `label [###...] text` redrawn in place
    (ended with a newline once the fraction reaches 1, or at `close`); elsewhere `log_prefix` and
    the text on a line of their own. Callers decide how often to show (a redraw is cheap, a log
    line is not)."""

    def __init__(self, label: str, log_prefix: str, stream=None):
        self.label, self.log_prefix = label, log_prefix
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False  # a redrawn line without its newline yet

    def show(self, fraction: float, text: str) -> None:
        if self.tty:
            filled = int(BAR_WIDTH * min(max(fraction, 0.0), 1.0))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}\033[K")
            self._open = fraction < 1.0
            if not self._open:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.log_prefix}{text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class StepProgress:
    """A sampling run's progress: at most 10 redraws a second on a terminal, one line per tenth of
    the loop elsewhere. Adaptive loops (no known number of calls) show their model time instead."""

    def __init__(self, run, stream=None):
        self.run, self.start, self.last_draw, self.last_tenth = run, time.perf_counter(), 0.0, 0
        self.line = ProgressLine("sampling", "sampling ", stream)

    def _fraction(self) -> float:
        run = self.run
        if run.total_steps:
            return run.steps_done / run.total_steps
        return 1.0 if run.done else float(np.clip(run.timestep, 0.0, 1.0))  # adaptive SiT loops run t from 0 to 1

    def update(self) -> None:
        now, run = time.perf_counter(), self.run
        rate = run.steps_done / max(now - self.start, 1e-9)
        done = (f"{run.steps_done}/{run.total_steps} steps" if run.total_steps else
                f"{run.steps_done} calls, t={run.timestep:.3f}")
        fraction = self._fraction()
        if self.line.tty:
            if now - self.last_draw < 0.1 and not run.done:
                return
            self.last_draw = now
        else:
            tenth = int(10 * fraction)
            if tenth == self.last_tenth:
                return
            self.last_tenth = tenth
        self.line.show(fraction, f"{done}, {rate:.1f} calls/s")

    def close(self) -> None:
        self.line.close()


class JobProgress:
    """A generate run's progress (called with each runtime.jobs.generate.Progress): images/s and ETA,
    redrawn on a terminal, one line per finished shard elsewhere."""

    def __init__(self, stream=None):
        self.line = ProgressLine("generate", "generate: ", stream)

    def __call__(self, p) -> None:
        eta = "?" if p.eta_s is None else f"{int(p.eta_s) // 3600}:{int(p.eta_s) % 3600 // 60:02d}:{int(p.eta_s) % 60:02d}"
        text = (f"{p.images_done}/{p.images_total} images, shard {p.shards_done}/{p.shards_total}, "
                f"{p.images_per_s:.2f} images/s, ETA {eta}")
        self.line.show(p.images_done / p.images_total, text)
