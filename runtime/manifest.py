"""The artifact manifest: the contract with services that run the loop without reading Python.

`manifest.json` is plain JSON (schema documented in engines/README.md). This module reads and
checks it and gives typed access to the parts the runtime needs; the exporter writes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "ditrt.manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ArtifactError(ValueError):
    """A missing, corrupt or incompatible artifact, with the reason in the message."""


@dataclass(frozen=True)
class ModelSpec:
    input_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    num_classes: int
    learn_sigma: bool


@dataclass(frozen=True)
class DiffusionSpec:
    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    null_class: int
    guided_channels: dict  # guidance name -> number of leading channels guided
    default_guidance: str
    vae_scale_factor: float


class Manifest:
    def __init__(self, data: dict, directory: Path):
        self.data = data
        self.directory = Path(directory)
        m, d = data["model"], data["diffusion"]
        self.model = ModelSpec(**{k: m[k] for k in ModelSpec.__dataclass_fields__})
        self.diffusion = DiffusionSpec(**{k: d[k] for k in DiffusionSpec.__dataclass_fields__})

    def graph(self, precision: str) -> dict:
        graphs = self.data["graphs"]
        if precision not in graphs:
            have = ", ".join(graphs) or "none"
            raise ArtifactError(f"{self.directory} has no {precision} graph (it has: {have}); "
                                f"re-export with --precision {precision}")
        return graphs[precision]

    def graph_path(self, precision: str) -> Path:
        return self.directory / self.graph(precision)["file"]

    @property
    def engines(self) -> list[dict]:
        return self.data.setdefault("engines", [])

    def file_hashes(self, precision: str) -> dict[str, tuple[str, str | None]]:
        """file -> (sha256 in the manifest, sha256 on disk or None when missing) for a graph."""
        out = {}
        for name, digest in self.graph(precision)["sha256"].items():
            path = self.directory / name
            out[name] = (digest, sha256_file(path) if path.is_file() else None)
        return out

    def verify_files(self, precision: str) -> None:
        """Check that the graph's files exist and have the recorded sha256."""
        for name, (recorded, actual) in self.file_hashes(precision).items():
            if actual is None:
                raise ArtifactError(f"{self.directory / name} is listed in the manifest but missing")
            if actual != recorded:
                raise ArtifactError(f"{self.directory / name} does not match its sha256 in the manifest "
                                    "(corrupt or replaced); re-export")

    def save(self) -> None:
        write_json_atomic(self.directory / MANIFEST_NAME, self.data)


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a ditrt artifact: no {MANIFEST_NAME} (create one with `ditrt export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"unreadable manifest {path}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not a ditrt manifest (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has manifest schema version {data.get('schema_version')}; this ditrt reads "
                            f"version {SCHEMA_VERSION}: re-export the artifact with this ditrt")
    try:
        return Manifest(data, directory)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path} lacks a required field: {e}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_output(path: str | Path, suffix: str = ""):
    """A binary file handle on a temporary name beside `path`, renamed onto it when the block ends
    without error (removed otherwise): readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_output(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())
