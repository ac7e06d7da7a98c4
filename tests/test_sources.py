"""Checkpoints as users name them (exporter/sources.py): Hugging Face ids from a prepared hub cache
(offline: nothing downloads), diffusers DiTPipeline folders, official checkpoint names in torch
hub's cache; and what the manifest records about them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import GOLDEN_DIR, ROOT, TINY_CHECKPOINT
from hub_cache import ID2LABEL, SCHEDULER, make_hub_cache, make_pipeline_folder

from ditrt import cli, runtime
from ditrt.exporter.checkpoints import CheckpointError
from ditrt.exporter.sources import OFFICIAL_CHECKPOINTS, locate

REPO = "facebook/DiT-XL-2-256"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VAE = GOLDEN_DIR / "vae" / "vae"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def invoke(*args, env: dict | None = None):
    return CliRunner().invoke(cli.main, [str(a) for a in args], env=env)


def offline_env(cache: Path) -> dict:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    return make_pipeline_folder(tmp_path_factory.mktemp("pipe") / "dit-pipeline", tiny_checkpoint, VAE, ID2LABEL)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, pipeline_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    make_hub_cache(cache, REPO, pipeline_dir, COMMIT)
    return cache


@pytest.fixture(scope="module")
def hub_artifact(tmp_path_factory, hub_cache) -> Path:
    """The hidden check's command, as a fresh process: `HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 ditrt
    export facebook/DiT-XL-2-256 --precision fp32 --out ART`."""
    out = tmp_path_factory.mktemp("hub-art") / "ART"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run([sys.executable, "-m", "ditrt.cli", "export", REPO, "--precision", "fp32", "--out", str(out)],
                          env={**env, **offline_env(hub_cache)}, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_hub_export_records_repository_revision_files_and_class_names(hub_artifact, hub_cache):
    manifest = runtime.load_manifest(hub_artifact)
    source = manifest.data["source"]
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (source["repository"], source["revision"]) == (REPO, COMMIT)
    assert source["format"] == "diffusers"  # the legacy Transformer2DModel class name was accepted
    assert source["files"] == {name: sha256(snapshot / name) for name in
                               ["model_index.json", "transformer/config.json",
                                "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                                "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]}
    assert source["sha256"] == sha256(snapshot / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(manifest.networks) == {"denoiser", "decoder", "embed", "blocks_0_1", "blocks_1_2", "final"}  # one command
    assert manifest.data["id2label"] == ID2LABEL
    assert invoke("verify", hub_artifact).exit_code == 0


def test_hub_export_samples_bit_identical_to_the_files_given_one_by_one(hub_artifact, hub_cache, tmp_path):
    """The acceptance: the same transformer weights and VAE folder, exported by path, give the same
    bits; and --labels tench,goldfish is --labels 0,1."""
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    by_files = tmp_path / "files"
    r = invoke("export", snapshot / "transformer" / "diffusion_pytorch_model.safetensors", "--vae", snapshot / "vae",
               "--precision", "fp32", "--out", by_files)
    assert r.exit_code == 0, r.output
    outputs = {}
    for name, art, labels in [("hub", hub_artifact, "tench,goldfish"), ("files", by_files, "0,1"),
                              ("hub-numbers", hub_artifact, "0,1")]:
        out = tmp_path / f"{name}.png"
        r = invoke("sample", art, "--labels", labels, "--steps", 5, "--seed", 3, "--out", out,
                   "--latents", tmp_path / f"{name}.npy", "--no-progress")
        assert r.exit_code == 0, r.output
        outputs[name] = (np.load(tmp_path / f"{name}.npy"), out.read_bytes())
    for name in ("files", "hub-numbers"):
        assert np.array_equal(outputs["hub"][0].view(np.uint32), outputs[name][0].view(np.uint32))
        assert outputs["hub"][1] == outputs[name][1]
    onnx_hub = (hub_artifact / "denoiser.fp32.onnx").read_bytes()
    assert onnx_hub == (by_files / "denoiser.fp32.onnx").read_bytes()


def test_a_pipeline_folder_is_a_checkpoint(pipeline_dir, tmp_path):
    """`ditrt export PIPELINE_FOLDER`: the transformer, its id2label, and its VAE by default."""
    out = tmp_path / "art"
    r = invoke("export", pipeline_dir, "--precision", "fp32", "--no-vae", "--out", out)
    assert r.exit_code == 0, r.output
    manifest = runtime.load_manifest(out)
    assert manifest.data["id2label"] == ID2LABEL and "repository" not in manifest.data["source"]
    assert manifest.data["source"]["pipeline"] == "DiTPipeline"
    assert manifest.data["source"]["files"]["model_index.json"] == sha256(pipeline_dir / "model_index.json")
    located = locate(pipeline_dir)
    assert located.vae_dir == pipeline_dir / "vae"  # exported as the decoder unless --no-vae


def _edited_pipeline(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: _write_json(d / "model_index.json", {**json.loads((d / "model_index.json").read_text()),
                                                    "_class_name": "StableDiffusionPipeline"}),
     "holds a 'StableDiffusionPipeline' pipeline; ditrt exports DiTPipeline pipelines only"),
    (lambda d: shutil.rmtree(d / "transformer"), "has no transformer (transformer/config.json is missing)"),
    (lambda d: _write_json(d / "transformer" / "config.json", {"_class_name": "UNet2DConditionModel"}),
     "class 'UNet2DConditionModel' is not a DiT transformer"),
    (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
        (d / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]),
     "unreadable safetensors file"),
    (lambda d: _write_json(d / "scheduler" / "scheduler_config.json", {**SCHEDULER, "beta_end": 0.012}),
     "beta_end 0.012 (the manifest's diffusion has 0.02)"),
    (lambda d: _write_json(d / "scheduler" / "scheduler_config.json", {**SCHEDULER, "num_train_timesteps": 4000}),
     "num_train_timesteps 4000 (the manifest's diffusion has 1000)"),
    (lambda d: _write_json(d / "model_index.json", {**json.loads((d / "model_index.json").read_text()),
                                                    "id2label": {"0": "tench", "10": "beyond"}}),
     "id2label key '10' is not a class label 0..9"),
])
def test_bad_pipeline_folders_are_refused_with_the_reason(pipeline_dir, tmp_path, edit, message):
    folder = _edited_pipeline(pipeline_dir, tmp_path / "pipe", edit)
    r = invoke("export", folder, "--precision", "fp32", "--out", tmp_path / "out")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_hub_repository_without_a_transformer_or_with_truncated_weights_is_refused(pipeline_dir, tmp_path):
    no_transformer = _edited_pipeline(pipeline_dir, tmp_path / "a", lambda d: shutil.rmtree(d / "transformer"))
    make_hub_cache(tmp_path / "cache", "org/no-transformer", no_transformer)
    truncated = _edited_pipeline(pipeline_dir, tmp_path / "b", lambda d: (
        d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""))
    make_hub_cache(tmp_path / "cache", "org/truncated", truncated)
    for repo, message in [("org/no-transformer", "Hugging Face repository org/no-transformer@"),
                          ("org/no-transformer", "has no transformer"),
                          ("org/truncated", "unreadable safetensors file")]:
        r = invoke("export", repo, "--precision", "fp32", "--out", tmp_path / "out", env=offline_env(tmp_path / "cache"))
        assert r.exit_code == 2 and message in r.output, r.output


def test_a_hub_id_missing_from_the_offline_cache_names_hf_hub_offline(hub_cache, tmp_path):
    r = invoke("export", "facebook/DiT-XL-2-512", "--out", tmp_path / "out", env=offline_env(hub_cache))
    assert r.exit_code == 2 and "HF_HUB_OFFLINE is set" in r.output and "facebook/DiT-XL-2-512" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_revision_pins_a_commit(pipeline_dir, tmp_path, monkeypatch, tiny_checkpoint):
    """refs/main names one commit; --revision picks the other snapshot (its own weights)."""
    cache = tmp_path / "cache"
    old = tmp_path / "old"
    make_pipeline_folder(old, tiny_checkpoint, VAE, {"0": "zero"})
    make_hub_cache(cache, REPO, old, "b" * 40)
    make_hub_cache(cache, REPO, pipeline_dir, COMMIT)  # refs/main -> COMMIT
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main, pinned = locate(REPO), locate(REPO, revision="b" * 40)
    assert (main.origin["revision"], pinned.origin["revision"]) == (COMMIT, "b" * 40)
    assert pinned.weights == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("b" * 40) / \
        "transformer" / "diffusion_pytorch_model.safetensors"
    assert pinned.id2label == {"0": "zero"} and main.id2label == ID2LABEL
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        locate(REPO, revision="c" * 40)
    with pytest.raises(CheckpointError, match="--revision applies to a Hugging Face repository id"):
        locate(pipeline_dir, revision="b" * 40)


def test_a_local_path_wins_over_a_hub_id_and_unknown_names_are_not_found(pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "facebook").mkdir()
    shutil.copytree(pipeline_dir, tmp_path / "facebook" / "DiT-XL-2-256")
    located = locate(REPO)  # the folder ./facebook/DiT-XL-2-256, not the hub
    assert located.weights == Path(REPO) / "transformer" / "diffusion_pytorch_model.safetensors"
    assert "repository" not in located.origin
    for name in ("missing.pt", "a/b/c", "org/name.safetensors"):
        with pytest.raises(CheckpointError, match="checkpoint not found"):
            locate(name)


def test_an_official_name_uses_the_file_in_torch_hubs_cache(tmp_path, monkeypatch):
    """DiT-XL-2-256x256.pt with no such local file: $TORCH_HOME/hub/checkpoints/DiT-XL-2-256x256.pt
    (a small file placed there; no download happens, and none could: the network is cut)."""
    import torch.hub
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "DiT-XL-2-256x256.pt"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(TINY_CHECKPOINT, cached)

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded {args}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    r = invoke("export", "DiT-XL-2-256x256.pt", "--num-heads", 4, "--precision", "fp32", "--out", tmp_path / "art")
    assert r.exit_code == 0, r.output
    source = runtime.load_manifest(tmp_path / "art").data["source"]
    assert Path(source["path"]) == cached and source["sha256"] == sha256(TINY_CHECKPOINT)
    assert source["url"] == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "torch"]  # nothing in the working directory
    # SiT's released checkpoint is a SiT: --family sit, else a clear refusal.
    shutil.copyfile(TINY_CHECKPOINT, cached.parent / "SiT-XL-2-256x256.pt")
    assert locate("SiT-XL-2-256x256.pt", family="sit").weights == cached.parent / "SiT-XL-2-256x256.pt"
    with pytest.raises(CheckpointError, match="export it with --family sit"):
        locate("SiT-XL-2-256x256.pt")
    assert set(OFFICIAL_CHECKPOINTS) == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", "SiT-XL-2-256x256.pt"}


def test_the_reference_model_is_found_again_through_the_hub_cache(hub_artifact, hub_cache, tmp_path, monkeypatch,
                                                                  tiny_checkpoint):
    """`parity --against reference` on another machine: source.path is not there, the repository
    at the recorded commit is (its files' sha256 checked)."""
    import torch

    from ditrt.exporter.reference import reference_model
    from ditrt.runtime.core.errors import ArtifactError
    art = tmp_path / "art"
    shutil.copytree(hub_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["source"]["path"] = "/elsewhere/transformer/diffusion_pytorch_model.safetensors"
    (art / "manifest.json").write_text(json.dumps(data))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = reference_model(runtime.load_manifest(art))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_checkpoint.state_dict.items())
    assert runtime.artifact.manifest.reexport_command(data, art) == f"ditrt export {REPO} --revision {COMMIT} --out {art} --force"
    data["source"]["files"]["vae/config.json"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="vae/config.json differs from the file the artifact was exported from"):
        reference_model(runtime.load_manifest(art))
