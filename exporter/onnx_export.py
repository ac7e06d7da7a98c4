"""Export the reference DiT to ONNX (fp32 reference graph, fp16 TensorRT-ready graph), validate
each graph (checker, strict shape inference, ONNX Runtime vs PyTorch, TensorRT lint) and write the
artifact directory with its manifest. Everything is written to a temporary directory that is
renamed into place only when every step passed."""
from __future__ import annotations

import contextlib
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
from ditrt.runtime.backends import INPUT_NAMES, OUTPUT_NAME, OnnxRuntimeBackend
from ditrt.runtime.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, Manifest, sha256_file, write_json_atomic
from ditrt.runtime.parity import compare

from .checkpoints import Checkpoint
from .model import DiT, DiTConfig, count_parameters, macs_per_forward, set_precision
from .trt_lint import lint_model

DEFAULT_OPSET = 20
VALID_OPSETS = range(18, 26)  # torch.onnx dynamo writes files checker and ORT accept only here
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a .data file beside the graph
# Bounds on max |onnx - torch fp32| / max |torch fp32| at export time.
# fp32: same math, different kernels: 3e-7 (golden tiny) and 1.5e-6 (DiT-XL/2) measured.
# fp16: unit roundoff 4.9e-4 through every block: 5.2e-4 (golden tiny) and 5.6e-4 (DiT-XL/2, random
# init) measured; 5e-3 flags a real problem (a rounded sinusoid table cost 3e-2) without noise.
MAX_REL_ERR = {"fp32": 1e-5, "fp16": 5e-3}
VAE_SCALE_FACTOR = 0.18215


class ExportError(RuntimeError):
    """Export or export-time validation failed; nothing was written."""


class ExportOptionError(ValueError):
    """Options that cannot work, refused before any work is done (the CLI's exit code 2)."""


@dataclass
class ExportSource:
    """Where the weights come from: a loaded checkpoint, or a named config with random init."""
    model: DiT
    description: dict
    config_name: str | None = None


class _Wrapper(torch.nn.Module):
    """The graph interface: float32 latent and timestep, int64 labels in; float32 out. An fp16
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
                    log: Callable[[str], None] = print) -> Manifest:
    """Write the artifact directory. The source model is used up: an fp16 export converts it in place."""
    out_dir = Path(out_dir)
    check_options(source.model.config, out_dir, precisions, opset, force, fp32_blocks)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        manifest_data = _export_into(source, tmp, precisions, opset, fp32_blocks, log)
        write_json_atomic(tmp / MANIFEST_NAME, manifest_data)
        _replace_dir(tmp, out_dir)
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


def _replace_dir(new: Path, target: Path) -> None:
    """Swap the finished directory into place; on failure the old artifact is put back."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_into(source: ExportSource, tmp: Path, precisions, opset, fp32_blocks, log) -> dict:
    model = source.model.eval()
    config = model.config
    cases = validation_inputs(config)
    steps = len(precisions) * 2 + 2
    step = _Steps(steps, log)
    with step("PyTorch fp32 reference outputs"):
        with torch.no_grad():
            references = [model(*map(torch.from_numpy, case)).numpy() for case in cases]
    graphs = {}
    for precision in sorted(precisions, key=("fp32", "fp16").index):
        blocks = tuple(sorted(set(fp32_blocks))) if precision == "fp16" else ()
        # fp16 comes last, so the model is converted in place: no second copy of the weights at the peak.
        net = model if precision == "fp32" else set_precision(model, "fp16", blocks)
        with step(f"exporting {precision} graph (opset {opset})"):
            files = _torch_export(net, tmp / f"denoiser.{precision}.onnx", opset)
        with step(f"validating {precision} graph"):
            validation = validate_graph(tmp / files[0], config, cases, references, precision)
        parity = validation["onnxruntime_vs_torch_fp32"]
        log(f"      ONNX Runtime vs PyTorch fp32: max rel err {parity['max_rel_err']:.2e} (bound {parity['bound']:g}); "
            f"checker + strict shape inference ok; TensorRT lint ok ({len(validation['tensorrt_lint']['op_counts'])} op types)")
        graphs[precision] = {
            "file": files[0], "files": files,
            "sha256": {name: sha256_file(tmp / name) for name in files},
            "bytes": sum((tmp / name).stat().st_size for name in files),
            "opset": opset,
            "compute_dtype": "float32" if precision == "fp32" else "float16",
            "float32_parts": ["timestep sinusoid", "LayerNormalization (stash_type 1)"] if precision == "fp16" else [],
            "fp32_blocks": list(blocks),
            "validation": validation,
        }
    with step("writing manifest"):
        return build_manifest(source, config, graphs)


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


def _torch_export(model: DiT, path: Path, opset: int) -> list[str]:
    """torch.onnx (dynamo) export with a dynamic batch axis; returns the files written."""
    wrapper = _Wrapper(model).eval()
    C, S = model.config.in_channels, model.config.input_size
    example = (torch.randn(1, C, S, S), torch.tensor([500.0]), torch.tensor([0], dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with _quiet_exporter():
        try:
            torch.onnx.export(
                wrapper, example, str(path), dynamo=True, opset_version=opset, optimize=True,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
                external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        except Exception as e:
            raise ExportError(f"torch.onnx export failed: {type(e).__name__}: {e}") from e
    _rename_batch_axis(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


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


def validation_inputs(config: DiTConfig, seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batch 1 and batch 3 inputs spanning timesteps 0..999 (fractional included) and labels
    (first, last, null)."""
    rng = np.random.default_rng(seed)
    C, S, K = config.in_channels, config.input_size, config.num_classes

    def case(timesteps, labels):
        n = len(timesteps)
        return (rng.standard_normal((n, C, S, S), dtype=np.float32), np.array(timesteps, dtype=np.float32),
                np.array(labels, dtype=np.int64))

    return [case([999.0], [K - 1]), case([0.0, 487.5, 999.0], [0, K, K // 2]), case([1.0, 250.0, 750.0], [K, 1, K - 1])]


def validate_graph(path: Path, config: DiTConfig, cases, references, precision: str) -> dict:
    """checker (full), strict shape inference, ONNX Runtime vs the PyTorch fp32 outputs, TRT lint."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected {path.name}: {e}") from None
    graph = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f"strict shape inference failed on {path.name}: {e}") from None
    out_dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    want = ["batch", config.out_channels, config.input_size, config.input_size]
    if out_dims != want:
        raise ExportError(f"{path.name}: inferred output shape {out_dims}, expected {want}")
    lint = lint_model(graph)
    if not lint.ok:
        raise ExportError(f"{path.name} fails the TensorRT lint: " + "; ".join(lint.problems))
    backend = OnnxRuntimeBackend(path)
    runs = []
    for (latent, timestep, label), ref in zip(cases, references):
        metrics = compare(backend(latent, timestep, label), ref)
        runs.append({"batch": len(latent), "timesteps": timestep.tolist(), "labels": label.tolist(), **metrics})
    worst = max(r["max_rel_err"] for r in runs)
    bound = MAX_REL_ERR[precision]
    if not worst <= bound:
        raise ExportError(f"{path.name}: ONNX Runtime output differs from PyTorch fp32 by {worst:.3g} (max error "
                          f"relative to the largest magnitude), above the {precision} bound {bound:g}")
    return {"checker_full_check": True, "strict_shape_inference": True,
            "onnxruntime_vs_torch_fp32": {"max_rel_err": worst, "bound": bound, "runs": runs},
            "tensorrt_lint": lint.to_dict()}


def build_manifest(source: ExportSource, config: DiTConfig, graphs: dict) -> dict:
    import onnxruntime
    import onnxscript
    C, S = config.in_channels, config.input_size
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": source.config_name, **config.to_dict(), "out_channels": config.out_channels,
                  "image_size": S * 8, "parameters": count_parameters(source.model),
                  "gmacs_per_forward": round(macs_per_forward(config) / 1e9, 3)},
        "source": source.description,
        "diffusion": {
            "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "variance": "learned_range" if config.learn_sigma else "fixed_large",
            "null_class": config.null_class,
            "guided_channels": {"official": 3, "standard": C},
            "default_guidance": "official", "default_cfg_scale": 4.0, "default_sampler": "ddpm",
            "default_steps": 250, "clip_denoised": False,
            "vae_scale_factor": VAE_SCALE_FACTOR, "vae": "stabilityai/sd-vae-ft-mse",
        },
        "interface": {
            "inputs": [
                {"name": "latent", "dtype": "float32", "shape": ["batch", C, S, S]},
                {"name": "timestep", "dtype": "float32", "shape": ["batch"],
                 "meaning": "original-scale timesteps 0..999, fractional allowed"},
                {"name": "class_label", "dtype": "int64", "shape": ["batch"],
                 "meaning": f"0..{config.num_classes - 1}; {config.null_class} is the null class"},
            ],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", config.out_channels, S, S],
                         "meaning": f"channels 0..{C - 1} eps" + (f", {C}..{2 * C - 1} variance v" if config.learn_sigma else "")}],
            "batch_axis": 0,
            "guidance_rows": "conditional rows first, then the same latents with the null class",
        },
        "graphs": graphs,
        "versions": {"ditrt": runtime.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "engines": [],
    }
