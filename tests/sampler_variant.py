"""A sampler variant for tests/test_request.py, importable by spawned generate workers (no torch,
no pytest): DDIM with one more registry option, `dummy`, that scales the final sample by
(1 + dummy), so a test sees whether the value arrived (dummy 1: exactly twice plain DDIM's sample)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ditrt.runtime.core.errors import InputError
from ditrt.runtime.sampling.samplers import SAMPLERS, Sampler
from ditrt.runtime.jobs.workers import ShardWorker

DDIM = SAMPLERS["ddim"]  # the registry's own entry, captured before any variant replaces it


def _loop(x, schedule, noise, eta, dummy):
    final = yield from DDIM.loop(x, schedule, noise, eta=eta)
    return final * np.float32(1 + dummy)  # 1 + dummy is 1 or 2 here: exact in float32


def _check(options: dict) -> dict:
    options = DDIM.check_options({"eta": options["eta"]}) | {"dummy": options["dummy"]}
    if options["dummy"] not in (0, 1):
        raise InputError(f"dummy must be 0 or 1, got {options['dummy']!r}")
    return options


def dummy_ddim() -> Sampler:
    """The registry's ddim entry with the extra option (its name stays ddim: the CLI's choices)."""
    return replace(DDIM, options={**DDIM.options, "dummy": 0.0}, loop=_loop, check_options=_check,
                   drawn=lambda sched, eta, dummy: DDIM.drawn(sched, eta))


class DummyOptionWorker(ShardWorker):
    """A generate worker whose process has the variant registered (a worker process is its own)."""

    def __init__(self, *args, **kwargs):
        from ditrt.runtime.sampling.samplers import register_sampler
        register_sampler(dummy_ddim())
        super().__init__(*args, **kwargs)
