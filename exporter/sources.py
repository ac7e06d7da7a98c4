"""Checkpoints as users name them: a local file, a diffusers `DiTPipeline` folder, a Hugging Face
repository id, or an official checkpoint name (`DiT-XL-2-256x256.pt`), each brought to the files
`load_checkpoint` and `load_vae` read, with what the manifest records about where they came from.

How `ditrt export NAME` reads NAME, in this order (docs/export.md#where-the-weights-come-from):
1. a local path that exists wins: a file is a checkpoint; a folder with `model_index.json` is a
   pipeline folder;
2. an official checkpoint name (`OFFICIAL_CHECKPOINTS`, a bare file name): its file in torch hub's
   cache (`$TORCH_HOME/hub/checkpoints/`), downloaded from its published URL when missing, as the
   official `find_model` does;
3. `org/name` (one slash, letters, digits, `-`, `_`, `.`; not ending in a weights suffix): a Hugging
   Face repository holding a `DiTPipeline`, fetched with `huggingface_hub.snapshot_download`
   (`allow_patterns`: the pipeline's configs, the transformer's and the VAE's safetensors), which
   honours HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN;
4. anything else: "checkpoint not found".
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ditrt.runtime.spec.config import Diffusion
from ditrt.runtime.core.files import sha256_file
from ditrt.runtime.artifact.labels import ClassNames, id2label_from_config

from .checkpoints import CheckpointError

PIPELINE_INDEX = "model_index.json"
PIPELINE_CLASS = "DiTPipeline"
# The hub's DiT repositories name the transformer with diffusers' legacy class name.
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
HUB_PATTERNS = [PIPELINE_INDEX, "transformer/config.json", f"transformer/{WEIGHTS_NAME}", "vae/config.json",
                f"vae/{WEIGHTS_NAME}", SCHEDULER_CONFIG]
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    family: str


# The released checkpoints and where their READMEs publish them (DiT: download.py's find_model;
# SiT: the willisma/SiT README's link).
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": OfficialCheckpoint("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "dit"),
    "DiT-XL-2-512x512.pt": OfficialCheckpoint("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", "dit"),
    "SiT-XL-2-256x256.pt": OfficialCheckpoint(
        "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
        "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0", "sit"),
}


@dataclass
class LocatedCheckpoint:
    """What NAME stands for: the weights file, the VAE folder and id2label that came with it, the
    scheduler config to check, and the manifest's `source` fields about its origin."""
    weights: Path
    default_name: str
    vae_dir: Path | None = None
    id2label: dict | None = None  # as model_index.json has it, checked once the class count is known
    scheduler: dict | None = None
    where: str = ""  # for messages: the folder or repository
    origin: dict = field(default_factory=dict)

    def labels(self, num_classes: int) -> ClassNames | None:
        if self.id2label is None:
            return None
        return id2label_from_config(self.id2label, num_classes, f"{self.where}/{PIPELINE_INDEX}", CheckpointError)

    def check_scheduler(self, family: str, diffusion) -> None:
        """The pipeline's scheduler must describe the training process the manifest records
        (betas and timesteps): a mismatch means the sampler tables would be wrong."""
        if self.scheduler is None:
            return
        if family != "dit":
            raise CheckpointError(f"{self.where} is a {PIPELINE_CLASS} (a DDPM-trained DiT, its scheduler says so); "
                                  f"--family {family} does not apply to it")
        check_scheduler_config(self.scheduler, diffusion, f"{self.where}/{SCHEDULER_CONFIG}")


def check_scheduler_config(config: dict, diffusion: Diffusion, where: str) -> None:
    want = {"num_train_timesteps": diffusion.num_train_timesteps, "beta_schedule": diffusion.beta_schedule,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end}
    problems = []
    for key, expected in want.items():
        have = config.get(key)
        same = (have == expected if isinstance(expected, str) else
                isinstance(have, (int, float)) and not isinstance(have, bool) and
                abs(float(have) - float(expected)) <= 1e-12 * abs(float(expected)))
        if not same:
            problems.append(f"{key} {have!r} (the manifest's diffusion has {expected!r})")
    if config.get("trained_betas") not in (None, []):
        problems.append("trained_betas is set (the manifest's diffusion has linear betas)")
    if problems:
        raise CheckpointError(f"{where} does not match the DiT's training process: " + "; ".join(problems)
                              + ". ditrt samples with the official linear schedule; this pipeline's scheduler differs")


def locate(name: str | Path, revision: str | None = None, family: str = "dit") -> LocatedCheckpoint:
    """What `ditrt export NAME` exports (see the module docstring for the order)."""
    text = str(name)
    path = Path(text)
    if revision is not None and (path.exists() or text in OFFICIAL_CHECKPOINTS or not is_hub_id(text)):
        raise CheckpointError(f"--revision applies to a Hugging Face repository id (org/name), not {text}")
    if path.is_dir():
        if not (path / PIPELINE_INDEX).is_file():
            raise CheckpointError(f"{path} is a folder without {PIPELINE_INDEX}: give the weights file, or a diffusers "
                                  f"{PIPELINE_CLASS} folder (model_index.json, transformer/, vae/)")
        return pipeline_folder(path, path.name)
    if path.exists():
        return LocatedCheckpoint(path, path.stem)
    if text in OFFICIAL_CHECKPOINTS:
        return official_checkpoint(text, family)
    if is_hub_id(text):
        return hub_checkpoint(text, revision)
    raise CheckpointError(f"checkpoint not found: {text} (not a local file or folder, not an official checkpoint name "
                          f"({', '.join(OFFICIAL_CHECKPOINTS)}), not a Hugging Face id org/name)")


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and not text.lower().endswith(WEIGHT_SUFFIXES) and ".." not in text


# ---- diffusers pipeline folders -------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: unreadable {path} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} is not a JSON object")
    return data


def pipeline_folder(folder: Path, default_name: str, where: str | None = None) -> LocatedCheckpoint:
    """A diffusers DiTPipeline folder: model_index.json (its class, id2label), transformer/ (its
    class, its safetensors), vae/ and the scheduler config."""
    where = where or str(folder)
    index = _read_json(folder / PIPELINE_INDEX, where)
    cls = index.get("_class_name")
    if cls != PIPELINE_CLASS:
        raise CheckpointError(f"{where} holds a {cls!r} pipeline; ditrt exports {PIPELINE_CLASS} pipelines only "
                              "(a class-conditional DiT)")
    transformer = folder / "transformer"
    if not (transformer / "config.json").is_file():
        raise CheckpointError(f"{where} has no transformer (transformer/config.json is missing): a {PIPELINE_CLASS} "
                              "needs its transformer/ folder")
    t_cls = _read_json(transformer / "config.json", where).get("_class_name")
    if t_cls not in TRANSFORMER_CLASSES:
        raise CheckpointError(f"{where}/transformer/config.json: class {t_cls!r} is not a DiT transformer "
                              f"({' or '.join(TRANSFORMER_CLASSES)})")
    weights = transformer / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{where} has no transformer weights: transformer/{WEIGHTS_NAME} is missing")
    vae = folder / "vae"
    scheduler = _read_json(folder / SCHEDULER_CONFIG, where) if (folder / SCHEDULER_CONFIG).is_file() else None
    if scheduler is None and "scheduler" in index:
        raise CheckpointError(f"{where}: model_index.json lists a scheduler but {SCHEDULER_CONFIG} is missing")
    files = {name: sha256_file(folder / name) for name in HUB_PATTERNS if (folder / name).is_file()}
    return LocatedCheckpoint(weights, default_name, vae if (vae / "config.json").is_file() else None,
                             index.get("id2label"), scheduler, where, {"pipeline": PIPELINE_CLASS, "files": files})


# ---- Hugging Face repositories ----------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_checkpoint(repo_id: str, revision: str | None = None) -> LocatedCheckpoint:
    """snapshot_download of the pipeline's configs and safetensors (HF_HUB_CACHE, HF_HUB_OFFLINE and
    HF_TOKEN read at call time), then the pipeline folder's checks on the snapshot."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{repo_id} looks like a Hugging Face id: pip install huggingface_hub (or 'ditrt[export]')") \
            from None
    offline = _offline()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                        cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        state = ("HF_HUB_OFFLINE is set, and" if offline else "the hub could not be reached (HF_HUB_OFFLINE is unset), and")
        raise CheckpointError(f"Hugging Face repository {repo_id}{'@' + revision if revision else ''}: {state} it is not "
                              "(completely) in the local cache (HF_HUB_CACHE="
                              f"{os.environ.get('HF_HUB_CACHE') or 'the default'}): {str(e).splitlines()[0]} Download it "
                              "once with HF_HUB_OFFLINE unset, or give a local path") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"Hugging Face repository {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    commit = folder.name
    located = pipeline_folder(folder, repo_id.replace("/", "--"), where=f"Hugging Face repository {repo_id}@{commit}")
    located.origin = {"repository": repo_id, "revision": commit, **located.origin}
    return located


# ---- official checkpoint names --------------------------------------------------------------------

def official_checkpoint(name: str, family: str) -> LocatedCheckpoint:
    """The released file in torch hub's cache ($TORCH_HOME/hub/checkpoints/NAME), downloaded from its
    published URL when missing (torch.hub writes a temporary file and renames it)."""
    import torch.hub
    official = OFFICIAL_CHECKPOINTS[name]
    if family != official.family:
        raise CheckpointError(f"{name} is a {official.family.upper() if official.family == 'dit' else 'SiT'} "
                              f"checkpoint: export it with --family {official.family}")
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(official.url, str(target), progress=True)
        except Exception as e:  # URLError, HTTPError, OSError: the message says which
            raise CheckpointError(f"{name} is not in torch hub's cache ({target}) and could not be downloaded from "
                                  f"{official.url}: {type(e).__name__}: {e}") from None
    return LocatedCheckpoint(target, Path(name).stem, origin={"url": official.url})
