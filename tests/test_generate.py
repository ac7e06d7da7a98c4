"""`ditrt generate`: the same bytes whatever the workers (1, 2, Ray, killed and resumed, a worker
that died), image i as `ditrt sample` makes it, the ADM npz streamed in bounded memory, labels as
docs/generate.md specifies them (checked with the pure-Python Philox of tests/noise_reference.py),
refusals with their reason. Worker processes are real (spawned), kills are real SIGKILLs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt.cli import main
from ditrt.runtime.jobs import generate as G
from ditrt.runtime.jobs import shards as S
from ditrt.runtime.core.errors import StepError
from generate_workers import (BUSY_MARKER, DIE_ONCE, DIE_SHARD, FAIL_SHARD, HASH_LOG, DyingWorker, FailingWorker,
                              HashCountingWorker, SlowWorker)
from helpers import read_png
from noise_reference import philox

N, SHARD, STEPS, SEED = 40, 8, 20, 3  # 5 shards of 8; the tiny golden model has 10 classes


def ditrt(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def generate_args(artifact, out: Path, *extra) -> list:
    return ["generate", artifact, "--num-images", N, "--out", out, "--shard-size", SHARD, "--steps", STEPS,
            "--seed", SEED, "--npz", out / "s.npz", "--no-progress", *extra]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


@pytest.fixture(scope="module")
def reference(tiny_artifact_with_vae, tmp_path_factory) -> Path:
    """One worker: the run every other way of running must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("generate") / "one"
    r = ditrt(*generate_args(tiny_artifact_with_vae, out, "--workers", 1))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout is the one JSON summary line
    assert (summary["images"], summary["workers"], summary["shards"], summary["retries"]) == (N, 1, 5, 0)
    return out


def process_group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of group `pgid` (a killed coordinator's workers) exits within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def assert_same_run(out: Path, reference: Path) -> None:
    images, labels = load_npz(out / "s.npz")
    ref_images, ref_labels = load_npz(reference / "s.npz")
    assert images.tobytes() == ref_images.tobytes() and labels.tobytes() == ref_labels.tobytes()
    assert (out / "s.npz").read_bytes() == (reference / "s.npz").read_bytes()  # the file itself is reproducible
    shards = lambda run: {k: e["sha256"] for k, e in json.loads((run / "run.json").read_text())["shards"].items()}  # noqa: E731
    assert shards(out) == shards(reference)


# ---- the same bytes, however it runs --------------------------------------------------------------

def test_two_workers_give_the_bytes_of_one(tiny_artifact_with_vae, reference, tmp_path):
    r = ditrt(*generate_args(tiny_artifact_with_vae, tmp_path / "two", "--workers", 2, "--png"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["workers"] == 2
    assert_same_run(tmp_path / "two", reference)
    images, _ = load_npz(reference / "s.npz")  # --png: sample_ddp.py's names, the npz's pixels
    assert sorted(p.name for p in (tmp_path / "two" / "png").iterdir()) == [f"{i:06d}.png" for i in range(N)]
    for i in (0, 21, 39):
        assert np.array_equal(read_png(tmp_path / "two" / "png" / f"{i:06d}.png"), images[i])


def test_a_run_killed_midway_resumes_to_the_same_bytes(tiny_artifact_with_vae, reference, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "ditrt.cli", *map(str, generate_args(tiny_artifact_with_vae, out, "--workers", 2))]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline, finished = time.monotonic() + 120, {}
    while not finished and time.monotonic() < deadline:  # kill as soon as one shard is recorded
        try:
            finished = json.loads((out / "run.json").read_text())["shards"]
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)  # the coordinator only: its workers must notice and exit by themselves
    run.communicate()
    assert 1 <= len(finished) < 5, "the kill must land mid-way"
    if not process_group_gone(run.pid, 20):
        pytest.fail("worker processes outlived their killed coordinator")
    half_written = out / "shards" / ".000004.npz.dead.npz.tmp"  # what a kill during a shard write leaves
    half_written.write_bytes(b"PK\x03\x04 half a shard")

    r = ditrt(*generate_args(tiny_artifact_with_vae, out, "--workers", 2, "--resume"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["shards_resumed"] >= 1 and summary["shards_resumed"] + summary["shards_computed"] == 5
    assert not half_written.exists()
    assert_same_run(out, reference)


def test_workers_exit_at_once_when_their_coordinator_is_killed_mid_shard(tiny_artifact_with_vae, tmp_path):
    """A coordinator SIGKILLed while its workers are a minute into their shards: they notice at once
    (they watch their parent), not when they next talk to it (a GPU held for a whole shard)."""
    script = f"""
from pathlib import Path
from ditrt.runtime.jobs import generate as G
from generate_workers import SlowWorker
G.generate(G.GenerateJob(Path({str(tiny_artifact_with_vae)!r}), Path({str(tmp_path / "run")!r}), 16,
                         sampling=G.SampleSpec(steps="2"), shard_size=8), G.Workers(2), worker_class=SlowWorker)
"""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, BUSY_MARKER: str(tmp_path / "busy"),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    run = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "busy").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "busy").exists(), "no worker started a shard"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    if not process_group_gone(run.pid, 10):  # the shard has 55+ s to go
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("worker processes kept computing after their coordinator was killed")


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_bytes_of_one(tiny_artifact_with_vae, reference, tmp_path):
    r = ditrt(*generate_args(tiny_artifact_with_vae, tmp_path / "ray", "--ray", "--workers", 2))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["workers"] == 2
    assert_same_run(tmp_path / "ray", reference)


@pytest.mark.slow
def test_ray_replaces_a_dead_actor_and_retries_its_shard(tiny_artifact_with_vae, reference, tmp_path, monkeypatch):
    tests = str(Path(__file__).resolve().parent)  # Ray's worker processes import DyingWorker from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(DIE_SHARD, "2")
    monkeypatch.setenv(DIE_ONCE, str(tmp_path / "died-once"))
    out = tmp_path / "ray-retried"
    summary = G.generate(job(tiny_artifact_with_vae, out), G.Workers(2, ray=True), worker_class=DyingWorker)
    assert (tmp_path / "died-once").exists() and summary.retries == 1
    assert_same_run(out, reference)


def job(artifact, out: Path, **overrides) -> G.GenerateJob:
    return G.GenerateJob(artifact, out, N, "balanced", SEED, G.SampleSpec(steps=str(STEPS)), shard_size=SHARD,
                         npz=out / "s.npz", **overrides)


def test_a_worker_killed_during_a_shard_is_replaced_and_the_shard_retried(tiny_artifact_with_vae, reference,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv(DIE_SHARD, "2")
    monkeypatch.setenv(DIE_ONCE, str(tmp_path / "died-once"))
    out = tmp_path / "retried"
    summary = G.generate(job(tiny_artifact_with_vae, out), G.Workers(2), worker_class=DyingWorker)
    assert (tmp_path / "died-once").exists() and summary.retries == 1
    assert_same_run(out, reference)


def test_a_shard_whose_worker_keeps_dying_fails_the_run_naming_it_and_keeps_the_rest(tiny_artifact_with_vae,
                                                                                     reference, tmp_path, monkeypatch):
    monkeypatch.setenv(DIE_SHARD, "1")
    out = tmp_path / "failing"
    with pytest.raises(StepError, match=r"shard 1 \(images 8\.\.15\) failed: its worker died 3 times \(last: killed "
                                        r"by SIGKILL\)"):
        G.generate(job(tiny_artifact_with_vae, out), G.Workers(1), worker_class=DyingWorker)
    record = json.loads((out / "run.json").read_text())
    assert list(record["shards"]) == ["0"] and (out / "shards" / "000000.npz").is_file()
    assert not (out / "s.npz").exists()
    # The finished shard is kept: a resume computes the other four and matches the reference.
    summary = G.generate(job(tiny_artifact_with_vae, out, resume=True), G.Workers(2))
    assert (summary.shards_resumed, summary.shards_computed) == (1, 4)
    assert_same_run(out, reference)


def test_resume_recomputes_shards_whose_files_changed_or_vanished(tiny_artifact_with_vae, reference, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    damaged = bytearray((out / "shards" / "000002.npz").read_bytes())
    damaged[5000] ^= 1  # one pixel bit: still a valid npz, but not the recorded sha256
    (out / "shards" / "000002.npz").write_bytes(bytes(damaged))
    (out / "shards" / "000004.npz").unlink()
    summary = G.generate(job(tiny_artifact_with_vae, out, resume=True), G.Workers(1))
    assert (summary.shards_resumed, summary.shards_computed) == (3, 2)
    assert_same_run(out, reference)


def test_batch_and_shard_size_do_not_change_the_bytes(tiny_artifact_with_vae, reference, tmp_path):
    """--batch 3 cuts each shard of 8 into calls of 3, 3, 2 (image start + j keeps noise image start
    + j): the same shard files; --shard-size 5 --batch 2 plans other shards: the same npz."""
    out = tmp_path / "batch3"
    G.generate(G.GenerateJob(tiny_artifact_with_vae, out, N, "balanced", SEED, G.SampleSpec(steps=str(STEPS)),
                             batch=3, shard_size=SHARD, npz=out / "s.npz"), G.Workers(1))
    assert_same_run(out, reference)
    out = tmp_path / "shard5"
    G.generate(G.GenerateJob(tiny_artifact_with_vae, out, N, "balanced", SEED, G.SampleSpec(steps=str(STEPS)),
                             batch=2, shard_size=5, npz=out / "s.npz"), G.Workers(1))
    assert len(json.loads((out / "run.json").read_text())["shards"]) == 8
    assert (out / "s.npz").read_bytes() == (reference / "s.npz").read_bytes()


def test_each_graph_file_is_hashed_once_per_run_and_unused_ones_never(tiny_artifact_with_vae, tmp_path, monkeypatch):
    """The coordinator hashes the manifest and the graphs the workers read (fp32 on ONNX Runtime),
    once each; its two local workers trust those digests (they hash nothing); the fp16 graphs, never
    used, are never read. A copy of the artifact: new files, so no digest is remembered from before."""
    from collections import Counter

    from ditrt.runtime.core import files
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact_with_vae, art)
    graphs = {network: {p: sorted(g["sha256"]) for p, g in entry["graphs"].items()}
              for network, entry in json.loads((art / "manifest.json").read_text())["networks"].items()}
    hashed, real = Counter(), files.hash_file
    monkeypatch.setattr(files, "hash_file", lambda path, *a, **k: (hashed.update([Path(path).name]) if
                                                                  Path(path).parent == art.resolve() else None,
                                                                  real(path, *a, **k))[1])  # not the shards
    (tmp_path / "hashes").mkdir()
    monkeypatch.setenv(HASH_LOG, str(tmp_path / "hashes"))
    out = tmp_path / "run"
    summary = G.generate(G.GenerateJob(art, out, 16, "balanced", SEED, G.SampleSpec(steps="2"), shard_size=8),
                         G.Workers(2), worker_class=HashCountingWorker)
    assert summary.workers == 2
    expected = ["manifest.json", *graphs["denoiser"]["fp32"], *graphs["decoder"]["fp32"]]
    assert sorted(hashed.elements()) == sorted(expected)  # each once; no fp16 graph
    workers = sorted((tmp_path / "hashes").iterdir())
    assert len(workers) == 2 and all(w.read_text() == "" for w in workers), [w.read_text() for w in workers]


def test_a_worker_trusts_only_digests_of_this_machine_and_of_unchanged_files(tmp_path, monkeypatch):
    """files.trust_verified_hashes: digests of this machine's unchanged files are taken as they are
    (here a forged one, to see it taken); another machine's (a Ray node reads its own copy) are not,
    nor those of a file replaced since they were taken: that file is hashed again."""
    import hashlib

    from ditrt.runtime.core import files
    kept, replaced = tmp_path / "kept.onnx", tmp_path / "replaced.onnx"
    kept.write_bytes(b"graph one")
    replaced.write_bytes(b"graph v1")
    verified = files.verified_hashes([kept, replaced])
    assert [entry[-1] for entry in verified["files"]] == [hashlib.sha256(b"graph one").hexdigest(),
                                                        hashlib.sha256(b"graph v1").hexdigest()]
    forged = {**verified, "files": [[*entry[:-1], "0" * 64] for entry in verified["files"]]}
    hashed, real = [], files.hash_file
    monkeypatch.setattr(files, "hash_file", lambda p, *a, **k: (hashed.append(Path(p).name), real(p, *a, **k))[1])
    assert files.trust_verified_hashes({**forged, "machine": "boot:another-node"}) == 0
    (tmp_path / "new").write_bytes(b"graph v2, edited")
    os.replace(tmp_path / "new", replaced)  # another inode and size: another file identity
    assert files.trust_verified_hashes(forged) == 2
    assert files.sha256_file(kept) == "0" * 64 and hashed == []
    assert files.sha256_file(replaced) == hashlib.sha256(b"graph v2, edited").hexdigest() and hashed == ["replaced.onnx"]


def test_a_worker_error_is_not_retried_it_fails_the_run_with_its_message(tiny_artifact_with_vae, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv(FAIL_SHARD, "0")
    with pytest.raises(StepError, match=r"^shard 0 \(images 0\.\.7\): simulated: the backend failed mid-loop \(0 "
                                        r"finished shards are kept"):
        G.generate(job(tiny_artifact_with_vae, tmp_path / "failed"), G.Workers(1), worker_class=FailingWorker)


# ---- what the images and labels are ---------------------------------------------------------------

def test_the_npz_is_the_adm_evaluators_and_image_i_is_ditrt_sample_s(tiny_artifact_with_vae, reference, tmp_path):
    images, labels = load_npz(reference / "s.npz")
    assert images.dtype == np.uint8 and images.shape == (N, 64, 64, 3)
    assert labels.dtype == np.int64 and np.array_equal(np.bincount(labels, minlength=10), [4] * 10)
    with np.load(reference / "s.npz") as z:
        assert z.files == ["arr_0", "arr_1", "labels"] and np.array_equal(z["labels"], labels)
    # Shard 1 as one `ditrt sample` call with the same labels and noise images 8..15.
    shard = ",".join(map(str, labels[8:16]))
    r = ditrt("sample", tiny_artifact_with_vae, "--labels", shard, "--steps", STEPS, "--seed", SEED,
              "--image-offset", 8, "--out", tmp_path / "grid.png", "--out-dir", tmp_path / "shard", "--no-progress")
    assert r.returncode == 0, r.stderr
    for i in range(8, 16):
        assert np.array_equal(read_png(tmp_path / "shard" / f"{i:06d}.png"), images[i]), i
    # Image 13 alone (a batch of one: ONNX Runtime's CPU kernels give the same bits at any batch size).
    r = ditrt("sample", tiny_artifact_with_vae, "--labels", labels[13], "--steps", STEPS, "--seed", SEED,
              "--image-offset", 13, "--out", tmp_path / "one.png", "--out-dir", tmp_path / "one", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(read_png(tmp_path / "one" / "000013.png"), images[13])
    assert not np.array_equal(images[13], images[12])


def test_png_writes_sample_ddp_names_from_the_shards_without_sampling(reference, tiny_artifact_with_vae, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    summary = G.generate(job(tiny_artifact_with_vae, out, png=True, resume=True), G.Workers(1))
    assert (summary.shards_computed, summary.workers) == (0, 0)  # every image came from the shard files
    images, _ = load_npz(reference / "s.npz")
    for i in (0, 17, 39):
        assert np.array_equal(read_png(out / "png" / f"{i:06d}.png"), images[i])
    assert len(list((out / "png").glob("*.png"))) == N


def expected_random_labels(seed: int, n: int, classes: int) -> list[int]:
    """docs/generate.md: word pair (x0, x1) of Philox counter (0, 2^32 - 1, i lo, i hi) under the seed."""
    out = []
    for i in range(n):
        x0, x1, _, _ = philox((0, 0xFFFFFFFF, i & 0xFFFFFFFF, i >> 32), (seed & 0xFFFFFFFF, seed >> 32))
        out.append(((x0 << 32) | x1) % classes)
    return out


def expected_balanced_labels(seed: int, n: int, classes: int) -> list[int]:
    """docs/generate.md: block b holds the classes sorted by the word pair of Philox counter
    (class, 2^32 - 2, b lo, b hi) (ties by class)."""
    out = []
    for b in range(-(-n // classes)):
        keys = []
        for c in range(classes):
            x0, x1, _, _ = philox((c, 0xFFFFFFFE, b & 0xFFFFFFFF, b >> 32), (seed & 0xFFFFFFFF, seed >> 32))
            keys.append(((x0 << 32) | x1, c))
        out += [c for _, c in sorted(keys)]
    return out[:n]


@pytest.mark.parametrize("seed", [0, 3, 2**40 + 7])
def test_labels_follow_the_documented_streams(seed):
    assert G.random_labels(seed, 0, 300, 1000).tolist() == expected_random_labels(seed, 300, 1000)
    assert G.balanced_labels(seed, 0, 2500, 1000).tolist() == expected_balanced_labels(seed, 2500, 1000)
    # Image i's label depends on (seed, i) only: any window of the stream is the same slice.
    assert G.balanced_labels(seed, 1234, 2100, 1000).tolist() == expected_balanced_labels(seed, 2100, 1000)[1234:]
    assert G.random_labels(seed, 77, 90, 10).tolist() == expected_random_labels(seed, 90, 10)[77:]


def test_balanced_labels_give_each_class_its_share():
    labels = G.balanced_labels(0, 0, 50_000, 1000)
    assert np.array_equal(np.bincount(labels, minlength=1000), np.full(1000, 50))  # FID-50K: 50 per class
    counts = np.bincount(G.balanced_labels(5, 0, 45, 10), minlength=10)
    assert sorted(counts.tolist()) == [4] * 5 + [5] * 5  # not a multiple: counts differ by one at most
    assert not np.array_equal(G.balanced_labels(0, 0, 10, 10), G.balanced_labels(1, 0, 10, 10))


def test_a_labels_file_gives_the_labels(tiny_artifact_with_vae, tmp_path):
    from ditrt.runtime.artifact.manifest import load_manifest
    (condition,) = [t.condition for t in load_manifest(tiny_artifact_with_vae).network("denoiser").conditions]
    given = np.arange(N, dtype=np.int32) % 7
    np.save(tmp_path / "l.npy", given)
    labels, kind = G.plan_labels(str(tmp_path / "l.npy"), 0, N, condition)
    assert kind == "file" and labels.dtype == np.int64 and labels.tolist() == given.tolist()


# ---- the npz in bounded memory --------------------------------------------------------------------

def test_assembling_the_npz_holds_one_shard_not_all(tmp_path):
    """16 shards of 1000 64x64 images (197 MB in all, 12 MB each): the assembling process's peak RSS
    grows by about a shard, far below the whole array."""
    rng = np.random.default_rng(0)
    shards = S.plan_shards(16_000, 1000)
    block = rng.integers(0, 256, (1000, 64, 64, 3), dtype=np.uint8)
    for shard in shards:
        S.write_shard(tmp_path / shard.name, np.roll(block, shard.index, axis=0), np.zeros(1000, np.int64),
                      np.arange(shard.start, shard.stop))
    # VmHWM is this process's peak RSS (ru_maxrss would carry pytest's over the fork and exec).
    script = f"""
import re, numpy as np
from pathlib import Path
from ditrt.runtime.jobs import shards as S
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
root = Path({str(tmp_path)!r})
shards = S.plan_shards(16_000, 1000)
S.read_shard(root / shards[0].name, shards[0])  # warm: numpy's zip reader, one shard's buffers
before = peak()
S.write_npz(root / "all.npz", [(s, root / s.name) for s in shards], np.zeros(16_000, np.int64))
print(before, peak())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split())  # KiB
    assert after - before < 40 * 1024, f"assembly grew the peak RSS by {(after - before) / 1024:.0f} MiB"
    with np.load(tmp_path / "all.npz", mmap_mode=None) as z:
        arr = z["arr_0"]
        assert arr.shape == (16_000, 64, 64, 3)
        assert np.array_equal(arr[5000:6000], np.roll(block, 5, axis=0))


# ---- refusals -------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_resume_with_another_option_is_refused_naming_it(tiny_artifact_with_vae, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "run.json").read_text()
    base = generate_args(tiny_artifact_with_vae, out, "--resume")
    r = invoke(*[STEPS + 1 if a == STEPS else a for a in base])
    assert r.exit_code == 2 and f"--steps: '{STEPS}' in the run, '{STEPS + 1}' now" in r.output
    r = invoke(*base, "--cfg-scale", 1.5, "--labels", "random")
    assert r.exit_code == 2 and "--cfg-scale: 4.0 in the run, 1.5 now" in r.output
    assert "--labels: 'balanced' in the run, 'random' now" in r.output
    r = invoke(*base, "--sampler", "ddim")
    assert r.exit_code == 2 and "--sampler: 'ddpm' in the run, 'ddim' now" in r.output and "--eta" in r.output
    # Another artifact: the same graphs with an edited manifest (its default cfg scale).
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact_with_vae, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["defaults"]["cfg_scale"] = 1.5
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = invoke(*generate_args(other, out, "--resume", "--cfg-scale", 4.0))
    assert r.exit_code == 2 and "artifact: sha256" in r.output and "manifest.json (changed)" in r.output
    # A hand-edited record cannot point the resume at other files.
    damaged = json.loads(before)
    damaged["shards"]["../../elsewhere"] = damaged["shards"].pop("0")
    (out / "run.json").write_text(json.dumps(damaged))
    r = invoke(*base)
    assert r.exit_code == 2 and "field shards has the key '../../elsewhere', not a shard index of this run (0..4)" \
        in r.output
    (out / "run.json").write_text(before)
    # Without --resume, a finished run is not overwritten.
    r = invoke(*generate_args(tiny_artifact_with_vae, out))
    assert r.exit_code == 2 and "holds a generate run already" in r.output and "--resume" in r.output
    assert (out / "run.json").read_text() == before


@pytest.mark.parametrize("key, message", [
    ("\u00b2", "field shards has the key '\u00b2', not a shard index of this run (0..4)"),  # str.isdigit, not int()
    ("\u0663", "field shards has the key '\u0663'"),  # an Arabic-Indic 3: int() takes it
    ("03", "field shards has the key '03'"),
    ("5", "field shards has the key '5', not a shard index of this run (0..4)"),
    ("9" * 5000, "field shards has the key '9999999999999999999999999999999999999999... (5000 characters)'"),
])
def test_a_hand_edited_record_key_is_refused_naming_it(tiny_artifact_with_vae, reference, tmp_path, key, message):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    record = json.loads((out / "run.json").read_text())
    record["shards"][key] = record["shards"].pop("3")
    (out / "run.json").write_text(json.dumps(record))
    r = invoke(*generate_args(tiny_artifact_with_vae, out, "--resume"))
    assert r.exit_code == 2 and message in r.output and "the record is damaged" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_a_record_entry_that_disagrees_with_the_plan_is_refused(tiny_artifact_with_vae, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    record = json.loads((out / "run.json").read_text())
    record["shards"]["2"]["first"] = 0
    (out / "run.json").write_text(json.dumps(record))
    r = invoke(*generate_args(tiny_artifact_with_vae, out, "--resume"))
    assert r.exit_code == 2 and "field shards['2'] must hold the sha256 of shards/000002.npz, first 16 and images 8" \
        in r.output, r.output


def test_resume_png_replaces_a_junk_png(tiny_artifact_with_vae, reference, tmp_path):
    """--resume --png over a run whose PNGs were written: a junk file in place of one (truncated,
    edited) is found by the record's png_sha256 and written again from its shard; the others stay."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    G.generate(job(tiny_artifact_with_vae, out, png=True, resume=True), G.Workers(1))  # writes all 40 PNGs
    junk, kept = out / "png" / "000021.png", out / "png" / "000005.png"
    junk.write_bytes(b"\x89PNG junk")
    kept_stat = kept.stat()
    summary = G.generate(job(tiny_artifact_with_vae, out, png=True, resume=True), G.Workers(1))
    assert summary.shards_computed == 0
    images, _ = load_npz(reference / "s.npz")
    assert np.array_equal(read_png(junk), images[21])
    assert kept.stat().st_ino == kept_stat.st_ino and kept.stat().st_mtime_ns == kept_stat.st_mtime_ns


def bad_labels(tmp_path: Path, name: str, value) -> Path:
    path = tmp_path / f"{name}.npy"
    np.save(path, value, allow_pickle=True)
    return path


@pytest.mark.parametrize("args, message", [
    (["--num-images", 0], "--num-images must be a positive integer below 2^48, got 0"),
    (["--num-images", -5], "--num-images must be a positive integer below 2^48, got -5"),
    (["--shard-size", 0], "--shard-size must be an integer from 1 to"),
    (["--batch", 0], "--batch must be an integer from 1 to"),
    (["--workers", 0], "--workers must be an integer from 1 to 4096, got 0"),
    (["--seed", -1], "--seed must be a non-negative integer below 2^64, got -1"),
    (["--address", "ray://x:10001"], "--address and --gpus-per-worker apply to --ray workers only"),
    (["--gpus-per-worker", 1], "--address and --gpus-per-worker apply to --ray workers only"),
    (["--labels", "uniform"], "--labels must be balanced, random or a .npy file of 40 class labels, got 'uniform'"),
    (["--labels", "{short}"], "holds shape (39,); --num-images 40 needs a 1-D array of 40 class labels"),
    (["--labels", "{square}"], "holds shape (40, 2)"),
    (["--labels", "{floats}"], "class_labels must be integers, got float64"),
    (["--labels", "{range}"], "class labels [10] out of range: this model has classes 0..9"),
    (["--labels", "{pickled}"], "cannot read the labels file"),
    (["--labels", "{missing}"], "cannot read the labels file"),
    (["--sampler", "ode-euler"], "unknown sampler 'ode-euler' for a dit model"),
    (["--eta", 0.5], "eta applies to ddim only; ddpm takes no eta"),
    (["--option", "atol=1e-3"], "ddpm takes no atol"),
    (["--threads", 0], "threads must be an integer from 1 to"),
])
def test_bad_inputs_are_refused_before_any_work(tiny_artifact_with_vae, tmp_path, args, message):
    files = {"short": bad_labels(tmp_path, "short", np.zeros(N - 1, np.int64)),
             "square": bad_labels(tmp_path, "square", np.zeros((N, 2), np.int64)),
             "floats": bad_labels(tmp_path, "floats", np.zeros(N)),
             "range": bad_labels(tmp_path, "range", np.full(N, 10)),
             "pickled": bad_labels(tmp_path, "pickled", np.array([object()] * N)),
             "missing": tmp_path / "missing.npy"}
    args = [str(a).format(**files) for a in args]
    out = tmp_path / "out"
    base = [str(a) for a in generate_args(tiny_artifact_with_vae, out)]
    for flag in set(args[::2]) & set(base):  # the case's value replaces the base one (a repeated option is refused)
        i = base.index(flag)
        del base[i:i + 2]
    r = invoke(*base, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()  # nothing was started


def test_an_unusable_out_is_refused(tiny_artifact_with_vae, tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke(*generate_args(tiny_artifact_with_vae, tmp_path / "file"))
    assert r.exit_code == 2 and "exists and is not a directory" in r.output
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    r = invoke(*generate_args(tiny_artifact_with_vae, tmp_path / "used"))
    assert r.exit_code == 2 and "is not empty (mine.txt) and holds no run record" in r.output


def test_an_artifact_without_decoder_gives_the_latents_of_ditrt_sample(tiny_artifact_with_vae, tmp_path):
    denoiser_only = tmp_path / "denoiser-only"
    shutil.copytree(tiny_artifact_with_vae, denoiser_only)
    manifest = json.loads((denoiser_only / "manifest.json").read_text())
    del manifest["networks"]["decoder"]
    (denoiser_only / "manifest.json").write_text(json.dumps(manifest))
    r = invoke(*generate_args(denoiser_only, tmp_path / "png"), "--png")
    assert r.exit_code == 2 and "has no decoder network, so no images can be written (--png" in r.output
    out = tmp_path / "latents"
    summary = G.generate(G.GenerateJob(denoiser_only, out, 12, "random", SEED, G.SampleSpec(steps=str(STEPS)),
                                       shard_size=SHARD, npz=out / "s.npz"), G.Workers(1))
    assert summary.output == "latents"
    latents, labels = load_npz(out / "s.npz")
    assert latents.dtype == np.float32 and latents.shape == (12, 4, 8, 8)
    r = ditrt("sample", denoiser_only, "--labels", ",".join(map(str, labels[8:])), "--steps", STEPS, "--seed", SEED,
              "--image-offset", 8, "--out", tmp_path / "l.npy", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "l.npy").tobytes() == latents[8:].tobytes()


def test_the_module_imports_neither_torch_nor_ray():
    code = "import sys, ditrt.runtime.jobs.generate; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
