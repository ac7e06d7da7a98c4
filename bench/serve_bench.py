"""`ditrt serve` under a mixed load, per batching policy: a real HTTP client (httpx, threads) on
loopback against a `ditrt serve` subprocess the bench starts on a free port, once per policy:

- step: continuous step-level batching (requests join and leave between backend calls)
- serial: one request at a time, FIFO
- request: whole-request batching (start the waiting requests together, none joins until all end)

Workload (closed loop, bounded in count): `--long-clients` clients each send `--long-requests`
long requests (ddpm, `--long-steps` steps, cfg 4.0) and `--short-clients` clients each send
`--short-requests` short ones (ddim, `--short-steps` steps, cfg 1.5 or 4.0 alternating), one
image per request. Default model: DiT-S/2 random-init at 128 px (latent 16x16: compute dominates
on 2 cores while the bench stays within minutes), exported here unless --artifact is given.

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, policy: str, threads: int, max_batch: int | None):
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "ditrt.cli", "serve", str(artifact), "--port", str(port), "--policy", policy,
           "--backend", "onnxruntime-fp32", "--threads", str(threads), "--max-queue", "256"]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ditrt serve exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("ditrt serve did not come up in 60 s")


def run_load(url: str, args) -> tuple[list[dict], float, dict]:
    import httpx
    records, lock = [], threading.Lock()

    def client(cls: str, index: int, count: int):
        with httpx.Client(base_url=url, timeout=args.time_limit) as http:
            for i in range(count):
                if cls == "long":
                    body = {"labels": [index % 10], "steps": args.long_steps, "sampler": "ddpm", "cfg_scale": 4.0,
                            "seed": 1000 * index + i}
                else:
                    body = {"labels": [index % 10], "steps": args.short_steps, "sampler": "ddim",
                            "cfg_scale": (1.5, 4.0)[i % 2], "seed": 1000 * index + i}
                t0 = time.perf_counter()
                r = http.post("/v1/samples", json=body)
                with lock:
                    records.append({"class": cls, "latency_s": time.perf_counter() - t0, "status": r.status_code})

    threads = [threading.Thread(target=client, args=("long", i, args.long_requests)) for i in range(args.long_clients)]
    threads += [threading.Thread(target=client, args=("short", 100 + i, args.short_requests))
                for i in range(args.short_clients)]
    start = time.perf_counter()
    for i, t in enumerate(threads):
        t.start()
    for t in threads:
        t.join(args.time_limit)
    wall = time.perf_counter() - start
    stats = httpx.get(url + "/v1/model", timeout=10).json()["stats"]
    return records, wall, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="An exported artifact [export DiT-S/2 random-init here]")
    ap.add_argument("--config", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, help="Rows per call for step/request [unlimited]")
    ap.add_argument("--long-clients", type=int, default=2)
    ap.add_argument("--long-requests", type=int, default=2)
    ap.add_argument("--long-steps", type=int, default=250)
    ap.add_argument("--short-clients", type=int, default=4)
    ap.add_argument("--short-requests", type=int, default=4)
    ap.add_argument("--short-steps", type=int, default=25)
    ap.add_argument("--policies", default="step,serial,request")
    ap.add_argument("--time-limit", type=float, default=600.0, help="Seconds per policy run at most")
    args = ap.parse_args()

    tmp = None
    artifact = args.artifact
    if artifact is None:
        tmp = tempfile.TemporaryDirectory()
        artifact = Path(tmp.name) / "model"
        subprocess.run([sys.executable, "-m", "ditrt.cli", "export", "--config", args.config, "--random-init",
                        "--image-size", str(args.image_size), "--precision", "fp32", "--out", str(artifact)],
                       check=True, stdout=subprocess.DEVNULL)
    rows = []
    for policy in args.policies.split(","):
        proc, url = start_server(artifact, policy, args.threads, args.max_batch)
        try:
            records, wall, stats = run_load(url, args)
        finally:
            proc.terminate()
            proc.wait(30)
        ok = [r for r in records if r["status"] == 200]
        row = {"policy": policy, "requests": len(records), "ok": len(ok), "wall_s": wall,
               "images_per_s": len(ok) / wall, "backend_calls": stats["backend_calls"],
               "rows_per_call_mean": stats["rows_per_call_mean"]}
        for cls in ("short", "long"):
            lat = np.array([r["latency_s"] for r in ok if r["class"] == cls])
            for q in (50, 95, 99):
                row[f"{cls}_p{q}_s"] = float(np.percentile(lat, q)) if lat.size else None
        rows.append(row)
        print(f"{policy}: {row['images_per_s']:.3f} images/s, short p95 {row['short_p95_s']:.2f} s", flush=True)
    by = {r["policy"]: r for r in rows}
    targets = {}
    if "step" in by and "serial" in by:
        targets = {"throughput_step_ge_serial": by["step"]["images_per_s"] >= by["serial"]["images_per_s"],
                   "short_p95_step_le_third_of_serial": by["step"]["short_p95_s"] <= by["serial"]["short_p95_s"] / 3}
    columns = ["policy", "ok", "wall_s", "images_per_s", "rows_per_call_mean", "backend_calls", "short_p50_s",
               "short_p95_s", "short_p99_s", "long_p50_s", "long_p95_s", "long_p99_s"]
    report("serve_bench", rows, columns, extra={
        "model": f"{args.config} random-init, {args.image_size} px, fp32, onnxruntime CPU, {args.threads} threads",
        "workload": {k: getattr(args, k) for k in ("long_clients", "long_requests", "long_steps", "short_clients",
                                                   "short_requests", "short_steps", "max_batch")},
        "targets": targets})
    print("targets:", targets)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
