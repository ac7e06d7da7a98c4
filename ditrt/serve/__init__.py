"""`ditrt serve`: the batching scheduler (runtime/jobs/batching.py) behind an HTTP API (FastAPI under
uvicorn), optionally scaled out on Ray Serve. FastAPI, uvicorn, prometheus_client and ray are
imported in this package only, and only when an app is made or launched: `ditrt.runtime` imports
without them (pip install 'ditrt[serve]', 'ditrt[ray]'). docs/serving.md is the reference (API,
limits, metrics, health, draining, Ray Serve, threads).

One module per job: `parsing` (limits, bodies, request -> SampleSpec), `app` (the FastAPI app and
its error map), `metrics`, `service` (the scheduler, its pools and draining), `launch` (uvicorn and
Ray Serve).

Threads: the event loop only reads bodies (bounded in bytes and time), answers and waits; request
set-up (JSON, validation, noise, admission) runs in a small thread pool, every network call in the
scheduler's worker thread (denoiser ticks and decoder batches), PNG encoding in another pool.
"""
from ditrt.runtime.jobs import outputs  # noqa: F401  (tests patch outputs.encode through this package)

from .app import ROUTES, create_app, encode, result_or_disconnect
from .launch import make_batcher, ray_app, require_ray_serve, run, serve_ray, serve_uvicorn
from .metrics import Metrics
from .parsing import (BODY_FIELD_OPTIONS, DEFAULT_TIMEOUT_S, SAMPLE_FIELDS, ClientGone, HttpError, HttpLimits,
                      SampleRequest, read_body)
from .service import Service, model_summary

__all__ = ["ROUTES", "create_app", "encode", "result_or_disconnect", "make_batcher", "ray_app", "require_ray_serve",
           "run", "serve_ray", "serve_uvicorn", "Metrics", "BODY_FIELD_OPTIONS", "DEFAULT_TIMEOUT_S", "SAMPLE_FIELDS",
           "ClientGone", "HttpError", "HttpLimits", "SampleRequest", "read_body", "Service", "model_summary"]
