"""Bulk generation: the official `sample_ddp.py` job (N images for an FID evaluation or a synthetic
data set), sharded over local worker processes or Ray, resumable, and identical whatever the number
of workers (docs/generate.md).

- Image i's label and noise depend only on (seed, i): noise is image i of the seed's Philox stream
  (runtime/sampling/noise.py), labels come from the same generator on a draw word noise never uses.
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

Shard files and the npz: runtime/jobs/shards.py; the workers and their pools: runtime/jobs/workers.py.
torch-free; Ray is imported only for a Ray run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.version import __version__
from ..execution.backends import check_threads, parse_backend, resolve_backend
from ..execution.chunking import BackendBase, check_max_batch
from ..core.errors import InputError, StepError
from ..core.files import (Input, check_outputs, check_regular, claimed_output, hash_file, read_json, sha256_file,
                    verified_hashes, write_json_atomic)
from ..core.images import per_image_name, write_png
from ..artifact.labels import as_number, resolve_labels, split_labels
from ..artifact.manifest import MANIFEST_NAME, Manifest, load_manifest
from ..sampling.noise import NOISE_VERSION, philox4x32_10
from ..execution.pipeline import class_condition, decoder_backend_name
from ..sampling.request import LoadOptions, SampleSpec
from .outputs import check_writable
from .shards import SHARD_DIR, Shard, plan_shards, read_shard, write_npz, write_shard
from ..core.validate import check_int, check_number
from .workers import LocalPool, RayPool, ShardResult, ShardTask, ShardWorker

RECORD_NAME = "run.json"
RECORD_SIGNATURE = "run.sig"  # with --private-key: the record's signature, renewed with every write
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
    seed: int = 0  # the seed of image i's label and noise (the job's: `sampling`'s seed is not read)
    sampling: SampleSpec = SampleSpec()  # what to sample; labels, seed and image offset come from the job
    batch: int = 32  # images per pipeline call within a shard
    shard_size: int = 256
    png: bool = False  # also png/NNNNNN.png per image, as sample_ddp.py names them
    npz: Path | None = None  # the ADM evaluator's file
    resume: bool = False
    private_key: Path | None = None  # sign the run record (run.sig) after every write
    load: LoadOptions = LoadOptions()  # how each worker loads its pipeline (the decoder: when the artifact has one;
    # threads None: the cores shared by the workers; public_key checked once, by the coordinator)


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


def plan_labels(spec: str, seed: int, num_images: int, condition, names=None) -> tuple[np.ndarray, str]:
    """(labels int64 (N,), kind): `balanced`, `random`, a .npy file of N labels, or a comma-separated
    list of class numbers or names (`names`: the manifest's ClassNames) that the images are balanced
    over, in the seeded order `balanced` uses (checked against the model's classes)."""
    if spec in LABEL_KINDS:
        make = balanced_labels if spec == "balanced" else random_labels
        return make(seed, 0, num_images, condition.num_classes), spec
    path = Path(spec)
    if path.suffix.lower() != ".npy":
        return listed_labels(spec, seed, num_images, condition, names), "list"
    try:
        check_regular(path, "labels file")  # a FIFO would block np.load, a device never end
    except InputError as e:
        raise InputError(f"cannot read the labels file {path}: {e}") from None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header is checked against the file size
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"cannot read the labels file {path}: {e}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or len(array) != num_images:
        shape = getattr(array, "shape", None)
        raise InputError(f"the labels file {path} holds shape {shape}; --num-images {num_images} needs a 1-D array of "
                         f"{num_images} class labels")
    return condition.check(np.array(array)), "file"


def listed_labels(spec: str, seed: int, num_images: int, condition, names=None) -> np.ndarray:
    """N labels balanced over the listed classes: image i gets classes[balanced_labels(seed, i, K)]."""
    items = split_labels(spec)
    if names is None and any(as_number(item) is None for item in items):
        raise InputError(f"--labels must be balanced, random or a .npy file of {num_images} class labels, got {spec!r} "
                         "(nor is it a list of class numbers; this artifact has no class names)")
    classes = condition.check(resolve_labels(items, names))
    return classes[balanced_labels(seed, 0, num_images, len(classes))]


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


# ---- validation ---------------------------------------------------------------------------------

class _SpecOnly(BackendBase):
    """A stand-in backend carrying only the denoiser's spec: `Pipeline.start` validates a request
    with it (the very checks a worker's run makes) before any worker loads a network."""

    def __init__(self, network):
        super().__init__(network, "validation", None)
        self.name = "validation"

    def infer(self, feeds):
        raise StepError("the validation stand-in runs no network")


def resolve_sampling(manifest: Manifest, sampling: SampleSpec, labels: np.ndarray) -> dict:
    """The options that decide the pixels, with the manifest's defaults filled in and every value
    checked by the pipeline itself (the run record's options)."""
    from ..execution.pipeline import Pipeline
    run = Pipeline(_SpecOnly(manifest.network("denoiser")), manifest).start_spec(sampling.for_batch(labels[:1], 0, 0))
    run.close()  # only validated: no noise prefetch
    d = manifest.defaults
    cached = run.cache.settings.to_dict() if run.cache is not None else {}  # uncached records stay as before
    return {"sampler": run.sampler.name, "num_steps": str(sampling.steps if sampling.steps is not None else d.steps),
            "cfg_scale": run.cfg_scale, "guidance": sampling.guidance or d.guidance, **run.options, **cached}


# ---- the run record -------------------------------------------------------------------------------

def graphs_read(manifest: Manifest, load: LoadOptions, decode: bool) -> list[tuple[str, str]]:
    """The (network, precision) graphs the workers' backends read: the denoiser's (and the
    decoder's when `decode`) as runtime.load resolves the options, on a backend that reads its
    graph files (ONNX Runtime; a TensorRT backend reads its plan, which it checks itself)."""
    wanted = [("denoiser", load.backend, load.precision)]
    if decode:
        wanted.append(("decoder", decoder_backend_name(load.backend), load.decoder_precision))
    read = []
    for network, backend, precision in wanted:
        kind, precision = resolve_backend(manifest, backend, precision, network)
        if kind.reads_graph:
            read.append((network, precision))
    return read


def artifact_identity(manifest: Manifest, used: list[tuple[str, str]]) -> tuple[dict, list[Path]]:
    """({"sha256": ..., "files": {name: sha256}}, the files hashed): the manifest file and the
    graph files (external data included) of the `used` (network, precision) pairs hashed from disk,
    every other graph file by the sha256 the manifest records for it (the manifest's own hash covers
    those: they are never read); `sha256` is over the sorted file list."""
    files, hashed = {MANIFEST_NAME: sha256_file(manifest.directory / MANIFEST_NAME)}, []
    for network in manifest.networks:
        for precision in manifest.precisions(network):
            read = (network, precision) in used
            for name, (recorded, actual) in manifest.file_hashes(network, precision, hashes=read).items():
                files[name] = actual or "missing"
                if read and actual:
                    hashed.append(manifest.directory / name)
    files = dict(sorted(files.items()))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": files}, hashed


@dataclass(frozen=True)
class Difference:
    """A recorded option of a run (its run.json name) that differs now."""
    option: str
    recorded: object
    now: object


class RunMismatch(InputError):
    """--resume with another artifact, other options or another noise stream. `problems` are the
    artifact's and noise's differences in words, `differences` the options' by their record names;
    `describe(name_of)` words them with another name for each option (the CLI: its flags)."""

    def __init__(self, out: Path, problems: list[str], differences: list[Difference]):
        self.out, self.problems, self.differences = out, problems, differences
        super().__init__(self.describe(lambda option: option))

    def describe(self, name_of) -> str:
        lines = self.problems + [f"{name_of('labels')}: the labels differ from the run's" if d.option == "labels_sha256"
                                 else f"{name_of(d.option)}: {d.recorded!r} in the run, {d.now!r} now"
                                 for d in self.differences]
        return (f"--resume: {self.out} was generated with something else; refusing to mix the two in one run:"
                + "".join(f"\n  {line}" for line in lines)
                + "\nrerun with the run's artifact and options, or choose another --out")


def check_resumable(record: dict, artifact: dict, options: dict, out: Path) -> None:
    """Refuse to continue a run with another artifact, other options or another noise stream,
    naming each difference (RunMismatch)."""
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
    recorded = record.get("options", {})
    differences = [Difference(key, recorded.get(key), options.get(key)) for key in sorted(set(recorded) | set(options))
                   if recorded.get(key) != options.get(key)]
    if problems or differences:
        raise RunMismatch(out, problems, differences)


def _read_record(path: Path) -> dict:
    record = read_json(path, "run record")  # bounded: a FIFO, /dev/zero or 100k nested lists end in a clear error
    if not isinstance(record, dict):
        raise InputError(f"{path} is not a ditrt generate run record")
    return record


def _recorded_shards(record: dict, shards: list[Shard], path: Path) -> dict:
    """The record's finished shards, each under the plan's index (a canonical decimal: "3", not
    "03", "٣" or "²") with its sha256 and the plan's first image and count; a hand-edited record
    that says otherwise is refused, naming the key."""
    entries = record.get("shards")
    damaged = f"{path}: the record is damaged (remove the run directory to start again)"
    if not isinstance(entries, dict):
        raise InputError(f"{damaged}: field shards must map shard indices 0..{len(shards) - 1} to their file's sha256")
    for key, entry in entries.items():
        index = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 20 else None
        if index is None or str(index) != key or index >= len(shards):
            raise InputError(f"{damaged}: field shards has the key {_shorten(key)!r}, not a shard index of this run "
                             f"(0..{len(shards) - 1})")
        shard = shards[index]
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and entry.get("first") == shard.start and entry.get("images") == shard.stop - shard.start):
            raise InputError(f"{damaged}: field shards[{key!r}] must hold the sha256 of {shard.name}, first "
                             f"{shard.start} and images {shard.stop - shard.start}")
    return entries


def _shorten(text, limit: int = 40) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    load = job.load
    if load.threads is not None:
        check_threads(load.threads)
    check_max_batch(load.max_batch)
    if load.backend != "auto":
        parse_backend(load.backend)
    if job.npz is not None:
        check_writable(Path(job.npz))
    if not isinstance(job.out, (str, os.PathLike)) or not str(job.out):
        raise InputError(f"--out must name the run directory, got {str(job.out)!r}")
    _check_run_dir(Path(job.out))
    if not isinstance(job.labels, str):
        raise InputError(f"--labels must be balanced, random, a .npy file or a list of classes, got {job.labels!r}")


def _check_run_dir(out: Path) -> None:
    """The run directory is a folder of its own: its lock file goes beside it, in its parent, so the
    root, the current directory and the folders above it ('/', '.', '', '..') are refused."""
    try:
        absolute = out.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise InputError(f"--out {out} cannot be resolved: {e}") from None
    if not out.name or absolute == absolute.parent or Path.cwd().resolve().is_relative_to(absolute):
        raise InputError(f"--out {str(out)!r} is {absolute}, the root, the current directory or one above it: a run "
                         "needs a directory of its own (its lock file goes beside it), e.g. --out runs/fid50k")


def _run_inputs(job: GenerateJob, manifest: Manifest) -> list[Input]:
    """What the run reads or keeps, which --npz may not replace: the artifact, the --labels file,
    the run record, its lock and every shard or PNG of the run."""
    out = Path(job.out)
    inputs = manifest.inputs()
    if job.labels not in LABEL_KINDS:
        inputs.append(Input("the --labels file", Path(job.labels)))
    return inputs + [Input("the run record", out / RECORD_NAME), Input("the run's lock", out.with_name(f".{out.name}.lock")),
                     Input("the run's shards folder", out / SHARD_DIR, folder=True),
                     Input("the run's PNG folder", out / PNG_DIR, folder=True)]


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
        _check_record_signature(job, out)
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
    for key, entry in _recorded_shards(record, shards, record_path).items():
        path = out / shards[int(key)].name  # the plan's name, whatever the record says
        if not path.is_file():
            log(f"note: shard {key} is recorded but {path} is missing; computing it again")
        elif sha256_file(path) != entry["sha256"]:
            log(f"note: shard {key}: {path} no longer matches its sha256; computing it again")
        else:
            kept[key] = entry
    record["shards"] = kept
    _write_record(out, record, job.private_key)
    return record


def _check_record_signature(job: GenerateJob, out: Path) -> None:
    """On resume: --public-key refuses a record whose signature is missing or does not verify (a
    rewritten shard with its sha256 updated in run.json); --private-key checks the record's own
    signature with its public key before signing the record again (never blessing an edit)."""
    from ..artifact.signing import public_key_of, require_signature
    record_path, signature = out / RECORD_NAME, out / RECORD_SIGNATURE
    if job.load.public_key is not None:
        require_signature(record_path, job.load.public_key, signature, what="run record")
    if job.private_key is not None and os.path.lexists(signature):
        with tempfile.TemporaryDirectory(prefix="ditrt-key-") as tmp:
            key = Path(tmp) / "public.pem"
            key.write_bytes(public_key_of(job.private_key))
            require_signature(record_path, key, signature, what="run record")


def _write_record(out: Path, record: dict, private_key: Path | None) -> None:
    write_json_atomic(out / RECORD_NAME, record)
    if private_key is not None:
        from ..artifact.signing import sign_path
        sign_path(out / RECORD_NAME, private_key, out / RECORD_SIGNATURE)


def generate(job: GenerateJob, workers: Workers = Workers(), progress: Callable[[Progress], None] | None = None,
             log: Callable[[str], None] = lambda m: None, worker_class=None) -> GenerateSummary:
    """Run (or resume) a generation job; see the module docstring. `worker_class` is what each
    worker process or actor runs (None: ShardWorker; tests pass a subclass)."""
    worker_class = worker_class or ShardWorker
    began = time.perf_counter()
    _check_job(job, workers)
    if job.private_key is not None:
        from ..artifact.signing import public_key_of
        public_key_of(job.private_key)  # a bad key is refused before any work
    if job.load.public_key is not None:  # checked here once; the workers trust this check
        from ..artifact.signing import require_signature
        require_signature(job.artifact, job.load.public_key)
    manifest = load_manifest(job.artifact)
    output = "images" if "decoder" in manifest.networks else "latents"
    if output == "latents":
        if job.png or job.load.decoder_precision is not None:
            raise InputError(f"{job.artifact} has no decoder network, so no images can be written (--png, "
                             "--decoder-precision); export with --vae DIR to add one")
        log(f"note: {job.artifact} has no decoder network: the shards and the npz hold the latents (float32 "
            "N, C, H, W), not images (export with --vae DIR for images)")
    condition = class_condition(manifest.network("denoiser")).condition
    labels, label_kind = plan_labels(job.labels, job.seed, job.num_images, condition, manifest.labels)
    load = job.load
    options = {"output": output, "num_images": job.num_images, "seed": job.seed, "labels": label_kind,
               "labels_sha256": labels_digest(labels), "shard_size": job.shard_size, "batch": job.batch,
               "backend": load.backend, "precision": load.precision, "max_batch": load.max_batch,
               "decoder_precision": load.decoder_precision, **resolve_sampling(manifest, job.sampling, labels)}
    shards = plan_shards(job.num_images, job.shard_size)
    out = Path(job.out)
    check_outputs([("--npz", job.npz)], _run_inputs(job, manifest))
    log(f"hashing the artifact {job.artifact} ...")
    # Each graph file the workers read is hashed once, here; the workers trust these digests
    # (files.trust_verified_hashes: same machine, same file identity), the unused graphs are not read.
    artifact, hashed = artifact_identity(manifest, graphs_read(manifest, load, output == "images"))
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
            threads = load.threads or (1 if workers.ray else max(1, _cpu_count() // used))
            # The workers sample the job's spec as given (resolved against the same manifest, checked by its
            # sha256: the recorded options); its max_model_calls is not recorded: it changes no pixel.
            worker_args = {"artifact": str(job.artifact), "load": replace(load, threads=threads, public_key=None,
                                                                          decoder=output == "images"),
                           "spec": job.sampling, "seed": job.seed, "batch": job.batch,
                           "trusted_hashes": verified_hashes(hashed) if load.verify else None}
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
            _fill_pngs(out, shards, record, log, job.private_key)
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
                _record_shard(out, result, record, job.png, record["options"]["output"], job.private_key)
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


def _record_shard(out: Path, result: ShardResult, record: dict, png: bool, output: str,
                  private_key: Path | None = None) -> None:
    """Write the shard (and its PNGs), then record it: a recorded shard is always complete."""
    shard = result.shard
    indices = np.arange(shard.start, shard.stop, dtype=np.int64)
    pngs = _write_pngs(out, shard, result.samples) if png else None
    digest = write_shard(out / shard.name, result.samples, result.labels, indices, output)
    record.setdefault("sample_shape", list(result.samples.shape[1:]))
    record["shards"][str(shard.index)] = {"file": shard.name, "sha256": digest, "first": shard.start,
                                          "images": len(indices), "seconds": round(result.seconds, 3),
                                          **({"png_sha256": pngs} if pngs else {})}
    _write_record(out, record, private_key)


def _write_pngs(out: Path, shard: Shard, images: np.ndarray) -> str:
    """The shard's PNGs, png/NNNNNN.png (sample_ddp.py's names); returns their digest (_pngs_digest)."""
    for j, image in enumerate(images):
        write_png(out / PNG_DIR / per_image_name(shard.start + j), image)
    return _pngs_digest(out, shard)


def _pngs_digest(out: Path, shard: Shard) -> str | None:
    """The sha256 over the sha256 hex digests of the shard's PNG files in index order (the record's
    png_sha256); None when one is missing or not a regular file."""
    digests = []
    for i in range(shard.start, shard.stop):
        path = out / PNG_DIR / per_image_name(i)
        if path.is_symlink() or not path.is_file():
            return None
        digests.append(hash_file(path))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _fill_pngs(out: Path, shards: list[Shard], record: dict, log, private_key: Path | None = None) -> None:
    """Every shard's PNGs as its record says (png_sha256): missing, changed (a junk or edited file)
    or never recorded ones (a run without --png) are written again from the shard file; nothing is
    sampled again."""
    rewritten = 0
    for shard in shards:
        entry = record["shards"][str(shard.index)]
        if entry.get("png_sha256") is not None and _pngs_digest(out, shard) == entry["png_sha256"]:
            continue
        images, _ = read_shard(out / shard.name, shard, "images")
        entry["png_sha256"] = _write_pngs(out, shard, images)
        rewritten += 1
        log(f"note: wrote the PNGs of shard {shard.index} from its file (missing, changed or not yet recorded)")
    if rewritten:
        _write_record(out, record, private_key)
