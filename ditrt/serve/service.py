"""`ditrt serve`'s service: one app's scheduler, thread pools, metrics and draining, and the
/v1/model summary."""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict

from ditrt import runtime
from ditrt.runtime.jobs.batching import StepBatcher
from ditrt.runtime.sampling.samplers import option_names, samplers_of

from .metrics import Metrics
from .parsing import BODY_FIELD_OPTIONS, HttpError, HttpLimits, SampleRequest

log = logging.getLogger("ditrt.serve")


class Service:
    """One app's state: the scheduler, the pools, the metrics, the draining flag."""

    def __init__(self, batcher: StepBatcher, http: HttpLimits):
        self.batcher, self.http = batcher, http
        self.draining = False
        self.setup_pool = ThreadPoolExecutor(2, thread_name_prefix="ditrt-setup")
        self.encode_pool = ThreadPoolExecutor(2, thread_name_prefix="ditrt-encode")
        self.metrics = Metrics(self)
        batcher.observer = self.metrics.observe
        self._handlers = 0
        self._idle = threading.Condition()

    def ready(self) -> bool:
        return self.batcher.ready and not self.draining and not self.batcher.closed

    def limits(self) -> dict:
        return {**self.batcher.limits.to_dict(), "max_body_bytes": self.http.max_body_bytes,
                "body_timeout_s": self.http.body_timeout, "discard_bytes": self.http.discard_bytes,
                "timeout_s": self.batcher.default_timeout,
                "drain_timeout_s": self.http.drain_timeout}

    def refusal(self) -> HttpError | None:
        """503 while warming up, draining or closed."""
        retry = {"Retry-After": str(self.http.retry_after)}
        if self.draining or self.batcher.closed:
            return HttpError(503, "the server is shutting down (draining); retry on another instance", retry)
        if not self.batcher.ready:
            problem = self.batcher.stats()["warm_up_error"]
            return HttpError(503, f"the engine failed its warm-up call: {problem}" if problem else
                             "the server is warming up its engines; retry shortly", retry)
        return None

    def submit(self, body: bytes, note: dict):
        """(format, future): parse, validate, admit (in the set-up pool, off the event loop)."""
        request = SampleRequest.parse(body, self.batcher.default_timeout)
        note.update(request.log_fields())
        return request.format, request.submit(self.batcher)

    @contextmanager
    def handling(self):
        """Counts the sample requests between admission and their answer (the drain waits for them)."""
        with self._idle:
            self._handlers += 1
        try:
            yield
        finally:
            with self._idle:
                self._handlers -= 1
                self._idle.notify_all()

    def drain(self, answer_timeout: float = 5.0) -> bool:
        """Stop admitting (503), finish what was admitted within drain_timeout (the rest fails:
        503), wait for those answers to go out. True when nothing admitted was failed."""
        self.draining = True
        stats = self.batcher.stats()
        log.info(json.dumps({"event": "draining", "in_flight": stats["in_flight"], "waiting": stats["queue_depth"],
                             "drain_timeout_s": self.http.drain_timeout}))
        finished = self.batcher.close(drain=True, timeout=self.http.drain_timeout)
        deadline = time.monotonic() + answer_timeout
        with self._idle:
            while self._handlers and time.monotonic() < deadline:
                self._idle.wait(0.05)
        log.info(json.dumps({"event": "drained", "all_finished": finished}))
        return finished

    def close(self) -> None:
        if not self.batcher.closed:
            self.drain()
        self.setup_pool.shutdown(wait=False)
        self.encode_pool.shutdown(wait=False)


def model_summary(service: Service) -> dict:
    batcher = service.batcher
    pipe, m = batcher.pipeline, batcher.pipeline.manifest
    decoder = getattr(pipe, "decoder", None)
    samplers = samplers_of(m.family.name)
    return {"model": asdict(m.model), "family": m.family.name, "latent_shape": list(pipe.latent_shape),
            m.family.process_section: asdict(m.process), "guidance": m.guidance.to_dict(),
            "noise": runtime.NOISE_VERSION, "defaults": m.defaults.to_dict(), "networks": list(m.networks),
            "samplers": list(samplers),
            "sampler_options": {s: option_names([e], BODY_FIELD_OPTIONS) for s, e in samplers.items()
                                if option_names([e], BODY_FIELD_OPTIONS)},
            "backend": pipe.backend.name, "decoder": decoder.name if decoder is not None else None,
            "formats": ["npy", "png"] if decoder is not None else ["npy"],
            "max_batch": batcher.limits.max_batch, "policy": batcher.policy, "limits": service.limits(),
            "ready": service.ready(), "stats": batcher.stats()}
