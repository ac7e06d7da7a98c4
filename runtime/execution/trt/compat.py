"""Which TensorRT plan may run here: the compatibility rules over a plan's manifest entry, the choice
among an artifact's plans, and the messages that say why none fits and what to build.

Rules (TensorRT docs, "Engine Compatibility", 10.x/11.x, and the 11.4.1 support matrix):
- A plan runs only on the TensorRT version that built it (major.minor.patch.build) ...
- ... unless built VERSION_COMPATIBLE: then it runs on the same or a newer TensorRT of the same
  major version, and across majors only for the pairs the support matrix lists (8 -> 10, 10 -> 11).
  The runtime must then set `engine_host_code_allowed` (the plan carries the lean runtime).
- A plan runs only on GPUs of the compute capability that built it (another GPU model of the same
  compute capability, H100 SXM vs PCIe say, runs it with a TensorRT warning and tactics timed elsewhere) ...
- ... unless built with hardware compatibility AMPERE_PLUS (any GPU of compute capability >= 8.0)
  or SAME_COMPUTE_CAPABILITY (any GPU with the builder's compute capability).

The rules are pure; `compatible_engine` / `choose_for` apply them to this machine (device.py).
"""
from __future__ import annotations

import logging
import shlex
from typing import Callable, Iterable, NamedTuple, Sequence

from ...core.errors import InputError
from . import device
from .settings import BuildFlags, EngineProfile, build_command
from ...artifact.versions import cc_string, parse_compute_capability, parse_version

log = logging.getLogger("ditrt.tensorrt")

# Version-compatible plans across major versions: only these (builder major, runtime major) pairs
# are supported (TensorRT 11.4.1 support matrix, "Engine Portability").
CROSS_MAJOR_VERSION_COMPAT = frozenset({(8, 10), (10, 11)})

AMPERE = (8, 0)

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
            candidates.append((entry, e))
        else:
            reasons.append(reason)
    if not candidates:
        return None, reasons
    newest_first = sorted(candidates, key=lambda c: str(c[0].get("built_utc", "")), reverse=True)
    best, _ = min(newest_first, key=lambda c: (c[1].trt_version != here, rank[c[1].flags.hardware_compat]))
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


# ---- this machine ---------------------------------------------------------------------------------

def choose_for(manifest, env: device.Environment, network: str, precision: str) -> tuple[dict | None, list[str]]:
    entries = [e for e in manifest.engines_for(network) if e.get("precision", "fp16") == precision]
    graph = manifest.data["networks"][network]["graphs"].get(precision, {})
    return choose_engine(entries, env.trt_version, env.gpu.compute_capability, env.gpu.name,
                         exists=lambda f: (manifest.directory / f).is_file(), artifact=str(manifest.directory),
                         graph_sha256=graph.get("sha256"))

def compatible_engine(manifest, network: str = "denoiser", precision: str = "fp16") -> dict | None:
    """The manifest's best plan entry for this network, GPU and TensorRT whose file exists, else
    None. Never raises: backend="auto" uses it to fall back to ONNX Runtime."""
    if not manifest.engines_for(network):
        return None  # nothing to choose from: do not import TensorRT or touch the GPU
    try:
        entry, refusals = choose_for(manifest, device.environment(), network, precision)
    except Exception as e:  # no TensorRT, no GPU, a malformed entry: all mean "not TensorRT"
        log.warning("backend auto: no TensorRT for %s (%s); using ONNX Runtime", manifest.directory, e)
        return None
    if entry is None:
        log.warning("backend auto: no plan in %s fits this GPU and TensorRT; using ONNX Runtime. %s",
                    manifest.directory, " ".join(refusals))
    return entry
