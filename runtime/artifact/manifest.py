"""The artifact manifest: the contract with services that run the loop without reading Python.

`manifest.json` is plain JSON (schema documented in engines/README.md). This module is the one
place that reads it (validated once, at load, into typed views: the model and its family, the
process, guidance, defaults, one spec, graph set and engine list per network) and the one place
that writes it (`new_manifest`, `network_section`, `graph_entry`, `engine_entry`, and
`Manifest.record_engine` / `save`). The exporter and `ditrt build` call these; nothing else builds
manifest dicts. Older schemas (1 and 2) are upgraded in memory.

`manifest.sha256` beside it records the manifest's own sha256 (`sha256sum -c` reads it): written by
the export, kept current by `ditrt build` and `ditrt verify --accept-manifest-edits`, checked by
`ditrt verify`, never by `load` (docs/integrity.md).
"""
from __future__ import annotations

import json
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from ..spec.config import (DiTConfig, Defaults, Family, Guidance, read_defaults, read_guidance, read_model,
                     read_process)
from ..core.errors import ArtifactError
from ..core.files import (Input, artifact_inputs, artifact_path, atomic_output, file_key, listed_files, read_json,
                    sha256_file, write_json_atomic)
from .labels import ClassNames, read_id2label
from ..spec.networks import QUANTIZED_PRECISIONS, NetworkSpec, denoiser_spec, segment_specs
from ..spec.quantization import QuantRecipe, read_quant_recipe
from ..core.validate import check_number

SCHEMA = "ditrt.manifest"
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
DIGEST_NAME = "manifest.sha256"  # the manifest's own sha256, "<hex>  manifest.json" (sha256sum's format)
PRECISIONS = ("fp32", "fp16", *QUANTIZED_PRECISIONS)
COMPUTE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "fp8": "float8_e4m3fn"}
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; a bigger "manifest" is not one


class Manifest:
    def __init__(self, data: dict, directory: Path, graphs_required: bool = True):
        """`graphs_required` False: the manifest of a model held in memory (training, a torch
        backend), which samples through a backend given to the Pipeline directly."""
        from ..sampling.samplers import samplers_of
        self.data = data
        self.directory = Path(directory)
        self.family, self.model = read_model(data)
        self.process = read_process(data, self.family, self.model)  # Diffusion (dit) or Transport (sit)
        self.guidance: Guidance = read_guidance(data, self.model)
        self.defaults: Defaults = read_defaults(data, self.family, self.guidance, samplers_of(self.family.name))
        self.labels: ClassNames | None = read_id2label(data, self.model.num_classes)  # class names, when exported with them
        networks = data.get("networks")
        if not isinstance(networks, dict) or "denoiser" not in networks:
            raise ArtifactError("manifest field networks must be an object with at least a denoiser")
        self.networks: dict[str, NetworkSpec] = {}
        for name, section in networks.items():
            spec = NetworkSpec.from_manifest(name, section).with_time_range(self.family.time_range(self.process))
            _CROSS_CHECKS.get(name, _check_segment if "segment_of" in spec.extra else lambda s, m: None)(spec, self)
            self.networks[name] = spec
            for precision in self._graphs(name):
                self._check_graph(name, precision)
        if graphs_required and not self._graphs("denoiser"):
            raise ArtifactError("manifest field networks.denoiser.graphs lists no graph: nothing can sample with this "
                                "artifact; re-export it")
        if not isinstance(data.get("engines", []), list):
            raise ArtifactError("manifest field engines must be a list")

    @property
    def diffusion(self):
        """The DiT family's process (ArtifactError for other families)."""
        if self.family.process_section != "diffusion":
            raise ArtifactError(f"{self.directory} is a {self.family.name} artifact: it has a {self.family.process_section}, "
                                "not a diffusion")
        return self.process

    # ---- networks and graphs ------------------------------------------------------------------

    def inputs(self, every_file: bool = True) -> list[Input]:
        """The artifact's files as inputs no output may replace (files.check_outputs); every_file
        False: only the manifest, its digest and the files it lists."""
        return artifact_inputs(self.directory, listed_files(self.data), every_file)

    def network(self, name: str = "denoiser") -> NetworkSpec:
        if not isinstance(name, str) or name not in self.networks:
            hint = " (export with --vae DIR to add a decoder)" if name == "decoder" else ""
            raise ArtifactError(f"{self.directory} has no {name} network{hint}; it has: {', '.join(self.networks)}")
        return self.networks[name]

    def _graphs(self, network: str) -> dict:
        graphs = self.data["networks"][network].get("graphs")
        if not isinstance(graphs, dict):
            raise ArtifactError(f"manifest field networks.{network}.graphs must be an object")
        return graphs

    def precisions(self, network: str = "denoiser") -> list[str]:
        self.network(network)
        return list(self._graphs(network))

    def graph(self, network: str, precision: str) -> dict:
        self.network(network)
        graphs = self._graphs(network)
        if precision not in graphs:
            have = ", ".join(graphs) or "none"
            if precision in QUANTIZED_PRECISIONS and network != "denoiser":
                raise ArtifactError(f"{self.directory} has no {precision} {network} graph (it has: {have}): quantized "
                                    f"graphs are made for the denoiser only, the {network} has no quantization recipe "
                                    "(docs/quantization.md)")
            raise ArtifactError(f"{self.directory} has no {precision} {network} graph (it has: {have}); "
                                f"re-export with --precision {precision}" if have == "none" or precision in PRECISIONS
                                else f"unknown precision {precision!r} for {network}; it has: {have}")
        return graphs[precision]

    def _check_graph(self, network: str, precision: str) -> None:
        where = f"networks.{network}.graphs.{precision}"
        if precision not in PRECISIONS:
            raise ArtifactError(f"manifest field {where}: unknown precision (use {', '.join(PRECISIONS)})")
        graph = self._graphs(network)[precision]
        if not isinstance(graph, dict):
            raise ArtifactError(f"manifest field {where} must be an object")
        artifact_path(self.directory, graph.get("file"), f"{where}.file")
        hashes = graph.get("sha256")
        if not isinstance(hashes, dict) or graph.get("file") not in hashes:
            raise ArtifactError(f"manifest field {where}.sha256 must map every file (the graph's included) to its sha256")
        for name, digest in hashes.items():
            artifact_path(self.directory, name, f"{where}.sha256")
            if not (isinstance(digest, str) and len(digest) == 64):
                raise ArtifactError(f"manifest field {where}.sha256[{name!r}] is not a sha256 hex digest")
        if precision in QUANTIZED_PRECISIONS:
            read_quant_recipe(graph, precision, where)

    def quantization(self, network: str, precision: str) -> QuantRecipe:
        """The recipe of a quantized graph (ArtifactError for a graph that has none)."""
        return read_quant_recipe(self.graph(network, precision), precision, f"networks.{network}.graphs.{precision}")

    def graph_path(self, network: str, precision: str) -> Path:
        return artifact_path(self.directory, self.graph(network, precision)["file"],
                             f"networks.{network}.graphs.{precision}.file")

    # ---- engines ----------------------------------------------------------------------------

    @property
    def engines(self) -> list[dict]:
        return self.data.setdefault("engines", [])

    def engines_for(self, network: str) -> list[dict]:
        return [e for e in self.engines if isinstance(e, dict) and e.get("network", "denoiser") == network]

    # ---- integrity ----------------------------------------------------------------------------

    def file_hashes(self, network: str, precision: str, hashes: bool = True) -> dict[str, tuple[str, str | None]]:
        """file -> (sha256 in the manifest, sha256 on disk or None when missing) for a graph
        (hashes=False: the recorded sha256 for a file that exists, without reading it)."""
        out = {}
        for name, digest in self.graph(network, precision)["sha256"].items():
            path = artifact_path(self.directory, name, f"networks.{network}.graphs.{precision}.sha256")
            out[name] = (digest, None if not path.is_file() else sha256_file(path) if hashes else digest)
        return out

    def verify_files(self, network: str, precision: str, hashes: bool = True) -> None:
        """Check a graph before a backend opens it: its listed files exist (and, with `hashes`, have
        their recorded sha256), and every external-data file the graph references is one of them,
        so nothing it reads is unlisted or outside the artifact."""
        for name, (recorded, actual) in self.file_hashes(network, precision, hashes).items():
            problem = file_problem(recorded, actual)
            if problem == "missing":
                raise ArtifactError(f"{self.directory / name} is listed in the manifest but missing")
            if problem:
                raise ArtifactError(f"{self.directory / name} does not match its sha256 in the manifest "
                                    "(corrupt or replaced); re-export")
        unlisted = self.unlisted_external_data(network, precision)
        if unlisted:
            raise ArtifactError(f"{self.graph_path(network, precision)} reads external data the manifest does not list "
                                f"(so it is not hashed): {', '.join(map(repr, unlisted))}; re-export the artifact")

    def unlisted_external_data(self, network: str, precision: str) -> list[str]:
        """The external-data files the graph references (as files of the artifact) that its
        manifest entry does not list; the graph is read without its data (onnx)."""
        path = self.graph_path(network, precision)
        listed = set(self.graph(network, precision)["sha256"])
        folder = PurePosixPath(self.graph(network, precision)["file"]).parent
        return sorted({str(folder / location) if location else repr(location) for location in _external_locations(path)}
                      - listed)

    def verify_all(self) -> list[tuple[str, str, str | None]]:
        """(file, what it is, problem or None) for the manifest itself (against manifest.sha256),
        every file the manifest names (each network's graphs, their external data, each engine's
        plan) and any external data a graph reads that the manifest does not list."""
        results = [(MANIFEST_NAME, "manifest since export", manifest_digest_problem(self.directory))]
        for network in self.networks:
            for precision in self.precisions(network):
                hashes = self.file_hashes(network, precision)
                for name, (recorded, actual) in hashes.items():
                    results.append((name, f"{network} {precision} graph", file_problem(recorded, actual)))
                if all(recorded == actual for recorded, actual in hashes.values()):  # a parsable graph
                    for name in self.unlisted_external_data(network, precision):
                        results.append((name, f"{network} {precision} graph", "read by the graph as external data, "
                                        "but not listed in the manifest (unhashed)"))
        for i, entry in enumerate(self.engines):
            name = entry.get("file") if isinstance(entry, dict) else None
            path = artifact_path(self.directory, name, f"engines[{i}].file")
            actual = sha256_file(path) if path.is_file() else None
            results.append((name, f"{entry.get('network', 'denoiser')} TensorRT plan", file_problem(entry.get("sha256"), actual)))
        return results

    # ---- writing ------------------------------------------------------------------------------

    def record_engine(self, entry: dict) -> None:
        """Add a plan's entry, replacing one for the same plan file; every other engine stays. The
        manifest on disk is read again first: another build (another GPU) may have recorded its
        plan meanwhile."""
        current = load_manifest(self.directory)
        current.data["engines"] = [e for e in current.engines if e.get("file") != entry["file"]] + [entry]
        current.save()
        self.data["engines"] = current.data["engines"]

    def save(self) -> None:
        """Write the manifest, and its digest when the manifest on disk matched the recorded one (a
        legitimate edit of a manifest as exported; an unrecorded hand edit stays reported by
        `ditrt verify` rather than blessed by this write)."""
        as_recorded = manifest_digest_problem(self.directory) is None
        write_json_atomic(self.directory / MANIFEST_NAME, self.data)
        if as_recorded:
            write_manifest_digest(self.directory)


def write_manifest_digest(directory: str | Path) -> str:
    """Record manifest.json's sha256 in manifest.sha256 (atomically); returns it."""
    directory = Path(directory)
    digest = sha256_file(directory / MANIFEST_NAME)
    with atomic_output(directory / DIGEST_NAME) as f:
        f.write(f"{digest}  {MANIFEST_NAME}\n".encode())
    return digest


def manifest_digest_problem(directory: str | Path) -> str | None:
    """None when manifest.json has the sha256 recorded in manifest.sha256; else what is wrong."""
    sidecar = Path(directory) / DIGEST_NAME
    accept = "if the manifest is as you intend, record it with `ditrt verify --accept-manifest-edits`"
    try:
        info = os.lstat(sidecar)
    except FileNotFoundError:
        return f"no recorded digest ({DIGEST_NAME} is missing): edits since export cannot be ruled out; {accept}"
    if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
        return f"{DIGEST_NAME} is not a small regular file; {accept}"
    try:
        match = re.fullmatch(rf"([0-9a-f]{{64}}) [ *]{re.escape(MANIFEST_NAME)}\n?", sidecar.read_text("ascii"))
    except (OSError, UnicodeDecodeError):
        match = None
    if not match:
        return f"{DIGEST_NAME} is not a line '<sha256>  {MANIFEST_NAME}'; {accept}"
    actual = sha256_file(Path(directory) / MANIFEST_NAME)
    if actual != match.group(1):
        return (f"edited since export: sha256 {actual[:16]}... differs from the {match.group(1)[:16]}... recorded in "
                f"{DIGEST_NAME}; {accept}")
    return None


_LOCATIONS: dict[tuple, list[str]] = {}  # file_key(graph) -> its external-data locations


def _external_locations(graph_path: Path) -> list[str]:
    """The `location` of every tensor of an ONNX graph whose data lives in another file (initializers,
    Constant and other tensor attributes, subgraphs), read without loading any data; remembered per
    file identity, as sha256_file does."""
    key = file_key(graph_path)
    if key not in _LOCATIONS:
        import onnx
        try:
            model = onnx.load(str(graph_path), load_external_data=False)
        except Exception as e:  # DecodeError and friends: not an ONNX graph
            raise ArtifactError(f"{graph_path} is not a readable ONNX graph: {type(e).__name__}: {e}") from None
        locations = []

        def walk(graph):
            tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
            for node in graph.node:
                for attribute in node.attribute:
                    tensors += [attribute.t, *attribute.tensors]
                    for subgraph in [attribute.g, *attribute.graphs]:
                        walk(subgraph)
            for tensor in tensors:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    locations.append(next((e.value for e in tensor.external_data if e.key == "location"), ""))

        walk(model.graph)
        _LOCATIONS[key] = locations
    return _LOCATIONS[key]


def file_problem(recorded: str | None, actual: str | None) -> str | None:
    if actual is None:
        return "missing"
    if actual != recorded:
        return f"sha256 {actual[:16]}... differs from the manifest's {str(recorded)[:16]}... (corrupt or replaced)"
    return None


# ---- cross-field checks: a network's tensors against the model section ---------------------------

def _check_denoiser(spec: NetworkSpec, m: Manifest) -> None:
    """The denoiser must take exactly what the model section and family say (a hand edit of one alone
    would feed the graph shapes it rejects, or make the runtime guide with the wrong null class)."""
    want = denoiser_spec(m.model, m.family, m.process)
    key = lambda s: [(t.name, t.dtype, list(t.shape), t.role, t.condition, t.range) for t in s.inputs + s.outputs]
    if key(spec) != key(want):
        raise ArtifactError(f"manifest field networks.denoiser inputs/outputs {key(spec)} do not match the model section "
                            f"and family {m.family.name} ({key(want)})")


def _check_decoder(spec: NetworkSpec, m: Manifest) -> None:
    have = list(spec.inputs[0].shape)
    if len(spec.inputs) != 1 or have != ["batch", *m.model.latent_shape]:
        raise ArtifactError(f"manifest field networks.decoder.inputs {have} does not take the denoiser's latents "
                            f"{['batch', *m.model.latent_shape]}")
    out = list(spec.output.shape)
    if len(out) != 4 or out[1] != 3:
        raise ArtifactError(f"manifest field networks.decoder.outputs[0].shape {out} is not an RGB image batch")
    factor = spec.extra.get("scaling_factor")
    check_number(factor, "manifest field networks.decoder.scaling_factor", 0, 1e3, low_open=True, error=ArtifactError)


def _check_segment(spec: NetworkSpec, m: Manifest) -> None:
    """A segment of the denoiser (feature caching) must be one `segment_specs` makes for the model
    section: its tensors, its `segment_of` and its `blocks` range."""
    want = {w.name: w for w in segment_specs(m.model, m.family, m.process)}.get(spec.name)
    key = lambda s: ([(t.name, t.dtype, list(t.shape), t.role, t.condition) for t in s.inputs + s.outputs],
                     s.extra.get("segment_of"), s.extra.get("blocks"))
    if want is None or key(spec) != key(want):
        raise ArtifactError(f"manifest field networks.{spec.name} is not a segment of this denoiser: {key(spec)}; the "
                            f"segments are {', '.join(w.name for w in segment_specs(m.model, m.family, m.process))}")


_CROSS_CHECKS = {"denoiser": _check_denoiser, "decoder": _check_decoder}


# ---- reading ----------------------------------------------------------------------------------------

def load_manifest(directory: str | Path) -> Manifest:
    if not isinstance(directory, (str, os.PathLike)):
        raise ArtifactError(f"an artifact is a directory path, got {type(directory).__name__} {directory!r}")
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    data = read_manifest_json(path)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not a ditrt manifest (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    version = data.get("schema_version")
    try:
        if version == 1 and type(version) is int:
            data = upgrade_schema_2(upgrade_schema_1(data))
        elif version == 2 and type(version) is int:
            data = upgrade_schema_2(data)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ArtifactError(f"{path}: schema {version} manifest lacks a required field or has a bad one ({e!r}); "
                            f"re-export with this ditrt ({reexport_command(data, directory)})") from None
    if data.get("schema_version") != SCHEMA_VERSION or type(data.get("schema_version")) is not int:
        raise ArtifactError(f"{path} has manifest schema version {version!r}; this ditrt reads versions 1 to "
                            f"{SCHEMA_VERSION}: re-export the artifact with this ditrt "
                            f"({reexport_command(data, directory)})")
    return Manifest(data, directory)


def read_manifest_json(path: Path):
    """The parsed JSON of a manifest file: a regular file of sane size (a FIFO, a device or a link to
    /dev/zero is refused before any read), nested at most MAX_JSON_DEPTH deep, UTF-8, valid JSON."""
    if not os.path.lexists(path):
        raise ArtifactError(f"{path.parent} is not a ditrt artifact: no {MANIFEST_NAME} (create one with "
                            "`ditrt export`)")
    return read_json(path, "manifest", ArtifactError, MAX_MANIFEST_BYTES)


def reexport_command(data: dict, directory: Path) -> str:
    source = data.get("source") if isinstance(data, dict) and isinstance(data.get("source"), dict) else {}
    what = source.get("path") if source.get("kind") == "checkpoint" else "CHECKPOINT"
    if source.get("kind") == "checkpoint" and isinstance(source.get("repository"), str):  # a Hugging Face id
        revision = source.get("revision")
        what = source["repository"] + (f" --revision {revision}" if isinstance(revision, str) else "")
    return f"ditrt export {what} --out {directory} --force"


def upgrade_schema_1(data: dict) -> dict:
    """A schema 1 manifest (ditrt 0.1: one network, graphs at the top, defaults inside
    diffusion) as schema 2, in memory: the files and the numbers are the same."""
    d, interface = data["diffusion"], data["interface"]
    denoiser = {"inputs": interface["inputs"], "outputs": interface["outputs"], "batch_axis": 0,
                "batch_unit": "rows", "guidance_rows": interface.get("guidance_rows", ""), "graphs": data["graphs"]}
    diffusion = {k: d[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance",
                                   "null_class", "guided_channels")}
    defaults = {"sampler": d.get("default_sampler", "ddpm"), "steps": d.get("default_steps", 250),
                "cfg_scale": d.get("default_cfg_scale", 4.0), "guidance": d.get("default_guidance", "official")}
    upgraded = {k: v for k, v in data.items() if k not in ("graphs", "interface", "diffusion")}
    upgraded.update(schema_version=2, upgraded_from_schema=1,
                    diffusion={**diffusion, "prediction": "epsilon", "clip_denoised": d.get("clip_denoised", False)},
                    defaults=defaults, networks={"denoiser": denoiser},
                    engines=[{**e, "network": "denoiser"} for e in data.get("engines", []) if isinstance(e, dict)])
    return upgraded


_SCHEMA_2_ROLES = {"latent": "latent", "timestep": "time", "class_label": "condition", "model_output": "prediction",
                   "image": "image"}


def upgrade_schema_2(data: dict) -> dict:
    """A schema 2 manifest (ditrt 0.2: DiT only; null class and guided channels in the diffusion
    section; tensors without roles) as schema 3, in memory."""
    d, model = dict(data["diffusion"]), data["model"]
    null, guided = d.pop("null_class"), d.pop("guided_channels")
    networks = {}
    for name, section in data["networks"].items():
        section = dict(section)
        for kind in ("inputs", "outputs"):
            tensors = []
            for t in section[kind]:
                t = {**t, "role": _SCHEMA_2_ROLES.get(t["name"], t.get("role"))}
                if t["role"] == "condition":
                    t["condition"] = {"kind": "class", "num_classes": model["num_classes"], "null": null}
                tensors.append(t)
            section[kind] = tensors
        networks[name] = section
    upgraded = {k: v for k, v in data.items() if k not in ("diffusion", "networks")}
    upgraded.update(schema_version=SCHEMA_VERSION, upgraded_from_schema=data.get("upgraded_from_schema", 2),
                    model={**model, "family": "dit"}, diffusion=d, guidance={"guided_channels": guided},
                    networks=networks)
    return upgraded


# ---- writing: the one place manifest dicts are made ------------------------------------------------

def new_manifest(*, family: Family, config: DiTConfig, model_extra: dict, source: dict, networks: dict,
                 versions: dict, labels: ClassNames | None = None) -> dict:
    """A complete schema-3 manifest: the family's training process, official guidance and defaults
    for `config`. `networks`: name -> `network_section(...)`; `labels`: the class names, if any."""
    process, guidance, defaults = family.default_process(config), Guidance.official(config), family.defaults
    data = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"family": family.name, **config.to_dict(), "out_channels": family.output_channels(config),
                  **model_extra},
        "source": source,
        family.process_section: process.to_dict(),
        "guidance": guidance.to_dict(),
        "defaults": defaults.to_dict(),
        "networks": networks,
        "versions": versions,
        "engines": [],
    }
    if labels is not None:
        data["id2label"] = labels.to_manifest()
    return data


def network_section(spec: NetworkSpec, graphs: dict) -> dict:
    """`networks.<name>`: the spec (tensors, roles, batch unit, network fields) and its graphs."""
    return {**spec.to_manifest(), "graphs": graphs}


def graph_entry(directory: Path, files: list[str], opset: int, precision: str, validation: dict,
                **fields) -> dict:
    """`networks.<name>.graphs.<precision>`: the graph file first, then its external data; every
    file hashed."""
    return {"file": files[0], "files": files, "sha256": {name: sha256_file(directory / name) for name in files},
            "bytes": sum((directory / name).stat().st_size for name in files), "opset": opset,
            "compute_dtype": COMPUTE_DTYPES[precision], **fields, "validation": validation}


def engine_entry(*, network: NetworkSpec, precision: str, file: str, sha256: str, size: int, trt_version: str,
                 gpu_name: str, compute_capability, driver_version: str | None, cuda_driver_version: str | None,
                 cuda_runtime_version: str | None, profile, flags, graph: dict, build_seconds: float,
                 parity: dict | None = None, versions: dict | None = None, built_utc: str | None = None) -> dict:
    """An `engines[]` entry: one TensorRT plan of one network (schema in engines/README.md)."""
    from .versions import cc_string, sm_name
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
        "built_utc": built_utc or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parity": parity,
        "versions": dict(versions or {}),
    }
