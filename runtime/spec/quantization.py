"""The recipe of a quantized graph (int8, fp8: ModelOpt QDQ graphs of the denoiser), as the manifest
records it in `networks.<name>.graphs.<precision>.quantization` and both readers check it (this one
and runtime/cpp/src/quantization.cpp read_quantization, by manifest_schema.json's rules): a quantized
graph without a well-formed recipe is refused, naming the field. Written by exporter/quantize.py; docs/quantization.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ArtifactError
from .networks import QUANTIZED_PRECISIONS
from .schema import Context, check_object, rules

# calibration steps, images and seed at most (the C++ reader's int64 holds them): manifest_schema.json's
MAX_COUNT = rules()["objects"]["calibration"]["fields"]["seed"]["max"]


@dataclass(frozen=True)
class Calibration:
    sampler: str  # the artifact's default sampler, with its guidance rows
    steps: int
    images: int  # balanced labels, seeded noise (runtime/sampling/noise.py)
    seed: int


@dataclass(frozen=True)
class QuantRecipe:
    precision: str  # int8 / fp8
    config: str  # ModelOpt's config name, e.g. INT8_DEFAULT_CFG
    modelopt_version: str
    calibration: Calibration
    excluded_layers: tuple[str, ...]  # module name patterns kept in fp32


def read_quant_recipe(graph: dict, precision: str, where: str) -> QuantRecipe:
    """The recipe of graph `where` (`networks.<name>.graphs.<precision>`), checked."""
    recipe = graph.get("quantization")
    if not isinstance(recipe, dict):
        raise ArtifactError(f"manifest field {where}.quantization must be an object (the recipe): a {precision} "
                            "graph without its recipe cannot be trusted; re-export it with --precision "
                            f"{precision}")
    v = check_object("quantization", recipe, f"{where}.quantization", Context(choices={"the graph's precision": [precision]}))
    return QuantRecipe(precision, v["config"], v["modelopt_version"], Calibration(**v["calibration"]),
                       tuple(v["excluded_layers"]))


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED_PRECISIONS
