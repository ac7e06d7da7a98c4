"""What a TensorRT plan is built with, and what it is called: the optimisation profile over the batch
axis, the build flags, plan and timing-cache file names, the `ditrt build` command that makes a
plan again, and the parity bound a new plan must meet. No TensorRT import.

Batch axis: the denoiser's engine batch is counted in ENGINE ROWS. With classifier-free guidance
every image is two rows (its conditional row and a null-class row), so `--max-batch 64` runs 32
guided images (or 64 unguided ones) per engine call; the runtime chunks larger requests. A decoder
counts images.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass

from ...core.errors import InputError
from ...core.validate import check_int, check_number
from ...artifact.versions import SM_NAME, parse_version

HARDWARE_COMPAT = ("none", "ampere+", "same-cc")

OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default 3

# Engine fp16 output vs ONNX Runtime fp32, max error relative to the largest magnitude. The fp16
# graph itself is held to 5e-3 vs PyTorch fp32 at export (measured ~5.5e-4); TensorRT picks other
# fp16 kernels (fused attention, its own GEMM tactics and reformats), so the engine gets twice that.
# Not yet measured on a GPU: the first `ditrt build` records the real figure in the manifest.
FP16_PARITY_BOUND = 1e-2

# fp32 plans (a strongly typed build of the fp32 graph, e.g. a VAE decoder that overflows fp16):
# TensorRT allows TF32 for fp32 matmuls and convolutions by default (10-bit mantissa, ~5e-4 per op).
FP32_PARITY_BOUND = 5e-3

PLAN_PRECISIONS = ("fp16", "fp32", "int8", "fp8")  # int8 / fp8: the denoiser's QDQ graphs


def parity_bound(precision: str) -> float:
    """The plan against ONNX Runtime on the fp32 graph. int8 / fp8 plans (strongly typed builds of
    ModelOpt's QDQ graphs): the bound their graph was exported under (runtime/networks.EXPORT_BOUNDS)."""
    from ...spec.networks import EXPORT_BOUNDS, QUANTIZED_PRECISIONS
    if precision in QUANTIZED_PRECISIONS:
        return EXPORT_BOUNDS[precision]
    return FP16_PARITY_BOUND if precision == "fp16" else FP32_PARITY_BOUND


# ---- profile ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineProfile:
    """One optimisation profile over the batch axis, in engine rows (see the module docstring)."""
    min_rows: int = 1
    opt_rows: int = 16
    max_rows: int = 64

    def __post_init__(self) -> None:
        for flag, value in (("--min-batch", self.min_rows), ("--opt-batch", self.opt_rows), ("--max-batch", self.max_rows)):
            check_int(value, flag, 1, unit=" (engine rows)")
        if not self.min_rows <= self.opt_rows <= self.max_rows:
            raise InputError(f"the batch profile needs min <= opt <= max, got --min-batch {self.min_rows} "
                             f"--opt-batch {self.opt_rows} --max-batch {self.max_rows}")

    def images_per_call(self, guided: bool) -> int:
        """Most images one engine call takes; more are chunked over several calls."""
        return self.max_rows // (2 if guided else 1)

    def to_dict(self) -> dict:
        return {"min": self.min_rows, "opt": self.opt_rows, "max": self.max_rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EngineProfile":
        return cls(data["min"], data["opt"], data["max"])

    def cli_args(self) -> list[str]:
        return ["--min-batch", str(self.min_rows), "--opt-batch", str(self.opt_rows), "--max-batch", str(self.max_rows)]

def default_profile(network) -> EngineProfile:
    """The profile `ditrt build` uses when none is given: 1/16/64 rows for the denoiser (32 guided
    images per call), 1/4/8 images for a decoder (its activations are 64x a latent's)."""
    return EngineProfile() if network.batch_unit == "rows" else EngineProfile(1, 4, 8)

def parity_batches(profile: EngineProfile) -> list[int]:
    """Engine batch sizes the post-build parity check runs: the profile's minimum and a small odd
    size (3 rows; kernels can differ from the minimum's), kept small so that the fp32 reference
    stays quick on a CPU even for DiT-XL/2."""
    return sorted({profile.min_rows, min(profile.max_rows, max(profile.min_rows, 3))})


# ---- build flags and names --------------------------------------------------------------------

@dataclass(frozen=True)
class BuildFlags:
    opt_level: int = 3
    hardware_compat: str = "none"
    version_compatible: bool = False
    workspace_gb: float | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: str | None = None  # None: timing.<sm>.trt<version>.cache in the artifact

    def __post_init__(self) -> None:
        check_int(self.opt_level, "--opt-level", OPT_LEVELS.start, OPT_LEVELS.stop - 1)
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise InputError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, got {self.hardware_compat!r}")
        if self.workspace_gb is not None:
            check_number(self.workspace_gb, "--workspace (GB)", 0, low_open=True)

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * 2**30)

    def to_dict(self) -> dict:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The `ditrt build` options that reproduce these flags (timing cache left out: it only
        speeds the build up)."""
        args = ["--opt-level", str(self.opt_level)]
        if self.hardware_compat != "none":
            args += ["--hardware-compat", self.hardware_compat]
        if self.version_compatible:
            args.append("--version-compatible")
        if self.workspace_gb is not None:
            args += ["--workspace", f"{self.workspace_gb:g}"]
        return args

def build_command(artifact: str, profile: EngineProfile, flags: BuildFlags, network: str = "denoiser",
                  precision: str = "fp16") -> str:
    """The `ditrt build` command that makes this plan again."""
    return " ".join(["ditrt", "build", shlex.quote(str(artifact)), "--network", network,
                     *(["--precision", precision] if precision != "fp16" else []), *profile.cli_args(), *flags.cli_args()])

_FLAG_TAGS = {"ampere+": "ampereplus", "same-cc": "samecc"}

def plan_filename(network: str, precision: str, sm: str, trt_version: str, hardware_compat: str = "none",
                  version_compatible: bool = False) -> str:
    """denoiser.fp16.sm90.trt11.4.0.106.plan; portable builds add .ampereplus / .samecc and .vc so
    that they never overwrite the plain plan for the same network, GPU and TensorRT."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(network)) or precision not in PLAN_PRECISIONS:
        raise InputError(f"not a network / precision pair: {network!r} {precision!r}")
    if not isinstance(sm, str) or not SM_NAME.match(sm):
        raise InputError(f"not an SM name: {sm!r} (expected e.g. 'sm90' for compute capability 9.0)")
    parse_version(trt_version)
    if hardware_compat not in HARDWARE_COMPAT:
        raise InputError(f"hardware_compat must be one of {', '.join(HARDWARE_COMPAT)}, got {hardware_compat!r}")
    tags = [_FLAG_TAGS[hardware_compat]] if hardware_compat in _FLAG_TAGS else []
    tags += ["vc"] if version_compatible else []
    return ".".join([network, precision, sm, f"trt{trt_version.strip()}", *tags, "plan"])

def timing_cache_filename(sm: str, trt_version: str) -> str:
    """Timing caches hold per-GPU, per-TensorRT measurements: one file per pair."""
    return f"timing.{sm}.trt{trt_version.strip()}.cache"
