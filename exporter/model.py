"""The reference DiT (Peebles & Xie 2023), written to export cleanly.

Same modules, state-dict keys and math as the official `models.py` (facebookresearch/DiT), with
changes that keep the numbers and make the graph exportable and CUDA-graph capturable:
- timestep frequencies are a non-persistent float32 buffer (no CPU tensors made in forward);
- attention uses `scaled_dot_product_attention`, unpatchify uses `permute` (no einsum);
- an fp16 model keeps its timestep sinusoid float32 (the official code cannot run under `.half()`).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditrt.runtime.spec.config import DiTConfig
from ditrt.runtime.core.errors import InputError


# depth, hidden, heads of the official named configs; each with patch 2, 4 or 8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items()
    for patch in (2, 4, 8)
}


def named_config(name: str, image_size: int = 256, **overrides) -> DiTConfig:
    """A named config (e.g. "DiT-XL/2") at an image size (latent side = image_size / 8)."""
    key = name if name.startswith("DiT-") else f"DiT-{name}"
    if key not in DIT_CONFIGS:
        raise InputError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    if image_size % 8:
        raise InputError(f"image size {image_size} is not a multiple of 8 (the VAE downsamples by 8)")
    cfg = replace(DIT_CONFIGS[key], input_size=image_size // 8, **overrides)
    cfg.validate()
    return cfg


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D), token index = row * (W / p) + col."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D). The sinusoid is always float32: at t = 999 its arguments reach
    ~1000, where fp16 would be wrong by 0.1-0.3."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        # A buffer, not a constant folded by the exporter: folding lands ~1 ulp off (8e-6 at t ~ 1000).
        self.register_buffer("freqs", timestep_frequencies(frequency_embedding_size // 2), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` would round `freqs` through the new dtype: recompute them in
        # float32 on whatever device the module moved to (casting back would keep the rounding).
        super()._apply(fn, recurse)
        self.freqs = timestep_frequencies(self.freqs.shape[0]).to(self.freqs.device)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (N, 128) float32
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as official
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


def timestep_frequencies(half: int) -> torch.Tensor:
    return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); index num_classes is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd) each
        x = F.scaled_dot_product_attention(q, k, v)  # scale hd^-0.5, as official
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block. Computes in its own weights' dtype, so single blocks can stay float32
    inside an fp16 model (casts at the block boundary)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        io_dtype, dtype = x.dtype, self.mlp.fc1.weight.dtype
        x, c = x.to(dtype), c.to(dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x.to(io_dtype)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # shift first, as official
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """(x (N, C, H, W), t (N,), y (N,)) -> (N, out_channels, H, W): eps, then (if learn_sigma) v."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        # Fixed sin-cos table, but a Parameter as in the official code: it is in the checkpoint.
        pos = get_2d_sincos_pos_embed(D, config.input_size // config.patch_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)

    @classmethod
    def from_state_dict(cls, config: DiTConfig, state_dict: dict[str, torch.Tensor]) -> "DiT":
        """Build without spending time on random init, then take the tensors (strictly)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.t_embedder.freqs = timestep_frequencies(model.t_embedder.freqs.shape[0])
        return model.float().eval()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*c) -> (N, c, H, W); the official einsum nhwpqc->nchpwq as a permute."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.pos_embed.dtype
        x = self.x_embedder(x.to(dtype)) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # (N, T, p*p*out)
        return self.unpatchify(x)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int = 3) -> torch.Tensor:
        """The official forward_with_cfg: rows [cond; null], x's second half replaced by its first.
        guided_channels=3 is the official quirk; in_channels gives standard (all-channel) guidance."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :guided_channels], out[:, guided_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class SiT(DiT):
    """SiT (Ma et al. 2024, willisma/SiT): DiT's backbone and state-dict keys, trained as a flow
    (t in [0, 1], 0 = noise, 1 = data, fed unscaled to the same sinusoid). With learn_sigma the
    official forward returns only the first in_channels output channels (the velocity);
    forward_with_cfg is DiT's (3 guided channels), on top of this forward."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t, y)  # (N, out_channels, H, W)
        return out[:, : self.config.in_channels] if self.config.learn_sigma else out


FAMILY_MODELS = {"dit": DiT, "sit": SiT}


def family_model(family: str) -> type[DiT]:
    """The module class of a model family (runtime.spec.config.FAMILIES names them)."""
    if family not in FAMILY_MODELS:
        raise InputError(f"no PyTorch model for family {family!r}; ditrt has {', '.join(FAMILY_MODELS)}")
    return FAMILY_MODELS[family]


def random_init(model: DiT, seed: int = 0) -> DiT:
    """Random weights with realistic statistics and non-trivial outputs. The official init zeroes
    adaLN and the final layer, which makes every output zero and hides numerical errors; here
    linears get Xavier-normal weights, adaLN / final layers and biases small ones (std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            if param.dim() == 1 or "embedding_table" in name or "adaLN" in name or "final_layer.linear" in name:
                std = 0.02
            else:
                std = (2.0 / (param.shape[0] + param[0].numel())) ** 0.5
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    return model.eval()


def set_precision(model: DiT, precision: str, fp32_blocks: tuple[int, ...] = ()) -> DiT:
    """fp32, or fp16 with the timestep sinusoid (always) and the listed blocks kept float32."""
    if precision == "fp32":
        return model.float()
    if precision != "fp16":
        raise InputError(f"unknown precision {precision!r}; use fp32 or fp16")
    bad = [i for i in fp32_blocks if not 0 <= i < len(model.blocks)]
    if bad:
        raise InputError(f"--fp32-blocks {bad} out of range: the model has blocks 0..{len(model.blocks) - 1}")
    model.half()
    for i in fp32_blocks:
        model.blocks[i].float()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # pos_embed included, as official


def macs_per_forward(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward for one sample (matmuls and the patch conv)."""
    T, D, p = config.num_patches, config.hidden_size, config.patch_size
    hidden_mlp = int(D * config.mlp_ratio)
    patch = T * D * config.in_channels * p * p
    t_embed = 256 * D + D * D
    block = 6 * D * D + T * (3 * D * D + D * D + 2 * D * hidden_mlp) + 2 * T * T * D
    final = 2 * D * D + T * D * p * p * config.out_channels
    return patch + t_embed + config.depth * block + final


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) float64 MAE sin-cos table. Token m = r * g + c: the first half
    encodes the column c, the second half the row r (the official meshgrid(w, h) order)."""
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    return np.concatenate([_1d_sincos(embed_dim // 2, cols.reshape(-1)),
                           _1d_sincos(embed_dim // 2, rows.reshape(-1))], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = pos[:, None] * omega[None]  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
