"""The workers of `ditrt generate` (runtime/jobs/generate.py): a `ShardWorker` (one pipeline, loaded
once, computing shard after shard) in local processes (`LocalPool`: multiprocessing's spawn context,
one pipe each) or in Ray actors (`RayPool`; Ray is imported only here, only for a Ray run).

Both pools give the coordinator the same events: (slot, "ready", backend) once a worker has loaded,
(slot, "done", ShardResult), (slot, "error", exit code or None for a bug, message) and
(slot, "died", reason) when its process or actor is gone. Failures travel as messages, never as
pickled exceptions.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from ..core.errors import DitrtError, InputError, StepError
from ..core.files import trust_verified_hashes
from ..core.images import to_uint8
from ..execution.pipeline import load_pipeline
from ..sampling.request import LoadOptions, SampleSpec
from .shards import Shard


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    labels: np.ndarray  # int64 (n,)


@dataclass(frozen=True)
class ShardResult:
    shard: Shard
    samples: np.ndarray  # images uint8 (n, H, W, 3), or latents float32 (n, C, H, W) without a decoder
    labels: np.ndarray  # int64 (n,)
    seconds: float


class ShardWorker:
    """One worker: its pipeline (the denoiser, and the decoder when `decode`), loaded once,
    computes shards."""

    def __init__(self, artifact: str, load: LoadOptions, spec: SampleSpec, seed: int, batch: int,
                 trusted_hashes: dict | None = None):
        """`load` for runtime.load (its `decoder`: whether shards hold images), `spec` what each
        batch samples (its labels and offsets come from the shard). `trusted_hashes`: the
        coordinator's verified digests (files.verified_hashes), taken for the files they name when
        this worker runs on the coordinator's machine and the files are unchanged; any other file is
        hashed here."""
        trust_verified_hashes(trusted_hashes)
        self.pipeline = load_pipeline(artifact, load)
        self.decode, self.spec, self.seed, self.batch = bool(load.decoder), spec, seed, batch

    @property
    def backend(self) -> str:
        return self.pipeline.backend.name

    def run(self, task: ShardTask) -> ShardResult:
        """The shard's images (uint8, as sample_ddp.py saves them) or latents, in batches of
        `batch`: image start + j gets noise image start + j."""
        start_time, shard = time.perf_counter(), task.shard
        spec = self.spec.for_batch(None, seed=self.seed)
        parts = [to_uint8(self.pipeline.decode(latents)) if self.decode else latents
                 for latents in self.pipeline.sample_batches(spec, task.labels, self.batch, shard.start)]
        return ShardResult(shard, np.concatenate(parts), task.labels, time.perf_counter() - start_time)


def _failure(e: BaseException) -> tuple:
    """An exception as a message for the coordinator: ("error", exit code, text); not a DitrtError:
    a bug, with its traceback."""
    if isinstance(e, DitrtError):
        return "error", e.exit_code, str(e)
    return "error", None, "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _attempt(worker: ShardWorker, task: ShardTask) -> tuple:
    try:
        return "done", worker.run(task)
    except Exception as e:  # the coordinator decides; the worker stays up
        return _failure(e)


# ---- local worker processes -----------------------------------------------------------------------

def _exit_with_parent() -> None:
    """A worker ends when its coordinator does, even when the coordinator was SIGKILLed."""
    import multiprocessing
    from multiprocessing.connection import wait
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)), daemon=True).start()


def _local_worker_main(conn, worker_class, worker_args: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which stops the workers
    _exit_with_parent()
    try:
        worker = worker_class(**worker_args)
    except Exception as e:
        conn.send(_failure(e))
        return
    try:
        conn.send(("ready", worker.backend))
        while (task := conn.recv()) is not None:
            conn.send(_attempt(worker, task))
    except (EOFError, OSError):  # the coordinator is gone
        pass


class LocalPool:
    """Worker processes (multiprocessing, spawn) on this machine; one pipe each. Events:
    (slot, "ready", backend) | (slot, "done", ShardResult) | (slot, "error", code, text) |
    (slot, "died", reason)."""

    def __init__(self, worker_class, worker_args: dict):
        import multiprocessing
        self._ctx = multiprocessing.get_context("spawn")
        self._class, self._args = worker_class, worker_args
        self._workers: dict[int, tuple] = {}  # slot -> (process, connection)
        self._next_slot = 0

    def start(self) -> int:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(target=_local_worker_main, args=(child_end, self._class, self._args),
                                    name=f"ditrt-generate-{self._next_slot}", daemon=True)
        process.start()
        child_end.close()
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._workers[slot] = (process, parent_end)
        return slot

    def submit(self, slot: int, task: ShardTask) -> None:
        try:
            self._workers[slot][1].send(task)
        except OSError:
            pass  # it died: its sentinel reports it

    def events(self, timeout: float) -> list[tuple]:
        from multiprocessing.connection import wait
        handles = {}
        for slot, (process, conn) in self._workers.items():
            handles[conn] = handles[process.sentinel] = slot
        events = []
        for slot in sorted({handles[h] for h in wait(list(handles), timeout)}):
            process, conn = self._workers[slot]
            try:
                while conn.poll():
                    events.append((slot, *conn.recv()))
            except (EOFError, OSError):
                pass
            if not process.is_alive():
                process.join()
                del self._workers[slot]
                events.append((slot, "died", _exit_reason(process.exitcode)))
        return events

    def close(self) -> None:
        for process, conn in self._workers.values():
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for process, conn in self._workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers.clear()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---- Ray actors ----------------------------------------------------------------------------------

class _RayWorker:
    """The Ray actor around a ShardWorker: failures come back as messages, never as exceptions
    (a DitrtError does not always survive Ray's pickling)."""

    def __init__(self, worker_class, worker_args: dict):
        try:
            self.worker, self.failure = worker_class(**worker_args), None
        except Exception as e:
            self.worker, self.failure = None, _failure(e)

    def ready(self) -> tuple:
        return self.failure or ("ready", self.worker.backend)

    def run(self, task: ShardTask) -> tuple:
        return self.failure or _attempt(self.worker, task)


class RayPool:
    """One Ray actor per worker (num_cpus each, num_gpus when asked), on the cluster at `address` or
    a local Ray started here. Same events as LocalPool; an actor that dies is reported as died."""

    def __init__(self, worker_class, worker_args: dict, address: str | None, cpus: float, gpus: float, log):
        try:
            import ray
        except ImportError as e:
            raise InputError(f"--ray needs Ray: pip install 'ditrt[ray]' ({e})") from None
        self._ray = ray
        started = time.perf_counter()
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise StepError(f"cannot start or reach {where}: {type(e).__name__}: {e}") from None
        self.init_seconds = time.perf_counter() - started
        log(f"ray: connected in {self.init_seconds:.1f} s ({ray.cluster_resources()})")
        self._actor_class = ray.remote(_RayWorker).options(num_cpus=cpus, num_gpus=gpus or 0, max_restarts=0,
                                                           max_task_retries=0)
        self._args = (worker_class, worker_args)
        self._actors: dict[int, object] = {}
        self._futures: dict[object, int] = {}  # future -> slot
        self._next_slot = 0

    def start(self) -> int:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        actor = self._actor_class.remote(*self._args)
        self._actors[slot] = actor
        self._futures[actor.ready.remote()] = slot
        return slot

    def submit(self, slot: int, task: ShardTask) -> None:
        self._futures[self._actors[slot].run.remote(task)] = slot

    def events(self, timeout: float) -> list[tuple]:
        ray = self._ray
        if not self._futures:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(list(self._futures), num_returns=1, timeout=timeout)
        events = []
        for future in ready:
            slot = self._futures.pop(future)
            try:
                events.append((slot, *ray.get(future)))
            except ray.exceptions.RayError as e:  # the actor (or its node) died
                self._drop(slot)
                events.append((slot, "died", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return events

    def _drop(self, slot: int) -> None:
        actor = self._actors.pop(slot, None)
        for future in [f for f, s in self._futures.items() if s == slot]:
            del self._futures[future]
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def close(self) -> None:
        for slot in list(self._actors):
            self._drop(slot)
        if self._owns:
            self._ray.shutdown()
