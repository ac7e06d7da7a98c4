"""One small spec per exported network: its tensors, batch unit, example inputs and bounds.

Export, validation, the TensorRT build (profiles, plan names), parity and the manifest all
iterate over these specs; backends take and return named tensors (`feeds -> outputs`). The
spec a runtime uses is read back from the manifest (`networks.<name>`), so a reader needs no
Python to know what a network takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import DiTConfig
from .errors import ArtifactError, InputError

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
BATCH = "batch"  # the one dynamic axis, first in every tensor


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple  # ints, and BATCH for the dynamic axis
    meaning: str = ""

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}

    @classmethod
    def from_dict(cls, data, where: str) -> "TensorSpec":
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("dtype"), str) \
                or data["dtype"] not in DTYPES:
            raise ArtifactError(f"manifest field {where} must have a name and a dtype in {', '.join(DTYPES)}, got {data!r}")
        shape = data.get("shape")
        if (not isinstance(shape, list) or not shape or shape[0] != BATCH
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape[1:])):
            raise ArtifactError(f"manifest field {where}.shape must be [\"batch\", positive ints...], got {shape!r}")
        return cls(data["name"], data["dtype"], tuple(shape), str(data.get("meaning", "")))


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # "denoiser", "decoder"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_unit: str  # "rows" (denoiser: 2 per image under guidance) or "images"
    # max error relative to the reference's largest magnitude, per graph precision, at export
    export_bounds: dict = field(default_factory=lambda: {"fp32": 1e-5, "fp16": 5e-3})
    extra: dict = field(default_factory=dict)  # network-specific manifest fields (e.g. scaling_factor)
    num_classes: int = 0  # denoiser: real classes (the null class is num_classes); from the model section

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def primary_input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def primary_output(self) -> TensorSpec:
        return self.outputs[0]

    def profile_shapes(self, low: int, opt: int, high: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape per input, for a TensorRT optimisation profile over the batch axis."""
        return {t.name: tuple(t.concrete(b) for b in (low, opt, high)) for t in self.inputs}

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> int:
        """The batch of a complete, consistent set of feeds; InputError naming the tensor otherwise."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing or len(feeds) != len(self.inputs):
            raise InputError(f"{self.name} takes inputs {list(self.input_names)}, got {sorted(feeds)}")
        batch = len(feeds[self.inputs[0].name])
        for t in self.inputs:
            if feeds[t.name].shape != t.concrete(batch):
                raise InputError(f"{self.name} input {t.name} has shape {feeds[t.name].shape}; this network takes "
                                 f"{t.concrete(batch)}")
        return batch

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs for validation, parity and build checks (the one generator)."""
        return _EXAMPLES[self.name](self, batch, seed)

    def to_manifest(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "batch_axis": 0, "batch_unit": self.batch_unit, **self.extra}

    @classmethod
    def from_manifest(cls, name: str, data) -> "NetworkSpec":
        where = f"networks.{name}"
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest field {where} must be an object")
        tensors = {}
        for kind in ("inputs", "outputs"):
            items = data.get(kind)
            if not isinstance(items, list) or not items:
                raise ArtifactError(f"manifest field {where}.{kind} must be a non-empty list")
            tensors[kind] = tuple(TensorSpec.from_dict(t, f"{where}.{kind}[{i}]") for i, t in enumerate(items))
        if data.get("batch_axis", 0) != 0:
            raise ArtifactError(f"manifest field {where}.batch_axis must be 0, got {data.get('batch_axis')!r}")
        unit = data.get("batch_unit")
        if unit not in ("rows", "images"):
            raise ArtifactError(f"manifest field {where}.batch_unit must be 'rows' or 'images', got {unit!r}")
        extra = {k: v for k, v in data.items() if k not in ("inputs", "outputs", "batch_axis", "batch_unit", "graphs")}
        return cls(name, tensors["inputs"], tensors["outputs"], unit, extra=extra)


# ---- the denoiser ------------------------------------------------------------------------------

# Max |onnx - torch fp32| / max |torch fp32| at export time.
# fp32: same math, other kernels: 3e-7 (golden tiny) and 1.5e-6 (DiT-XL/2) measured.
# fp16: unit roundoff 4.9e-4 through every block: 5.2e-4 (golden tiny) and 5.6e-4 (DiT-XL/2, random
# init) measured; 5e-3 flags a real problem (a rounded sinusoid table cost 3e-2) without noise.
DENOISER_EXPORT_BOUNDS = {"fp32": 1e-5, "fp16": 5e-3}

def denoiser_spec(config: DiTConfig) -> NetworkSpec:
    C, S, K = config.in_channels, config.input_size, config.num_classes
    meaning = f"channels 0..{C - 1} eps" + (f", {C}..{2 * C - 1} variance v" if config.learn_sigma else "")
    return NetworkSpec(
        "denoiser",
        inputs=(TensorSpec("latent", "float32", (BATCH, C, S, S), "x_t"),
                TensorSpec("timestep", "float32", (BATCH,), "original-scale timesteps, fractional allowed, one per row"),
                TensorSpec("class_label", "int64", (BATCH,), f"0..{K - 1}; {config.null_class} is the null class")),
        outputs=(TensorSpec("model_output", "float32", (BATCH, config.out_channels, S, S), meaning),),
        batch_unit="rows",
        export_bounds=dict(DENOISER_EXPORT_BOUNDS),
        num_classes=K,
        extra={"guidance_rows": "conditional rows first, then the same latents with the null class"})


def _denoiser_examples(spec: NetworkSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Timesteps from 999 down to 0 (the ends included, fractional in between); labels cycling
    through the real classes with the null class on odd rows (and always on the last of several)."""
    rng = np.random.default_rng([seed, batch])
    latent = spec.inputs[0]
    null_class = spec.num_classes
    t = np.linspace(999.0, 0.0, batch) if batch > 1 else np.array([999.0])
    t[1:-1] += 0.25  # fractional timesteps are part of the interface
    labels = np.array([null_class if i % 2 else (37 * i) % max(null_class, 1) for i in range(batch)], dtype=np.int64)
    if batch > 1:
        labels[-1] = null_class
    return {"latent": rng.standard_normal(latent.concrete(batch), dtype=np.float32),
            "timestep": t.astype(np.float32), "class_label": labels}


def _decoder_examples(spec: NetworkSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    """DiT-scale latents, what the sampler hands over: DiT trains on VAE latents times the scaling
    factor (about unit variance), so standard normals."""
    rng = np.random.default_rng([seed, batch, 7])
    latent = spec.inputs[0]
    return {latent.name: rng.standard_normal(latent.concrete(batch), dtype=np.float32)}


_EXAMPLES = {"denoiser": _denoiser_examples, "decoder": _decoder_examples}


def register_examples(network: str, generator) -> None:
    """Example-input generator for another network kind (the decoder registers its own)."""
    _EXAMPLES[network] = generator
