"""Export the reference DiT to ONNX (fp32 reference graph, fp16 TensorRT-ready graph), validate
each graph (checker, strict shape inference, ONNX Runtime vs PyTorch, TensorRT lint) and write the
artifact directory with its manifest. Everything is written to a temporary directory that is
renamed into place only when every step passed."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ditrt import runtime
from ditrt.runtime.backends import OnnxRuntimeBackend
from ditrt.runtime.config import Defaults, DiTConfig, Diffusion
from ditrt.runtime.errors import InputError, StepError
from ditrt.runtime.files import claimed_output, listed_files, sha256_file, swap_into_place, write_json_atomic
from ditrt.runtime.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, Manifest
from ditrt.runtime.networks import NetworkSpec, denoiser_spec
from ditrt.runtime.parity import compare

from .checkpoints import Checkpoint
from .model import DiT, count_parameters, macs_per_forward, set_precision
from .trt_lint import lint_model

DEFAULT_OPSET = 20
VALID_OPSETS = range(18, 26)  # torch.onnx dynamo writes files checker and ORT accept only here
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a .data file beside the graph
VALIDATION_BATCHES = ((1, 1), (3, 2), (3, 3))  # (batch, seed) of the export-time checks


class ExportError(StepError):
    """Export or export-time validation failed; nothing was written."""


class ExportOptionError(InputError):
    """Options that cannot work, refused before any work is done (the CLI's exit code 2)."""


@dataclass
class ExportSource:
    """Where the weights come from: a loaded checkpoint, or a named config with random init."""
    model: DiT
    description: dict
    config_name: str | None = None


class _DenoiserGraph(torch.nn.Module):
    """The denoiser's interface: float32 latent and timestep, int64 labels in; float32 out. An fp16
    model casts at its boundary (the timestep sinusoid stays float32 inside the model)."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_label: torch.Tensor) -> torch.Tensor:
        return self.model(latent, timestep, class_label).float()


def source_from_checkpoint(ckpt: Checkpoint) -> ExportSource:
    return ExportSource(ckpt.build_model(), {"kind": "checkpoint", "path": str(ckpt.path), "sha256": ckpt.sha256,
                                            "format": ckpt.format, "notes": ckpt.notes})


def source_from_random_init(config: DiTConfig, seed: int = 0, config_name: str | None = None) -> ExportSource:
    from .model import random_init
    return ExportSource(random_init(DiT(config), seed), {"kind": "random-init", "seed": seed}, config_name)


def export_artifact(source: ExportSource, out_dir: str | Path, precisions: tuple[str, ...] = ("fp32", "fp16"),
                    opset: int = DEFAULT_OPSET, force: bool = False, fp32_blocks: tuple[int, ...] = (),
                    log: Callable[[str], None] = print, vae=None) -> Manifest:
    """Write the artifact directory. The source model is used up: an fp16 export converts it in place.
    `vae` (a LoadedVae from exporter.vae.load_vae) adds the decoder network, in the same precisions."""
    out_dir = Path(out_dir)
    with claimed_output(out_dir, log):  # a racing export to the same --out fails here, at once
        check_options(source.model.config, out_dir, precisions, opset, force, fp32_blocks)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
        try:
            manifest_data = _export_into(source, tmp, precisions, opset, fp32_blocks, log)
            if vae is not None:
                from .decoder_export import export_decoder
                if vae.latent_channels != source.model.config.in_channels:
                    raise ExportOptionError(f"the VAE has {vae.latent_channels} latent channels, the DiT takes "
                                            f"{source.model.config.in_channels}")
                manifest_data["networks"]["decoder"] = export_decoder(vae, tmp, source.model.config.input_size,
                                                                      precisions, opset, log)
            write_json_atomic(tmp / MANIFEST_NAME, manifest_data)
            swap_into_place(tmp, out_dir, _old_listed(out_dir), log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out_dir} ({', '.join(precisions)})")
    return Manifest(manifest_data, out_dir)


def check_options(config: DiTConfig, out_dir: Path, precisions, opset: int, force: bool, fp32_blocks) -> None:
    """Everything that can be refused before minutes of work is refused here."""
    if opset not in VALID_OPSETS:
        raise ExportOptionError(f"opset {opset} is not supported: torch.onnx (dynamo) writes valid graphs for opsets "
                                f"{VALID_OPSETS.start}..{VALID_OPSETS.stop - 1}")
    unknown = [p for p in precisions if p not in ("fp32", "fp16")]
    if unknown or not precisions:
        raise ExportOptionError(f"unknown precision(s) {unknown or precisions}; use fp32 and/or fp16")
    if fp32_blocks and "fp16" not in precisions:
        raise ExportOptionError("--fp32-blocks only applies to the fp16 graph; add fp16 to --precision")
    bad = [i for i in fp32_blocks if not 0 <= i < config.depth]
    if bad:
        raise ExportOptionError(f"--fp32-blocks {bad} out of range: the model has blocks 0..{config.depth - 1}")
    if out_dir.exists():
        if not force:
            raise ExportOptionError(f"{out_dir} already exists; pass --force to overwrite it")
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file()):
            # --force replaces an artifact, never an arbitrary folder (say --out engines by mistake).
            raise ExportOptionError(f"{out_dir} is not a ditrt artifact (no {MANIFEST_NAME}); --force only replaces "
                                    "artifacts or empty directories: choose another --out")


def _old_listed(out_dir: Path) -> set[str]:
    """The files the artifact being replaced owns (its manifest's); everything else is kept."""
    try:
        return listed_files(json.loads((out_dir / MANIFEST_NAME).read_text()))
    except (OSError, ValueError):
        return {MANIFEST_NAME}


def _export_into(source: ExportSource, tmp: Path, precisions, opset, fp32_blocks, log) -> dict:
    model = source.model.eval()
    config = model.config
    spec = denoiser_spec(config)
    cases = [spec.example_inputs(batch, seed) for batch, seed in VALIDATION_BATCHES]
    step = _Steps(len(precisions) * 2 + 2, log)
    with step("PyTorch fp32 reference outputs"):
        with torch.no_grad():
            references = [model(*(torch.from_numpy(c[n]) for n in spec.input_names)).numpy() for c in cases]
    graphs = {}
    for precision in sorted(precisions, key=("fp32", "fp16").index):
        blocks = tuple(sorted(set(fp32_blocks))) if precision == "fp16" else ()
        # fp16 comes last, so the model is converted in place: no second copy of the weights at the peak.
        net = model if precision == "fp32" else set_precision(model, "fp16", blocks)
        with step(f"exporting {precision} denoiser graph (opset {opset})"):
            files = torch_export(_DenoiserGraph(net), spec, tmp / f"denoiser.{precision}.onnx", opset)
        with step(f"validating {precision} denoiser graph"):
            validation = validate_graph(tmp / files[0], spec, cases, references, precision)
        graphs[precision] = graph_entry(tmp, files, opset, precision, validation, log)
        graphs[precision].update(
            float32_parts=["timestep sinusoid", "LayerNormalization (stash_type 1)"] if precision == "fp16" else [],
            fp32_blocks=list(blocks))
    with step("writing manifest"):
        return build_manifest(source, config, {"denoiser": {**spec.to_manifest(), "graphs": graphs}})


def graph_entry(directory: Path, files: list[str], opset: int, precision: str, validation: dict, log) -> dict:
    """The manifest entry of one exported graph (any network)."""
    parity = validation["onnxruntime_vs_reference"]
    log(f"      ONNX Runtime vs PyTorch fp32: max rel err {parity['max_rel_err']:.2e} (bound {parity['bound']:g}); "
        f"checker + strict shape inference ok; TensorRT lint ok ({len(validation['tensorrt_lint']['op_counts'])} op types)")
    return {"file": files[0], "files": files, "sha256": {name: sha256_file(directory / name) for name in files},
            "bytes": sum((directory / name).stat().st_size for name in files), "opset": opset,
            "compute_dtype": "float32" if precision == "fp32" else "float16", "validation": validation}


class _Steps:
    """Numbered progress lines with timings: `with steps("what"): ...`."""

    def __init__(self, total: int, log):
        self.total, self.done, self.log = total, 0, log

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {what} ...")
        start = time.perf_counter()
        yield
        self.log(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - start:.1f} s")


def torch_export(module: torch.nn.Module, spec: NetworkSpec, path: Path, opset: int, example_batch: int = 1) -> list[str]:
    """torch.onnx (dynamo) export of `module(*inputs)` with the spec's names and a dynamic batch
    axis; returns the files written (the graph, then any external data). Modules whose code
    branches on a size-1 batch need an `example_batch` of 2 (torch.export specialises size 1)."""
    module = module.eval()
    example = tuple(_example_tensor(t, example_batch) for t in spec.inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with _quiet_exporter():
        try:
            torch.onnx.export(
                module, example, str(path), dynamo=True, opset_version=opset, optimize=True,
                input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_shapes={name: {0: batch} for name in spec.input_names},
                external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        except Exception as e:
            raise ExportError(f"torch.onnx export of the {spec.name} failed: {type(e).__name__}: {e}") from e
    _rename_batch_axis(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def _example_tensor(t, batch: int = 1) -> torch.Tensor:
    """An example of an input: 500 for a float timestep (any value traces the same graph)."""
    shape = t.concrete(batch)
    if t.dtype == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    return torch.full(shape, 500.0) if len(shape) == 1 else torch.randn(shape)


def _rename_batch_axis(path: Path) -> None:
    """Name the dynamic axis 'batch' on every input and output (the exporter may call it s0)."""
    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_param != "batch":
            dim.dim_param = "batch"
            changed = True
    if changed:
        onnx.save(model, str(path))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter is chatty (torchvision registry notes, deprecation warnings): keep its output
    for real errors."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def validate_graph(path: Path, spec: NetworkSpec, cases: list[dict], references: list[np.ndarray],
                   precision: str) -> dict:
    """checker (full), strict shape inference, ONNX Runtime vs the PyTorch fp32 outputs, TRT lint."""
    graph, inferred = check_graph_file(path)
    out_dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    want = list(spec.primary_output.shape)
    if out_dims != want:
        raise ExportError(f"{path.name}: inferred output shape {out_dims}, expected {want}")
    lint = lint_model(graph)
    if not lint.ok:
        raise ExportError(f"{path.name} fails the TensorRT lint: " + "; ".join(lint.problems))
    backend = OnnxRuntimeBackend(path, spec, precision)
    runs = []
    for feeds, ref in zip(cases, references):
        metrics = compare(backend(feeds)[spec.output_names[0]], ref)
        runs.append({"batch": len(ref), **{k: v.tolist() for k, v in feeds.items() if v.ndim == 1}, **metrics})
    worst = max(r["max_rel_err"] for r in runs)
    bound = spec.export_bounds[precision]
    if not worst <= bound:
        raise ExportError(f"{path.name}: ONNX Runtime output differs from PyTorch fp32 by {worst:.3g} (max error "
                          f"relative to the largest magnitude), above the {precision} bound {bound:g}")
    return {"checker_full_check": True, "strict_shape_inference": True,
            "onnxruntime_vs_reference": {"reference": "PyTorch fp32", "max_rel_err": worst, "bound": bound, "runs": runs},
            "tensorrt_lint": lint.to_dict()}


def check_graph_file(path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """onnx.checker (full check, by path: works above 2 GB) and strict shape inference; returns the
    graph (without external data) and its inferred form."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected {path.name}: {e}") from None
    graph = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f"strict shape inference failed on {path.name}: {e}") from None
    return graph, inferred


def build_manifest(source: ExportSource, config: DiTConfig, networks: dict) -> dict:
    import onnxruntime
    import onnxscript
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": source.config_name, **config.to_dict(), "out_channels": config.out_channels,
                  "image_size": config.input_size * 8, "parameters": count_parameters(source.model),
                  "gmacs_per_forward": round(macs_per_forward(config) / 1e9, 3)},
        "source": source.description,
        "diffusion": Diffusion.official(config).to_dict(),
        "defaults": Defaults().to_dict(),
        "networks": networks,
        "versions": {"ditrt": runtime.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "engines": [],
    }
