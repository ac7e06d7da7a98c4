"""Export the VAE decoder (latents -> images) to ONNX, fp32 and fp16 graphs, each validated as the
denoiser's are (checker full check, strict shape inference, ONNX Runtime vs PyTorch fp32, TensorRT
lint), and return the network's manifest section. Writes into an existing (temporary) directory;
moving it into place is the caller's job (export_artifact's temp-dir-then-rename)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ditrt.runtime.files import sha256_file
from ditrt.runtime.networks import BATCH, NetworkSpec, TensorSpec
from ditrt.runtime.parity import compare

from .onnx_export import (DEFAULT_OPSET, VALID_OPSETS, ExportError, ExportOptionError, _Steps, check_graph_file,
                          torch_export)
from .trt_lint import lint_model
from .vae import DecoderGraph, LoadedVae

INPUT_NAME = "latent"
OUTPUT_NAME = "image"
PRECISIONS = ("fp32", "fp16")
# Bounds on max |onnx - torch fp32| / max |torch fp32| over the validation latents.
# fp32: same math, other kernels; the denoiser's 1e-5. Measured: 1.2e-6 (golden tiny VAE, 64 px),
#   7.4e-6 (sd-vae layout, random init, 256 px, these latents) and 1.04e-5 on 8 other latents (bench):
#   TIGHT for the sd-vae depth. Most of it is PyTorch's own float32 error: against a float64 decode
#   (128 px) PyTorch fp32 is off by 4.4e-6 and ONNX Runtime by 1.5e-6.
# fp16 (float16 weights and activations; GroupNorm statistics and the 1/scaling_factor division in
#   float32): each conv/matmul output is rounded to float16 (unit roundoff 4.9e-4) through ~30 layers
#   whose residual adds pass the roundings on. Measured through ONNX Runtime (CPU): 6.6e-4..1.1e-3
#   (golden tiny VAE), 7.4e-4..1.0e-3 (sd-vae layout, random init, 256 px); PyTorch's own fp16 CPU
#   decoder, which rounds every elementwise op too, 1.4e-3..2.3e-3. 5e-3 leaves 2x over the worst of
#   those for TensorRT's fp16 kernels, and is what the denoiser uses; what it exists to catch is
#   coarse: a float16 overflow (inf/NaN fails any bound), a missing 1/scaling_factor (order 1).
MAX_REL_ERR = {"fp32": 1e-5, "fp16": 5e-3}
FP16_FLOAT32_PARTS = ["latent / scaling_factor", "GroupNorm (InstanceNormalization + affine)"]
VALIDATION_BATCHES = (1, 3)


def decoder_file(precision: str) -> str:
    return f"decoder.{precision}.onnx"


def export_decoder(loaded: LoadedVae, out_dir: Path, latent_size: int, precisions: tuple[str, ...] = PRECISIONS,
                   opset: int = DEFAULT_OPSET, log: Callable[[str], None] = print) -> dict:
    """Write decoder.<precision>.onnx into `out_dir` (which must exist) and return the manifest
    section for the decoder network. On failure the files this call wrote are removed."""
    out_dir = Path(out_dir)
    check_decoder_options(loaded, out_dir, latent_size, precisions, opset)
    order = sorted(set(precisions), key=PRECISIONS.index)
    written: list[Path] = []
    try:
        return _export_into(loaded, out_dir, latent_size, order, opset, log, written)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def check_decoder_options(loaded: LoadedVae, out_dir: Path, latent_size: int, precisions, opset: int) -> None:
    if opset not in VALID_OPSETS:
        raise ExportOptionError(f"opset {opset} is not supported: torch.onnx (dynamo) writes valid graphs for opsets "
                                f"{VALID_OPSETS.start}..{VALID_OPSETS.stop - 1}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ExportOptionError(f"unknown decoder precision(s) {unknown or list(precisions)}; use fp32 and/or fp16")
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ExportOptionError(f"latent_size must be a positive integer, not {latent_size!r}")
    if not out_dir.is_dir():
        raise ExportOptionError(f"{out_dir} is not an existing directory")
    existing = [decoder_file(p) for p in precisions if (out_dir / decoder_file(p)).exists()]
    if existing:
        raise ExportOptionError(f"{out_dir} already holds {', '.join(existing)}; export into a fresh directory")


def validation_latents(channels: int, latent_size: int, seed: int = 4321) -> list[np.ndarray]:
    """DiT-scale latents (what the sampler hands over, before the 1/scaling_factor division): DiT is
    trained on VAE latents times 0.18215, about unit variance, so standard normals, batch 1 and 3
    (the golden example latents have std 0.74, extremes +-2.7)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, channels, latent_size, latent_size), dtype=np.float32) for n in VALIDATION_BATCHES]


def _export_into(loaded: LoadedVae, out_dir: Path, latent_size: int, precisions, opset: int, log, written) -> dict:
    step = _Steps(len(precisions) * 2 + 1, log)
    C, h = loaded.latent_channels, latent_size
    H = h * loaded.upsampling
    cases = validation_latents(C, h)
    reference = DecoderGraph(loaded, "fp32")
    with step("PyTorch fp32 decoder reference images"):
        with torch.no_grad():
            references = [reference(torch.from_numpy(x)).numpy() for x in cases]
    graphs = {}
    for precision in precisions:
        path = out_dir / decoder_file(precision)
        with step(f"exporting {precision} decoder graph (opset {opset})"):
            net = reference if precision == "fp32" else DecoderGraph(loaded, precision)
            files = _export_graph(net, path, C, h, opset, written)
            del net
        with step(f"validating {precision} decoder graph"):
            validation = validate_decoder_graph(path, (C, h), (3, H), cases, references, precision)
        parity = validation["onnxruntime_vs_reference"]
        log(f"      ONNX Runtime vs PyTorch fp32: max rel err {parity['max_rel_err']:.2e} (bound {parity['bound']:g}); "
            f"checker + strict shape inference ok; TensorRT lint ok ({len(validation['tensorrt_lint']['op_counts'])} op types)")
        graphs[precision] = {
            "file": files[0], "files": files,
            "sha256": {name: sha256_file(out_dir / name) for name in files},
            "bytes": sum((out_dir / name).stat().st_size for name in files),
            "opset": opset,
            "compute_dtype": "float32" if precision == "fp32" else "float16",
            "float32_parts": FP16_FLOAT32_PARTS if precision == "fp16" else [],
            "validation": validation,
        }
    return {
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", C, h, h],
                    "meaning": "DiT-scale latents (the sampler's output); the graph divides by scaling_factor"}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 3, H, H],
                     "meaning": "RGB, nominally [-1, 1], not clamped (vae.decode(latent / scaling_factor).sample)"}],
        "batch_axis": 0,
        "batch_unit": "images",
        "scaling_factor": loaded.scaling_factor,
        "source": loaded.source(),
        "graphs": graphs,
    }


def _export_graph(net: DecoderGraph, path: Path, channels: int, latent_size: int, opset: int, written: list) -> list[str]:
    """The shared torch.onnx export with a dynamic batch axis; the example has batch 2, not 1:
    torch.export specialises size-1 dimensions (diffusers' Upsample2D branches on the batch)."""
    spec = NetworkSpec("decoder", (TensorSpec(INPUT_NAME, "float32", (BATCH, channels, latent_size, latent_size)),),
                       (TensorSpec(OUTPUT_NAME, "float32", (BATCH, 3, latent_size * 8, latent_size * 8)),), "images")
    before = set(path.parent.iterdir())
    try:
        return torch_export(net, spec, path, opset, example_batch=2)
    finally:
        written += sorted(set(path.parent.iterdir()) - before)


def validate_decoder_graph(path: Path, latent_chw: tuple[int, int], image_chw: tuple[int, int], cases, references,
                           precision: str) -> dict:
    """checker (full), strict shape inference (and the output shape), float32 normalisation in the
    fp16 graph, ONNX Runtime vs the PyTorch fp32 images, TensorRT lint."""
    graph, inferred = check_graph_file(path)
    (C, h), (c_out, H) = latent_chw, image_chw
    for value, want in ((inferred.graph.input[0], ["batch", C, h, h]), (inferred.graph.output[0], ["batch", c_out, H, H])):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        elem = value.type.tensor_type.elem_type
        if dims != want or elem != onnx.TensorProto.FLOAT:
            raise ExportError(f"{path.name}: {value.name} is {onnx.TensorProto.DataType.Name(elem)} {dims}, "
                              f"expected FLOAT {want}")
    norms_fp32 = _normalisations_in_float32(inferred)
    if precision == "fp16" and not norms_fp32:
        raise ExportError(f"{path.name}: the fp16 graph normalises in float16 (InstanceNormalization inputs are not "
                          "float32); its GroupNorm statistics would overflow")
    lint = lint_model(graph)
    if not lint.ok:
        raise ExportError(f"{path.name} fails the TensorRT lint: " + "; ".join(lint.problems))
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runs = []
    for latent, ref in zip(cases, references):
        image = session.run([OUTPUT_NAME], {INPUT_NAME: latent})[0]
        runs.append({"batch": len(latent), "latent_std": float(latent.std()), **compare(image, ref)})
    worst = max(r["max_rel_err"] for r in runs)
    bound = MAX_REL_ERR[precision]
    if not worst <= bound:  # NaN fails too
        raise ExportError(f"{path.name}: ONNX Runtime images differ from PyTorch fp32 by {worst:.3g} (max error "
                          f"relative to the largest magnitude), above the {precision} bound {bound:g}")
    return {"checker_full_check": True, "strict_shape_inference": True, "normalisation_in_float32": norms_fp32,
            "onnxruntime_vs_reference": {"max_rel_err": worst, "bound": bound, "runs": runs},
            "tensorrt_lint": lint.to_dict()}


def _normalisations_in_float32(inferred: onnx.ModelProto) -> bool:
    """True when every InstanceNormalization / GroupNormalization (GroupNorm's export) reads a
    float32 tensor."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    nodes = [n for n in inferred.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    return bool(nodes) and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in nodes)
