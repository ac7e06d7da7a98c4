"""The recipe of a quantized graph (int8, fp8: ModelOpt QDQ graphs of the denoiser), as the manifest
records it in `networks.<name>.graphs.<precision>.quantization` and both readers check it (this one
and runtime/cpp/src/manifest.cpp read_quantization): a quantized graph without a well-formed recipe
is refused, naming the field. Written by exporter/quantize.py; docs/quantization.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ArtifactError
from .networks import QUANTIZED_PRECISIONS
from .validate import check_int

MAX_COUNT = 1 << 62  # calibration steps, images and seed (the C++ reader's int64 holds them)


@dataclass(frozen=True)
class Calibration:
    sampler: str  # the artifact's default sampler, with its guidance rows
    steps: int
    images: int  # balanced labels, seeded noise (runtime/noise.py)
    seed: int


@dataclass(frozen=True)
class QuantRecipe:
    precision: str  # int8 / fp8
    config: str  # ModelOpt's config name, e.g. INT8_DEFAULT_CFG
    modelopt_version: str
    calibration: Calibration
    excluded_layers: tuple[str, ...]  # module name patterns kept in fp32


def _text(section: dict, key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"manifest field {where}.{key} must be a non-empty string, got {value!r}")
    return value


def read_quant_recipe(graph: dict, precision: str, where: str) -> QuantRecipe:
    """The recipe of graph `where` (`networks.<name>.graphs.<precision>`), checked."""
    recipe = graph.get("quantization")
    if not isinstance(recipe, dict):
        raise ArtifactError(f"manifest field {where}.quantization must be an object (the recipe): a {precision} "
                            "graph without its recipe cannot be trusted; re-export it with --precision "
                            f"{precision}")
    where = f"{where}.quantization"
    if recipe.get("precision") != precision:
        raise ArtifactError(f"manifest field {where}.precision must be {precision!r}, got {recipe.get('precision')!r}")
    calibration = recipe.get("calibration")
    if not isinstance(calibration, dict):
        raise ArtifactError(f"manifest field {where}.calibration must be an object")
    at = f"{where}.calibration"
    counts = {key: check_int(calibration.get(key), f"manifest field {at}.{key}", low, MAX_COUNT, error=ArtifactError)
              for key, low in (("steps", 1), ("images", 1), ("seed", 0))}
    excluded = recipe.get("excluded_layers")
    if not isinstance(excluded, list) or not all(isinstance(p, str) for p in excluded):
        raise ArtifactError(f"manifest field {where}.excluded_layers must be a list of strings")
    return QuantRecipe(precision, _text(recipe, "config", where), _text(recipe, "modelopt_version", where),
                       Calibration(_text(calibration, "sampler", at), **counts), tuple(excluded))


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED_PRECISIONS
