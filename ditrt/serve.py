"""`ditrt serve`: the batching scheduler (runtime/batching.py) behind an HTTP API (FastAPI under
uvicorn), optionally scaled out on Ray Serve. FastAPI, uvicorn, prometheus_client and ray are
imported here only: `ditrt.runtime` imports without them (pip install 'ditrt[serve]', 'ditrt[ray]').
docs/serving.md is the reference (API, limits, metrics, health, draining, Ray Serve, threads).

Threads: the event loop only reads bodies (bounded in bytes and time), answers and waits; request
set-up (JSON, validation, noise, admission) runs in a small thread pool, every network call in the
scheduler's worker thread (denoiser ticks and decoder batches), PNG encoding in another pool.
"""

import asyncio
import functools
import json
import logging
import math
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

from ditrt import runtime
from ditrt.runtime import outputs
from ditrt.runtime.batching import Overloaded, StepBatcher
from ditrt.runtime.errors import DitrtError, InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError
from ditrt.runtime.request import SampleSpec, sampler_options
from ditrt.runtime.samplers import option_names, samplers_of
from ditrt.runtime.cache import cache_settings
from ditrt.runtime.validate import check_choice, check_int, check_number

log = logging.getLogger("ditrt.serve")
access_log = logging.getLogger("ditrt.serve.access")

DEFAULT_TIMEOUT_S = 300.0  # a request's deadline unless it asks for less (and the most it may ask for)
SAMPLE_FIELDS = ("labels", "steps", "sampler", "cfg_scale", "guidance", "seed", "eta", "format", "timeout", "options",
                 "max_calls", "cache", "cache_options")


BODY_FIELD_OPTIONS = ("eta",)  # sampler options a request gives as fields of their own, not in `options`


ROUTES = ("/v1/samples", "/v1/health", "/v1/health/live", "/v1/health/ready", "/v1/model", "/metrics")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP side's limits (the scheduler's are runtime.batching.Limits); flags of `ditrt serve`."""
    max_body_bytes: int = 64 * 1024  # a request body (labels are max_images ints: a few KB at most)
    body_timeout: float = 10.0  # seconds to receive a whole body (a slow or endless body: 408)
    drain_timeout: float = 30.0  # seconds SIGTERM waits for admitted requests before failing them
    retry_after: int = 1  # Retry-After (s) of a 503 while warming up or draining
    discard_bytes: int = 64 << 20  # a refused (413) body is read and dropped up to this, so the client gets the 413

    def __post_init__(self):
        check_int(self.max_body_bytes, "max_body_bytes", 64, 1 << 30)
        check_number(self.body_timeout, "body_timeout (seconds)", 0, 3600, low_open=True)
        check_number(self.drain_timeout, "drain_timeout (seconds)", 0, 86400)
        check_int(self.retry_after, "retry_after (seconds)", 1, 3600)
        check_int(self.discard_bytes, "discard_bytes", 0, 1 << 40)


class HttpError(Exception):
    """An answer other than 200 decided on the event loop: status, message, headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class ClientGone(Exception):
    """The client disconnected (logged as 499; nothing is sent)."""


# ---- requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRequest:
    """A POST /v1/samples body, checked as far as the HTTP layer knows (fields, types it alone
    uses, bounds): the request's SampleSpec (as sent; None: the manifest's default), which the
    pipeline checks at submit with the Python API's messages, and the HTTP side's fields."""
    spec: SampleSpec
    format: str
    timeout: float | None
    max_calls: int | None

    @classmethod
    def parse(cls, body: bytes, max_timeout: float | None) -> "SampleRequest":
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
            raise InputError(f"invalid request: the body is not JSON ({_short(e)})") from None
        if not isinstance(data, dict):
            raise InputError("invalid request: the body must be a JSON object with 'labels', got "
                             f"{type(data).__name__}")
        unknown = [name for name in data if name not in SAMPLE_FIELDS]
        if unknown:
            raise InputError(f"invalid request: unknown field {_short(unknown[0])!r}; the fields are "
                             f"{', '.join(SAMPLE_FIELDS)}")
        if "labels" not in data:
            raise InputError("invalid request: 'labels' (a list of class labels, one image each) is required")
        fmt = check_choice(data.get("format", "npy"), "format", outputs.FORMATS)
        timeout = data.get("timeout")
        if timeout is not None:
            timeout = check_number(timeout, "timeout (seconds)", 0, max_timeout, low_open=True)
        max_calls = data.get("max_calls")
        if max_calls is not None:
            max_calls = check_int(max_calls, "max_calls (model calls)", 1)
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise InputError(f"options must be an object of sampler options (e.g. {{\"atol\": 1e-6}}), got "
                             f"{type(options).__name__}")
        for name in options:
            check_choice(name, "a sampler option", option_names(exclude=BODY_FIELD_OPTIONS))
        cache, cache_options = data.get("cache", "none"), data.get("cache_options")
        cache_settings(cache, cache_options)  # 400 with the cache's message
        spec = SampleSpec(labels=data["labels"], sampler=data.get("sampler"), steps=data.get("steps"),
                          guidance=data.get("guidance"), cfg_scale=data.get("cfg_scale"), seed=data.get("seed", 0),
                          options=sampler_options(data.get("eta"), options), cache=cache,
                          cache_options=cache_options or {})
        return cls(spec, fmt, timeout, max_calls)

    def submit(self, batcher: StepBatcher):
        return batcher.submit_spec(self.spec, timeout=self.timeout, decode=self.format == "png",
                                   max_calls=self.max_calls)

    def log_fields(self) -> dict:
        """What the access log shows: the image count, never the labels."""
        labels = self.spec.labels
        fields = {"images": len(labels) if isinstance(labels, list) else None, "format": self.format}
        for name in ("steps", "sampler", "cfg_scale", "seed"):
            value = getattr(self.spec, name)
            fields[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                abs(value) < 1e18 else _short(value, 40) if value is not None else None
        return fields


def _short(value, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


async def read_body(receive, headers, limits: HttpLimits) -> bytes:
    """The request body, refused past max_body_bytes (413: by Content-Length at once, else at the
    first byte over; an endless chunked body is never held) or when it takes longer than
    body_timeout (408). Before a 413 the rest of the body is read and discarded, up to
    discard_bytes in all and within body_timeout: a client that sends its whole body before it
    reads (urllib) then gets the answer, where closing on unread data would reset the connection."""
    length = headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):
        raise HttpError(400, "invalid Content-Length")
    deadline = asyncio.get_running_loop().time() + limits.body_timeout
    if length is not None and int(length) > limits.max_body_bytes:
        await _discard(receive, 0, limits, deadline)
        raise HttpError(413, f"the body is {int(length)} bytes; this server takes at most {limits.max_body_bytes} "
                             "(max_body_bytes)")

    async def chunks() -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            part = message.get("body", b"")
            size += len(part)
            more = message.get("more_body", False)
            if size > limits.max_body_bytes:
                raise _Oversize(size, more)
            parts.append(part)
            if not more:
                return b"".join(parts)
    try:
        return await asyncio.wait_for(chunks(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the body did not arrive within {limits.body_timeout:g} s (body_timeout)") from None
    except _Oversize as over:
        if over.more:
            await _discard(receive, over.received, limits, deadline)
        raise HttpError(413, f"the body is over {limits.max_body_bytes} bytes, this server's limit "
                             "(max_body_bytes)") from None


class _Oversize(Exception):
    """A body that went over max_body_bytes while read: the bytes received, and whether more follow."""

    def __init__(self, received: int, more: bool):
        super().__init__(received)
        self.received, self.more = received, more


async def _discard(receive, received: int, limits: HttpLimits, deadline: float) -> None:
    """Read and drop the rest of a refused body: until its end, discard_bytes in all (`received`
    counted), the deadline, or the client's disconnect, whichever comes first (the 413 follows)."""
    loop = asyncio.get_running_loop()
    while received < limits.discard_bytes:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        received += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def result_or_disconnect(batcher: StepBatcher, future, receive):
    """The request's result, or ClientGone (and the request cancelled) when the client leaves."""
    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    waiting, watcher = asyncio.wrap_future(future), asyncio.ensure_future(gone())
    try:
        finished, _ = await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        batcher.cancel(future)
        raise
    finally:
        watcher.cancel()
    if waiting not in finished:
        batcher.cancel(future)
        raise ClientGone()
    return waiting.result()


def encode(result, fmt: str) -> bytes:
    """The response body (runtime/outputs.encode); png: the scheduler has decoded the images."""
    if fmt == "png":
        return outputs.encode(result.latents, "png", lambda _latents: result.images)
    return outputs.encode(result, fmt)


# ---- the service ----------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of their own (one per app: tests and Ray replicas run several)."""

    def __init__(self, service: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ditrt_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("ditrt_request_latency_seconds", "HTTP request latency, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.sample_latency = Histogram("ditrt_sample_latency_seconds", "POST /v1/samples answered 200, by format",
                                        ["format"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("ditrt_rejected_requests", "POST /v1/samples refused before running, by reason",
                                ["reason"], registry=r)
        self.step = Histogram("ditrt_step_seconds", "One scheduler tick: the denoiser call(s) and the sampler math",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Histogram("ditrt_rows_per_call", "Rows per scheduler tick (denoiser call)",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.decode = Histogram("ditrt_decode_seconds", "One decoder batch", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_images = Histogram("ditrt_decode_images_per_call", "Images per decoder batch",
                                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        r.register(_SchedulerGauges(service))

    def observe(self, kind: str, count: int, seconds: float) -> None:
        """The scheduler's observer: called by its worker after each tick and decoder batch."""
        if kind == "step":
            self.step.observe(seconds)
            self.rows.observe(count)
        else:
            self.decode.observe(seconds)
            self.decode_images.observe(count)


class _SchedulerGauges:
    """Gauges read from the scheduler at scrape time."""

    def __init__(self, service: "Service"):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.service.batcher.stats()
        for name, help, value in (
                ("ditrt_queue_depth", "Requests admitted and waiting to start", s["queue_depth"]),
                ("ditrt_requests_in_flight", "Requests running or waiting for the decoder", s["in_flight"]),
                ("ditrt_rows_in_flight", "Rows of the running requests (each model call)", s["in_flight_rows"]),
                ("ditrt_decode_queue_depth", "Finished requests waiting for the decoder", s["decode_queue"]),
                ("ditrt_ready", "1 when warmed up and taking requests", int(self.service.ready())),
                ("ditrt_draining", "1 while draining (SIGTERM)", int(self.service.draining))):
            yield GaugeMetricFamily(name, help, value=value)
        yield CounterMetricFamily("ditrt_engine_calls", "Scheduler ticks (denoiser calls before chunking)",
                                  value=s["backend_calls"])
        limits = GaugeMetricFamily("ditrt_limit", "The server's limits (GET /v1/model)", labels=["name"])
        for name, value in self.service.limits().items():
            if value is not None:  # timeout_s None: no deadline
                limits.add_metric([name], value)
        yield limits


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


# ---- the app --------------------------------------------------------------------------------------

class _Observe:
    """ASGI middleware: a request id (X-Request-ID taken when well-formed, else made; echoed), one
    JSON access-log line per request (escaped: a field cannot forge a line; the image count, never
    the labels), request metrics, and a JSON 500 for anything that escapes a handler (a bug, logged
    with its traceback)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = request_id, {}
        start, status = time.perf_counter(), None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            if status is None:
                await _send_json(send_with_id, 500, {"error": f"internal error (request {request_id}); see the "
                                                              "server log"})
        finally:
            seconds = time.perf_counter() - start
            path = scope.get("path", "")
            route = path if path in ROUTES else "other"
            service = getattr(scope["app"].state, "service", None) if "app" in scope else None
            if service is not None:
                service.metrics.requests.labels(route, str(status or 499)).inc()
                service.metrics.latency.labels(route).observe(seconds)
            line = {"request_id": request_id, "method": _short(scope.get("method"), 16), "path": _short(path, 120),
                    "status": status or 499, "seconds": round(seconds, 6),
                    "client": scope["client"][0] if scope.get("client") else None, **state["log"]}
            access_log.info(json.dumps(line, ensure_ascii=True, default=str))


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


# A request's DitrtError -> (HTTP status, the `rejected` metric's reason or None, answer Retry-After).
# Checked in this order: the first matching kind wins (Overloaded is a QueueFull, both InputErrors).
_ERROR_STATUS = {
    Overloaded: (429, "deadline", True),
    QueueFull: (429, "queue_full", True),
    InputError: (400, None, False),
    RequestTimeout: (504, None, False),
    SchedulerClosed: (503, "draining", True),
    StepError: (500, None, False),
}


def create_app(batcher: StepBatcher | Callable[[], StepBatcher], http: HttpLimits = HttpLimits()):
    """The FastAPI app over a scheduler, or over a function that makes one when the app starts (a
    Ray Serve replica: the app's lifespan owns its scheduler, no module state; it is warm before
    the replica takes requests). The app's lifespan shutdown drains the scheduler."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        made = not isinstance(batcher, StepBatcher)
        scheduler = await asyncio.to_thread(batcher) if made else batcher
        app.state.service = service = Service(scheduler, http)
        if made:
            await asyncio.to_thread(_wait_ready, scheduler)
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="ditrt", version=runtime.__version__, lifespan=lifespan)
    app.add_middleware(_Observe)

    def error(status: int, message: str, headers: dict | None = None, close: bool = False):
        headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error(400, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.get("/v1/health")
    async def health(request: Request):
        service: Service = request.app.state.service
        s = service.batcher.stats()
        status = ("draining" if service.draining else "closed" if s["closed"] else
                  "ok" if service.batcher.ready else "warming")
        return {"status": status, "queue_depth": s["queue_depth"], "in_flight": s["in_flight"]}

    @app.get("/v1/health/live")
    async def live(request: Request):
        """Alive while the scheduler's worker runs (a dead worker: restart the process)."""
        service: Service = request.app.state.service
        if service.batcher.alive or service.draining:
            return {"status": "live"}
        return JSONResponse({"status": "dead", "error": "the scheduler's worker thread has stopped"}, 503)

    @app.get("/v1/health/ready")
    async def ready(request: Request):
        """Ready: loaded, warmed with engine calls, not draining."""
        service: Service = request.app.state.service
        refusal = service.refusal()
        if refusal is None:
            return {"status": "ready"}
        return JSONResponse({"status": "draining" if service.draining else "not ready", "error": str(refusal)}, 503,
                            headers=refusal.headers)

    @app.get("/v1/model")
    async def model(request: Request):
        return model_summary(request.app.state.service)

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/samples")
    async def samples(request: Request):
        service: Service = request.app.state.service
        note, start = request.state.log, time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            refusal = service.refusal()
            if refusal is not None:
                service.metrics.rejected.labels("draining" if service.draining else "not_ready").inc()
                raise refusal
            body = await read_body(request.receive, request.headers, http)
            with service.handling():
                fmt, future = await loop.run_in_executor(service.setup_pool, service.submit, body, note)
                result = await result_or_disconnect(service.batcher, future, request.receive)
                content = await loop.run_in_executor(service.encode_pool, encode, result, fmt)
        except HttpError as e:
            if e.status == 413:
                service.metrics.rejected.labels("body_too_large").inc()
            note["error"] = _short(e)
            return error(e.status, str(e), e.headers, close=e.status in (408, 413))
        except ClientGone:
            note["error"] = "the client disconnected; its request was cancelled"
            return Response(status_code=499)
        except DitrtError as e:
            status, rejected, retry = _ERROR_STATUS[next(kind for kind in _ERROR_STATUS if isinstance(e, kind))]
            if rejected:
                service.metrics.rejected.labels(rejected).inc()
            note["error"] = _short(e)
            retry_after = max(1, math.ceil(e.retry_after)) if isinstance(e, Overloaded) else http.retry_after
            return error(status, str(e), {"Retry-After": str(retry_after)} if retry else None)
        service.metrics.sample_latency.labels(fmt).observe(time.perf_counter() - start)
        note["bytes"] = len(content)
        return Response(content, media_type=outputs.FORMATS[fmt])

    return app


def _wait_ready(batcher: StepBatcher, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not batcher.ready and batcher.alive and time.monotonic() < deadline:
        if batcher.stats()["warm_up_error"]:
            return
        time.sleep(0.05)


# ---- running it -----------------------------------------------------------------------------------

def make_batcher(artifact, backend: str = "auto", precision: str | None = None, threads: int | None = None,
                 verify: bool = True, allow_plan_host_code: bool = False, decoder_precision: str | None = None,
                 policy: str = "step", timeout: float | None = DEFAULT_TIMEOUT_S, warm_up: bool = True,
                 public_key=None, **limits) -> StepBatcher:
    """Load the artifact as `ditrt sample` does (the same options, `public_key` included: an
    artifact whose signature does not verify is refused before the port opens) and start its
    scheduler. `limits`: runtime.batching.Limits fields (max_batch, max_rows, max_images,
    max_steps, max_queue, decode_batch); None: sized for the backend."""
    pipe = runtime.load(artifact, backend=backend, precision=precision, threads=threads,
                        max_batch=limits.get("max_batch"), allow_plan_host_code=allow_plan_host_code, verify=verify,
                        decoder_precision=decoder_precision, public_key=public_key)
    return StepBatcher(pipe, policy=policy, timeout=timeout, warm_up=warm_up, **limits)


def serve_uvicorn(batcher: StepBatcher, host: str = "127.0.0.1", port: int = 8000,
                  http: HttpLimits = HttpLimits()) -> None:
    """Serve until SIGTERM or SIGINT, then drain: new requests get 503 + Retry-After, admitted
    ones finish within http.drain_timeout, and this returns (exit 0). A second signal stops at once."""
    import uvicorn

    app = create_app(batcher, http)

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):  # uvicorn's signal handler: drain first, then exit
            service = getattr(app.state, "service", None)
            if self.draining or service is None:
                self.force_exit = self.draining
                self.should_exit = True
                if self.draining:
                    threading.Thread(target=batcher.close, kwargs={"drain": False}, daemon=True).start()
                return
            self.draining = True
            threading.Thread(target=self._drain, args=(service,), name="ditrt-drain", daemon=True).start()

        def _drain(self, service: Service):
            service.drain()
            self.should_exit = True

    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        batcher.close(drain=False)


def require_ray_serve() -> None:
    """Ray Serve importable, or an InputError naming the extra to install (before anything loads)."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise InputError(f"--ray needs Ray Serve, which is not installed: pip install 'ditrt[ray]' ({e})") from None


def ray_app(artifact, replicas: int = 1, num_cpus: float = 0.5, http: HttpLimits = HttpLimits(), **options):
    """The Ray Serve application: the same FastAPI app, one scheduler per replica, made by the app's
    lifespan in the replica (no module state); a GPU per replica where the cluster has GPUs. Ray
    Serve drains a replica it stops: no new requests are routed to it, its requests get
    graceful_shutdown_timeout_s (= http.drain_timeout), then the lifespan shutdown closes the
    scheduler. Call after ray.init."""
    import ray
    from ray import serve

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    actor = {"num_gpus": 1} if gpus else {"num_cpus": num_cpus}
    app = create_app(functools.partial(make_batcher, str(artifact), **options), http)

    @serve.deployment(name="ditrt", num_replicas=replicas, ray_actor_options=actor,
                      graceful_shutdown_timeout_s=http.drain_timeout, graceful_shutdown_wait_loop_s=0.5,
                      max_ongoing_requests=1024)  # the replica's own admission answers 429, not Ray's queue
    @serve.ingress(app)
    class DitrtReplica:
        pass

    return DitrtReplica.bind()


def serve_ray(artifact, address=None, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
              blocking: bool = True, http: HttpLimits = HttpLimits(), **options) -> None:
    """Deploy on Ray Serve; with `blocking`, until SIGTERM or SIGINT, then delete the application
    (Ray drains each replica, see ray_app) and shut Serve down."""
    import signal

    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_app(artifact, replicas, http=http, **options), name="ditrt", route_prefix="/")
    if not blocking:
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    serve.delete("ditrt")
    serve.shutdown()


def run(artifact, host: str = "127.0.0.1", port: int = 8000, use_ray: bool = False, replicas: int = 1,
        address: str | None = None, http: HttpLimits = HttpLimits(), log: Callable[[str], None] = print,
        **options) -> None:
    """`ditrt serve`: load (errors before the port opens), say where, serve until SIGTERM."""
    if not use_ray and (replicas != 1 or address is not None):
        raise InputError("replicas and address apply to Ray Serve only (use_ray, --ray)")
    if use_ray:
        check_int(replicas, "replicas", 1, 4096)
        require_ray_serve()
        log(f"ditrt serve on Ray Serve: {replicas} replica(s) at http://{host}:{port}")
        serve_ray(artifact, address=address, replicas=replicas, host=host, port=port, http=http, **options)
        return
    batcher = make_batcher(artifact, **options)
    limits = ", ".join(f"{k} {v}" for k, v in batcher.limits.to_dict().items())
    log(f"ditrt serve {artifact} on {batcher.pipeline.backend.name} (policy {batcher.policy}; {limits}; "
        f"max_body_bytes {http.max_body_bytes}, discard_bytes {http.discard_bytes}) at http://{host}:{port}")
    serve_uvicorn(batcher, host, port, http)
