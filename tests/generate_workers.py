"""Worker classes for tests/test_generate.py, importable by the spawned worker processes (no torch,
no pytest): a ShardWorker whose process dies for real while computing a chosen shard."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ditrt.runtime.core import files
from ditrt.runtime.core.errors import BackendError
from ditrt.runtime.jobs.workers import ShardWorker

DIE_SHARD = "DITRT_TEST_DIE_SHARD"  # the shard whose worker dies
DIE_ONCE = "DITRT_TEST_DIE_ONCE"  # a marker file: die only while it does not exist (the first attempt)
FAIL_SHARD = "DITRT_TEST_FAIL_SHARD"  # the shard whose backend fails
BUSY_MARKER = "DITRT_TEST_BUSY_MARKER"  # a file SlowWorker creates when it starts a shard
HASH_LOG = "DITRT_TEST_HASH_LOG"  # a folder where HashCountingWorker lists the files it hashed, one file per worker


class DyingWorker(ShardWorker):
    """SIGKILLs its own process (as the OOM killer or a preempted node would) on shard $DITRT_TEST_DIE_SHARD:
    on every attempt, or only on the first when $DITRT_TEST_DIE_ONCE names a marker file."""

    def run(self, task):
        if task.shard.index == int(os.environ[DIE_SHARD]):
            marker = os.environ.get(DIE_ONCE)
            if marker is None or not os.path.exists(marker):
                if marker is not None:
                    Path(marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().run(task)


class FailingWorker(ShardWorker):
    """Its backend fails (a BackendError, as a CUDA error would raise) on shard $DITRT_TEST_FAIL_SHARD."""

    def run(self, task):
        if task.shard.index == int(os.environ[FAIL_SHARD]):
            raise BackendError("simulated: the backend failed mid-loop")
        return super().run(task)


class SlowWorker(ShardWorker):
    """Takes a minute per shard (a big model's shard), announcing each start in $DITRT_TEST_BUSY_MARKER."""

    def run(self, task):
        Path(os.environ[BUSY_MARKER]).touch()
        time.sleep(60)
        return super().run(task)


class HashCountingWorker(ShardWorker):
    """Lists every file it reads to hash (files.hash_file, under sha256_file's cache) while loading
    its pipeline, in $DITRT_TEST_HASH_LOG/<pid>.txt: the graphs it did not trust its coordinator for."""

    def __init__(self, *args, **kwargs):
        hashed, real = [], files.hash_file
        files.hash_file = lambda path, *a, **k: (hashed.append(os.path.basename(path)), real(path, *a, **k))[1]
        try:
            super().__init__(*args, **kwargs)
        finally:
            files.hash_file = real
        Path(os.environ[HASH_LOG], f"{os.getpid()}.txt").write_text("".join(f"{name}\n" for name in hashed))
