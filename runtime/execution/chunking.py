"""Backend calls within a backend's batch bounds: the one place that splits larger calls and pads
smaller ones, and the protocol every backend follows (`backend(feeds) -> outputs`, named numpy
tensors in and out; `max_batch` None is unlimited, `min_batch` the fewest rows a call takes)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..core.errors import InputError
from ..spec.networks import NetworkSpec
from ..core.validate import check_int

MAX_ROWS_PER_CALL = 1 << 20  # --max-batch's bound (as --max-rows'): beyond it a value is a typo, not a batch


class Backend(Protocol):
    name: str  # "<kind>-<precision>"
    network: NetworkSpec
    max_batch: int | None
    min_batch: int

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class BackendBase:
    """What every backend shares, said once (as Polygraphy's runners: `infer` checks, `infer_impl`
    runs): its network, precision, name ("<kind>-<precision>") and batch bounds, and `__call__`,
    which checks the feeds (`check_feeds`: NetworkSpec.check_feeds unless the backend knows
    better) and then runs `infer(feeds)`, the backend's own part."""

    def __init__(self, network: NetworkSpec, kind: str, precision: str | None, max_batch: int | None = None,
                 min_batch: int = 1):
        self.network, self.precision = network, precision
        self.name = f"{kind}-{precision}"
        self.max_batch = check_max_batch(max_batch)
        self.min_batch = min_batch

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        return self.infer(feeds)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        self.network.check_feeds(feeds)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def chunk_plan(rows: int, max_rows: int | None, min_rows: int = 1) -> list[tuple[int, int, int]]:
    """(start, stop, call rows) per backend call for `rows` rows: calls hold at most max_rows rows;
    a call below min_rows is padded up to it (engines reject smaller batches) and the padding rows
    are dropped from the output."""
    if rows < 1:
        raise InputError(f"need at least one row, got {rows}")
    max_rows = max_rows or rows
    if not 1 <= min_rows <= max_rows:
        raise InputError(f"invalid batch bounds: min {min_rows}, max {max_rows}")
    return [(s, min(s + max_rows, rows), max(min(max_rows, rows - s), min_rows)) for s in range(0, rows, max_rows)]


def run_chunked(backend: Backend, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run any number of rows through a backend within its batch bounds. Padding rows repeat the
    chunk's first row, so they are always valid inputs (labels in range)."""
    rows = len(next(iter(feeds.values())))
    plan = chunk_plan(rows, backend.max_batch, getattr(backend, "min_batch", 1))
    if len(plan) == 1 and plan[0][2] == rows:
        return backend(feeds)
    parts = []
    for start, stop, call_rows in plan:
        chunk = {}
        for name, array in feeds.items():
            part = array[start:stop]
            if call_rows > stop - start:
                part = np.concatenate([part, np.repeat(part[:1], call_rows - (stop - start), axis=0)])
            chunk[name] = part
        parts.append((stop - start, backend(chunk)))
    return {name: np.concatenate([out[name][:n] for n, out in parts]) for name in parts[0][1]}


def check_max_batch(max_batch) -> int | None:
    if max_batch is None:
        return None
    check_int(max_batch, "max_batch", 1, unit=" (or None for no limit)")  # 0: "a positive integer"
    return check_int(max_batch, "max_batch", 1, MAX_ROWS_PER_CALL, unit=" (or None for no limit)")
