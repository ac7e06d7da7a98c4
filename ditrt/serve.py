"""`ditrt serve`: the batching scheduler behind an HTTP API (FastAPI under uvicorn), optionally
scaled out on Ray Serve. FastAPI, uvicorn and ray are imported here only: `ditrt.runtime` imports
without them (pip install 'ditrt[serve]', 'ditrt[ray]').

API: POST /v1/samples {labels, steps, sampler, cfg_scale, guidance, seed, eta, format, timeout}
-> .npy body (np.save of the latents (N, C, H, W) float32, exactly `Pipeline.sample`'s); GET
/v1/health; GET /v1/model. 400: bad request (the Python API's InputError text); 429 + Retry-After:
queue full; 504: timeout; 500: a failed step; 499 (logged only): the client went away, and its
request was cancelled.
"""

import asyncio
import logging
import time
from dataclasses import asdict


from ditrt import runtime
from ditrt.runtime import outputs
from ditrt.runtime.batching import StepBatcher
from ditrt.runtime.errors import InputError, QueueFull, RequestTimeout, StepError

log = logging.getLogger("ditrt.serve")
_REPLICA_BATCHER: StepBatcher | None = None  # the batcher of this process's Ray Serve replica
RETRY_AFTER_S = 1


def check_png(pipeline) -> None:
    """InputError (a 400) unless this pipeline can answer format "png"; checked before queueing."""
    if getattr(pipeline, "decoder", None) is None:
        raise InputError("format 'png' needs an artifact with a decoder network (this one has only "
                         f"{', '.join(pipeline.manifest.networks)}); ask for format 'npy' (the latents)")


def model_summary(batcher: StepBatcher) -> dict:
    pipe = batcher.pipeline
    m = pipe.manifest
    return {"model": asdict(m.model), "family": m.family.name, "latent_shape": list(pipe.latent_shape),
            m.family.process_section: asdict(m.process), "guidance": m.guidance.to_dict(), "noise": runtime.NOISE_VERSION,
            "defaults": m.defaults.to_dict(), "networks": list(m.networks), "samplers": [s for s, e in runtime.SAMPLERS.items() if e.family == m.family.name],
            "backend": pipe.backend.name, "max_batch": batcher.max_batch, "policy": batcher.policy,
            "stats": batcher.stats()}


def create_app(batcher: StepBatcher | None = None):
    """The FastAPI app over a batcher (None: the Ray Serve replica's, set when it starts)."""
    from typing import Literal, Optional, Union

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

    class SampleBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        labels: list[StrictInt]
        steps: Optional[Union[StrictInt, StrictStr]] = None
        sampler: Optional[StrictStr] = None
        cfg_scale: Optional[Union[StrictInt, StrictFloat]] = None
        guidance: Optional[StrictStr] = None
        seed: StrictInt = 0
        eta: Optional[Union[StrictInt, StrictFloat]] = None
        format: Literal["npy", "png"] = "npy"
        timeout: Optional[Union[StrictInt, StrictFloat]] = None

    app = FastAPI(title="ditrt", version=runtime.__version__)
    app.state.batcher = batcher

    def current() -> StepBatcher:
        import ditrt.serve as module  # by name: a Ray replica sets the module's global
        b = app.state.batcher or module._REPLICA_BATCHER
        if b is None:
            raise StepError("no scheduler is running in this process")
        return b

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        message = "invalid request: " + "; ".join(parts)
        log.info("%s %s 400 %s", request.method, request.url.path, message)
        return error(400, message)

    @app.get("/v1/health")
    async def health():
        s = current().stats()
        return {"status": "closed" if s["closed"] else "ok", "queue_depth": s["queue_depth"],
                "in_flight": s["in_flight"]}

    @app.get("/v1/model")
    async def model():
        return model_summary(current())

    @app.post("/v1/samples")
    async def samples(body: SampleBody, request: Request):
        b, start = current(), time.perf_counter()
        what = f"labels={body.labels} steps={body.steps} sampler={body.sampler} cfg={body.cfg_scale}"

        def done(status: int, note: str = ""):
            log.info("POST /v1/samples %d %.3fs %s %s", status, time.perf_counter() - start, what, note)

        try:
            if body.format == "png":
                check_png(b.pipeline)
            future = b.submit(body.labels, body.steps, body.sampler, body.cfg_scale, body.guidance, body.seed,
                              body.eta, timeout=body.timeout)
        except QueueFull as e:
            done(429, str(e))
            return error(429, str(e), {"Retry-After": str(RETRY_AFTER_S)})
        except InputError as e:
            done(400, str(e))
            return error(400, str(e))
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                finished, _ = await asyncio.wait({waiting}, timeout=0.05)
                if finished:
                    break
                if await request.is_disconnected():
                    b.cancel(future)
                    done(499, "client disconnected: cancelled")
                    return Response(status_code=499)
            latents = waiting.result()
        except asyncio.CancelledError:
            b.cancel(future)
            done(499, "cancelled")
            raise
        except RequestTimeout as e:
            done(504, str(e))
            return error(504, str(e))
        except InputError as e:
            done(400, str(e))
            return error(400, str(e))
        except StepError as e:
            done(500, str(e))
            return error(500, str(e))
        try:
            content = outputs.encode(latents, body.format, b.pipeline.decode)
        except InputError as e:
            done(400, str(e))
            return error(400, str(e))
        media = outputs.FORMATS[body.format]
        done(200, f"-> {tuple(latents.shape)}")
        return Response(content, media_type=media)

    return app


def make_batcher(artifact, backend="auto", threads=None, max_batch=None, max_queue=64, policy="step",
                 timeout=None) -> StepBatcher:
    pipe = runtime.load(artifact, backend=backend, threads=threads)
    return StepBatcher(pipe, max_batch=max_batch, max_queue=max_queue, policy=policy, timeout=timeout)


def serve_uvicorn(batcher: StepBatcher, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn
    try:
        uvicorn.run(create_app(batcher), host=host, port=port, log_level="warning")
    finally:
        batcher.close(drain=False)


def ray_app(artifact, replicas=1, backend="auto", threads=None, max_batch=None, max_queue=64, policy="step",
            timeout=None, num_cpus=0.5):
    """The Ray Serve application: the same FastAPI app, one scheduler per replica; a GPU per
    replica where the cluster has GPUs. Call after ray.init."""
    import ray
    from ray import serve

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    options = {"num_gpus": 1} if gpus else {"num_cpus": num_cpus}
    app = create_app(None)
    artifact = str(artifact)

    @serve.deployment(name="ditrt", num_replicas=replicas, ray_actor_options=options)
    @serve.ingress(app)
    class DitrtReplica:
        def __init__(self):
            import ditrt.serve as module
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
            module._REPLICA_BATCHER = make_batcher(artifact, backend, threads, max_batch, max_queue, policy, timeout)

    return DitrtReplica.bind()


def serve_ray(artifact, address=None, replicas=1, host="127.0.0.1", port=8000, blocking=True, **options):
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ray_app(artifact, replicas, **options), name="ditrt", route_prefix="/", blocking=blocking)
