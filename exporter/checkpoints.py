"""Checkpoint loading: official flat state dicts, training checkpoints (their EMA weights) and
diffusers-format DiT weights, all brought to the official key layout and checked key by key.

Always `torch.load(weights_only=True)`; training checkpoints hold an argparse.Namespace, which is
allowed explicitly and nothing else.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditrt.runtime.core.errors import InputError
from ditrt.runtime.core.files import sha256_file
from ditrt.runtime.core.validate import check_int

from .model import DIT_CONFIGS, DiT, DiTConfig, get_2d_sincos_pos_embed


class CheckpointError(InputError):
    """A checkpoint that cannot be used, with the reason in the message."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]  # official layout, float32
    config: DiTConfig
    format: str  # "official", "training-ema", "diffusers"
    path: Path
    sha256: str
    notes: list[str] = field(default_factory=list)


def load_checkpoint(path: str | Path, **overrides) -> Checkpoint:
    """Read, convert to the official layout, infer the config (overrides win) and check every key."""
    path = Path(path)
    tensors, source_format, notes = _read(path)
    if "x_embedder.proj.weight" in tensors:
        state_dict, fmt = tensors, source_format
    elif "pos_embed.proj.weight" in tensors or any(k.startswith("transformer_blocks.") for k in tensors):
        if _DIFFUSERS_DIT_MARKER not in tensors:  # PixArt, SD3 and other diffusers transformers share the prefixes
            raise CheckpointError(f"{path} is a diffusers-layout transformer but not a class-conditional DiT: "
                                  f"it has no '{_DIFFUSERS_DIT_MARKER}'")
        state_dict = diffusers_to_official(tensors)
        fmt = "diffusers"
        overrides = {**_diffusers_config_overrides(path), **overrides}
    else:
        sample = ", ".join(sorted(tensors)[:8]) or "(no tensors)"
        raise CheckpointError(
            f"{path} does not look like a DiT checkpoint: it has neither 'x_embedder.proj.weight' (official "
            f"layout) nor 'pos_embed.proj.weight' (diffusers layout). First keys: {sample}")
    state_dict, dtype_notes = _to_float32(state_dict)
    notes += dtype_notes
    config = infer_config(state_dict, **overrides)
    if fmt == "diffusers" and "pos_embed" not in state_dict:
        grid = config.input_size // config.patch_size
        state_dict["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, grid)).float()[None]
        notes.append("pos_embed is not stored in this diffusers file: recomputed from the sin-cos formula "
                     "(the official checkpoints' EMA-touched values can differ slightly)")
    check_state_dict(state_dict, config, path)
    non_finite = [k for k, v in state_dict.items() if not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{path} has NaN or inf weights in {', '.join(non_finite[:8])}"
                              + (f" and {len(non_finite) - 8} more" if len(non_finite) > 8 else ""))
    return Checkpoint(state_dict, config, fmt, path, sha256_file(path), notes)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), "official", []
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"unreadable safetensors file {path}: {e}") from None
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "unsupported global" in line.lower()), "")
        if not detail:  # not a refusal: the bytes are no pickle at all
            raise CheckpointError(f"unreadable checkpoint {path}: not a PyTorch or safetensors file, or truncated") from None
        raise CheckpointError(
            f"{path} holds objects other than tensors and an argparse.Namespace, which weights_only loading "
            f"refuses (ditrt never unpickles arbitrary code). {detail}".strip()) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... for truncated or foreign files
        raise CheckpointError(f"unreadable checkpoint {path}: not a PyTorch (zip) or safetensors file, "
                              f"or truncated ({type(e).__name__})") from None
    return _unwrap(obj, path)


def _torch_load(path: Path):
    """weights_only loading (argparse.Namespace allowed for training checkpoints). mmap pages a
    2.7 GB checkpoint in instead of reading a second copy; legacy (non-zip) files cannot be mapped,
    so they are read normally."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < (1 << 30) and head[8:9] == b"{"


def _unwrap(obj, path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    notes: list[str] = []
    fmt = "official"
    if "ema" in obj and isinstance(obj["ema"], dict):
        fmt = "training-ema"
        skipped = sorted(k for k in obj if k != "ema")
        notes.append(f"training checkpoint: using its 'ema' weights (ignoring {', '.join(skipped) or 'nothing else'})")
        obj = obj["ema"]
    elif "model" in obj and isinstance(obj["model"], dict) and not isinstance(obj["model"], torch.Tensor):
        raise CheckpointError(f"{path} is a training checkpoint without 'ema' weights (keys: {', '.join(sorted(obj))}); "
                              "the official sampler uses EMA weights")
    not_strings = [repr(k) for k in obj if not isinstance(k, str)]
    if not_strings:
        raise CheckpointError(f"{path} is not a state dict: keys must be strings, got {', '.join(not_strings[:5])}")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path} is not a flat state dict: non-tensor entries {', '.join(map(str, not_tensors[:10]))}")
    not_dense = sorted(k for k, v in obj.items() if v.layout != torch.strided)
    if not_dense:
        raise CheckpointError(f"{path} holds sparse or other non-dense tensors ({', '.join(not_dense[:5])}); "
                              "a DiT state dict is dense")
    prefixes = [p for p in ("module.", "_orig_mod.") if obj and all(k.startswith(p) for k in obj)]
    for p in prefixes:  # DDP / torch.compile wrappers
        obj = {k[len(p):]: v for k, v in obj.items()}
        notes.append(f"stripped the '{p}' prefix from every key")
    return dict(obj), fmt, notes


def _to_float32(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()})
    if dtypes == ["float32"]:
        return state_dict, []
    bad = sorted(k for k, v in state_dict.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"non-floating-point tensors in a DiT state dict: {', '.join(bad[:10])}")
    return {k: v.float() for k, v in state_dict.items()}, [f"weights stored as {'/'.join(dtypes)}, converted to float32"]


def infer_config(state_dict: dict[str, torch.Tensor], **overrides) -> DiTConfig:
    """Derive the config from tensor shapes; num_heads only from a named config of the same
    depth and width (or an override), since no tensor records it."""
    unknown = sorted(set(overrides) - set(DiTConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"unknown config override(s): {', '.join(unknown)}")
    needed = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointError(f"cannot infer the DiT config: missing keys {', '.join(missing)}")
    for key in needed:
        if 0 in state_dict[key].shape:
            raise CheckpointError(f"{key} has an empty shape {tuple(state_dict[key].shape)}")
    if state_dict["x_embedder.proj.weight"].ndim != 4:
        raise CheckpointError(f"x_embedder.proj.weight has shape {tuple(state_dict['x_embedder.proj.weight'].shape)}; "
                              "a DiT patch embedding is a 4-D convolution kernel (hidden, C, p, p)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = block_count(state_dict, r"blocks\.(\d+)\.")
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    found = dict(hidden_size=hidden, in_channels=in_channels, patch_size=patch, depth=depth,
                 num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
                 learn_sigma=out_channels == 2 * in_channels)
    if "pos_embed" in state_dict:
        side = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
        found["input_size"] = side * patch
    if "blocks.0.mlp.fc1.weight" in state_dict:
        found["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    named = [c for c in DIT_CONFIGS.values() if (c.depth, c.hidden_size) == (depth, hidden)]
    if named:
        found["num_heads"] = named[0].num_heads
    found.update(overrides)
    if "num_heads" not in found:
        raise CheckpointError(
            f"cannot infer num_heads: depth {depth} x hidden {hidden} matches no named DiT config and no "
            "tensor records the head count; pass it (--num-heads N / num_heads=N)")
    if "input_size" not in found:
        raise CheckpointError("cannot infer the latent size: 'pos_embed' is missing; pass it (--input-size N)")
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final_layer.linear.weight gives {out_channels} output channels for {in_channels} "
                              f"input channels; a DiT has {in_channels} or {2 * in_channels}")
    try:
        config = DiTConfig(**found)
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return config


def expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], config: DiTConfig, source: object = "checkpoint") -> None:
    """Raise with every missing key, unexpected key and shape mismatch listed."""
    check_keys(expected_shapes(config), state_dict, f"{source} does not match {describe(config)}", CheckpointError)


def check_keys(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], what: str,
               error=CheckpointError, at_most: int | None = None) -> None:
    """The one key check of every weight file (DiT checkpoints, VAE folders): raise `error` with
    `what`, then the missing keys, unexpected keys and shape mismatches (`at_most` of each named)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k])]
    problems = []
    for label, items, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                              ("shape mismatch", mismatched, "; ")):
        if items:
            shown = items if at_most is None else items[:at_most]
            more = f" (and {len(items) - len(shown)} more)" if len(shown) < len(items) else ""
            problems.append(f"{label} ({len(items)}): {sep.join(shown)}{more}")
    if problems:
        raise error(f"{what}:\n  " + "\n  ".join(problems))


def describe(config: DiTConfig) -> str:
    return (f"DiT depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, patch "
            f"{config.patch_size}, latent {config.input_size}x{config.input_size}x{config.in_channels}, "
            f"{config.num_classes} classes, learn_sigma {config.learn_sigma}")


# ---- diffusers layout (DiTTransformer2DModel) <-> official layout ---------------------------------

# official name -> diffusers name; "{i}" is the block index. The timestep and label embedders are
# copied into every diffusers block; q/k/v are split out of qkv.
DIFFUSERS_GLOBAL_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
DIFFUSERS_BLOCK_EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight",
}
DIFFUSERS_BLOCK_KEYS = {
    "blocks.{i}.adaLN_modulation.1.{p}": "transformer_blocks.{i}.norm1.linear.{p}",
    "blocks.{i}.attn.proj.{p}": "transformer_blocks.{i}.attn1.to_out.0.{p}",
    "blocks.{i}.mlp.fc1.{p}": "transformer_blocks.{i}.ff.net.0.proj.{p}",
    "blocks.{i}.mlp.fc2.{p}": "transformer_blocks.{i}.ff.net.2.{p}",
}
_DIFFUSERS_DIT_MARKER = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
DIFFUSERS_POS_EMBED = "pos_embed.pos_embed"  # a buffer; diffusers recomputes it and usually omits it


def diffusers_to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert, consuming every key; anything left over is an error, never dropped."""
    remaining = dict(tensors)
    take = remaining.pop
    depth = block_count(tensors, r"transformer_blocks\.(\d+)\.")
    try:
        out = {src: take(dst) for src, dst in DIFFUSERS_GLOBAL_KEYS.items()}
        for src, dst in DIFFUSERS_BLOCK_EMBEDDER_KEYS.items():
            copies = [take(dst.format(i=i)) for i in range(depth)]
            differing = [i for i, c in enumerate(copies) if not torch.equal(c, copies[0])]
            if differing:
                raise CheckpointError(f"diffusers checkpoint: {dst.format(i=differing[0])} differs from block 0's copy; "
                                      f"the official model has one shared {src}")
            out[src] = copies[0]
        for i in range(depth):
            for p in ("weight", "bias"):
                for src, dst in DIFFUSERS_BLOCK_KEYS.items():
                    out[src.format(i=i, p=p)] = take(dst.format(i=i, p=p))
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                    [take(f"transformer_blocks.{i}.attn1.to_{n}.{p}") for n in "qkv"], dim=0)
    except KeyError as e:
        raise CheckpointError(f"diffusers checkpoint is missing key {e.args[0]}") from None
    pos = remaining.pop(DIFFUSERS_POS_EMBED, remaining.pop("pos_embed", None))
    if pos is not None:
        out["pos_embed"] = pos
    if remaining:
        raise CheckpointError(f"diffusers checkpoint has keys with no official counterpart: {', '.join(sorted(remaining))}")
    return out


def block_count(state_dict: dict, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))), default=-1)


def _diffusers_config_overrides(path: Path) -> dict:
    """diffusers keeps the head count and latent size in config.json beside the weights."""
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable diffusers config {config_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"diffusers config {config_path} is not a JSON object")
    overrides = {}
    for key, name in (("num_attention_heads", "num_heads"), ("sample_size", "input_size")):
        if key in cfg:
            overrides[name] = check_int(cfg[key], f"diffusers config {config_path}: {key}", 1, error=CheckpointError)
    return overrides


def inspect_checkpoint(path: str | Path, **overrides) -> dict:
    """`ditrt inspect`: format, inferred config, named config, size, cost and notes of a checkpoint."""
    from dataclasses import replace
    from .model import macs_per_forward
    ckpt = load_checkpoint(path, **overrides)
    cfg = ckpt.config
    grid = cfg.input_size // cfg.patch_size
    pos = ckpt.state_dict["pos_embed"].double().numpy()[0]
    named = next((name for name, c in DIT_CONFIGS.items()
                  if replace(c, input_size=cfg.input_size, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma) == cfg),
                 None)
    return {"path": str(path), "format": ckpt.format, "sha256": ckpt.sha256, "named_config": named,
            "config": {**cfg.to_dict(), "out_channels": cfg.out_channels}, "description": describe(cfg),
            "image_size": cfg.input_size * 8, "parameters": sum(t.numel() for t in ckpt.state_dict.values()),
            "gmacs_per_forward": round(macs_per_forward(cfg) / 1e9, 3),
            "pos_embed_max_deviation_from_sincos": float(abs(pos - get_2d_sincos_pos_embed(cfg.hidden_size, grid)).max()),
            "family": "not recorded: no tensor tells a SiT from a DiT (the same network); export with --family",
            "notes": ckpt.notes}
