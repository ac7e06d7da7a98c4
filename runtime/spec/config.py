"""Typed, validated views of what a manifest (or a checkpoint) says: the model and its family, the
process it was trained with (DiT: a diffusion; SiT: a transport), guidance and the sampling
defaults. Torch-free: the exporter builds its PyTorch model from the same `DiTConfig` the runtime
reads back.

Model families share the network (DiT's backbone) and differ in the time convention, the output
and the process the samplers integrate. One registry, `FAMILIES`; a family's samplers are the
`SAMPLERS` entries that name it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

from ..core.errors import ArtifactError, InputError
from .schema import Context, check_object, registry
from ..core.validate import check_int


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
        """Channels the backbone produces (DiT's graph output; SiT's graph keeps the first half)."""
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

    def validate(self, error=InputError) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            check_int(getattr(self, name), f"DiT config {name}", low=1, error=error)
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos pos_embed)")
        if problems:
            raise error("invalid DiT config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


# ---- the processes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diffusion:
    """DiT's training process: every DiT sampler's tables are built from these betas."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "learned_range"  # or "fixed_large"
    prediction: str = "epsilon"
    clip_denoised: bool = False

    def betas(self) -> np.ndarray:
        """float64 betas of the training process (the official "linear" schedule)."""
        return np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)

    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Transport:
    """SiT's interpolant: x_t = alpha_t x1 + sigma_t x0 with x0 noise, x1 data, t in [0, 1]. Only
    the Linear path (alpha_t = t, sigma_t = 1 - t) with velocity prediction and eps 0 is
    implemented (the SiT-XL/2 release); other paths and predictions are refused by name."""
    path_type: str = "Linear"
    prediction: str = "velocity"
    train_eps: float = 0.0
    sample_eps: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_diffusion(d: dict, model: DiTConfig, error=ArtifactError) -> Diffusion:
    """The diffusion section, checked against what this runtime can honour (nothing is silently
    replaced: a value it cannot honour is refused, naming the field). The value rules are
    manifest_schema.json's; the degenerate-schedule check is code."""
    v = check_object("diffusion", d, "diffusion", Context(refs={"model.learn_sigma": model.learn_sigma}))
    diffusion = Diffusion(v["num_train_timesteps"], "linear", v["beta_start"], v["beta_end"], v["variance"], "epsilon",
                          False)
    check_alphas_cumprod(diffusion, error)
    return diffusion


FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 2^-126, float32's smallest normal number


def check_alphas_cumprod(diffusion: Diffusion, error=ArtifactError) -> None:
    """Refuse a degenerate training schedule. The samplers apply alphas_cumprod (ac) and its
    coefficients in float32; ac falls monotonically from ac[0] = 1 - beta_start, so its ends decide:
    - float32(ac[-1]) must be a normal float32 (>= 2^-126): below, 1/sqrt(ac) overflows, ac rounds
      to 0 (it underflows for beta_end 0.5 or num_train_timesteps 100000) and DDIM's
      alpha_bar / alpha_bar_prev is 0/0;
    - float32(ac[0]) must be below 1: at 1, 1 - ac is 0 (a beta_start below float32's resolution)
      and DDIM's sigma and x0 divide by it.
    The C++ reader (runtime/cpp/src/config.cpp) applies the same rule to the same float64 table."""
    ac = diffusion.alphas_cumprod()
    if not float(np.float32(ac[0])) < 1.0:
        raise error(f"manifest field diffusion.beta_start {diffusion.beta_start} makes a degenerate schedule: "
                    "alphas_cumprod[0] = 1 - beta_start rounds to 1 in float32, where the samplers divide by "
                    "1 - alphas_cumprod; beta_start must be at least about 6e-8")
    if not float(np.float32(ac[-1])) >= FLOAT32_TINY:
        first = int(np.argmax(ac.astype(np.float32) < FLOAT32_TINY))
        raise error(f"manifest fields diffusion.beta_end {diffusion.beta_end} and diffusion.num_train_timesteps "
                    f"{diffusion.num_train_timesteps} make a degenerate schedule: alphas_cumprod falls to "
                    f"{float(ac[-1]):.3g}, below float32's smallest normal number 2^-126 from timestep {first} on, "
                    "where the samplers' float32 coefficients overflow (1/sqrt(alphas_cumprod)) or divide 0 by 0; "
                    "lower beta_end or num_train_timesteps")


def read_transport(d: dict, model: DiTConfig | None, error=ArtifactError,
                   where: str = "manifest field transport.") -> Transport:
    """The transport section (or, from the exporter, the options describing one), refusing what is
    not implemented by name (manifest_schema.json's transport rules)."""
    try:
        check_object("transport", d, "transport")
    except ArtifactError as e:  # the exporter's options name themselves, with its error kind
        raise error(str(e).replace("manifest field transport.", where, 1)) from None
    return Transport()


# ---- families -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    """What a request that names nothing gets."""
    sampler: str = "ddpm"
    steps: int | str = 250
    cfg_scale: float = 4.0
    guidance: str = "official"
    eta: float | None = None  # only for a sampler that takes eta

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    process_section: str  # the manifest section of its process: "diffusion" or "transport"
    read_process: Callable[[dict, DiTConfig], object]
    default_process: Callable[[DiTConfig], object]
    time_range: Callable[[object], tuple[float, float]]  # process -> the (low, high) values the time input takes
    time_meaning: str
    keeps_variance: bool  # the exported graph outputs the learned-variance channels (DiT) or drops them (SiT)
    defaults: Defaults

    def output_channels(self, config: DiTConfig) -> int:
        return config.out_channels if self.keeps_variance else config.in_channels


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    FAMILIES[family.name] = family


register_family(Family(
    "dit", "DiT (Peebles & Xie 2023): DDPM-trained, eps prediction, timesteps 0..999", "diffusion", read_diffusion,
    lambda c: Diffusion(variance="learned_range" if c.learn_sigma else "fixed_large"),
    lambda d: (0.0, float(d.num_train_timesteps - 1)),
    "original-scale timesteps (0..num_train_timesteps-1, fractional allowed), one per row", True,
    Defaults(**registry("families")["dit"]["defaults"])))
register_family(Family(
    "sit", "SiT (Ma et al. 2024): DiT's backbone trained as a flow-matching interpolant (Linear path, velocity)",
    "transport", read_transport, lambda c: Transport(), lambda t: (0.0, 1.0),
    "t in [0, 1] (0 noise, 1 data), unscaled, one per row", False,
    # SiT's headline FID (2.06 for SiT-XL/2): the SDE sampler, Euler-Maruyama, 250 steps, cfg 1.5.
    Defaults(**registry("families")["sit"]["defaults"])))


def get_family(name, error=InputError) -> Family:
    if not isinstance(name, str) or name not in FAMILIES:
        raise error(f"unknown model family {name!r}; ditrt knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ---- guidance and defaults ------------------------------------------------------------------------

@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance conventions: name -> leading channels guided (official: 3, the
    released models' quirk; standard: every latent channel)."""
    guided_channels: dict

    @classmethod
    def official(cls, config: DiTConfig) -> "Guidance":
        return cls({"official": min(3, config.in_channels), "standard": config.in_channels})

    def channels(self, name) -> int:
        if not isinstance(name, str) or name not in self.guided_channels:
            raise InputError(f"unknown guidance {name!r}; use {' or '.join(self.guided_channels)}")
        return int(self.guided_channels[name])

    def to_dict(self) -> dict:
        return {"guided_channels": dict(self.guided_channels)}


def read_model(data) -> tuple[Family, DiTConfig]:
    section = _section(data, "model")
    family = get_family(section.get("family"), ArtifactError)
    config = DiTConfig.from_dict(check_object("model", section, "model"))
    try:
        config.validate()
    except InputError as e:
        raise ArtifactError(f"manifest field model: {e}") from None
    if "out_channels" in section and section["out_channels"] != family.output_channels(config):
        raise ArtifactError(f"manifest field model.out_channels is {section['out_channels']!r}, but a {family.name} with "
                            f"in_channels {config.in_channels} and learn_sigma {config.learn_sigma} outputs "
                            f"{family.output_channels(config)}")
    return family, config


def read_process(data, family: Family, model: DiTConfig):
    return family.read_process(_section(data, family.process_section), model)


def read_guidance(data, model: DiTConfig) -> Guidance:
    values = check_object("guidance", _section(data, "guidance"), "guidance",
                          Context(refs={"model.in_channels": model.in_channels}))
    return Guidance(dict(values["guided_channels"]))


def read_defaults(data, family: Family, guidance: Guidance, samplers) -> Defaults:
    """The manifest's defaults; `samplers` the family's registry entries (samplers.samplers_of)."""
    d = data.get("defaults", {})
    if not isinstance(d, dict):
        raise ArtifactError(f"manifest field defaults must be an object, got {d!r}")
    mine = list(samplers)  # the family's (samplers.samplers_of)
    context = Context(choices={"samplers of the family": mine, "guidance.guided_channels": list(guidance.guided_channels)},
                      defaults=family.defaults.__dict__)
    defaults = Defaults(**check_object("defaults", d, "defaults", context))
    if defaults.eta is not None and "eta" not in samplers[defaults.sampler].options:  # the sampler registry: code
        raise ArtifactError(f"manifest field defaults.eta is set, but the default sampler {defaults.sampler} takes "
                            "no eta")
    return defaults


def _section(data, name: str) -> dict:
    section = data.get(name) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ArtifactError(f"manifest field {name} is missing or not an object")
    return section
