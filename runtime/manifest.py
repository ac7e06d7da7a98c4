"""The artifact manifest: the contract with services that run the loop without reading Python.

`manifest.json` is plain JSON (schema documented in engines/README.md). This module reads and
validates it once, at load, and gives typed access to what the runtime uses: the model, the
diffusion process, the defaults, and one spec, graph set and engine list per network. The
exporter writes it; `ditrt build` adds engines.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import DiTConfig, Defaults, Diffusion, read_defaults, read_diffusion, read_model
from .errors import ArtifactError
from .files import artifact_path, sha256_file, write_json_atomic
from .networks import NetworkSpec

SCHEMA = "ditrt.manifest"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")


class Manifest:
    def __init__(self, data: dict, directory: Path):
        from .samplers import SAMPLERS
        self.data = data
        self.directory = Path(directory)
        self.model: DiTConfig = read_model(data)
        self.diffusion: Diffusion = read_diffusion(data, self.model)
        self.defaults: Defaults = read_defaults(data, self.diffusion, SAMPLERS)
        networks = data.get("networks")
        if not isinstance(networks, dict) or "denoiser" not in networks:
            raise ArtifactError("manifest field networks must be an object with at least a denoiser")
        self.networks: dict[str, NetworkSpec] = {}
        for name, section in networks.items():
            spec = NetworkSpec.from_manifest(name, section)
            if name == "denoiser":
                spec = _with_classes(spec, self.model)
                _check_denoiser_io(spec, self.model)
            elif name == "decoder":
                _check_decoder_io(spec, self.model)
            self.networks[name] = spec
            for precision in self._graphs(name):
                self._check_graph(name, precision)
        if not isinstance(data.get("engines", []), list):
            raise ArtifactError("manifest field engines must be a list")

    # ---- networks and graphs ------------------------------------------------------------------

    def network(self, name: str = "denoiser") -> NetworkSpec:
        if name not in self.networks:
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

    def file_hashes(self, network: str, precision: str) -> dict[str, tuple[str, str | None]]:
        """file -> (sha256 in the manifest, sha256 on disk or None when missing) for a graph."""
        out = {}
        for name, digest in self.graph(network, precision)["sha256"].items():
            path = artifact_path(self.directory, name, f"networks.{network}.graphs.{precision}.sha256")
            out[name] = (digest, sha256_file(path) if path.is_file() else None)
        return out

    def verify_files(self, network: str, precision: str) -> None:
        """Check that the graph's files exist and have the recorded sha256."""
        for name, (recorded, actual) in self.file_hashes(network, precision).items():
            if actual is None:
                raise ArtifactError(f"{self.directory / name} is listed in the manifest but missing")
            if actual != recorded:
                raise ArtifactError(f"{self.directory / name} does not match its sha256 in the manifest "
                                    "(corrupt or replaced); re-export")

    def verify_all(self) -> list[tuple[str, str, str | None]]:
        """(file, what it is, problem or None) for every file the manifest names: each network's
        graphs (with external data) and each engine's plan."""
        results = []
        for network in self.networks:
            for precision in self.precisions(network):
                for name, (recorded, actual) in self.file_hashes(network, precision).items():
                    results.append((name, f"{network} {precision} graph", _problem(recorded, actual)))
        for i, entry in enumerate(self.engines):
            name = entry.get("file") if isinstance(entry, dict) else None
            path = artifact_path(self.directory, name, f"engines[{i}].file")
            actual = sha256_file(path) if path.is_file() else None
            results.append((name, f"{entry.get('network', 'denoiser')} TensorRT plan", _problem(entry.get("sha256"), actual)))
        return results

    def save(self) -> None:
        write_json_atomic(self.directory / MANIFEST_NAME, self.data)


def _problem(recorded: str | None, actual: str | None) -> str | None:
    if actual is None:
        return "missing"
    if actual != recorded:
        return f"sha256 {actual[:16]}... differs from the manifest's {str(recorded)[:16]}... (corrupt or replaced)"
    return None


def _check_denoiser_io(spec: NetworkSpec, model: DiTConfig) -> None:
    """The denoiser's tensors must agree with the model section (a hand edit of one alone would
    feed the graph shapes it rejects)."""
    want = {"latent": ["batch", *model.latent_shape], "timestep": ["batch"], "class_label": ["batch"]}
    have = {t.name: list(t.shape) for t in spec.inputs}
    out = list(spec.outputs[0].shape)
    if have != want or out != ["batch", model.out_channels, model.input_size, model.input_size]:
        raise ArtifactError(f"manifest field networks.denoiser inputs {have} / output {out} do not match the model "
                            f"section (inputs {want}, output {['batch', model.out_channels, model.input_size, model.input_size]})")


def _check_decoder_io(spec: NetworkSpec, model: DiTConfig) -> None:
    have = list(spec.inputs[0].shape)
    if len(spec.inputs) != 1 or have != ["batch", *model.latent_shape]:
        raise ArtifactError(f"manifest field networks.decoder.inputs {have} does not take the denoiser's latents "
                            f"{['batch', *model.latent_shape]}")
    out = list(spec.outputs[0].shape)
    if len(out) != 4 or out[1] != 3:
        raise ArtifactError(f"manifest field networks.decoder.outputs[0].shape {out} is not an RGB image batch")
    factor = spec.extra.get("scaling_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e3:
        raise ArtifactError(f"manifest field networks.decoder.scaling_factor must be a positive number, got {factor!r}")


def _with_classes(spec: NetworkSpec, model: DiTConfig) -> NetworkSpec:
    from dataclasses import replace
    return replace(spec, num_classes=model.num_classes)


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a ditrt artifact: no {MANIFEST_NAME} (create one with `ditrt export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"unreadable manifest {path}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not a ditrt manifest (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    version = data.get("schema_version")
    if version == 1 and type(version) is int:
        data = upgrade_schema_1(data)
    elif version != SCHEMA_VERSION or type(version) is not int:
        raise ArtifactError(f"{path} has manifest schema version {version!r}; this ditrt reads versions 1 and "
                            f"{SCHEMA_VERSION}: re-export the artifact with this ditrt "
                            f"({reexport_command(data, directory)})")
    return Manifest(data, directory)


def reexport_command(data: dict, directory: Path) -> str:
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    what = source.get("path") if source.get("kind") == "checkpoint" else "CHECKPOINT"
    return f"ditrt export {what} --out {directory} --force"


def upgrade_schema_1(data: dict) -> dict:
    """A schema 1 manifest (ditrt 0.1: one network, graphs at the top, defaults inside
    diffusion) as schema 2, in memory: the files and the numbers are the same."""
    try:
        d, interface = data["diffusion"], data["interface"]
        denoiser = {"inputs": interface["inputs"], "outputs": interface["outputs"], "batch_axis": 0,
                    "batch_unit": "rows", "guidance_rows": interface.get("guidance_rows", ""), "graphs": data["graphs"]}
        diffusion = {k: d[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance",
                                       "null_class", "guided_channels")}
        defaults = {"sampler": d.get("default_sampler", "ddpm"), "steps": d.get("default_steps", 250),
                    "cfg_scale": d.get("default_cfg_scale", 4.0), "guidance": d.get("default_guidance", "official")}
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"schema 1 manifest lacks a required field ({e}); re-export with this ditrt") from None
    upgraded = {k: v for k, v in data.items() if k not in ("graphs", "interface", "diffusion")}
    upgraded.update(schema_version=SCHEMA_VERSION, upgraded_from_schema=1,
                    diffusion={**diffusion, "prediction": "epsilon", "clip_denoised": d.get("clip_denoised", False)},
                    defaults=defaults, networks={"denoiser": denoiser},
                    engines=[{**e, "network": "denoiser"} for e in data.get("engines", []) if isinstance(e, dict)])
    return upgraded
