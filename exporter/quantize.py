"""Quantized denoiser graphs (int8, fp8) with NVIDIA ModelOpt: the fp32 model is fake-quantized in
PyTorch (`mtq.quantize`), calibrated on real sampling trajectories, and exported as explicit
quantization (QuantizeLinear / DequantizeLinear pairs) that TensorRT builds into int8 / fp8
kernels and ONNX Runtime's CPU provider runs as int8 (docs/quantization.md).

Calibration runs the runtime's own pipeline (the artifact's default sampler, official guidance with
its null rows, balanced labels, the seeded noise stream of runtime/sampling/noise.py) over the model being
calibrated, one batch of images at a time: nothing but the model and one batch of activations is
held. ModelOpt keeps quantization off while it calibrates, so the trajectories are fp32's.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditrt.runtime.spec.networks import QUANTIZED_PRECISIONS
from ditrt.runtime.spec.quantization import MAX_COUNT

from .onnx_export import ExportOptionError

QUANT_EXTRA = "pip install 'ditrt[quant]'"
# ModelOpt's configs that make QDQ graphs TensorRT and ONNX Runtime build, by precision.
QUANT_CONFIGS = {"int8": ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"), "fp8": ("FP8_DEFAULT_CFG",)}
DEFAULT_QUANT_CONFIG = {"int8": "INT8_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG"}
# Kept in fp32 (quantizers disabled), by module name pattern: the conditioning path is a tiny share
# of the compute, and its error reaches every block through the adaLN shift / scale / gate; the
# final layer writes the prediction itself; the patch embedding sees the raw noisy latent.
EXCLUDED_LAYERS = ("*t_embedder*", "*y_embedder*", "*adaLN_modulation*", "*final_layer*", "*x_embedder*", "*norm*")
DEFAULT_CALIB_IMAGES = 64
DEFAULT_CALIB_STEPS = 25
DEFAULT_CALIB_SEED = 0
CALIB_BATCH = 16  # images per calibration batch (2 rows each under guidance): the activation memory


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints ("Inserted 96 quantizers") and warns about packages ditrt does not use."""
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        yield


def import_modelopt():
    """modelopt.torch.quantization, or an ExportOptionError naming the extra to install."""
    try:
        with _quiet():
            import modelopt
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ExportOptionError(f"int8 / fp8 graphs are made with NVIDIA ModelOpt, which is not installed ({e}): "
                                f"{QUANT_EXTRA}") from None
    return modelopt, mtq


@dataclass(frozen=True)
class QuantOptions:
    """`ditrt export`'s quantization options (the same for every quantized precision but the config)."""
    calib_images: int = DEFAULT_CALIB_IMAGES
    calib_steps: int = DEFAULT_CALIB_STEPS
    calib_seed: int = DEFAULT_CALIB_SEED
    configs: dict = field(default_factory=dict)  # precision -> ModelOpt config name (unset: the default)
    excluded_layers: tuple[str, ...] = EXCLUDED_LAYERS

    def config_name(self, precision: str) -> str:
        return self.configs.get(precision, DEFAULT_QUANT_CONFIG[precision])


def parse_quant_configs(names) -> dict:
    """`--quant-config NAME` (repeatable) -> {precision: name}; an unknown name is refused, listing
    the names there are."""
    known = {name: precision for precision, names_ in QUANT_CONFIGS.items() for name in names_}
    configs = {}
    for name in names or ():
        if name not in known:
            raise ExportOptionError(f"unknown --quant-config {name!r}; use one of {', '.join(known)} (ModelOpt's names)")
        if known[name] in configs:
            raise ExportOptionError(f"two --quant-config values for {known[name]}: {configs[known[name]]}, {name}")
        configs[known[name]] = name
    return configs


def quant_options(calib_images: int | None = None, calib_steps: int | None = None, calib_seed: int | None = None,
                  configs=()) -> QuantOptions:
    """QuantOptions from `ditrt export`'s options (None: the default)."""
    given = {k: v for k, v in (("calib_images", calib_images), ("calib_steps", calib_steps),
                               ("calib_seed", calib_seed)) if v is not None}
    return QuantOptions(**given, configs=parse_quant_configs(configs))


def check_quant_options(options: QuantOptions, precisions: tuple[str, ...]) -> None:
    """Refused before any work: bad counts, a config for a precision not exported, no ModelOpt."""
    from ditrt.runtime.core.validate import check_int
    check_int(options.calib_images, "--calib-images", 1, 1_000_000, error=ExportOptionError)
    check_int(options.calib_steps, "--calib-steps", 1, 10_000, error=ExportOptionError)
    check_int(options.calib_seed, "--calib-seed", 0, MAX_COUNT, error=ExportOptionError)
    unused = sorted(set(options.configs) - set(precisions))
    if unused:
        raise ExportOptionError(f"--quant-config {', '.join(options.configs[p] for p in unused)} applies to "
                                f"{', '.join(unused)}; add it to --precision")
    if any(p in QUANTIZED_PRECISIONS for p in precisions):
        import_modelopt()


def calibrate(model: torch.nn.Module, family, options: QuantOptions) -> dict:
    """Run `model` (being calibrated) over sampling trajectories: the family's default sampler and
    cfg scale with guidance rows, `calib_steps` steps, `calib_images` balanced images, seeded noise;
    returns the calibration part of the recipe."""
    from ditrt.runtime.artifact.manifest import Manifest, network_section, new_manifest
    from ditrt.runtime.spec.networks import denoiser_spec
    from ditrt.runtime.jobs.generate import balanced_labels
    from ditrt.runtime.execution.pipeline import Pipeline
    from ditrt.runtime.sampling.request import SampleSpec

    from .torch_backend import TorchBackend
    config = model.config
    spec = denoiser_spec(config, family, family.default_process(config))
    data = new_manifest(family=family, config=config, model_extra={}, source={"kind": "in-memory"},
                        networks={"denoiser": network_section(spec, {})}, versions={})
    manifest = Manifest(data, Path("."), graphs_required=False)
    pipe = Pipeline(TorchBackend(model, spec), manifest)
    defaults, calls = manifest.defaults, 0
    # balanced labels and noise from (seed, image index), as `ditrt generate`: any batch size gives the same images
    labels = balanced_labels(options.calib_seed, 0, options.calib_images, config.num_classes)
    spec = SampleSpec(sampler=defaults.sampler, steps=options.calib_steps, guidance=defaults.guidance,
                      cfg_scale=defaults.cfg_scale, seed=options.calib_seed)
    for _ in pipe.sample_batches(spec, labels, CALIB_BATCH):
        calls += pipe.last_stats.steps
    return {"sampler": defaults.sampler, "steps": options.calib_steps, "images": options.calib_images,
            "seed": options.calib_seed, "cfg_scale": defaults.cfg_scale, "guidance": defaults.guidance,
            "labels": "balanced", "batch_images": CALIB_BATCH, "model_calls": calls}


def quantize(model: torch.nn.Module, family, precision: str, options: QuantOptions,
             in_place: bool = False) -> tuple[torch.nn.Module, dict]:
    """A fake-quantized copy of the fp32 `model` (`in_place`: the model itself, when nothing is
    exported from it afterwards: no second copy of the weights), calibrated on trajectories, and
    its recipe (the manifest's `quantization` field of the graph)."""
    modelopt, mtq = import_modelopt()
    name = options.config_name(precision)
    config = copy.deepcopy(getattr(mtq, name))
    config["quant_cfg"] = list(config["quant_cfg"]) + [{"quantizer_name": pattern, "enable": False}
                                                         for pattern in options.excluded_layers]
    torch.manual_seed(0)  # nothing random should run; this pins it if ModelOpt ever draws
    recipe: dict = {}
    quantized = (model if in_place else copy.deepcopy(model)).float().eval()
    with torch.no_grad(), _quiet():
        quantized = mtq.quantize(quantized, config, lambda m: recipe.update(calibrate(m, family, options)))
    enabled = sorted({n.rsplit(".", 1)[0] for n, m in quantized.named_modules()
                      if n.endswith("_quantizer") and getattr(m, "is_enabled", False)})
    return quantized, {"tool": "nvidia-modelopt", "modelopt_version": modelopt.__version__, "config": name,
                       "precision": precision, "calibration": recipe, "calibration_algorithm": config.get("algorithm"),
                       "excluded_layers": list(options.excluded_layers), "quantized_layers": len(enabled)}


def qdq_counts(graph) -> dict:
    """QuantizeLinear / DequantizeLinear nodes of an ONNX graph, by op type (the QDQ pairs TensorRT
    fuses into quantized kernels)."""
    counts: dict = {}
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
