"""`ditrt serve`'s FastAPI app: the routes, the error map (a DitrtError -> its HTTP status), the
request-id and access-log middleware, and the answer (waiting for a result, encoding it). FastAPI
is imported when an app is made. No `from __future__ import annotations`: FastAPI reads the
routes' annotations (`Request`, imported in create_app) as objects."""

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable

from ditrt import runtime
from ditrt.runtime.jobs import outputs
from ditrt.runtime.jobs.batching import Overloaded, StepBatcher
from ditrt.runtime.core.errors import DitrtError, InputError, QueueFull, RequestTimeout, SchedulerClosed, StepError

from .parsing import ClientGone, HttpError, HttpLimits, read_body, shorten
from .service import Service, model_summary

log = logging.getLogger("ditrt.serve")
access_log = logging.getLogger("ditrt.serve.access")

ROUTES = ("/v1/samples", "/v1/health", "/v1/health/live", "/v1/health/ready", "/v1/model", "/metrics")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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
            line = {"request_id": request_id, "method": shorten(scope.get("method"), 16), "path": shorten(path, 120),
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
            note["error"] = shorten(e)
            return error(e.status, str(e), e.headers, close=e.status in (408, 413))
        except ClientGone:
            note["error"] = "the client disconnected; its request was cancelled"
            return Response(status_code=499)
        except DitrtError as e:
            status, rejected, retry = _ERROR_STATUS[next(kind for kind in _ERROR_STATUS if isinstance(e, kind))]
            if rejected:
                service.metrics.rejected.labels(rejected).inc()
            note["error"] = shorten(e)
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
