"""The PyTorch models an artifact was exported from, found again from its manifest: the denoiser
(its source checkpoint, sha256-checked, or the same random init, as the family's module) and the
decoder (its source VAE folder). The `torch` backend and `ditrt parity --against reference` use them."""
from __future__ import annotations

from pathlib import Path

from ditrt.runtime.core.errors import ArtifactError
from ditrt.runtime.artifact.manifest import Manifest

from .checkpoints import load_checkpoint
from .model import DiT, family_model, random_init


def reference_model(manifest: Manifest, checkpoint: str | Path | None = None) -> DiT:
    """The fp32 PyTorch model the artifact was exported from: its source checkpoint (sha256
    checked), `checkpoint` when given, or the same random init."""
    config, cls = manifest.model, family_model(manifest.family.name)
    source = manifest.data.get("source")
    if not isinstance(source, dict):
        raise ArtifactError("manifest field source is missing or not an object: the reference model cannot be found")
    if checkpoint is None and source.get("kind") == "random-init":
        return random_init(cls(config), source.get("seed", 0))
    if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise ArtifactError(f"checkpoint must be a path, got {checkpoint!r}")
    where = checkpoint if checkpoint is not None else source.get("path")
    if not isinstance(where, (str, Path)) or not where:
        raise ArtifactError(f"manifest field source.path must be the checkpoint's path, got {where!r}; pass "
                            "--checkpoint PATH")
    path = Path(where)
    if checkpoint is not None and not path.is_file():
        raise ArtifactError(f"--checkpoint {path}: file not found")
    if not path.is_file() and checkpoint is None and isinstance(source.get("repository"), str):
        path = _from_hub_cache(source)
    if not path.is_file():
        raise ArtifactError(f"the artifact's source checkpoint {path} is not on this machine; pass --checkpoint PATH "
                            "(or compare against a golden file saved where it was)")
    ckpt = load_checkpoint(path, num_heads=config.num_heads)
    if checkpoint is None and ckpt.sha256 != source.get("sha256"):
        raise ArtifactError(f"{path} changed since the export (sha256 {ckpt.sha256[:12]}... vs "
                            f"{str(source.get('sha256'))[:12]}... in the manifest); pass the right --checkpoint or re-export")
    if ckpt.config != config:
        raise ArtifactError(f"{path} is a different model than the artifact's ({ckpt.config} vs {config})")
    return cls.from_state_dict(ckpt.config, ckpt.state_dict)


def _from_hub_cache(source: dict) -> Path:
    """The source's transformer weights found again in this machine's Hugging Face cache (or hub),
    at the recorded commit, each recorded file's sha256 checked."""
    from ditrt.runtime.core.files import sha256_file

    from .checkpoints import CheckpointError
    from .sources import hub_checkpoint
    repository, revision, files = source["repository"], source.get("revision"), source.get("files")
    try:
        located = hub_checkpoint(repository, revision if isinstance(revision, str) else None)
    except CheckpointError as e:
        raise ArtifactError(f"the artifact's source {repository}@{revision} cannot be found again: {e}") from None
    folder = located.weights.parent.parent
    for name, digest in (files.items() if isinstance(files, dict) else []):
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise ArtifactError(f"{repository}@{revision}: {name} differs from the file the artifact was exported "
                                "from (its sha256 in the manifest's source.files); pass --checkpoint PATH")
    return located.weights


def reference_decoder(manifest: Manifest, precision: str = "fp32"):
    """The decoder network's source VAE folder (sha256 checked) as the exported module."""
    from .vae import DecoderGraph, load_vae
    source = manifest.network("decoder").extra.get("source", {})
    folder = Path(source.get("path", "")) if isinstance(source, dict) and isinstance(source.get("path"), str) else None
    if folder is None or not folder.is_dir():
        raise ArtifactError(f"the decoder's source VAE folder {folder} is not on this machine (compare against a "
                            "golden file saved where it was)")
    loaded = load_vae(folder, in_channels=manifest.model.in_channels)
    if loaded.sha256 != source.get("sha256"):
        raise ArtifactError(f"{loaded.weights_path} changed since the export (sha256 differs from the manifest's); "
                            "re-export")
    return DecoderGraph(loaded, precision)
