"""`ditrt generate` on CPU: images/s with 1 and 2 local worker processes and with 2 Ray actors, Ray's
start-up cost, and the peak memory of assembling the ADM .npz from the shards.

    python bench/generate_bench.py [--artifact DIR] [--num-images 256] [--steps 50] [--shard-size 32]
                                   [--npz-images 2000 (0: skip)] [--repeats 2]
                                   [--skip-ray] [--npz-only] [--results-name generate_bench]

Without --artifact the embedded example is exported to a temporary folder (`ditrt export --example`:
64x64 images, random weights). Each case is one `generate()` call on a fresh run directory (the same
job: same seed, labels, sampler, steps); the npz of every case must be byte-identical, and is
checked. Rates: `images_per_s` is the summary's (worker start-up included, Ray's connection not);
`steady_images_per_s` counts from the first finished shard to the last (workers loaded).

The npz case generates --npz-images images (ddim, 5 steps: the pixels do not matter here) in shards
of 100, then, in a fresh process, assembles the npz from the shards and reports the process's peak
RSS (VmHWM) before and after, next to one shard's and the whole array's size, and next to holding
the whole array and writing it with `np.savez` (what sample_ddp.py does) in the same process.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from ditrt.runtime.jobs import generate as G  # noqa: E402

PEAK = 'int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))'


def run_case(name: str, artifact: Path, out: Path, args, workers: G.Workers, steps: int) -> dict:
    times = []
    job = G.GenerateJob(artifact, out, args.num_images, "balanced", 0, G.SampleSpec(steps=str(steps)),
                        batch=args.shard_size, shard_size=args.shard_size, npz=out / "s.npz")
    start = time.perf_counter()
    summary = G.generate(job, workers, progress=lambda p: times.append((time.perf_counter(), p.images_done)),
                         log=lambda m: print(f"  {m}", file=sys.stderr))
    wall = time.perf_counter() - start
    (t0, n0), (t1, n1) = times[1], times[-1]  # times[0]: the report before any shard
    return {"case": name, "workers": summary.workers, "images": summary.images, "wall_s": round(wall, 2),
            "first_shard_s": round(t0 - start, 2),
            "images_per_s": summary.images_per_s,
            "steady_images_per_s": round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else None,
            "npz": (out / "s.npz").read_bytes()}


def npz_memory(artifact: Path, root: Path, images: int) -> dict:
    out = root / "npz-run"
    job = G.GenerateJob(artifact, out, images, "balanced", 0, G.SampleSpec(sampler="ddim", steps="5"),
                        batch=100, shard_size=100)
    G.generate(job, G.Workers(2), log=lambda m: None)
    script = f"""
import re, numpy as np
from pathlib import Path
from ditrt.runtime.jobs import shards as S
out = Path({str(out)!r})
shards = S.plan_shards({images}, 100)
labels = np.concatenate([S.read_shard(out / s.name, s)[1] for s in shards])
imported = {PEAK}
S.write_npz(out / "s.npz", [(s, out / s.name) for s in shards], labels)
streamed = {PEAK}
whole = np.concatenate([S.read_shard(out / s.name, s)[0] for s in shards])  # sample_ddp.py holds every image
np.savez(out / "savez.npz", arr_0=whole, arr_1=labels)
print(imported, streamed, {PEAK}, whole.nbytes, whole.nbytes // len(shards))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    imported, streamed, savez, total, shard = map(int, r.stdout.split())  # peaks in KiB
    with np.load(out / "s.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape[0] == images and z["arr_0"].shape[3] == 3
    mib = lambda kib: round(kib / 1024, 2)  # noqa: E731
    return {"npz_images": images, "shard_images": 100, "shard_mib": round(shard / 2**20, 2),
            "array_mib": round(total / 2**20, 2), "peak_rss_before_mib": mib(imported),
            "peak_rss_after_streamed_assembly_mib": mib(streamed),
            "streamed_assembly_growth_mib": mib(streamed - imported),
            "peak_rss_after_whole_array_np_savez_mib": mib(savez),
            "whole_array_np_savez_growth_mib": mib(savez - streamed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="an artifact with a decoder [the example, exported here]")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--npz-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--npz-only", action="store_true", help="only the npz memory case; print it, write nothing")
    parser.add_argument("--results-name", default="generate_bench", help="bench/results/NAME.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    artifact = args.artifact
    if artifact is None:
        artifact = root / "example"
        subprocess.run([sys.executable, "-m", "ditrt.cli", "export", "--example", "--out", str(artifact)], check=True,
                       capture_output=True)
    if args.npz_only:
        print(npz_memory(artifact, root, args.npz_images))
        return
    cases = [("local, 1 worker", G.Workers(1)), ("local, 2 workers", G.Workers(2))]
    from ditrt.runtime.artifact.manifest import load_manifest
    manifest = load_manifest(artifact)
    model = manifest.data["model"]
    extra = {"artifact": str(artifact), "model": model.get("name") or "the example",
             "image_size": model.get("image_size"), "sampler": manifest.defaults.sampler, "steps": args.steps,
             "shard_size": args.shard_size, "batch": args.shard_size, "repeats": args.repeats,
             "note": "each case run `repeats` times, interleaved; the row is the run with the best steady rate"}
    if not args.skip_ray:
        import ray
        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        extra["ray_init_s"] = round(time.perf_counter() - start, 2)
        cases.append(("ray, 2 actors", G.Workers(2, ray=True)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in cases}
    try:
        for repeat in range(args.repeats):
            for name, workers in cases:
                folder = root / f"{name.replace(', ', '-').replace(' ', '-')}-{repeat}"
                runs[name].append(run_case(name, artifact, folder, args, workers, args.steps))
    finally:
        if not args.skip_ray:
            ray.shutdown()
    rows = [max(found, key=lambda row: row["steady_images_per_s"] or 0) for found in runs.values()]
    for row, found in zip(rows, runs.values()):
        row["all_steady_images_per_s"] = [r["steady_images_per_s"] for r in found]
    if not args.skip_ray:
        # Ray's start-up: the connection (a local Ray here), plus how much later the first shard of the first Ray
        # run lands than that of the first local 2-worker run (actor processes and their pipelines).
        first_ray, first_local = runs["ray, 2 actors"][0]["first_shard_s"], runs["local, 2 workers"][0]["first_shard_s"]
        extra["ray_first_shard_delay_s"] = round(first_ray - first_local, 2)
        extra["ray_startup_s"] = round(extra["ray_init_s"] + first_ray - first_local, 2)
    npzs = {run.pop("npz") for found in runs.values() for run in found}
    extra["npz_identical_across_cases"] = len(npzs) == 1
    assert len(npzs) == 1, "the cases wrote different npz files"
    if args.npz_images:
        extra["npz_assembly"] = npz_memory(artifact, root, args.npz_images)
        print(extra["npz_assembly"])
    report(args.results_name, rows, ["case", "workers", "images", "wall_s", "first_shard_s", "images_per_s",
                                    "steady_images_per_s",
                                    "all_steady_images_per_s"], extra)


if __name__ == "__main__":
    main()
