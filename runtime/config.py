"""Typed, validated views of what a manifest (or a checkpoint) says: the model, the diffusion
process it was trained with, and the sampling defaults. Torch-free: the exporter builds its
PyTorch model from the same `DiTConfig` the runtime reads back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ArtifactError, InputError


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent side (image side / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def validate(self) -> None:
        problems = []
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise InputError("invalid DiT config: " + "; ".join(problems))
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos pos_embed)")
        if problems:
            raise InputError("invalid DiT config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


VARIANCES = ("learned_range", "fixed_large")
BETA_SCHEDULES = ("linear",)
PREDICTIONS = ("epsilon",)


@dataclass(frozen=True)
class Diffusion:
    """The training process: every sampler's tables are built from these betas."""
    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    variance: str
    null_class: int
    guided_channels: dict  # guidance name -> number of leading channels guided
    prediction: str = "epsilon"
    clip_denoised: bool = False

    def betas(self) -> np.ndarray:
        """float64 betas of the training process (the official "linear" schedule)."""
        return np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)

    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas())

    @classmethod
    def official(cls, config: DiTConfig) -> "Diffusion":
        """What the official DiT trains with: linear 1e-4..0.02 over 1000 steps."""
        return cls(1000, "linear", 1e-4, 0.02, "learned_range" if config.learn_sigma else "fixed_large",
                   config.null_class, {"official": min(3, config.in_channels), "standard": config.in_channels})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Defaults:
    """What a request that names nothing gets."""
    sampler: str = "ddpm"
    steps: int | str = 250
    cfg_scale: float = 4.0
    guidance: str = "official"

    def to_dict(self) -> dict:
        return asdict(self)


def read_model(data) -> DiTConfig:
    section = _section(data, "model")
    for f in fields(DiTConfig):
        if f.name not in section:
            raise ArtifactError(f"manifest field model.{f.name} is missing")
    for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        _int(section, f"model.{name}", name, low=1, high=1 << 20)
    if not isinstance(section["learn_sigma"], bool):
        raise ArtifactError(f"manifest field model.learn_sigma must be true or false, got {section['learn_sigma']!r}")
    _number(section, "model.mlp_ratio", "mlp_ratio", positive=True)
    config = DiTConfig.from_dict(section)
    try:
        config.validate()
    except InputError as e:
        raise ArtifactError(f"manifest field model: {e}") from None
    if "out_channels" in section and section["out_channels"] != config.out_channels:
        raise ArtifactError(f"manifest field model.out_channels is {section['out_channels']!r}, but in_channels "
                            f"{config.in_channels} with learn_sigma {config.learn_sigma} gives {config.out_channels}")
    return config


def read_diffusion(data, model: DiTConfig) -> Diffusion:
    """The diffusion section, checked against what this runtime can honour (nothing is silently
    replaced: a value it cannot honour is refused, naming the field)."""
    d = _section(data, "diffusion")
    n = _int(d, "diffusion.num_train_timesteps", "num_train_timesteps", low=2, high=100_000)
    _choice(d, "diffusion.beta_schedule", "beta_schedule", BETA_SCHEDULES)
    start = _number(d, "diffusion.beta_start", "beta_start", positive=True)
    end = _number(d, "diffusion.beta_end", "beta_end", positive=True)
    if not start <= end < 1:
        raise ArtifactError(f"manifest fields diffusion.beta_start {start} and beta_end {end} need "
                            "0 < beta_start <= beta_end < 1")
    variance = _choice(d, "diffusion.variance", "variance", VARIANCES)
    if variance == "learned_range" and model.out_channels != 2 * model.in_channels:
        raise ArtifactError(f"manifest field diffusion.variance is learned_range, but the model has {model.out_channels} "
                            f"output channels (learned range needs 2 x in_channels = {2 * model.in_channels})")
    prediction = _choice(d, "diffusion.prediction", "prediction", PREDICTIONS, default="epsilon")
    clip = d.get("clip_denoised", False)
    if clip is not False:
        raise ArtifactError(f"manifest field diffusion.clip_denoised is {clip!r}: this runtime samples as the official "
                            "sample.py does (clip_denoised false) and cannot clip")
    null_class = _int(d, "diffusion.null_class", "null_class", low=0, high=1 << 30)
    if null_class != model.num_classes:
        raise ArtifactError(f"manifest field diffusion.null_class is {null_class}, but the null class of a DiT is "
                            f"model.num_classes = {model.num_classes} (classes 0..{model.num_classes - 1} are real)")
    guided = d.get("guided_channels")
    if not isinstance(guided, dict) or not guided:
        raise ArtifactError(f"manifest field diffusion.guided_channels must be an object like "
                            f'{{"official": 3, "standard": {model.in_channels}}}, got {guided!r}')
    for name in guided:
        _int(guided, f"diffusion.guided_channels.{name}", name, low=1, high=model.in_channels)
    return Diffusion(n, "linear", float(start), float(end), variance, null_class, dict(guided), prediction, False)


def read_defaults(data, diffusion: Diffusion, samplers) -> Defaults:
    d = data.get("defaults", {})
    if not isinstance(d, dict):
        raise ArtifactError(f"manifest field defaults must be an object, got {d!r}")
    defaults = Defaults(**{k: d[k] for k in Defaults.__dataclass_fields__ if k in d})
    if defaults.sampler not in samplers:
        raise ArtifactError(f"manifest field defaults.sampler is {defaults.sampler!r}; this runtime has "
                            f"{', '.join(samplers)}")
    if defaults.guidance not in diffusion.guided_channels:
        raise ArtifactError(f"manifest field defaults.guidance is {defaults.guidance!r}, not one of "
                            f"diffusion.guided_channels ({', '.join(diffusion.guided_channels)})")
    if isinstance(defaults.cfg_scale, bool) or not isinstance(defaults.cfg_scale, (int, float)) \
            or not np.isfinite(np.float32(defaults.cfg_scale)):
        raise ArtifactError(f"manifest field defaults.cfg_scale must be a finite number, got {defaults.cfg_scale!r}")
    if isinstance(defaults.steps, bool) or not isinstance(defaults.steps, (int, str)):
        raise ArtifactError(f"manifest field defaults.steps must be an int or a step spec string, got {defaults.steps!r}")
    return defaults


# ---- field checks ------------------------------------------------------------------------------

def _section(data, name: str) -> dict:
    section = data.get(name) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ArtifactError(f"manifest field {name} is missing or not an object")
    return section


def _int(section: dict, field: str, key: str, low: int, high: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArtifactError(f"manifest field {field} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ArtifactError(f"manifest field {field} is {value}, outside {low}..{high}")
    return value


def _number(section: dict, field: str, key: str, positive: bool = False) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ArtifactError(f"manifest field {field} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ArtifactError(f"manifest field {field} must be positive, got {value!r}")
    return float(value)


def _choice(section: dict, field: str, key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    value = section.get(key, default)
    if value not in allowed:
        raise ArtifactError(f"manifest field {field} is {value!r}; this runtime supports {', '.join(map(repr, allowed))}")
    return value
