"""The VAE decoder network's exporter: `image = vae.decode(latent / scaling_factor).sample` as the
official scripts decode DiT latents (diffusers' AutoencoderKL), in fp32 and fp16 graphs.

The fp16 graph divides by the scaling factor in float32 and keeps GroupNorm statistics float32
(`exporter.vae.DecoderGraph`); its validation also checks that every normalisation reads float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch

from ditrt.runtime.spec.networks import decoder_spec

from .onnx_export import ExportError, ExportOptionError
from .vae import DecoderGraph, LoadedVae

FP16_FLOAT32_PARTS = ["latent / scaling_factor", "GroupNorm (InstanceNormalization + affine)"]


@dataclass
class DecoderExporter:
    vae: LoadedVae
    latent_shape: tuple[int, int, int]  # the denoiser's (C, h, w)
    # No quantized graph: the decoder runs once per image (not once per step), and its output is
    # the image itself, where int8 rounding shows; it stays fp32 / fp16 (docs/quantization.md).
    quantizable = ()
    # Batch 2 for torch.export: diffusers' Upsample2D branches on the batch size.
    validation_batches: tuple[tuple[int, int], ...] = ((1, 1), (3, 2))
    example_batch: int = 2
    spec: object = field(init=False)

    def __post_init__(self):
        self.spec = decoder_spec(self.latent_shape, self.vae.upsampling, self.vae.scaling_factor, self.vae.source())

    def check_options(self, precisions: tuple[str, ...]) -> None:
        if self.vae.latent_channels != self.latent_shape[0]:
            raise ExportOptionError(f"the VAE has {self.vae.latent_channels} latent channels, the DiT takes "
                                    f"{self.latent_shape[0]}")

    def reference(self) -> torch.nn.Module:
        return DecoderGraph(self.vae, "fp32")

    def module(self, precision: str) -> torch.nn.Module:
        return DecoderGraph(self.vae, precision)

    def graph_fields(self, precision: str) -> dict:
        return {"float32_parts": FP16_FLOAT32_PARTS if precision == "fp16" else []}

    def check_graph(self, inferred: onnx.ModelProto, precision: str) -> dict:
        norms_fp32 = _normalisations_in_float32(inferred)
        if precision == "fp16" and not norms_fp32:
            raise ExportError("the fp16 decoder graph normalises in float16 (InstanceNormalization inputs are not "
                              "float32); its GroupNorm statistics would overflow")
        return {"normalisation_in_float32": norms_fp32}


def _normalisations_in_float32(inferred: onnx.ModelProto) -> bool:
    """True when every InstanceNormalization / GroupNormalization (GroupNorm's export) reads a
    float32 tensor."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    nodes = [n for n in inferred.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    return bool(nodes) and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in nodes)
