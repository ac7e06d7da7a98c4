"""`ditrt serve`'s launchers: load an artifact and start its scheduler, serve it under uvicorn
with draining on SIGTERM, or deploy it on Ray Serve (Ray imported for a Ray run only)."""
from __future__ import annotations

import functools
import threading
from dataclasses import replace
from typing import Callable

from ditrt.runtime.jobs.batching import StepBatcher
from ditrt.runtime.core.errors import InputError
from ditrt.runtime.execution.pipeline import load_pipeline
from ditrt.runtime.sampling.request import LoadOptions
from ditrt.runtime.core.validate import check_int

from .app import create_app
from .parsing import DEFAULT_TIMEOUT_S, HttpLimits
from .service import Service


def make_batcher(artifact, load: LoadOptions = LoadOptions(), policy: str = "step",
                 timeout: float | None = DEFAULT_TIMEOUT_S, warm_up: bool = True, **limits) -> StepBatcher:
    """Load the artifact as `ditrt sample` does (the same options, `public_key` included: an
    artifact whose signature does not verify is refused before the port opens) and start its
    scheduler. `limits`: runtime.jobs.batching.Limits fields (max_batch, max_rows, max_images,
    max_steps, max_queue, decode_batch); None: sized for the backend. The denoiser's calls are at
    most max_batch rows (the load's max_batch is the scheduler's)."""
    pipe = load_pipeline(artifact, replace(load, max_batch=limits.get("max_batch")))
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
