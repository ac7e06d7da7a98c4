"""The denoiser network's exporter: a DiT-family backbone (DiT or SiT, from a checkpoint or a random
init) as the graph `model_output = denoiser(latent, timestep, class_label)`.

The fp32 graph is the reference; the fp16 graph has fp16 weights and activations with the timestep
sinusoid and LayerNorm statistics in float32 (and `fp32_blocks` kept float32 whole). The int8 and
fp8 graphs are ModelOpt QDQ graphs of a calibrated copy of the fp32 model (exporter/quantize.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch

from ditrt.runtime.spec.config import DiTConfig, Family, get_family
from ditrt.runtime.artifact.labels import ClassNames
from ditrt.runtime.spec.networks import QUANTIZED_PRECISIONS, denoiser_spec

from .checkpoints import Checkpoint
from .model import DiT, count_parameters, family_model, macs_per_forward, set_precision
from .onnx_export import ExportOptionError
from .quantize import QuantOptions, check_quant_options, qdq_counts, quantize

FP16_FLOAT32_PARTS = ["timestep sinusoid", "LayerNormalization (stash_type 1)"]


@dataclass
class ExportSource:
    """Where the weights come from (a loaded checkpoint or a named config with random init) and
    the family they were trained as (no tensor tells a SiT from a DiT)."""
    model: DiT  # DiT or SiT (exporter.model.family_model)
    family: Family
    description: dict  # the manifest's `source`
    config_name: str | None = None
    labels: ClassNames | None = None  # the class names (id2label) the checkpoint came with

    @property
    def config(self) -> DiTConfig:
        return self.model.config

    def model_fields(self) -> dict:
        """The manifest's model section beyond the config: name, sizes and cost."""
        return {"name": self.config_name, "image_size": self.config.input_size * 8,
                "parameters": count_parameters(self.model),
                "gmacs_per_forward": round(macs_per_forward(self.config) / 1e9, 3)}


def source_from_checkpoint(ckpt: Checkpoint, family: str = "dit") -> ExportSource:
    family_ = get_family(family, ExportOptionError)
    model = family_model(family_.name).from_state_dict(ckpt.config, ckpt.state_dict)
    return ExportSource(model, family_, {"kind": "checkpoint", "path": str(ckpt.path), "sha256": ckpt.sha256,
                                         "format": ckpt.format, "notes": ckpt.notes})


def source_from_random_init(config: DiTConfig, seed: int = 0, config_name: str | None = None,
                            family: str = "dit") -> ExportSource:
    from .model import random_init
    family_ = get_family(family, ExportOptionError)
    return ExportSource(random_init(family_model(family_.name)(config), seed), family_,
                        {"kind": "random-init", "seed": seed}, config_name)


class _DenoiserGraph(torch.nn.Module):
    """The denoiser's interface: float32 latent and time, int64 labels in; float32 out. An fp16
    model casts at its boundary (the timestep sinusoid stays float32 inside the model)."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        return self.model(latent, timestep, class_label).float()


@dataclass
class DenoiserExporter:
    source: ExportSource
    fp32_blocks: tuple[int, ...] = ()
    quant: QuantOptions = field(default_factory=QuantOptions)
    quantizable: tuple[str, ...] = QUANTIZED_PRECISIONS
    validation_batches: tuple[tuple[int, int], ...] = ((1, 1), (3, 2), (3, 3))
    example_batch: int = 1
    spec: object = field(init=False)

    def __post_init__(self):
        family = self.source.family
        self.spec = denoiser_spec(self.source.config, family, family.default_process(self.source.config))
        self.fp32_blocks = tuple(sorted(set(self.fp32_blocks)))
        self._recipes: dict = {}  # precision -> the recipe of the graph being exported
        self._precisions: tuple[str, ...] = ()

    def check_options(self, precisions: tuple[str, ...]) -> None:
        if self.fp32_blocks and "fp16" not in precisions:
            raise ExportOptionError("--fp32-blocks only applies to the fp16 graph; add fp16 to --precision")
        bad = [i for i in self.fp32_blocks if not 0 <= i < self.source.config.depth]
        if bad:
            raise ExportOptionError(f"--fp32-blocks {bad} out of range: the model has blocks 0..{self.source.config.depth - 1}")
        check_quant_options(self.quant, precisions)
        self._precisions = precisions  # in export order

    def reference(self) -> torch.nn.Module:
        return _DenoiserGraph(self.source.model.float())

    def module(self, precision: str) -> torch.nn.Module:
        if precision in QUANTIZED_PRECISIONS:  # a calibrated copy, unless no later graph needs the fp32 model
            last = precision == self._precisions[-1]
            model, self._recipes[precision] = quantize(self.source.model, self.source.family, precision, self.quant,
                                                       in_place=last)
            return _DenoiserGraph(model)
        # fp16 comes last, so the model is converted in place: no second copy of the weights at the peak.
        model = self.source.model if precision == "fp32" else set_precision(self.source.model, "fp16", self.fp32_blocks)
        return _DenoiserGraph(model)

    def graph_fields(self, precision: str) -> dict:
        if precision in QUANTIZED_PRECISIONS:
            return {"float32_parts": [], "fp32_blocks": [], "quantization": self._recipes.pop(precision)}
        return {"float32_parts": FP16_FLOAT32_PARTS if precision == "fp16" else [],
                "fp32_blocks": list(self.fp32_blocks) if precision == "fp16" else []}

    def check_graph(self, inferred: onnx.ModelProto, precision: str) -> dict:
        if precision not in QUANTIZED_PRECISIONS:
            return {}
        counts = qdq_counts(inferred)
        if not counts:
            raise ExportOptionError(f"the {precision} graph has no QuantizeLinear / DequantizeLinear node: every layer "
                                    "was excluded from quantization")
        return {"qdq_nodes": counts}
