"""The HTTP service: real uvicorn on a free loopback port, real HTTP with httpx, real ORT sessions."""
from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP tests need fastapi (pip install 'ditrt[serve]')")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from ditrt import runtime  # noqa: E402
from ditrt.runtime.batching import StepBatcher  # noqa: E402
from ditrt.serve import create_app  # noqa: E402

from test_batching import Gate, alone, mixed_requests  # noqa: E402
from helpers import read_png  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, batcher):
        self.batcher, self.port = batcher, free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(batcher), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.batcher.close(drain=False)


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return runtime.load(tiny_artifact, backend="onnxruntime-fp32", threads=1)


def as_json(req: dict) -> dict:
    body = {"labels": list(req["class_labels"]), "steps": req.get("num_steps"), "sampler": req.get("sampler"),
            "cfg_scale": req.get("cfg_scale"), "guidance": req.get("guidance"), "seed": req.get("seed", 0),
            "eta": req.get("eta")}
    return {k: v for k, v in body.items() if v is not None}


def latents(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    return np.load(io.BytesIO(response.content))


def test_http_threads_bit_identical(pipe):
    reqs = [r for r in mixed_requests(pipe) if "noise" not in r]  # injected noise is a Python-API feature
    expected = [alone(pipe, r) for r in reqs]
    with Server(StepBatcher(pipe)) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        with ThreadPoolExecutor(len(reqs)) as ex:
            got = list(ex.map(lambda r: latents(client.post("/v1/samples", json=as_json(r))), reqs))
        stats = client.get("/v1/model").json()["stats"]
    for e, g in zip(expected, got):
        assert g.dtype == np.float32 and np.array_equal(e, g)
    assert stats["completed"] == len(reqs)


def test_health_and_model(pipe):
    with Server(StepBatcher(pipe, max_batch=16)) as s:
        assert httpx.get(s.url + "/v1/health").json() == {"status": "ok", "queue_depth": 0, "in_flight": 0}
        m = httpx.get(s.url + "/v1/model").json()
        assert m["networks"] == ["denoiser"] and m["backend"] == "onnxruntime-fp32" and m["max_batch"] == 16
        assert set(m["samplers"]) >= {"ddpm", "ddim", "dpm++2m"} and m["defaults"]["steps"] == 250
        assert m["model"]["num_classes"] == pipe.manifest.model.num_classes


@pytest.mark.parametrize("body,message", [
    ({"labels": [1], "sampler": "nope"}, None),
    ({"labels": [999]}, None),
    ({"labels": [1], "sampler": "ddpm", "eta": 0.5}, None),
    ({"labels": "1"}, "invalid request: labels"),
    ({"labels": [1], "seed": "x"}, "invalid request: seed"),
    ({"labels": [1.5]}, "invalid request: labels"),
    ({"labels": [1], "bogus": 1}, "invalid request: bogus"),
    ({"labels": [1], "format": "png"}, "format 'png' needs an artifact with a decoder"),
])
def test_bad_requests_400_with_message(pipe, body, message):
    if message is None:  # the Python API's own message
        with pytest.raises(runtime.InputError) as e:
            pipe.sample(body["labels"], sampler=body.get("sampler"), eta=body.get("eta"), progress=False)
        message = str(e.value)
    with Server(StepBatcher(pipe)) as s:
        r = httpx.post(s.url + "/v1/samples", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
        r = httpx.post(s.url + "/v1/samples", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "invalid request" in r.json()["error"]
        assert httpx.get(s.url + "/v1/health").status_code == 200  # still serving


def test_queue_full_429(pipe):
    gate = Gate(pipe.backend)
    gate.open.clear()
    b = StepBatcher(runtime.Pipeline(gate, pipe.manifest), max_queue=1, policy="serial")
    with Server(b) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        body = {"labels": [1], "steps": 3, "sampler": "ddim"}
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(client.post, "/v1/samples", json=body)
            time.sleep(0.3)
            second = ex.submit(client.post, "/v1/samples", json=body)
            time.sleep(0.3)
            r = client.post("/v1/samples", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "queue is full (1 requests waiting, the limit)" in r.json()["error"]
            gate.open.set()
            assert latents(first.result()).shape == (1, *pipe.latent_shape)
            assert latents(second.result()).shape == (1, *pipe.latent_shape)


def test_disconnect_cancels(pipe):
    gate = Gate(pipe.backend)
    b = StepBatcher(runtime.Pipeline(gate, pipe.manifest))
    with Server(b) as s:
        gate.open.clear()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/samples", json={"labels": [1], "steps": 200, "sampler": "ddim"}, timeout=0.5)
        gate.open.set()
        for _ in range(100):
            if b.stats()["cancelled"] == 1:
                break
            time.sleep(0.05)
        stats = b.stats()
        assert stats["cancelled"] == 1 and stats["in_flight"] == 0 and stats["backend_calls"] < 50


def test_timeout_504(pipe):
    gate = Gate(pipe.backend)
    gate.open.clear()
    with Server(StepBatcher(runtime.Pipeline(gate, pipe.manifest))) as s:
        threading.Timer(0.6, gate.open.set).start()
        r = httpx.post(s.url + "/v1/samples", json={"labels": [1], "steps": 20, "sampler": "ddim", "timeout": 0.3},
                       timeout=30)
        assert r.status_code == 504 and "timed out after 0.3 s" in r.json()["error"]


def test_backend_failure_500_then_serves(pipe):
    gate = Gate(pipe.backend, fail_on=2)
    with Server(StepBatcher(runtime.Pipeline(gate, pipe.manifest))) as s:
        r = httpx.post(s.url + "/v1/samples", json={"labels": [1], "steps": 4, "sampler": "ddim"}, timeout=30)
        assert r.status_code == 500 and "injected failure on call 2" in r.json()["error"]
        r = httpx.post(s.url + "/v1/samples", json={"labels": [1], "steps": 4, "sampler": "ddim", "seed": 3}, timeout=30)
        assert np.array_equal(latents(r), alone(pipe, dict(class_labels=[1], num_steps=4, sampler="ddim", seed=3)))


@pytest.mark.slow
def test_ray_serve_one_request(tiny_artifact):
    ray = pytest.importorskip("ray", reason="Ray Serve tests need ray[serve] (pip install 'ditrt[ray]')")
    from ray import serve

    from ditrt.serve import ray_app
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(tiny_artifact, replicas=1, backend="onnxruntime-fp32", threads=1), name="ditrt",
                  route_prefix="/")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/samples", json={"labels": [3], "steps": 4, "sampler": "ddim",
                                                                     "seed": 2}, timeout=120)
        pipe = runtime.load(tiny_artifact, backend="onnxruntime-fp32", threads=1)
        assert np.array_equal(latents(r), alone(pipe, dict(class_labels=[3], num_steps=4, sampler="ddim", seed=2)))
        assert httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()["backend"] == "onnxruntime-fp32"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_png_format_returns_the_decoded_grid(tiny_artifact_with_vae):
    from ditrt.runtime import images
    vae_pipe = runtime.load(tiny_artifact_with_vae, backend="onnxruntime-fp32", threads=1)
    with Server(StepBatcher(vae_pipe)) as server:
        r = httpx.post(f"{server.url}/v1/samples", json={"labels": [3, 7], "steps": 5, "seed": 2, "format": "png"},
                       timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    expected = images.grid(vae_pipe.decode(vae_pipe.sample([3, 7], num_steps=5, seed=2, progress=False)))
    np.testing.assert_array_equal(read_png(io.BytesIO(r.content)), expected)
