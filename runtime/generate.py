"""Bulk generation: the official `sample_ddp.py` job (N images for an FID evaluation or a synthetic
data set), sharded over local worker processes or Ray, resumable, and identical whatever the number
of workers (docs/generate.md).

- Image i's label and noise depend only on (seed, i): noise is image i of the seed's Philox stream
  (runtime/noise.py), labels come from the same generator on a draw word noise never uses.
- The images are cut into shards of K consecutive images. A shard is computed in batches of B by one
  worker (its pipeline loaded once), written atomically (`shards/NNNNNN.npz`: uint8 images, labels,
  global indices), and recorded with its sha256 in the run record (`run.json`), which also holds the
  artifact's sha256, the options that decide the pixels and the noise version.
- `resume` keeps the recorded shards whose files still match their sha256 and computes the rest; a
  different artifact or options are refused, naming what differs.
- A worker that dies has its shard retried (SHARD_ATTEMPTS in all); then the run fails naming the
  shard, keeping every finished one.
- The ADM evaluator's .npz (`arr_0` uint8 (N, H, W, 3), the labels as `arr_1`) is assembled by
  streaming the shards: peak memory is one shard, not N images.
- An artifact without a decoder gives latents instead of images (float32 (N, C, H, W)), with a note.

Shard files and the npz: runtime/shards.py; the workers and their pools: runtime/workers.py.
torch-free; Ray is imported only for a Ray run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .backends import check_threads, parse_backend
from .chunking import check_max_batch
from .errors import InputError, StepError
from .files import claimed_output, sha256_file, write_json_atomic
from .images import per_image_name, write_png
from .manifest import MANIFEST_NAME, Manifest, load_manifest
from .noise import NOISE_VERSION, philox4x32_10
from .outputs import check_writable
from .shards import SHARD_DIR, Shard, plan_shards, read_shard, write_npz, write_shard
from .validate import check_int, check_number
from .workers import LocalPool, RayPool, ShardResult, ShardTask, ShardWorker

RECORD_NAME = "run.json"
RECORD_SCHEMA = "ditrt.generate"
RECORD_VERSION = 1
PNG_DIR = "png"
SHARD_ATTEMPTS = 3  # a shard whose worker died this many times fails the run
LABEL_KINDS = ("balanced", "random")
# The Philox draw words of the label streams: noise uses draw 0 (x_T) and k + 1 for step k, so
# these two are never noise (a sampler would need 2^32 - 2 steps to reach them).
RANDOM_LABEL_DRAW = 0xFFFFFFFF
BALANCED_LABEL_DRAW = 0xFFFFFFFE
MAX_IMAGES = (1 << 48) - 1  # image indices are 64-bit in the noise stream; a run this large is a typo


# ---- options --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingOptions:
    """The options of `ditrt sample` (None: the manifest's default): what to sample and how each
    worker loads its pipeline."""
    sampler: str | None = None
    steps: int | str | None = None
    cfg_scale: float | None = None
    guidance: str | None = None
    eta: float | None = None
    sampler_options: dict = field(default_factory=dict)
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    max_batch: int | None = None
    decoder_precision: str | None = None
    verify: bool = True
    allow_plan_host_code: bool = False
    cache: str = "none"  # feature caching (runtime/cache.py)
    cache_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Workers:
    """Where shards run: `count` local processes, or `count` Ray actors (on the cluster at `address`,
    a local Ray when None) with `gpus` GPUs each."""
    count: int = 1
    ray: bool = False
    address: str | None = None
    gpus: float = 0.0


@dataclass(frozen=True)
class GenerateJob:
    artifact: Path
    out: Path  # the run directory: run.json, shards/, png/
    num_images: int
    labels: str = "balanced"  # balanced | random | a .npy file of N class labels
    seed: int = 0
    sampling: SamplingOptions = SamplingOptions()
    batch: int = 32  # images per pipeline call within a shard
    shard_size: int = 256
    png: bool = False  # also png/NNNNNN.png per image, as sample_ddp.py names them
    npz: Path | None = None  # the ADM evaluator's file
    resume: bool = False


@dataclass(frozen=True)
class Progress:
    images_done: int  # finished images, resumed ones included
    images_total: int
    shards_done: int
    shards_total: int
    computed: int  # images computed by this invocation
    seconds: float  # since this invocation's workers started

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.images_per_s
        return (self.images_total - self.images_done) / rate if rate > 0 else None


@dataclass
class GenerateSummary:
    images: int
    seconds: float
    images_per_s: float  # images computed by this invocation per second of it
    workers: int
    retries: int
    shards: int
    shards_computed: int
    shards_resumed: int
    backend: str | None
    output: str  # images, or latents for an artifact without a decoder
    out: str
    npz: str | None

    def to_dict(self) -> dict:
        return asdict(self)


# ---- labels ---------------------------------------------------------------------------------------

def _philox_key64(seed: int, c0, draw: int, index: np.ndarray) -> np.ndarray:
    """A 64-bit Philox word pair per counter (c0, draw, index lo, index hi) under the seed."""
    index = index.astype(np.uint64)
    x0, x1, _, _ = philox4x32_10(c0, np.uint64(draw), index & np.uint64(0xFFFFFFFF), index >> np.uint64(32),
                                 seed & 0xFFFFFFFF, seed >> 32)
    return (x0 << np.uint64(32)) | x1


def random_labels(seed: int, start: int, stop: int, num_classes: int) -> np.ndarray:
    """Labels of images start..stop-1: uniform over the classes, image i's from (seed, i) alone (a
    64-bit word mod num_classes: the bias is below num_classes / 2^64)."""
    words = _philox_key64(seed, np.uint64(0), RANDOM_LABEL_DRAW, np.arange(start, stop, dtype=np.uint64))
    return (words % np.uint64(num_classes)).astype(np.int64)


def balanced_labels(seed: int, start: int, stop: int, num_classes: int) -> np.ndarray:
    """Labels of images start..stop-1: each block of num_classes consecutive images holds every
    class once, in the order of a seeded permutation of that block. So N a multiple of the class
    count gives each class N / num_classes images (50 each for FID-50K on ImageNet), otherwise the
    counts differ by at most one, and image i's label depends on (seed, i) alone, not on N."""
    first, last = start // num_classes, (stop - 1) // num_classes
    blocks = np.arange(first, last + 1, dtype=np.uint64)[:, None]  # (B, 1)
    classes = np.arange(num_classes, dtype=np.uint64)[None, :]  # (1, C)
    keys = _philox_key64(seed, classes, BALANCED_LABEL_DRAW, np.broadcast_to(blocks, (len(blocks), num_classes)))
    order = np.argsort(keys, axis=1, kind="stable").reshape(-1)  # (B * C,) block by block
    offset = first * num_classes
    return order[start - offset:stop - offset].astype(np.int64)


def plan_labels(spec: str, seed: int, num_images: int, condition) -> tuple[np.ndarray, str]:
    """(labels int64 (N,), kind): `balanced`, `random` or a .npy file of N labels (checked against
    the model's classes)."""
    if spec in LABEL_KINDS:
        make = balanced_labels if spec == "balanced" else random_labels
        return make(seed, 0, num_images, condition.num_classes), spec
    path = Path(spec)
    if path.suffix.lower() != ".npy":
        raise InputError(f"--labels must be balanced, random or a .npy file of {num_images} class labels, got {spec!r}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header is checked against the file size
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read the labels file {path}: {e}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or len(array) != num_images:
        shape = getattr(array, "shape", None)
        raise InputError(f"the labels file {path} holds shape {shape}; --num-images {num_images} needs a 1-D array of "
                         f"{num_images} class labels")
    return condition.check(np.array(array)), "file"


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


# ---- validation ---------------------------------------------------------------------------------

class _SpecOnly:
    """A stand-in backend carrying only the denoiser's spec: `Pipeline.start` validates a request
    with it (the very checks a worker's run makes) before any worker loads a network."""
    max_batch, min_batch, name = None, 1, "validation"

    def __init__(self, network):
        self.network = network

    def __call__(self, feeds):
        raise StepError("the validation stand-in runs no network")


def resolve_sampling(manifest: Manifest, sampling: SamplingOptions, labels: np.ndarray) -> dict:
    """The options that decide the pixels, with the manifest's defaults filled in and every value
    checked by the pipeline itself: the keyword arguments of `Pipeline.sample` for each batch."""
    from .pipeline import Pipeline
    run = Pipeline(_SpecOnly(manifest.network("denoiser")), manifest).start(
        labels[:1], sampling.steps, sampling.sampler, sampling.cfg_scale, sampling.guidance, 0, sampling.eta,
        cache=sampling.cache, cache_options=sampling.cache_options, **sampling.sampler_options)
    run.close()  # only validated: no noise prefetch
    d = manifest.defaults
    cached = run.cache.settings.to_dict() if run.cache is not None else {}  # uncached records stay as before
    return {"sampler": run.sampler.name, "num_steps": str(sampling.steps if sampling.steps is not None else d.steps),
            "cfg_scale": run.cfg_scale, "guidance": sampling.guidance or d.guidance, **run.options, **cached}


# ---- the run record -------------------------------------------------------------------------------

def artifact_identity(manifest: Manifest) -> dict:
    """{"sha256": ..., "files": {name: sha256}}: the manifest file and every graph file (external
    data included) of every network, hashed from disk; `sha256` is over the sorted file list."""
    files = {MANIFEST_NAME: sha256_file(manifest.directory / MANIFEST_NAME)}
    for network in manifest.networks:
        for precision in manifest.precisions(network):
            for name, (recorded, actual) in manifest.file_hashes(network, precision).items():
                files[name] = actual or "missing"
    files = dict(sorted(files.items()))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": files}


# The recorded options by the flag that sets them (a sampler's own options are --option NAME=VALUE).
OPTION_FLAGS = {"num_images": "--num-images", "seed": "--seed", "labels": "--labels", "shard_size": "--shard-size",
                "batch": "--batch", "sampler": "--sampler", "num_steps": "--steps", "cfg_scale": "--cfg-scale",
                "guidance": "--guidance", "eta": "--eta", "backend": "--backend", "precision": "--precision",
                "max_batch": "--max-batch", "decoder_precision": "--decoder-precision",
                "output": "output (images with a decoder, latents without)"}


def _differences(recorded: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(now)):
        if recorded.get(key) == now.get(key):
            continue
        if key == "labels_sha256":
            out.append("--labels: the labels differ from the run's")
        else:
            out.append(f"{OPTION_FLAGS.get(key, f'--option {key}')}: {recorded.get(key)!r} in the run, "
                       f"{now.get(key)!r} now")
    return out


def check_resumable(record: dict, artifact: dict, options: dict, out: Path) -> None:
    """Refuse to continue a run with another artifact, other options or another noise stream,
    naming each difference."""
    if record.get("schema") != RECORD_SCHEMA or record.get("version") != RECORD_VERSION:
        raise InputError(f"{out / RECORD_NAME} is not a ditrt generate run record (schema {record.get('schema')!r} "
                         f"version {record.get('version')!r}); choose another --out")
    problems = []
    if record.get("noise") != NOISE_VERSION:
        problems.append(f"noise stream: {record.get('noise')!r} in the run, {NOISE_VERSION!r} in this ditrt")
    old = record.get("artifact", {})
    if old.get("sha256") != artifact["sha256"]:
        before, now = old.get("files") or {}, artifact["files"]
        changed = [f"{name} ({'missing' if name not in now else 'new' if name not in before else 'changed'})"
                   for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        problems.append(f"artifact: sha256 {str(old.get('sha256'))[:12]}... in the run, {artifact['sha256'][:12]}... "
                        f"now; files that differ: {', '.join(changed) or 'none listed'}")
    problems += _differences(record.get("options", {}), options)
    if problems:
        raise InputError(f"--resume: {out} was generated with something else; refusing to mix the two in one run:"
                         + "".join(f"\n  {problem}" for problem in problems)
                         + "\nrerun with the run's artifact and options, or choose another --out")


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the run record {path}: {e}") from None
    if not isinstance(record, dict):
        raise InputError(f"{path} is not a ditrt generate run record")
    return record


def _recorded_shards(record: dict, num_shards: int, path: Path) -> dict:
    """The record's finished shards, each an index of the plan with a sha256 (a hand-edited record
    that says otherwise is refused)."""
    entries = record.get("shards")
    good = isinstance(entries, dict) and all(
        isinstance(key, str) and key.isdigit() and int(key) < num_shards and isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str) for key, entry in entries.items())
    if not good:
        raise InputError(f"{path}: field shards must map shard indices 0..{num_shards - 1} to their file's sha256; "
                         "the record is damaged (remove the run directory to start again)")
    return entries


# ---- the job --------------------------------------------------------------------------------------

def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_job(job: GenerateJob, workers: Workers) -> None:
    check_int(job.num_images, "--num-images", 1, MAX_IMAGES)
    check_int(job.seed, "--seed", 0, (1 << 64) - 1)
    check_int(job.shard_size, "--shard-size", 1, 1 << 20)
    check_int(job.batch, "--batch", 1, 1 << 16)
    check_int(workers.count, "--workers", 1, 4096)
    check_number(workers.gpus, "--gpus-per-worker", 0.0, 64.0)
    if not workers.ray and (workers.address is not None or workers.gpus):
        raise InputError("--address and --gpus-per-worker apply to --ray workers only")
    s = job.sampling
    if s.threads is not None:
        check_threads(s.threads)
    check_max_batch(s.max_batch)
    if s.backend != "auto":
        parse_backend(s.backend)
    if job.npz is not None:
        check_writable(Path(job.npz))
    if not isinstance(job.labels, str):
        raise InputError(f"--labels must be balanced, random or a .npy file, got {job.labels!r}")


def _open_run(job: GenerateJob, artifact: dict, options: dict, shards: list[Shard], log) -> dict:
    """The run record: a new one, or the recorded run (checked) with the shards whose files still
    match; temporary files of a killed run are removed."""
    out, record_path = Path(job.out), Path(job.out) / RECORD_NAME
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    record = None
    if record_path.exists():
        if not job.resume:
            raise InputError(f"{out} holds a generate run already ({RECORD_NAME}): add --resume to continue it, or "
                             "choose another --out")
        record = _read_record(record_path)
        check_resumable(record, artifact, options, out)
    else:
        if out.is_dir() and any(out.iterdir()):
            found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise InputError(f"--out {out} is not empty ({found}) and holds no run record ({RECORD_NAME}); choose a "
                             "new or empty directory")
        if job.resume:
            log(f"note: {out} holds no run to resume; starting one")
        record = {"schema": RECORD_SCHEMA, "version": RECORD_VERSION, "ditrt": __version__, "noise": NOISE_VERSION,
                  "artifact": {"path": str(job.artifact), **artifact}, "options": options, "backend": None,
                  "num_shards": len(shards), "shards": {}}
    for folder in (SHARD_DIR, PNG_DIR):
        for tmp in (out / folder).glob(".*.tmp") if (out / folder).is_dir() else ():
            tmp.unlink(missing_ok=True)  # a file being written when a run was killed: redone below
            log(f"note: removed {folder}/{tmp.name}, left half-written by a killed run")
    kept = {}
    for key, entry in _recorded_shards(record, len(shards), record_path).items():
        path = out / shards[int(key)].name  # the plan's name, whatever the record says
        if not path.is_file():
            log(f"note: shard {key} is recorded but {path} is missing; computing it again")
        elif sha256_file(path) != entry["sha256"]:
            log(f"note: shard {key}: {path} no longer matches its sha256; computing it again")
        else:
            kept[key] = entry
    record["shards"] = kept
    write_json_atomic(record_path, record)
    return record


def generate(job: GenerateJob, workers: Workers = Workers(), progress: Callable[[Progress], None] | None = None,
             log: Callable[[str], None] = lambda m: None, worker_class=ShardWorker) -> GenerateSummary:
    """Run (or resume) a generation job; see the module docstring. `worker_class` is what each
    worker process or actor runs (ShardWorker; tests pass a subclass)."""
    began = time.perf_counter()
    _check_job(job, workers)
    manifest = load_manifest(job.artifact)
    output = "images" if "decoder" in manifest.networks else "latents"
    if output == "latents":
        if job.png or job.sampling.decoder_precision is not None:
            raise InputError(f"{job.artifact} has no decoder network, so no images can be written (--png, "
                             "--decoder-precision); export with --vae DIR to add one")
        log(f"note: {job.artifact} has no decoder network: the shards and the npz hold the latents (float32 "
            "N, C, H, W), not images (export with --vae DIR for images)")
    (condition,) = [t.condition for t in manifest.network("denoiser").conditions]
    labels, label_kind = plan_labels(job.labels, job.seed, job.num_images, condition)
    sample_kwargs = resolve_sampling(manifest, job.sampling, labels)
    s = job.sampling
    options = {"output": output, "num_images": job.num_images, "seed": job.seed, "labels": label_kind,
               "labels_sha256": labels_digest(labels), "shard_size": job.shard_size, "batch": job.batch,
               "backend": s.backend, "precision": s.precision, "max_batch": s.max_batch,
               "decoder_precision": s.decoder_precision, **sample_kwargs}
    shards = plan_shards(job.num_images, job.shard_size)
    out = Path(job.out)
    log(f"hashing the artifact {job.artifact} ...")
    artifact = artifact_identity(manifest)
    with claimed_output(out, log=log):
        record = _open_run(job, artifact, options, shards, log)
        resumed = len(record["shards"])
        todo = [shard for shard in shards if str(shard.index) not in record["shards"]]
        if resumed:
            log(f"resuming: {resumed} of {len(shards)} shards verified, {len(todo)} to compute")
        retries, used, seconds = 0, 0, 0.0
        if todo:
            used = min(workers.count, len(todo))
            # ONNX Runtime threads: the cores shared by the local workers; a Ray actor asks for one CPU (a GPU
            # actor needs few) unless --threads says more.
            threads = s.threads or (1 if workers.ray else max(1, _cpu_count() // used))
            load_kwargs = {"backend": s.backend, "precision": s.precision, "threads": threads,
                           "max_batch": s.max_batch, "allow_plan_host_code": s.allow_plan_host_code,
                           "verify": s.verify, "decoder_precision": s.decoder_precision}
            worker_args = {"artifact": str(job.artifact), "decode": output == "images", "load_kwargs": load_kwargs,
                           "sample_kwargs": sample_kwargs, "seed": job.seed, "batch": job.batch}
            if workers.ray:
                pool = RayPool(worker_class, worker_args, workers.address, cpus=threads, gpus=workers.gpus, log=log)
            else:
                pool = LocalPool(worker_class, worker_args)
            started = time.perf_counter()
            try:
                retries = _schedule(pool, used, [ShardTask(sh, labels[sh.start:sh.stop]) for sh in todo], record, job,
                                    shards, progress, started, log)
                seconds = time.perf_counter() - started  # workers' start-up included, Ray's connection not
            finally:
                pool.close()
        if job.png:
            _fill_pngs(out, shards, record, log)
        if job.npz is not None:
            log(f"writing {job.npz} ...")
            npz_tmp = Path(job.npz).parent.glob(f".{Path(job.npz).name}.*.tmp")  # left by a run killed while writing
            for tmp in npz_tmp if Path(job.npz).parent.is_dir() else ():
                tmp.unlink(missing_ok=True)
            shape = write_npz(Path(job.npz), [(sh, out / sh.name) for sh in shards], labels, output)
            log(f"wrote {job.npz}: arr_0 ({output}) {shape}, labels")
    computed = sum(sh.stop - sh.start for sh in todo)
    return GenerateSummary(images=job.num_images, seconds=round(time.perf_counter() - began, 3),
                           images_per_s=round(computed / seconds, 3) if computed and seconds > 0 else 0.0,
                           workers=used, retries=retries, shards=len(shards), shards_computed=len(todo),
                           shards_resumed=resumed, backend=record.get("backend"), output=output, out=str(out),
                           npz=str(job.npz) if job.npz is not None else None)


def _schedule(pool, count: int, tasks: list[ShardTask], record: dict, job: GenerateJob, shards: list[Shard],
              progress, started: float, log) -> int:
    """Hand tasks to idle workers until every shard is recorded; replace dead workers and retry
    their shard (SHARD_ATTEMPTS in all). Returns the number of retries."""
    out = Path(job.out)
    todo, attempts, busy, idle = deque(tasks), {}, {}, []
    retries, failed, deaths_before_ready = 0, None, 0
    computed = 0
    for _ in range(count):
        pool.start()

    def report() -> None:
        if progress:
            done = sum(e["images"] for e in record["shards"].values())
            progress(Progress(done, job.num_images, len(record["shards"]), len(shards), computed,
                              time.perf_counter() - started))

    report()
    while busy or (todo and failed is None):
        while idle and todo and failed is None:
            slot, task = idle.pop(), todo.popleft()
            busy[slot] = task
            attempts[task.shard.index] = attempts.get(task.shard.index, 0) + 1
            pool.submit(slot, task)
        for slot, kind, *payload in pool.events(0.5):
            if kind == "ready":
                deaths_before_ready = 0
                _check_backend(record, payload[0], out)
                idle.append(slot)
            elif kind == "done":
                task, result = busy.pop(slot), payload[0]
                if result.shard != task.shard:
                    raise StepError(f"a worker returned shard {result.shard.index} for shard {task.shard.index}")
                _record_shard(out, result, record, job.png, record["options"]["output"])
                computed += result.shard.stop - result.shard.start
                idle.append(slot)
                report()
            elif kind == "error":  # not a death: the same input would fail again, so no retry
                code, text = payload
                where, kept = str(busy[slot].shard) if slot in busy else "a worker", len(record["shards"])
                if code is None:
                    raise StepError(f"{where} failed with a bug in ditrt ({kept} finished shards are kept):\n{text}")
                raise (InputError if code == 2 else StepError)(f"{where}: {text} ({kept} finished shards are kept in "
                                                               f"{out})")
            elif kind == "died":
                reason = payload[0]
                task = busy.pop(slot, None)
                if slot in idle:
                    idle.remove(slot)
                if task is None:
                    deaths_before_ready += 1
                    log(f"warning: a worker died while loading or idle ({reason})")
                    if deaths_before_ready >= SHARD_ATTEMPTS:
                        raise StepError(f"workers die while loading the artifact ({reason}, {deaths_before_ready} "
                                        f"times in a row); {len(record['shards'])} finished shards are kept in {out}")
                else:
                    index = task.shard.index
                    log(f"warning: the worker of {task.shard} died ({reason}); attempt {attempts[index]} of "
                        f"{SHARD_ATTEMPTS}")
                    if attempts[index] >= SHARD_ATTEMPTS:
                        failed = (task, reason)
                    else:
                        retries += 1
                        todo.appendleft(task)
                if todo and failed is None:
                    pool.start()
    if failed is None and len(record["shards"]) != len(shards):
        raise StepError(f"the workers stopped with {len(shards) - len(record['shards'])} shards not done")  # a bug
    if failed is not None:
        task, reason = failed
        raise StepError(f"{task.shard} failed: its worker died {SHARD_ATTEMPTS} times (last: {reason}); "
                        f"{len(record['shards'])} finished shards are kept in {out}: run again with --resume to "
                        "compute the rest")
    return retries


def _check_backend(record: dict, backend: str, out: Path) -> None:
    """Every shard of a run comes from one backend (another one would change the bits)."""
    if record.get("backend") is None:
        record["backend"] = backend
    elif record["backend"] != backend:
        raise StepError(f"a worker loaded the {backend} backend, but this run's shards come from {record['backend']}; "
                        f"pass --backend {record['backend']} (the record is {out / RECORD_NAME})")


def _record_shard(out: Path, result: ShardResult, record: dict, png: bool, output: str) -> None:
    """Write the shard (and its PNGs), then record it: a recorded shard is always complete."""
    shard = result.shard
    indices = np.arange(shard.start, shard.stop, dtype=np.int64)
    if png:
        for image, index in zip(result.samples, indices):
            write_png(out / PNG_DIR / per_image_name(int(index)), image)
    digest = write_shard(out / shard.name, result.samples, result.labels, indices, output)
    record.setdefault("sample_shape", list(result.samples.shape[1:]))
    record["shards"][str(shard.index)] = {"file": shard.name, "sha256": digest, "first": shard.start,
                                          "images": len(indices), "seconds": round(result.seconds, 3)}
    write_json_atomic(out / RECORD_NAME, record)


def _fill_pngs(out: Path, shards: list[Shard], record: dict, log) -> None:
    """PNGs of recorded shards that are missing (deleted, or a resumed run that wrote none) come from
    the shard files: nothing is sampled again."""
    for shard in shards:
        missing = [i for i in range(shard.start, shard.stop) if not (out / PNG_DIR / per_image_name(i)).is_file()]
        if missing:
            images, _ = read_shard(out / shard.name, shard, "images")
            for i in missing:
                write_png(out / PNG_DIR / per_image_name(i), images[i - shard.start])
            log(f"note: wrote {len(missing)} missing PNGs of shard {shard.index} from its file")
