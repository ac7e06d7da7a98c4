"""The one export loop: a network exporter (its spec, its PyTorch modules, its validation inputs and
bounds) goes through torch.onnx -> checker -> strict shape inference -> TensorRT lint -> ONNX
Runtime vs the PyTorch fp32 reference, per precision, and comes out as its manifest section.

An exporter is any object with the `NetworkExporter` attributes; `exporter/denoiser.py` and
`exporter/decoder.py` are the two there are. Adding a network means one such module and its spec
(runtime/spec/networks.py); see docs/extending.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnx
import torch

from ditrt.runtime.execution.backends import ONNXRUNTIME_REFUSED
from ditrt.runtime.core.errors import InputError, StepError
from ditrt.runtime.artifact.manifest import graph_entry, network_section
from ditrt.runtime.spec.networks import QUANTIZED_PRECISIONS, NetworkSpec
from ditrt.runtime.jobs.parity import compare

from .trt_lint import lint_model

DEFAULT_OPSET = 20
VALID_OPSETS = range(18, 26)  # torch.onnx dynamo writes files checker and ORT accept only here
# export order: fp16 last, so an exporter may convert its model in place (quantized graphs copy fp32)
PRECISIONS = ("fp32", "int8", "fp8", "fp16")
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a .data file beside the graph


class ExportError(StepError):
    """Export or export-time validation failed; nothing was written."""


class ExportOptionError(InputError):
    """Options that cannot work, refused before any work is done (the CLI's exit code 2)."""


class NetworkExporter(Protocol):
    spec: NetworkSpec  # names, roles, shapes and the export bounds per precision
    quantizable: tuple[str, ...]  # the QUANTIZED_PRECISIONS it has a recipe for (the others export fp32 / fp16 only)
    validation_batches: tuple[tuple[int, int], ...]  # (batch, seed) of the export-time checks
    example_batch: int  # the batch torch.export traces with (2 where code branches on a batch of 1)
    # Optional `dynamo: bool` (default True): torch.export (dynamo) for the fp32 / fp16 graphs; False:
    # the TorchScript exporter (the denoiser's segments). Read with getattr so exporters written
    # before it (docs/extending.md) keep working.

    def check_options(self, precisions: tuple[str, ...]) -> None: ...  # ExportOptionError before any work

    def reference(self) -> torch.nn.Module: ...  # the fp32 reference the graphs are validated against

    def module(self, precision: str) -> torch.nn.Module: ...  # the module exported for a precision

    def graph_fields(self, precision: str) -> dict: ...  # extra fields of the graph's manifest entry

    def check_graph(self, inferred: onnx.ModelProto, precision: str) -> dict: ...  # extra checks -> validation fields


class Steps:
    """Numbered progress lines with timings: `with steps("what"): ...`."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log = total, 0, log

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {what} ...")
        start = time.perf_counter()
        yield
        self.log(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - start:.1f} s")


def steps_per_network(precisions) -> int:
    return 1 + 2 * len(precisions)  # the reference, then export + validation per precision


def check_common_options(precisions, opset: int) -> tuple[str, ...]:
    """Options every network shares; the precisions in export order."""
    if opset not in VALID_OPSETS:
        raise ExportOptionError(f"opset {opset} is not supported: torch.onnx (dynamo) writes valid graphs for opsets "
                                f"{VALID_OPSETS.start}..{VALID_OPSETS.stop - 1}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ExportOptionError(f"unknown precision(s) {unknown or list(precisions)}; use any of "
                                f"{', '.join(sorted(PRECISIONS, key=('fp32', 'fp16', 'int8', 'fp8').index))}")
    return tuple(sorted(set(precisions), key=PRECISIONS.index))


def network_precisions(exporter: NetworkExporter, precisions: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions a network exports: quantized ones only where it has a recipe (the decoder
    has none: it stays fp32 / fp16, and fp32 when only quantized precisions were asked)."""
    kept = tuple(p for p in precisions if p not in QUANTIZED_PRECISIONS or p in exporter.quantizable)
    return kept or ("fp32",)


def export_network(exporter: NetworkExporter, directory: Path, precisions: tuple[str, ...], opset: int,
                   steps: Steps) -> dict:
    """Export, validate and describe one network into `directory` (an export's temporary folder);
    returns its manifest section (`networks.<name>`)."""
    spec = exporter.spec
    precisions = network_precisions(exporter, precisions)
    cases = [spec.example_inputs(batch, seed) for batch, seed in exporter.validation_batches]
    with steps(f"PyTorch fp32 {spec.name} reference outputs"):
        reference = exporter.reference().eval()
        with torch.no_grad():
            references = [_numpy_outputs(reference(*(torch.from_numpy(c[n]) for n in spec.input_names))) for c in cases]
        del reference
    graphs = {}
    for precision in precisions:
        path = directory / f"{spec.name}.{precision}.onnx"
        with steps(f"exporting {precision} {spec.name} graph (opset {opset})"):
            module = exporter.module(precision)
            files = torch_export(module, spec, path, opset, exporter.example_batch,
                                 dynamo=getattr(exporter, "dynamo", True) and precision not in QUANTIZED_PRECISIONS)
        with steps(f"validating {precision} {spec.name} graph"):
            validation = validate_graph(path, spec, cases, references, precision, exporter.check_graph,
                                        torch_candidate=module if precision in ONNXRUNTIME_REFUSED else None)
        del module
        parity = validation[VALIDATION_KEY[precision in ONNXRUNTIME_REFUSED]]
        steps.log(f"      {parity['candidate']} vs PyTorch fp32: max rel err {parity['max_rel_err']:.2e} (bound "
                  f"{parity['bound']:g}); checker + strict shape inference ok; TensorRT lint ok "
                  f"({len(validation['tensorrt_lint']['op_counts'])} op types)")
        graphs[precision] = graph_entry(directory, files, opset, precision, validation,
                                        **exporter.graph_fields(precision))
    return network_section(spec, graphs)


def _badness(metrics: dict) -> float:
    err = metrics["max_rel_err"]
    return err if err == err else float("inf")  # NaN is the worst


def _numpy_outputs(output) -> np.ndarray | tuple[np.ndarray, ...]:
    """A module's output(s) as float32 numpy: one array, or a tuple for a several-output network."""
    if isinstance(output, (tuple, list)):
        return tuple(o.float().numpy() for o in output)
    return output.float().numpy()


def torch_export(module: torch.nn.Module, spec: NetworkSpec, path: Path, opset: int, example_batch: int = 1,
                 dynamo: bool = True) -> list[str]:
    """torch.onnx (dynamo) export of `module(*inputs)` with the spec's names and a dynamic batch
    axis; returns the files written (the graph, then any external data). Modules whose code
    branches on a size-1 batch need an `example_batch` of 2 (torch.export specialises size 1).
    dynamo=False: the TorchScript exporter, for ModelOpt's fake-quantized modules (their QDQ
    symbolics are TorchScript's; torch.export cannot trace their data-dependent amax checks)."""
    module = module.eval()
    example = tuple(_example_tensor(t, example_batch) for t in spec.inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    axes = ({"dynamic_shapes": {name: {0: batch} for name in spec.input_names}} if dynamo else
            {"dynamic_axes": {name: {0: "batch"} for name in (*spec.input_names, *spec.output_names)}})
    with _quiet_exporter():
        try:
            torch.onnx.export(
                module, example, str(path), dynamo=dynamo, opset_version=opset, **({"optimize": True} if dynamo else {}),
                input_names=list(spec.input_names), output_names=list(spec.output_names), **axes,
                external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        except Exception as e:
            raise ExportError(f"torch.onnx export of the {spec.name} failed: {type(e).__name__}: {e}") from e
    _name_axes(path, spec)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def _example_tensor(t, batch: int = 1) -> torch.Tensor:
    """An example input: the top of the range for a time input (any value traces the same graph)."""
    shape = t.concrete(batch)
    if t.dtype.startswith("int"):
        return torch.zeros(shape, dtype=torch.int64 if t.dtype == "int64" else torch.int32)
    if t.role == "time":
        return torch.full(shape, float(t.range[1]) / 2)
    return torch.randn(shape)


def _name_axes(path: Path, spec: NetworkSpec) -> None:
    """Name the dynamic axis 'batch' on every input and output (the exporter may call it s0), and
    give the other axes the spec's sizes where the exporter left a name (the TorchScript exporter
    names a size-1 axis it cannot prove constant, e.g. DiT-S/8's single token)."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims[0].dim_param != "batch":
            dims[0].dim_param = "batch"
            changed = True
        want = tensors[value.name].shape if value.name in tensors else ()
        for dim, size in zip(list(dims)[1:], want[1:]):
            if isinstance(size, int) and not dim.HasField("dim_value"):
                dim.dim_value = size
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


_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32}


# Where the graph's numbers were checked: ONNX Runtime runs the graph; for a graph it cannot run (fp8:
# TensorRT's own ops) the exported PyTorch module (ModelOpt's fake quantization) stands in, and
# `ditrt build` checks the plan TensorRT makes of it.
VALIDATION_KEY = {False: "onnxruntime_vs_reference", True: "fake_quant_vs_reference"}


def validate_graph(path: Path, spec: NetworkSpec, cases: list[dict], references: list[np.ndarray], precision: str,
                   extra_checks: Callable[[onnx.ModelProto, str], dict] = lambda inferred, precision: {},
                   torch_candidate: torch.nn.Module | None = None) -> dict:
    """checker (full), strict shape inference (every input and output as the spec says), the
    network's own checks, TensorRT lint, and ONNX Runtime (or `torch_candidate`, the module exported,
    for graphs ONNX Runtime cannot run) vs the PyTorch fp32 outputs within the spec's bound for this
    precision."""
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    graph, inferred = check_graph_file(path)
    for value, want in zip([*inferred.graph.input, *inferred.graph.output], [*spec.inputs, *spec.outputs]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        elem = value.type.tensor_type.elem_type
        if value.name != want.name or dims != list(want.shape) or elem != _ONNX_TYPES[want.dtype]:
            raise ExportError(f"{path.name}: {value.name} is {onnx.TensorProto.DataType.Name(elem)} {dims}, expected "
                              f"{want.name} {want.dtype} {list(want.shape)}")
    extra = extra_checks(inferred, precision)
    lint = lint_model(graph)
    if not lint.ok:
        raise ExportError(f"{path.name} fails the TensorRT lint: " + "; ".join(lint.problems))
    from .torch_backend import TorchBackend
    backend = (OnnxRuntimeBackend(path, spec, precision) if torch_candidate is None else
               TorchBackend(torch_candidate, spec, precision=precision))
    label = "ONNX Runtime" if torch_candidate is None else TORCH_CANDIDATE
    runs = []
    for feeds, ref in zip(cases, references):
        outputs, refs = backend(feeds), ref if isinstance(ref, tuple) else (ref,)
        # a network with several outputs (the embed segment) is as good as its worst output
        metrics = max((compare(outputs[t.name], r) for t, r in zip(spec.outputs, refs)), key=_badness)
        runs.append({"batch": len(refs[0]), **{k: v.tolist() for k, v in feeds.items() if v.ndim == 1}, **metrics})
    worst = max(r["max_rel_err"] for r in runs)
    bound = spec.export_bounds[precision]
    if not worst <= bound:  # NaN fails too
        raise ExportError(f"{path.name}: {label} output differs from PyTorch fp32 by {worst:.3g} (max error "
                          f"relative to the largest magnitude), above the {precision} bound {bound:g}")
    return {"checker_full_check": True, "strict_shape_inference": True, **extra,
            VALIDATION_KEY[torch_candidate is not None]: {
                "reference": "PyTorch fp32", "candidate": label, "max_rel_err": worst, "bound": bound,
                "runs": runs},
            "tensorrt_lint": lint.to_dict()}


TORCH_CANDIDATE = "PyTorch fake-quantized (ModelOpt)"  # the candidate's name in reports: graphs ONNX Runtime cannot
# run are checked as their exported module, behind the torch backend


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
