"""The denoiser as segments, for feature caching (runtime/execution/cache.py): `embed` (latent, timestep,
class label -> tokens and the adaLN conditioning), the block ranges of
`runtime.spec.networks.block_segments` (tokens, conditioning -> tokens), and `final` (tokens,
conditioning -> the denoiser's output). Composed, they are the monolithic denoiser; export checks
that on ONNX Runtime (`check_composition`, within 1e-6 fp32), and the monolithic graph stays the
uncached path.

Each segment exporter owns a copy of its part of the model, so converting one segment to fp16 in
place (the export loop's fp16 comes last) never rounds another network's fp32 weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ditrt.runtime.spec.networks import NetworkSpec, segment_specs

from .denoiser import FP16_FLOAT32_PARTS, ExportSource
from .model import SiT
from .onnx_export import ExportError

COMPOSITION_BOUND = 1e-6  # composed segments vs the monolithic fp32 graph (max error / max magnitude)


class _Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.x_embedder, self.t_embedder, self.y_embedder = (copy.deepcopy(m) for m in
                                                             (model.x_embedder, model.t_embedder, model.y_embedder))
        self.pos_embed = copy.deepcopy(model.pos_embed)

    def forward(self, latent, timestep, class_label):
        dtype = self.pos_embed.dtype
        tokens = self.x_embedder(latent.to(dtype)) + self.pos_embed  # as DiT.forward
        embedding = self.t_embedder(timestep) + self.y_embedder(class_label)
        return tokens.float(), embedding.float()


class _Blocks(torch.nn.Module):
    def __init__(self, model, start: int, stop: int):
        super().__init__()
        self.blocks = copy.deepcopy(model.blocks[start:stop])
        self.dtype = model.pos_embed.dtype  # the activations' dtype between blocks

    def forward(self, hidden_states, conditioning):
        x, c = hidden_states.to(self.dtype), conditioning.to(self.dtype)
        for block in self.blocks:
            x = block(x, c)
        return x.float()


class _Final(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.final_layer = copy.deepcopy(model.final_layer)
        self.config = model.config
        self.velocity_only = isinstance(model, SiT) and model.config.learn_sigma  # SiT.forward's slice
        self.dtype = model.pos_embed.dtype

    def forward(self, hidden_states, conditioning):
        x = self.final_layer(hidden_states.to(self.dtype), conditioning.to(self.dtype))
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p  # DiT.unpatchify
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        out = x.reshape(x.shape[0], c, h * p, w * p)
        return (out[:, : self.config.in_channels] if self.velocity_only else out).float()


@dataclass
class SegmentExporter:
    """One segment through the one export loop (onnx_export.export_network)."""
    spec: NetworkSpec
    part: torch.nn.Module  # fp32, this exporter's own copy
    fp32_blocks: tuple[int, ...] = ()  # model block indices kept float32 in the fp16 graph
    first_block: int = 0
    validation_batches: tuple[tuple[int, int], ...] = ((1, 1), (3, 2))
    example_batch: int = 1
    quantizable: tuple[str, ...] = ()  # no recipe: a segment exports fp32 / fp16 only (docs/caching.md)
    # The TorchScript exporter: 15x faster than dynamo on these small graphs, and the composition
    # check (check_composition, 1e-6 against the monolithic graph) holds the result to the same function.
    dynamo: bool = False

    def check_options(self, precisions: tuple[str, ...]) -> None:
        pass  # the denoiser's exporter checks the shared options

    def reference(self) -> torch.nn.Module:
        return self.part.float()

    def module(self, precision: str) -> torch.nn.Module:
        if precision == "fp16":
            self.part.half()
            blocks = getattr(self.part, "blocks", [])
            for i, block in enumerate(blocks):
                if self.first_block + i in self.fp32_blocks:
                    block.float()
            if hasattr(self.part, "dtype"):
                self.part.dtype = torch.float16
        return self.part

    def graph_fields(self, precision: str) -> dict:
        return {"float32_parts": FP16_FLOAT32_PARTS if precision == "fp16" else [],
                "fp32_blocks": [b for b in self.fp32_blocks if b in self._block_range()] if precision == "fp16" else []}

    def _block_range(self) -> range:
        blocks = self.spec.extra.get("blocks")
        return range(*blocks) if blocks else range(0)

    def check_graph(self, inferred: onnx.ModelProto, precision: str) -> dict:
        return {}


def segment_exporters(source: ExportSource, fp32_blocks: tuple[int, ...] = ()) -> list[SegmentExporter]:
    """The segments' exporters, each with its own fp32 copy of its part (made now: before any
    network converts the model to fp16)."""
    model = source.model.float()
    family = source.family
    exporters = []
    for spec in segment_specs(source.config, family, family.default_process(source.config)):
        blocks = spec.extra.get("blocks")
        part = (_Embed(model) if spec.name == "embed" else _Final(model) if spec.name == "final"
                else _Blocks(model, *blocks))
        exporters.append(SegmentExporter(spec, part.eval(), tuple(fp32_blocks), blocks[0] if blocks else 0))
    return exporters


def check_composition(directory: Path, denoiser: NetworkSpec, segments: list[NetworkSpec],
                      batches: tuple[tuple[int, int], ...] = ((1, 5), (3, 6))) -> dict:
    """ONNX Runtime, fp32: embed -> blocks... -> final against the monolithic denoiser graph on the
    denoiser's example inputs; ExportError above COMPOSITION_BOUND. Returns the record."""
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    from ditrt.runtime.jobs.parity import compare
    whole = OnnxRuntimeBackend(directory / f"{denoiser.name}.fp32.onnx", denoiser, "fp32")
    parts = [OnnxRuntimeBackend(directory / f"{s.name}.fp32.onnx", s, "fp32") for s in segments]
    runs = []
    for batch, seed in batches:
        feeds = denoiser.example_inputs(batch, seed)
        tokens, embedding = (parts[0](feeds)[n] for n in ("hidden_states", "conditioning"))
        for blocks in parts[1:-1]:
            tokens = blocks({"hidden_states": tokens, "conditioning": embedding})["hidden_states_out"]
        composed = parts[-1]({"hidden_states": tokens, "conditioning": embedding})[denoiser.output.name]
        runs.append({"batch": batch, **compare(composed, whole(feeds)[denoiser.output.name])})
    worst = max(r["max_rel_err"] for r in runs)
    if not worst <= COMPOSITION_BOUND:
        raise ExportError(f"the denoiser's segments composed differ from the monolithic fp32 graph by {worst:.3g} "
                          f"(max error relative to the largest magnitude), above {COMPOSITION_BOUND:g}")
    return {"reference": "the monolithic fp32 denoiser graph", "max_rel_err": worst, "bound": COMPOSITION_BOUND,
            "runs": [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in runs]}
