"""`ditrt serve` under load: a real HTTP client (httpx, threads) on loopback against a `ditrt serve`
subprocess the bench starts on a free port with its default limits, once per scenario.

1. The three batching policies under a mixed load (closed loop, bounded in count):
   - step: continuous step-level batching (requests join and leave between backend calls)
   - serial: one request at a time, FIFO
   - request: whole-request batching (start the waiting requests together, none joins until all end)
   `--long-clients` clients each send `--long-requests` long requests (ddpm, `--long-steps` steps,
   cfg 4.0) and `--short-clients` clients each send `--short-requests` short ones (ddim,
   `--short-steps` steps, cfg 1.5 or 4.0 alternating), one image per request.
2. png mix (policy step): `--png-clients` clients asking for 4-image PNG grids (decoded by the
   scheduler's decode stage, encoded in a thread pool) beside `--npy-clients` clients asking for
   one-image latents, while a probe measures GET /v1/health every 20 ms.
3. The flood of issue 21 (policy step): `--flood-requests` requests {"labels": [1, 2, 3, 4],
   "steps": 999, "timeout": 25} sent `--flood-pace` s apart (open loop, each on its own thread).
   Target: >= 90% of the admitted requests finish within their timeout, and the rest are refused
   early with 429 + Retry-After.

Each row: served / rejected (429) / timed-out (504) / other counts, p50/p95 latency per class, the
server's peak RSS (VmHWM). Models: scenarios 1-2 a DiT-S/2 random-init at 128 px with the example
VAE as its decoder (latent 16x16: compute dominates on 2 cores while the bench stays within minutes);
the flood the example artifact (`ditrt export --example`: the tiny DiT and its VAE), as in the
issue. Both are exported here unless --artifact / --flood-artifact are given.

    python bench/serve_bench.py --threads 2
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_VAE = ROOT / "exporter" / "data" / "example_vae"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A `ditrt serve` subprocess with its defaults (plus --policy / --threads), ready to take requests."""

    def __init__(self, artifact: Path, policy: str, threads: int):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ditrt.cli", "serve", str(artifact), "--port", str(self.port), "--policy", policy,
               "--backend", "onnxruntime-fp32", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/v1/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"ditrt serve exited with {self.proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.1)
        self.proc.kill()
        raise SystemExit("ditrt serve was not ready in 120 s")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: the server drains, then exits 0
        return self.proc.wait(60)


def post(http, body: dict, cls: str, records: list, lock) -> None:
    t0 = time.perf_counter()
    try:
        status = http.post("/v1/samples", json=body).status_code
    except Exception as e:  # a transport error is a result too (it must not happen)
        status = type(e).__name__
    with lock:
        records.append({"class": cls, "latency_s": time.perf_counter() - t0, "status": status})


def summarize(name: str, records: list[dict], wall: float, served: Served, classes: list[str], stats: dict) -> dict:
    statuses = [r["status"] for r in records]
    ok, timed_out = statuses.count(200), statuses.count(504)
    row = {"scenario": name, "requests": len(records), "served": ok, "rejected_429": statuses.count(429),
           "timed_out_504": timed_out, "other": len(records) - ok - statuses.count(429) - timed_out,
           "wall_s": wall, "images_per_s": None, "backend_calls": stats["backend_calls"],
           "rows_per_call_mean": stats["rows_per_call_mean"], "decoder_calls": stats["decoder_calls"],
           "peak_rss_mb": served.peak_rss_mb()}
    for cls in classes:
        for status, tag in ((200, ""), (429, "_429")):
            lat = np.array([r["latency_s"] for r in records if r["class"] == cls and r["status"] == status])
            for q in (50, 95):
                row[f"{cls}{tag}_p{q}_s"] = float(np.percentile(lat, q)) if lat.size else None
    return row


def run_policy(artifact: Path, policy: str, args) -> dict:
    import httpx
    served = Served(artifact, policy, args.threads)
    records, lock = [], threading.Lock()

    def client(cls: str, index: int, count: int):
        with httpx.Client(base_url=served.url, timeout=args.time_limit) as http:
            for i in range(count):
                if cls == "long":
                    body = {"labels": [index % 10], "steps": args.long_steps, "sampler": "ddpm", "cfg_scale": 4.0,
                            "seed": 1000 * index + i}
                else:
                    body = {"labels": [index % 10], "steps": args.short_steps, "sampler": "ddim",
                            "cfg_scale": (1.5, 4.0)[i % 2], "seed": 1000 * index + i}
                post(http, body, cls, records, lock)

    threads = [threading.Thread(target=client, args=("long", i, args.long_requests)) for i in range(args.long_clients)]
    threads += [threading.Thread(target=client, args=("short", 100 + i, args.short_requests))
                for i in range(args.short_clients)]
    wall = run_threads(threads, args.time_limit)
    stats = httpx.get(served.url + "/v1/model", timeout=10).json()["stats"]
    row = summarize(policy, records, wall, served, ["short", "long"], stats)
    row["exit_code"] = served.stop()
    row["images_per_s"] = row["served"] / wall
    return row


def run_threads(threads: list, time_limit: float) -> float:
    """Start the client threads, wait for them (each at most time_limit), return the wall time."""
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit)
    return time.perf_counter() - start


def run_png_mix(artifact: Path, args) -> dict:
    import httpx
    served = Served(artifact, "step", args.threads)
    records, lock, probes, done = [], threading.Lock(), [], threading.Event()

    def client(cls: str, index: int):
        with httpx.Client(base_url=served.url, timeout=args.time_limit) as http:
            for i in range(args.mix_requests):
                body = ({"labels": [index % 10, 1, 2, 3], "steps": args.short_steps, "sampler": "ddim",
                         "seed": 1000 * index + i, "format": "png"} if cls == "png" else
                        {"labels": [index % 10], "steps": args.short_steps, "sampler": "ddim", "seed": 1000 * index + i})
                post(http, body, cls, records, lock)

    def probe():
        with httpx.Client(base_url=served.url, timeout=10) as http:
            while not done.is_set():
                t0 = time.perf_counter()
                http.get("/v1/health")
                probes.append(time.perf_counter() - t0)
                time.sleep(0.02)

    threads = [threading.Thread(target=client, args=("png", i)) for i in range(args.png_clients)]
    threads += [threading.Thread(target=client, args=("npy", 100 + i)) for i in range(args.npy_clients)]
    prober = threading.Thread(target=probe)
    prober.start()
    wall = run_threads(threads, args.time_limit)
    done.set()
    prober.join()
    stats = httpx.get(served.url + "/v1/model", timeout=10).json()["stats"]
    row = summarize("png mix", records, wall, served, ["png", "npy"], stats)
    row["exit_code"] = served.stop()
    row["images_per_s"] = sum(4 if r["class"] == "png" else 1 for r in records if r["status"] == 200) / wall
    row["health_p50_ms"] = 1e3 * float(np.percentile(probes, 50))
    row["health_p99_ms"] = 1e3 * float(np.percentile(probes, 99))
    return row


def run_flood(artifact: Path, args) -> dict:
    import httpx
    served = Served(artifact, "step", args.threads)
    records, lock = [], threading.Lock()

    def one():
        with httpx.Client(base_url=served.url, timeout=args.flood_timeout + 30) as http:
            post(http, {"labels": [1, 2, 3, 4], "steps": 999, "timeout": args.flood_timeout}, "flood", records, lock)

    threads = []
    start = time.perf_counter()
    for _ in range(args.flood_requests):
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        time.sleep(args.flood_pace)
    for t in threads:
        t.join(args.flood_timeout + 60)
    wall = time.perf_counter() - start
    stats = httpx.get(served.url + "/v1/model", timeout=10).json()["stats"]
    row = summarize("flood", records, wall, served, ["flood"], stats)
    row["exit_code"] = served.stop()
    row["images_per_s"] = 4 * row["served"] / wall
    admitted = row["served"] + row["timed_out_504"]
    row["admitted_in_time_fraction"] = row["served"] / admitted if admitted else None
    return row


def export(args_list: list[str], out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ditrt.cli", "export", *args_list, "--precision", "fp32", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="Artifact for the policies and the png mix (needs a decoder) "
                                                  "[DiT-S/2 random-init 128 px + the example VAE, exported here]")
    ap.add_argument("--flood-artifact", type=Path, help="Artifact for the flood [the example, exported here]")
    ap.add_argument("--config", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-clients", type=int, default=2)
    ap.add_argument("--long-requests", type=int, default=2)
    ap.add_argument("--long-steps", type=int, default=250)
    ap.add_argument("--short-clients", type=int, default=4)
    ap.add_argument("--short-requests", type=int, default=4)
    ap.add_argument("--short-steps", type=int, default=25)
    ap.add_argument("--png-clients", type=int, default=3)
    ap.add_argument("--npy-clients", type=int, default=3)
    ap.add_argument("--mix-requests", type=int, default=3, help="Requests per png-mix client")
    ap.add_argument("--flood-requests", type=int, default=300)
    ap.add_argument("--flood-pace", type=float, default=0.03)
    ap.add_argument("--flood-timeout", type=float, default=25.0)
    ap.add_argument("--scenarios", default="step,serial,request,png,flood")
    ap.add_argument("--time-limit", type=float, default=600.0, help="Seconds per client at most")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")

    tmp = tempfile.TemporaryDirectory()
    artifact, flood_artifact = args.artifact, args.flood_artifact
    if artifact is None and set(scenarios) - {"flood"}:
        artifact = export(["--config", args.config, "--random-init", "--image-size", str(args.image_size), "--vae",
                           str(EXAMPLE_VAE)], Path(tmp.name) / "model")
    if flood_artifact is None and "flood" in scenarios:
        flood_artifact = export(["--example"], Path(tmp.name) / "example")
    rows = []
    for scenario in scenarios:
        if scenario in ("step", "serial", "request"):
            row = run_policy(artifact, scenario, args)
        elif scenario == "png":
            row = run_png_mix(artifact, args)
        elif scenario == "flood":
            row = run_flood(flood_artifact, args)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        rows.append(row)
        print(f"{scenario}: served {row['served']}, 429 {row['rejected_429']}, 504 {row['timed_out_504']}, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.1f} s", flush=True)
    by = {r["scenario"]: r for r in rows}
    targets = {}
    if "step" in by and "serial" in by:
        targets["throughput_step_ge_serial"] = by["step"]["images_per_s"] >= by["serial"]["images_per_s"]
        targets["short_p95_step_le_third_of_serial"] = by["step"]["short_p95_s"] <= by["serial"]["short_p95_s"] / 3
    if "png mix" in by:
        targets["png_mix_health_p99_le_50ms"] = by["png mix"]["health_p99_ms"] <= 50
    if "flood" in by:
        f = by["flood"]
        targets["flood_admitted_in_time_ge_90pct"] = (f["admitted_in_time_fraction"] or 0) >= 0.9
        targets["flood_rest_rejected_429"] = f["other"] == 0 and f["served"] + f["timed_out_504"] + f["rejected_429"] \
            == f["requests"] and (f["flood_429_p95_s"] or 0) < 2.0
    targets["every_server_exited_0_on_sigterm"] = all(r["exit_code"] == 0 for r in rows)
    columns = ["scenario", "requests", "served", "rejected_429", "timed_out_504", "other", "wall_s", "images_per_s",
               "rows_per_call_mean", "short_p95_s", "long_p95_s", "png_p95_s", "npy_p95_s", "flood_p95_s",
               "flood_429_p95_s", "health_p99_ms", "peak_rss_mb"]
    report("serve_bench", rows, columns, extra={
        "model": f"{args.config} random-init {args.image_size} px + the example VAE (policies, png mix); the example "
                 f"artifact (flood); fp32, onnxruntime CPU, {args.threads} threads, default limits",
        "workload": {k: getattr(args, k) for k in ("long_clients", "long_requests", "long_steps", "short_clients",
                                                   "short_requests", "short_steps", "png_clients", "npy_clients",
                                                   "mix_requests", "flood_requests", "flood_pace", "flood_timeout")},
        "targets": targets})
    print("targets:", targets)
    tmp.cleanup()


if __name__ == "__main__":
    main()
