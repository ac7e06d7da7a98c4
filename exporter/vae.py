"""The VAE decoder the official DiT scripts use (diffusers' `AutoencoderKL`, `vae.decode(latents /
0.18215).sample`): loading a diffusers folder strictly, and the graph-shaped module that is exported.

A diffusers VAE folder is `config.json` + `diffusion_pytorch_model.safetensors` (preferred) or
`diffusion_pytorch_model.bin` (read with `torch.load(weights_only=True)` only). The model is built
from the config and the state dict is checked key by key here, so every failure is a `VaeError`
naming the file and the reason.
"""
from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditrt.runtime.core.errors import InputError
from ditrt.runtime.core.files import sha256_file
from ditrt.runtime.core.validate import check_number

from .checkpoints import check_keys

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preference order
VAE_CLASS = "AutoencoderKL"
DEFAULT_SCALING_FACTOR = 0.18215  # the sd-vae family (sd-vae-ft-ema / -mse) that DiT was trained with
DEFAULT_LATENT_CHANNELS = 4  # diffusers' AutoencoderKL default
_LIST_AT_MOST = 6  # keys named per problem in an error message


class VaeError(InputError):
    """A VAE folder that cannot be used, with the file and the reason in the message."""


@dataclass
class LoadedVae:
    model: torch.nn.Module  # diffusers AutoencoderKL, float32, eval mode
    config: dict  # config.json as read
    scaling_factor: float
    latent_channels: int
    folder: Path
    weights_path: Path
    sha256: str  # of the weights file
    format: str  # "safetensors" or "bin"
    notes: list[str] = field(default_factory=list)

    @property
    def upsampling(self) -> int:
        """Image pixels per latent pixel: 2 per up block after the first (8 for the sd-vae layout)."""
        return 2 ** (len(self.config.get("block_out_channels", (0, 0, 0, 0))) - 1)

    def source(self) -> dict:
        """The manifest's `source` entry for the decoder network."""
        import diffusers
        return {"kind": "diffusers-folder", "class": VAE_CLASS, "path": str(self.folder),
                "weights": self.weights_path.name, "format": self.format, "sha256": self.sha256,
                "diffusers": diffusers.__version__, "notes": list(self.notes)}


def load_vae(folder: str | Path, in_channels: int | None = None) -> LoadedVae:
    """Read a diffusers `AutoencoderKL` folder. `in_channels` (the DiT's latent channels), when
    given, must equal the VAE's latent channels."""
    folder = Path(folder)
    notes: list[str] = []
    config = _read_config(folder)
    latent_channels = int(config.get("latent_channels", DEFAULT_LATENT_CHANNELS))
    if in_channels is not None and latent_channels != in_channels:
        raise VaeError(f"{folder / CONFIG_NAME}: the VAE has {latent_channels} latent channels but the DiT "
                       f"produces {in_channels}-channel latents; use the VAE the DiT was trained with")
    scaling_factor = _scaling_factor(config, folder, notes)
    if config.get("shift_factor") not in (None, 0, 0.0):
        raise VaeError(f"{folder / CONFIG_NAME}: shift_factor {config['shift_factor']} is set; DiT decodes with "
                       "latents / scaling_factor only (the sd-vae family has no shift)")
    weights_path, fmt = _find_weights(folder)
    tensors = _read_weights(weights_path, fmt)
    tensors = _to_float32(tensors, weights_path, notes)
    model = _build(config, folder)
    tensors = _fix_legacy_attention_keys(model, tensors, notes)
    check_vae_state_dict(model, tensors, weights_path)
    model.load_state_dict(tensors, strict=True)
    model.eval().requires_grad_(False)
    return LoadedVae(model, config, scaling_factor, latent_channels, folder, weights_path,
                     sha256_file(weights_path), fmt, notes)


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise VaeError(f"VAE folder not found: {folder}")
    if not folder.is_dir():
        raise VaeError(f"{folder} is not a folder: a diffusers VAE is a folder holding {CONFIG_NAME} and "
                       f"{WEIGHT_NAMES[0]}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (folder / "vae" / CONFIG_NAME).is_file():  # a whole pipeline folder (e.g. DiT's) was given
            hint = f"; it has a vae/ subfolder: pass {folder / 'vae'}"
        raise VaeError(f"{path} not found: a diffusers VAE folder holds {CONFIG_NAME} beside its weights{hint}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VaeError(f"unreadable VAE config {path}: {e}") from None
    if not isinstance(config, dict):
        raise VaeError(f"{path} holds a JSON {type(config).__name__}, not a diffusers config object")
    cls = config.get("_class_name")
    if cls != VAE_CLASS:
        what = f"_class_name {cls!r}" if cls is not None else "no _class_name"
        raise VaeError(f"{path} has {what}: ditrt decodes with a diffusers {VAE_CLASS} (the sd-vae family "
                       "the official DiT scripts use)")
    return config


def _scaling_factor(config: dict, folder: Path, notes: list[str]) -> float:
    value = config.get("scaling_factor")
    if value is None:
        notes.append(f"config.json has no scaling_factor: using {DEFAULT_SCALING_FACTOR} (the sd-vae value the "
                     "official DiT scripts hard-code)")
        return DEFAULT_SCALING_FACTOR
    return check_number(value, f"{folder / CONFIG_NAME}: scaling_factor", 0, low_open=True, error=VaeError)


def _find_weights(folder: Path) -> tuple[Path, str]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name, name.rsplit(".", 1)[1]
    present = sorted(p.name for p in folder.iterdir())
    variants = [n for n in present if n.startswith("diffusion_pytorch_model.")]
    hint = f" (found {', '.join(variants)}: rename the one to use)" if variants else \
        f" (the folder holds: {', '.join(present[:10]) or 'nothing'})"
    raise VaeError(f"{folder}: no weights file: expected {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]}{hint}")


def _read_weights(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise VaeError(f"unreadable safetensors file {path} (truncated or corrupt): {e}") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
            raise VaeError(f"unreadable checkpoint {path}: " + (
                f"it holds objects other than tensors, which weights_only loading refuses. {detail}" if detail
                else "not a PyTorch file, or truncated")) from None
        except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or foreign files
            raise VaeError(f"unreadable checkpoint {path}: not a PyTorch (zip) file, or truncated "
                           f"({type(e).__name__})") from None
    if not isinstance(tensors, dict):
        raise VaeError(f"{path} holds a {type(tensors).__name__}, not a state dict")
    not_tensors = sorted(str(k) for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise VaeError(f"{path} is not a flat state dict: non-tensor entries {', '.join(not_tensors[:_LIST_AT_MOST])}")
    return dict(tensors)


def _to_float32(tensors: dict[str, torch.Tensor], path: Path, notes: list[str]) -> dict[str, torch.Tensor]:
    bad = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if bad:
        raise VaeError(f"{path}: non-floating-point tensors in a VAE state dict: {', '.join(bad[:_LIST_AT_MOST])}")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
    if dtypes and dtypes != ["float32"]:
        notes.append(f"weights stored as {'/'.join(dtypes)}, converted to float32")
        tensors = {k: v.float() for k, v in tensors.items()}
    return tensors


def _build(config: dict, folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    try:
        return AutoencoderKL.from_config(config).eval()
    except Exception as e:  # diffusers raises TypeError/ValueError/KeyError for unusable values
        raise VaeError(f"{folder / CONFIG_NAME}: diffusers cannot build an {VAE_CLASS} from it: "
                       f"{type(e).__name__}: {e}") from None


def _fix_legacy_attention_keys(model: torch.nn.Module, tensors: dict, notes: list[str]) -> dict:
    """Files saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn
    (to_q/to_k/to_v/to_out.0 now); diffusers renames them on load, so do the same."""
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is None or not any(k.endswith((".query.weight", ".proj_attn.weight")) for k in tensors):
        return tensors
    renamed = fix(dict(tensors))
    if set(renamed) != set(tensors):
        notes.append("legacy attention key names (query/key/value/proj_attn) renamed to diffusers' current ones")
    return renamed


def check_vae_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: object) -> None:
    """Raise listing missing keys, unexpected keys and shape mismatches (a few of each)."""
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, tensors,
               f"{source} does not match the {VAE_CLASS} its config.json describes", VaeError, _LIST_AT_MOST)


class _Float32GroupNorm(torch.nn.Module):
    """GroupNorm computed in float32 inside an fp16 network (cast in, normalise, cast out): its
    mean/variance reductions in fp16 overflow once activations pass ~256 (x^2 > 65504) and lose
    precision on 10^4..10^5-element groups. Mirrors the denoiser's float32 LayerNormalization."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        # The affine parameters stay float16 like every other weight: diffusers' Decoder reads the
        # up blocks' dtype from their first parameter (a GroupNorm weight) to pick its compute dtype.
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class DecoderGraph(torch.nn.Module):
    """The exported function: `image = vae.decode(latent / scaling_factor).sample`, written out as
    post_quant_conv + decoder (what `decode` runs with tiling and slicing off). float32 in and out;
    the fp16 variant divides in float32, casts to float16 at the boundary, runs a float16 copy of the
    network (GroupNorm in float32, see `_Float32GroupNorm`) and casts the image back to float32."""

    def __init__(self, loaded: LoadedVae, precision: str = "fp32", fp32_group_norm: bool = True):
        super().__init__()
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"unknown precision {precision!r}; use fp32 or fp16")
        vae = loaded.model
        # A shallow copy of the module tree sharing the loaded weights (fp32), or a deep float16 copy
        # (fp16): the loaded model stays as it is, usable as the reference.
        post_quant_conv, decoder = _share_weights_copy(vae.post_quant_conv), _share_weights_copy(vae.decoder)
        if precision == "fp16":
            post_quant_conv, decoder = copy.deepcopy(post_quant_conv), copy.deepcopy(decoder)
            post_quant_conv = post_quant_conv.half() if post_quant_conv is not None else None
            decoder = decoder.half()
            if fp32_group_norm:
                _replace_group_norms(decoder)
        _replace_upsamplers(decoder)
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder
        self.scaling_factor = float(loaded.scaling_factor)
        self.precision = precision
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32
        self.eval()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = (latent.float() / self.scaling_factor).to(self.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()


class _Upsample(torch.nn.Module):
    """diffusers' Upsample2D as the sd-vae decoder uses it (nearest 2x, then a 3x3 conv) without its
    batch-size branches (`shape[0] >= 64` and `numel() > 2**31` only call .contiguous(), which changes
    no value), which would make torch.export guard the dynamic batch axis to 2..63."""

    def __init__(self, up: torch.nn.Module):
        super().__init__()
        supported = (getattr(up, "norm", None) is None and not up.use_conv_transpose and up.interpolate
                     and up.use_conv and up.name == "conv")
        if not supported:
            raise ValueError("Upsample2D configuration other than nearest-2x + conv (norm, conv transpose or "
                             "no conv) is not supported by the decoder export")
        self.conv = up.conv

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None:
            raise ValueError("Upsample2D with an explicit output_size is not supported by the decoder export")
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def _share_weights_copy(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """Copy the module objects (so submodules can be swapped) but not the parameters and buffers."""
    if module is None:
        return None
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def _replace_upsamplers(module: torch.nn.Module) -> int:
    from diffusers.models.upsampling import Upsample2D
    count = 0
    for name, child in module.named_children():
        if isinstance(child, Upsample2D):
            setattr(module, name, _Upsample(child))
            count += 1
        else:
            count += _replace_upsamplers(child)
    return count


def _replace_group_norms(module: torch.nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, _Float32GroupNorm(child))
            count += 1
        else:
            count += _replace_group_norms(child)
    return count


# stabilityai/sd-vae-ft-ema / -mse (the VAE the official DiT scripts use): 4 resolutions, 8x
# upsampling, 2 resnets per block (3 in the decoder's up blocks), a mid-block attention, 83.7M parameters.
SD_VAE_CONFIG = {
    "_class_name": VAE_CLASS, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": DEFAULT_SCALING_FACTOR,
}


def random_vae(config: dict | None = None, seed: int = 0) -> LoadedVae:
    """A random-init AutoencoderKL (default: the sd-vae layout) wrapped like a loaded one, for
    benchmarks and tests; nothing is read from disk."""
    import diffusers
    config = dict(config or SD_VAE_CONFIG)
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL.from_config(config).eval().requires_grad_(False)
    return LoadedVae(model, config, float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                     int(config.get("latent_channels", DEFAULT_LATENT_CHANNELS)), Path("<random-init>"),
                     Path("<random-init>"), "", "random-init", [f"random init, seed {seed}"])
