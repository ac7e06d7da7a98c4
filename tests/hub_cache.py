"""Test-only: diffusers DiTPipeline folders and Hugging Face cache directories in the hub's own
layout (models--org--name/refs/main, snapshots/<commit>/... as links into blobs/), built from small
models, so that nothing is downloaded."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from helpers import save_diffusers

# A few ImageNet entries, as facebook/DiT-XL-2-256's model_index.json writes them (synonyms
# separated by commas); "crane" names two classes there, as it does in ImageNet (134 and 517).
ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "great white shark, white shark",
            "3": "crane", "4": "umbrella", "5": "crane, derrick", "6": "bubble"}

# DiT's training process as diffusers' DDIMScheduler config records it for the DiT repositories.
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": True, "steps_offset": 0,
             "trained_betas": None, "prediction_type": "epsilon"}


def make_pipeline_folder(folder: Path, checkpoint, vae_dir: Path, id2label: dict | None = None,
                         pipeline_class: str = "DiTPipeline", transformer_class: str = "Transformer2DModel",
                         scheduler: dict | None = None) -> Path:
    """A DiTPipeline folder as save_pretrained writes it, with the legacy transformer class name
    the hub repositories use."""
    folder = Path(folder)
    save_diffusers(checkpoint.state_dict, checkpoint.config, folder / "transformer")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": transformer_class}, indent=1))
    shutil.copytree(vae_dir, folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or SCHEDULER, indent=1))
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.12.0.dev0",
             "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if id2label is not None:
        index["id2label"] = id2label
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def make_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """Put every file of `folder` into a hub cache as snapshot_download leaves it: blobs named by
    content, snapshots/<commit>/<path> links to them, refs/main holding the commit. Returns the
    snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
