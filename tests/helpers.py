"""Test-only helpers: writing files in formats ditrt reads (diffusers DiT weights), reading PNGs, and
making signing keys."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ditrt.exporter.checkpoints import (DIFFUSERS_BLOCK_EMBEDDER_KEYS, DIFFUSERS_BLOCK_KEYS, DIFFUSERS_GLOBAL_KEYS,
                                        DIFFUSERS_POS_EMBED, block_count)
from ditrt.exporter.model import DiT
from ditrt.runtime.spec.config import DiTConfig


def build_model(ckpt) -> DiT:
    return DiT.from_state_dict(ckpt.config, ckpt.state_dict)


def official_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    depth = block_count(state_dict, r"blocks\.(\d+)\.")
    out = {dst: state_dict[src] for src, dst in DIFFUSERS_GLOBAL_KEYS.items()}
    out[DIFFUSERS_POS_EMBED] = state_dict["pos_embed"]  # kept, so a round trip is exact
    for i in range(depth):
        for src, dst in DIFFUSERS_BLOCK_EMBEDDER_KEYS.items():
            out[dst.format(i=i)] = state_dict[src].clone()
        for p in ("weight", "bias"):
            for src, dst in DIFFUSERS_BLOCK_KEYS.items():
                out[dst.format(i=i, p=p)] = state_dict[src.format(i=i, p=p)]
            q, k, v = state_dict[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{p}"] = t.clone()
    return out



def save_diffusers(state_dict: dict[str, torch.Tensor], config: DiTConfig, directory: str | Path) -> Path:
    """Write diffusers-layout safetensors plus the config.json fields ditrt reads back."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in official_to_diffusers(state_dict).items()}, str(weights))
    (directory / "config.json").write_text(json.dumps({
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth, "patch_size": config.patch_size,
        "sample_size": config.input_size, "num_embeds_ada_norm": config.num_classes}, indent=1))
    return weights



def read_png(path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image).copy()


def openssl_key_pair(directory: Path, name: str = "key") -> tuple[Path, Path]:
    """An EC P-256 key pair (private, public PEM), made as the docs say (openssl ecparam / openssl
    ec); skips the test when the openssl command is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl (the command) makes the test keys")
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    return private, public


def swap_graph_and_its_digests(art: Path, precision: str = "fp16") -> None:
    """The signing issue's attack: rewrite the denoiser's graph of this precision, put its new
    sha256 in the manifest, regenerate manifest.sha256. Every digest agrees afterwards; only a
    signature can tell."""
    graph = art / f"denoiser.{precision}.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["networks"]["denoiser"]["graphs"][precision]["sha256"][graph.name] = hashlib.sha256(data).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    digest = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    (art / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
