"""`ditrt serve`'s request side: the HTTP limits, reading a bounded body, and parsing a
POST /v1/samples body into the request's SampleSpec (runtime/sampling/request.py) and its HTTP fields."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from ditrt.runtime.jobs import outputs
from ditrt.runtime.jobs.batching import StepBatcher
from ditrt.runtime.execution.cache import cache_settings
from ditrt.runtime.core.errors import InputError
from ditrt.runtime.sampling.request import SampleSpec, sampler_options
from ditrt.runtime.sampling.samplers import option_names
from ditrt.runtime.core.validate import check_choice, check_int, check_number

DEFAULT_TIMEOUT_S = 300.0  # a request's deadline unless it asks for less (and the most it may ask for)
SAMPLE_FIELDS = ("labels", "steps", "sampler", "cfg_scale", "guidance", "seed", "eta", "format", "timeout", "options",
                 "max_calls", "cache", "cache_options")

BODY_FIELD_OPTIONS = ("eta",)  # sampler options a request gives as fields of their own, not in `options`


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP side's limits (the scheduler's are runtime.jobs.batching.Limits); flags of `ditrt serve`."""
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
            raise InputError(f"invalid request: the body is not JSON ({shorten(e)})") from None
        if not isinstance(data, dict):
            raise InputError("invalid request: the body must be a JSON object with 'labels', got "
                             f"{type(data).__name__}")
        unknown = [name for name in data if name not in SAMPLE_FIELDS]
        if unknown:
            raise InputError(f"invalid request: unknown field {shorten(unknown[0])!r}; the fields are "
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
                abs(value) < 1e18 else shorten(value, 40) if value is not None else None
        return fields


def shorten(value, limit: int = 200) -> str:
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
