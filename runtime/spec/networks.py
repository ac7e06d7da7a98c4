"""One spec per exported network: its named tensors and their roles, batch unit, example inputs and
export bounds.

Export, validation, the TensorRT build (profiles, plan names), parity and the manifest all iterate
over these specs; backends take and return named tensors (`feeds -> outputs`). The spec a runtime
uses is read back from the manifest (`networks.<name>`), so a reader needs no Python to know what a
network takes. Each tensor has a role, so code finds "the latent input" or "the condition inputs"
without knowing their names:

    inputs:  latent (the state being denoised / decoded), time (one value per row, in `range`),
             condition (with a `condition` kind, see conditioning.py)
    outputs: prediction (what the denoiser predicts: eps [+ variance] or velocity), image
    both:    tokens (the transformer's hidden states, (N, T, D)) and embedding (the adaLN
             conditioning c = t_emb + y_emb, (N, D)): the denoiser's segments (feature caching)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from .conditioning import ClassLabels, Conditioning, read_condition
from .config import DiTConfig, Family
from ..core.errors import ArtifactError, InputError
from .schema import check_object

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
BATCH = "batch"  # the one dynamic axis, first in every tensor
SEGMENT_ROLES = ("tokens", "embedding")  # the denoiser's segments pass these between them
INPUT_ROLES = ("latent", "time", "condition", *SEGMENT_ROLES)
OUTPUT_ROLES = ("prediction", "image", *SEGMENT_ROLES)

# Max |onnx - torch fp32| / max |torch fp32| at export time, for both networks.
# fp32: same math, other kernels: 3e-7 (golden tiny DiT), 1.5e-6 (DiT-XL/2), 1.2e-6 (tiny VAE) and
#   7.4e-6 (sd-vae layout at 256 px: tight; PyTorch's own fp32 is off a float64 decode by 4.4e-6).
# fp16: unit roundoff 4.9e-4 through every layer: 5.2e-4 (golden tiny), 5.6e-4 (DiT-XL/2, random
#   init), 6.6e-4..1.1e-3 (VAEs); 5e-3 flags a real problem (a rounded sinusoid table cost 3e-2, a
#   float16 overflow fails any bound) without noise.
# int8 (ModelOpt QDQ, denoiser only): per-tensor activations and per-channel weights round to
#   1/254 of their range; 4 quantized matmuls per block in series: 1.5e-2..2.6e-2 (digits, 4 blocks),
#   2.2e-2 (DiT-S/2 random init, the probe); 8e-2 leaves room for deeper models, while a
#   quantized conditioning path (adaLN, final layer, LayerNorm inputs) cost 2.4e-1 on the digits model.
# fp8 (e4m3): 3 mantissa bits round to 2^-4 of a value: 2.5e-1.
EXPORT_BOUNDS = {"fp32": 1e-5, "fp16": 5e-3, "int8": 8e-2, "fp8": 2.5e-1}
QUANTIZED_PRECISIONS = ("int8", "fp8")  # made by exporter/quantize.py; the denoiser's only


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple  # ints, and BATCH for the dynamic axis
    role: str
    meaning: str = ""
    condition: Conditioning | None = None  # role "condition": its kind
    range: tuple[float, float] | None = None  # role "time": the values it takes (low, high), from the family

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": self.role,
               "meaning": self.meaning}
        if self.condition is not None:
            out["condition"] = self.condition.to_manifest()
        return out  # a time input's range comes from the family and its process, not from a field

    @classmethod
    def from_dict(cls, data, where: str, roles: tuple[str, ...]) -> "TensorSpec":
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("dtype"), str) \
                or data["dtype"] not in DTYPES:
            raise ArtifactError(f"manifest field {where} must have a name and a dtype in {', '.join(DTYPES)}, got {data!r}")
        shape = data.get("shape")
        if (not isinstance(shape, list) or not shape or shape[0] != BATCH
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape[1:])):
            raise ArtifactError(f"manifest field {where}.shape must be [\"batch\", positive ints...], got {shape!r}")
        role = data.get("role")
        if role not in roles:
            raise ArtifactError(f"manifest field {where}.role is {role!r}; use one of {', '.join(roles)}")
        condition = read_condition(data.get("condition"), f"{where}.condition") if role == "condition" else None
        return cls(data["name"], data["dtype"], tuple(shape), role, str(data.get("meaning", "")), condition)


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # "denoiser", "decoder"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_unit: str  # "rows" (denoiser: 2 per image under guidance) or "images"
    # max error relative to the reference's largest magnitude, per graph precision, at export
    export_bounds: dict = field(default_factory=lambda: dict(EXPORT_BOUNDS))
    extra: dict = field(default_factory=dict)  # network-specific manifest fields (e.g. scaling_factor)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, role: str) -> TensorSpec:
        """The one input with this role (InputError naming the network otherwise)."""
        found = [t for t in self.inputs if t.role == role]
        if len(found) != 1:
            raise InputError(f"the {self.name} network has {len(found)} inputs with role {role!r}, not one")
        return found[0]

    @property
    def conditions(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.inputs if t.role == "condition")

    @property
    def output(self) -> TensorSpec:
        """The network's output (every network here has one)."""
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
        """Deterministic inputs for validation, parity and build checks (the one generator):
        standard-normal latents (what samplers start from; DiT-scale latents have about unit
        variance too), times from the top of the range down to the bottom (both ends included,
        fractional in between), condition values with the null value among them."""
        rng = np.random.default_rng([seed, batch, zlib.crc32(self.name.encode())])
        feeds = {}
        for t in self.inputs:
            if t.role in ("latent", *SEGMENT_ROLES):
                feeds[t.name] = rng.standard_normal(t.concrete(batch), dtype=np.float32)
            elif t.role == "time":
                low, high = t.range
                values = np.linspace(high, low, batch) if batch > 1 else np.array([high])
                values[1:-1] += (high - low) / 3996  # off the integer grid: fractional times are part of the interface
                feeds[t.name] = values.astype(t.numpy_dtype)
            else:
                feeds[t.name] = t.condition.examples(batch).astype(t.numpy_dtype)
        return feeds

    def to_manifest(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "batch_axis": 0, "batch_unit": self.batch_unit, **self.extra}

    @classmethod
    def from_manifest(cls, name: str, data) -> "NetworkSpec":
        where = f"networks.{name}"
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest field {where} must be an object")
        tensors = {}
        for kind, roles in (("inputs", INPUT_ROLES), ("outputs", OUTPUT_ROLES)):
            items = data.get(kind)
            if not isinstance(items, list) or not items:
                raise ArtifactError(f"manifest field {where}.{kind} must be a non-empty list")
            tensors[kind] = tuple(TensorSpec.from_dict(t, f"{where}.{kind}[{i}]", roles) for i, t in enumerate(items))
        names = [t.name for t in tensors["inputs"] + tensors["outputs"]]
        if len(set(names)) != len(names):
            raise ArtifactError(f"manifest field {where}: tensor names must be unique, got {names}")
        unit = check_object("network", data, where)["batch_unit"]  # manifest_schema.json: batch_axis, batch_unit
        extra = {k: v for k, v in data.items() if k not in ("inputs", "outputs", "batch_axis", "batch_unit", "graphs")}
        return cls(name, tensors["inputs"], tensors["outputs"], unit, extra=extra)

    def with_time_range(self, value_range: tuple[float, float]) -> "NetworkSpec":
        """The spec with its time input's range filled in (a manifest reader knows it from the family)."""
        return replace(self, inputs=tuple(replace(t, range=value_range) if t.role == "time" else t for t in self.inputs))


# ---- the networks ---------------------------------------------------------------------------------

def denoiser_spec(config: DiTConfig, family: Family, process) -> NetworkSpec:
    C, S, K = config.in_channels, config.input_size, config.num_classes
    out = family.output_channels(config)
    meaning = {"dit": f"channels 0..{C - 1} eps" + (f", {C}..{2 * C - 1} variance v" if out == 2 * C else ""),
               "sit": "velocity"}.get(family.name, "prediction")
    return NetworkSpec(
        "denoiser",
        inputs=(TensorSpec("latent", "float32", (BATCH, C, S, S), "latent", "x_t"),
                TensorSpec("timestep", "float32", (BATCH,), "time", family.time_meaning, range=family.time_range(process)),
                TensorSpec("class_label", "int64", (BATCH,), "condition", f"0..{K - 1}; {K} is the null class",
                           condition=ClassLabels(K, K))),
        outputs=(TensorSpec("model_output", "float32", (BATCH, out, S, S), "prediction", meaning),),
        batch_unit="rows",
        extra={"guidance_rows": "conditional rows first, then the same latents with the null condition"})


def decoder_spec(latent_shape: tuple[int, int, int], upsampling: int, scaling_factor: float,
                 source: dict | None = None) -> NetworkSpec:
    C, h, w = latent_shape
    return NetworkSpec(
        "decoder",
        inputs=(TensorSpec("latent", "float32", (BATCH, C, h, w), "latent",
                           "DiT-scale latents (the sampler's output); the graph divides by scaling_factor"),),
        outputs=(TensorSpec("image", "float32", (BATCH, 3, h * upsampling, w * upsampling), "image",
                            "RGB, nominally [-1, 1], not clamped (vae.decode(latent / scaling_factor).sample)"),),
        batch_unit="images",
        extra={"scaling_factor": scaling_factor, **({"source": source} if source is not None else {})})


# ---- the denoiser's segments (feature caching, runtime/execution/cache.py) ------------------------------------

def block_segments(depth: int) -> tuple[tuple[int, int], ...]:
    """The block ranges [start, stop) exported as segments: the first block alone (FirstBlockCache
    decides on its residual), then the rest as one graph (both caches skip or run them together)."""
    return ((0, 1), (1, depth)) if depth > 1 else ((0, 1),)


def segment_name(blocks: tuple[int, int] | None = None, part: str = "") -> str:
    return f"blocks_{blocks[0]}_{blocks[1]}" if blocks is not None else part


def segment_specs(config: DiTConfig, family: Family, process) -> list[NetworkSpec]:
    """`embed` (the denoiser's inputs -> tokens and conditioning), one network per block range of
    `block_segments`, and `final` (tokens and conditioning -> the denoiser's output): composed, the
    monolithic denoiser. Every tensor is float32 at the boundary, whatever the graph's precision."""
    denoiser = denoiser_spec(config, family, process)
    T, D = config.num_patches, config.hidden_size
    tokens = TensorSpec("hidden_states", "float32", (BATCH, T, D), "tokens", "hidden states (patch tokens)")
    embedding = TensorSpec("conditioning", "float32", (BATCH, D), "embedding", "adaLN conditioning t_emb + y_emb")
    segment = {"segment_of": "denoiser"}
    specs = [NetworkSpec("embed", denoiser.inputs, (tokens, embedding), "rows", extra=dict(segment))]
    for start, stop in block_segments(config.depth):
        specs.append(NetworkSpec(segment_name((start, stop)), (tokens, embedding),
                                 (replace(tokens, name="hidden_states_out"),), "rows",
                                 extra={**segment, "blocks": [start, stop]}))
    specs.append(NetworkSpec("final", (tokens, embedding), denoiser.outputs, "rows", extra=dict(segment)))
    return specs
