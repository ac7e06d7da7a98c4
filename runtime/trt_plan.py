"""TensorRT plan logic that needs no TensorRT: the optimisation profile, build flags, plan file
names, the manifest's `engines` entries and the rules that decide whether a plan can run here.

Kept free of tensorrt/cuda imports so that all of it is unit-tested on machines without a GPU;
runtime/tensorrt.py and exporter/trt_build.py do the TensorRT work on top of it.

Batch axis: the engine's batch is counted in ENGINE ROWS. With classifier-free guidance every
image is two rows (its conditional row and a null-class row), so `--max-batch 64` runs 32 guided
images (or 64 unguided ones) per engine call; the runtime chunks larger requests.

Compatibility rules (TensorRT docs, "Engine Compatibility", 10.x/11.x, and the 11.4.1 support matrix):
- A plan runs only on the TensorRT version that built it (major.minor.patch.build) ...
- ... unless built VERSION_COMPATIBLE: then it runs on the same or a newer TensorRT of the same
  major version, and across majors only for the pairs the support matrix lists (8 -> 10, 10 -> 11).
  The runtime must then set `engine_host_code_allowed` (the plan carries the lean runtime).
- A plan runs only on GPUs of the compute capability that built it (another GPU model of the same
  compute capability, H100 SXM vs PCIe say, runs it with a TensorRT warning and tactics timed elsewhere) ...
- ... unless built with hardware compatibility AMPERE_PLUS (any GPU of compute capability >= 8.0)
  or SAME_COMPUTE_CAPABILITY (any GPU with the builder's compute capability).
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

from .errors import InputError, StepError

INSTALL_HINT = ("TensorRT engines need TensorRT, Polygraphy and cuda-python: pip install 'ditrt[trt]', "
                "and an NVIDIA GPU with its driver. Without them, use the ONNX Runtime backend "
                "(--backend onnxruntime).")

HARDWARE_COMPAT = ("none", "ampere+", "same-cc")
OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default 3
# Version-compatible plans across major versions: only these (builder major, runtime major) pairs
# are supported (TensorRT 11.4.1 support matrix, "Engine Portability").
CROSS_MAJOR_VERSION_COMPAT = frozenset({(8, 10), (10, 11)})
AMPERE = (8, 0)
# Engine fp16 output vs ONNX Runtime fp32, max error relative to the largest magnitude. The fp16
# graph itself is held to 5e-3 vs PyTorch fp32 at export (measured ~5.5e-4); TensorRT picks other
# fp16 kernels (fused attention, its own GEMM tactics and reformats), so the engine gets twice that.
# Not yet measured on a GPU: the first `ditrt build` records the real figure in the manifest.
FP16_PARITY_BOUND = 1e-2
# fp32 plans (a strongly typed build of the fp32 graph, e.g. a VAE decoder that overflows fp16):
# TensorRT allows TF32 for fp32 matmuls and convolutions by default (10-bit mantissa, ~5e-4 per op).
FP32_PARITY_BOUND = 5e-3


def parity_bound(precision: str) -> float:
    return FP16_PARITY_BOUND if precision == "fp16" else FP32_PARITY_BOUND


class TensorRTUnavailable(StepError):
    """tensorrt, polygraphy or cuda-python is missing, or there is no usable NVIDIA GPU: the
    message says which, and how to install what is missing."""

    def __init__(self, missing: str):
        super().__init__(f"{missing}. {INSTALL_HINT}")
        self.missing = missing


# ---- profile ----------------------------------------------------------------------------------

def rows_for_images(images: int, guided: bool) -> int:
    """Engine rows one sampling step needs for `images` images (guidance doubles them)."""
    return images * (2 if guided else 1)


@dataclass(frozen=True)
class EngineProfile:
    """One optimisation profile over the batch axis, in engine rows (see the module docstring)."""
    min_rows: int = 1
    opt_rows: int = 16
    max_rows: int = 64

    def __post_init__(self) -> None:
        for flag, value in (("--min-batch", self.min_rows), ("--opt-batch", self.opt_rows), ("--max-batch", self.max_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag} must be a positive integer (engine rows), got {value!r}")
        if not self.min_rows <= self.opt_rows <= self.max_rows:
            raise InputError(f"the batch profile needs min <= opt <= max, got --min-batch {self.min_rows} "
                             f"--opt-batch {self.opt_rows} --max-batch {self.max_rows}")

    @classmethod
    def for_images(cls, min_images: int, opt_images: int, max_images: int, guided: bool = True) -> "EngineProfile":
        """The profile that serves these image batch sizes per call (2 rows per image when guided)."""
        return cls(*(rows_for_images(n, guided) for n in (min_images, opt_images, max_images)))

    def images_per_call(self, guided: bool) -> int:
        """Most images one engine call takes; more are chunked over several calls."""
        return self.max_rows // (2 if guided else 1)

    def calls_per_step(self, images: int, guided: bool) -> int:
        return math.ceil(rows_for_images(images, guided) / self.max_rows)

    def to_dict(self) -> dict:
        return {"min": self.min_rows, "opt": self.opt_rows, "max": self.max_rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EngineProfile":
        return cls(data["min"], data["opt"], data["max"])

    def cli_args(self) -> list[str]:
        return ["--min-batch", str(self.min_rows), "--opt-batch", str(self.opt_rows), "--max-batch", str(self.max_rows)]


def default_profile(network) -> EngineProfile:
    """The profile `ditrt build` uses when none is given: 1/16/64 rows for the denoiser (32 guided
    images per call), 1/4/8 images for a decoder (its activations are 64x a latent's)."""
    return EngineProfile() if network.batch_unit == "rows" else EngineProfile(1, 4, 8)


def parity_batches(profile: EngineProfile) -> list[int]:
    """Engine batch sizes the post-build parity check runs: the profile's minimum and a small odd
    size (3 rows; kernels can differ from the minimum's), kept small so that the fp32 reference
    stays quick on a CPU even for DiT-XL/2."""
    return sorted({profile.min_rows, min(profile.max_rows, max(profile.min_rows, 3))})


# ---- build flags --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildFlags:
    opt_level: int = 3
    hardware_compat: str = "none"
    version_compatible: bool = False
    workspace_gb: float | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: str | None = None  # None: timing.<sm>.trt<version>.cache in the artifact

    def __post_init__(self) -> None:
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or self.opt_level not in OPT_LEVELS:
            raise InputError(f"--opt-level must be an integer {OPT_LEVELS.start}..{OPT_LEVELS.stop - 1}, got {self.opt_level!r}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise InputError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, got {self.hardware_compat!r}")
        if self.workspace_gb is not None and not (isinstance(self.workspace_gb, (int, float))
                                                  and math.isfinite(self.workspace_gb) and self.workspace_gb > 0):
            raise InputError(f"--workspace must be a positive number of GB, got {self.workspace_gb!r}")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * 2**30)

    def to_dict(self) -> dict:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The `ditrt build` options that reproduce these flags (timing cache left out: it only
        speeds the build up)."""
        args = ["--opt-level", str(self.opt_level)]
        if self.hardware_compat != "none":
            args += ["--hardware-compat", self.hardware_compat]
        if self.version_compatible:
            args.append("--version-compatible")
        if self.workspace_gb is not None:
            args += ["--workspace", f"{self.workspace_gb:g}"]
        return args


def build_command(artifact: str, profile: EngineProfile, flags: BuildFlags, network: str = "denoiser",
                  precision: str = "fp16") -> str:
    """The `ditrt build` command that makes this plan again."""
    return " ".join(["ditrt", "build", shlex.quote(str(artifact)), "--network", network,
                     *(["--precision", precision] if precision != "fp16" else []), *profile.cli_args(), *flags.cli_args()])


# ---- names and versions ---------------------------------------------------------------------------

_SM = re.compile(r"^sm(\d+)(\d)$")
_VERSION = re.compile(r"^\d+(\.\d+){1,3}$")


def parse_compute_capability(cc) -> tuple[int, int]:
    """(major, minor) from (9, 0), "9.0" or "sm90"."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2 and all(isinstance(v, int) and v >= 0 for v in cc):
        return int(cc[0]), int(cc[1])
    if isinstance(cc, str):
        if m := re.fullmatch(r"(\d+)\.(\d+)", cc.strip()):
            return int(m[1]), int(m[2])
        if m := _SM.match(cc.strip()):
            return int(m[1]), int(m[2])
    raise InputError(f"not a compute capability: {cc!r} (expected e.g. '9.0', (9, 0) or 'sm90')")


def sm_name(cc) -> str:
    major, minor = parse_compute_capability(cc)
    return f"sm{major}{minor}"


def cc_string(cc) -> str:
    return "{}.{}".format(*parse_compute_capability(cc))


def parse_version(version: str) -> tuple[int, ...]:
    """TensorRT version "11.4.0.106" -> (11, 4, 0, 106); missing trailing parts count as 0."""
    if not isinstance(version, str) or not _VERSION.match(version.strip()):
        raise InputError(f"not a TensorRT version: {version!r} (expected e.g. '11.4.0.106')")
    parts = tuple(int(p) for p in version.strip().split("."))
    return parts + (0,) * (4 - len(parts))


_FLAG_TAGS = {"ampere+": "ampereplus", "same-cc": "samecc"}


def plan_filename(network: str, precision: str, sm: str, trt_version: str, hardware_compat: str = "none",
                  version_compatible: bool = False) -> str:
    """denoiser.fp16.sm90.trt11.4.0.106.plan; portable builds add .ampereplus / .samecc and .vc so
    that they never overwrite the plain plan for the same network, GPU and TensorRT."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(network)) or precision not in ("fp16", "fp32"):
        raise InputError(f"not a network / precision pair: {network!r} {precision!r}")
    if not isinstance(sm, str) or not _SM.match(sm):
        raise InputError(f"not an SM name: {sm!r} (expected e.g. 'sm90' for compute capability 9.0)")
    parse_version(trt_version)
    if hardware_compat not in HARDWARE_COMPAT:
        raise InputError(f"hardware_compat must be one of {', '.join(HARDWARE_COMPAT)}, got {hardware_compat!r}")
    tags = [_FLAG_TAGS[hardware_compat]] if hardware_compat in _FLAG_TAGS else []
    tags += ["vc"] if version_compatible else []
    return ".".join([network, precision, sm, f"trt{trt_version.strip()}", *tags, "plan"])


def timing_cache_filename(sm: str, trt_version: str) -> str:
    """Timing caches hold per-GPU, per-TensorRT measurements: one file per pair."""
    return f"timing.{sm}.trt{trt_version.strip()}.cache"


# ---- manifest entries -----------------------------------------------------------------------------

def engine_entry(*, network, precision: str, file: str, sha256: str, size: int, trt_version: str, gpu_name: str,
                 compute_capability, driver_version: str | None, cuda_driver_version: str | None,
                 cuda_runtime_version: str | None, profile: EngineProfile, flags: BuildFlags, graph: dict,
                 build_seconds: float, built_utc: str, parity: dict | None = None,
                 versions: dict | None = None) -> dict:
    """The manifest `engines` entry for one plan of one network (a NetworkSpec; schema in
    engines/README.md)."""
    unit = ("engine rows (2 per image under guidance)" if network.batch_unit == "rows" else network.batch_unit)
    return {
        "network": network.name, "file": file, "sha256": sha256, "bytes": int(size), "precision": precision,
        "graph": {"file": graph["file"], "sha256": dict(graph["sha256"])},
        "tensorrt": {"version": trt_version, "strongly_typed": True},
        "gpu": {"name": gpu_name, "compute_capability": cc_string(compute_capability), "sm": sm_name(compute_capability)},
        "cuda": {"driver_version": driver_version, "driver_cuda_version": cuda_driver_version,
                 "runtime_cuda_version": cuda_runtime_version},
        "profile": {**profile.to_dict(), "axis": "batch", "unit": unit,
                    **({"guided_images_per_call": profile.images_per_call(True)} if network.batch_unit == "rows" else {}),
                    "shapes": {name: [list(s) for s in bounds]
                               for name, bounds in network.profile_shapes(*profile.to_dict().values()).items()}},
        "build": {**flags.to_dict(), "seconds": round(float(build_seconds), 3)},
        "built_utc": built_utc,
        "parity": parity,
        "versions": dict(versions or {}),
    }


class EntryView(NamedTuple):
    """The fields of an engines entry the compatibility rules read."""
    network: str
    precision: str
    file: str
    trt_version: tuple[int, ...]
    trt_version_text: str
    compute_capability: tuple[int, int]
    gpu_name: str | None
    profile: EngineProfile
    flags: BuildFlags


def read_entry(entry: dict) -> EntryView:
    """Typed view of an entry; InputError naming the missing or bad field."""
    try:
        build = entry["build"]
        flags = BuildFlags(opt_level=build["opt_level"], hardware_compat=build["hardware_compat"],
                           version_compatible=bool(build["version_compatible"]), workspace_gb=build.get("workspace_gb"))
        return EntryView(entry.get("network", "denoiser"), entry.get("precision", "fp16"), entry["file"], parse_version(entry["tensorrt"]["version"]), entry["tensorrt"]["version"],
                         parse_compute_capability(entry["gpu"]["compute_capability"]), entry["gpu"].get("name"),
                         EngineProfile.from_dict(entry["profile"]), flags)
    except (KeyError, TypeError) as e:
        raise InputError(f"engines entry {entry.get('file', '?') if isinstance(entry, dict) else entry!r} "
                         f"lacks a field or has a bad one: {e}") from None


class Compat(NamedTuple):
    ok: bool
    reason: str


def check_engine_compat(entry: dict, trt_version: str, compute_capability, gpu_name: str | None = None,
                        artifact: str = "ARTIFACT") -> Compat:
    """Can this plan run on TensorRT `trt_version` on a GPU of `compute_capability` (named
    `gpu_name`; None skips the GPU-model check)? Returns (ok, reason): the reason names every
    difference and the `ditrt build` command that makes a plan for this machine."""
    try:
        e = read_entry(entry)
        here_version = parse_version(trt_version)
        here_cc = parse_compute_capability(compute_capability)
    except InputError as err:
        return Compat(False, f"{err}; rebuild with `ditrt build {shlex.quote(str(artifact))}`")
    problems = _version_problems(e, here_version, trt_version) + _hardware_problems(e, here_cc, gpu_name)
    if problems:
        return Compat(False, f"{e.file}: " + "; ".join(problems) + ". Rebuild it on this machine with: "
                      + build_command(artifact, e.profile, e.flags, e.network, e.precision))
    notes = []
    if e.trt_version != here_version:
        notes.append(f"version-compatible plan from TensorRT {e.trt_version_text} on {trt_version}")
    if e.flags.hardware_compat != "none" and (e.compute_capability != here_cc or (gpu_name and e.gpu_name != gpu_name)):
        notes.append(f"hardware-compatible ({e.flags.hardware_compat}) plan from {e.gpu_name} "
                     f"(compute capability {cc_string(e.compute_capability)})")
    elif gpu_name and e.gpu_name and gpu_name != e.gpu_name:
        notes.append(f"built on {e.gpu_name}, running on {gpu_name} (same compute capability): TensorRT allows this "
                     f"with a warning; tactics were timed on the other model, so rebuild here for the best speed")
    return Compat(True, f"{e.file}: " + ("; ".join(notes) if notes else "built for this GPU and TensorRT version"))


def _version_problems(e: EntryView, here: tuple[int, ...], here_text: str) -> list[str]:
    built = f"built with TensorRT {e.trt_version_text}, this is TensorRT {here_text}"
    if e.trt_version == here:
        return []
    if not e.flags.version_compatible:
        return [f"{built}: a plan runs only on the TensorRT version that built it (unless built with --version-compatible)"]
    if here < e.trt_version:
        return [f"{built}: a version-compatible plan runs only on the same or a newer TensorRT"]
    if here[0] != e.trt_version[0] and (e.trt_version[0], here[0]) not in CROSS_MAJOR_VERSION_COMPAT:
        return [f"{built}: version-compatible plans do not cross from TensorRT {e.trt_version[0]} to {here[0]} "
                f"(supported across majors: " + ", ".join(f"{a} -> {b}" for a, b in sorted(CROSS_MAJOR_VERSION_COMPAT)) + ")"]
    return []


def _hardware_problems(e: EntryView, here_cc: tuple[int, int], gpu_name: str | None) -> list[str]:
    built_cc, here = cc_string(e.compute_capability), cc_string(here_cc)
    level = e.flags.hardware_compat
    if level == "ampere+":
        return [] if here_cc >= AMPERE else [f"built for Ampere and newer GPUs (compute capability >= 8.0), "
                                             f"this GPU has compute capability {here}"]
    if e.compute_capability != here_cc:
        return [f"built on a GPU of compute capability {built_cc} ({e.gpu_name}), this GPU ({gpu_name or 'unknown'}) has "
                f"{here}: the plan runs only on {'its compute capability' if level == 'same-cc' else 'the GPU type that built it'}"
                + ("" if level == "same-cc" else " (unless built with --hardware-compat)")]
    return []  # same compute capability, another GPU model (H100 SXM vs PCIe): TensorRT runs it with a warning


def choose_engine(entries: Sequence[dict], trt_version: str, compute_capability, gpu_name: str | None,
                  exists: Callable[[str], bool], artifact: str = "ARTIFACT",
                  graph_sha256: dict | None = None) -> tuple[dict | None, list[str]]:
    """The best entry for this machine whose plan file exists (and, given the artifact's current
    fp16 graph hashes, that was built from that graph), and one line per rejected entry.
    Preference: a plan built by this exact TensorRT, then native over same-cc over ampere+
    (portable plans may give up fusions), then the newest build."""
    rank = {"none": 0, "same-cc": 1, "ampere+": 2}
    here = parse_version(trt_version)
    candidates, reasons = [], []
    for entry in entries:
        ok, reason = check_engine_compat(entry, trt_version, compute_capability, gpu_name, artifact)
        if ok:
            e = read_entry(entry)
            rebuild = build_command(artifact, e.profile, e.flags, e.network, e.precision)
            if not exists(e.file):
                ok, reason = False, f"{e.file}: listed in the manifest but the file is missing; rebuild it with: {rebuild}"
            elif graph_sha256 is not None and entry.get("graph", {}).get("sha256") != graph_sha256:
                ok, reason = False, f"{e.file}: built from another graph than the artifact's; rebuild it with: {rebuild}"
        if ok:
            candidates.append(entry)
        else:
            reasons.append(reason)
    if not candidates:
        return None, reasons
    newest_first = sorted(candidates, key=lambda entry: str(entry.get("built_utc", "")), reverse=True)
    best = min(newest_first, key=lambda entry: (read_entry(entry).trt_version != here,
                                                 rank[read_entry(entry).flags.hardware_compat]))
    return best, reasons


def no_engine_message(artifact: str, entries: Iterable[dict], reasons: list[str], trt_version: str,
                      compute_capability, gpu_name: str | None, default_command: str) -> str:
    """Why no plan of the artifact can run here, and what to build."""
    here = f"TensorRT {trt_version} on {gpu_name or 'this GPU'} (compute capability {cc_string(compute_capability)})"
    if not list(entries):
        return (f"{artifact} has no TensorRT engine; build one for {here} with: {default_command} "
                "(or use --backend onnxruntime)")
    return (f"no TensorRT plan in {artifact} runs on {here}:\n  " + "\n  ".join(reasons))


def null_engine_message(plan: str, errors: Sequence[str], rebuild: str) -> str:
    """TensorRT returned no engine: its logger's errors are the only explanation it gives."""
    detail = "\n  ".join(errors) if errors else "(TensorRT logged no error)"
    return (f"TensorRT could not deserialise {plan} (it returned no engine). TensorRT said:\n  {detail}\n"
            f"The plan is corrupt or does not match this TensorRT/GPU; rebuild it with: {rebuild}")
