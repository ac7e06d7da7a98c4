"""`ditrt export`: an artifact directory (graphs + manifest) from a denoiser source and an optional
VAE, through the one export loop (onnx_export.export_network) per network. Everything is written to
a temporary directory beside `--out` that is renamed into place only when every network passed;
`--out` is checked before any work (runtime.core.files.resolve_out_dir: a symbolic link is resolved,
never rewritten) and claimed exclusively for the duration (runtime.core.files.claimed_output). SIGTERM
and SIGINT run the same cleanup as an error (runtime.core.files.signals_raise): the lock and the
temporary folder go, a previous artifact stays as it was. See docs/integrity.md."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import torch

from ditrt import runtime
from ditrt.runtime.core.errors import StepError
from ditrt.runtime.core.files import (Input, Terminated, check_output_folder, claimed_output, listed_files, resolve_out_dir, signals_raise,
                                 swap_into_place, write_json_atomic)
from ditrt.runtime.artifact.manifest import MANIFEST_NAME, Manifest, new_manifest, write_manifest_digest

from .decoder import DecoderExporter
from .denoiser import DenoiserExporter, ExportSource
from .segments import check_composition, segment_exporters
from .onnx_export import (DEFAULT_OPSET, ExportOptionError, Steps, check_common_options, export_network,
                          network_precisions, steps_per_network)
from .quantize import QuantOptions, check_quant_options


class ExportInterrupted(StepError):
    """SIGTERM or SIGINT stopped the export; its cleanup ran. The exit code is the shell's for the
    signal (128 + its number: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def export_artifact(source: ExportSource, out_dir: str | Path, precisions: tuple[str, ...] = ("fp32", "fp16"),
                    opset: int = DEFAULT_OPSET, force: bool = False, fp32_blocks: tuple[int, ...] = (),
                    log: Callable[[str], None] = print, vae=None, quant: QuantOptions | None = None) -> Manifest:
    """Write the artifact directory. The source model is used up: an fp16 export converts it in place.
    `vae` (a LoadedVae from exporter.vae.load_vae) adds the decoder network, in the same precisions
    but the quantized ones (it stays fp32 / fp16). `quant`: calibration and config of int8 / fp8."""
    out_dir, written = prepare_out_dir(out_dir, force, log), False
    exporters = [DenoiserExporter(source, fp32_blocks, quant or QuantOptions()), *segment_exporters(source, tuple(fp32_blocks))]
    if vae is not None:
        exporters.append(DecoderExporter(vae, source.config.latent_shape))
    try:
        with signals_raise() as signals, claimed_output(out_dir, log):  # a racing export fails here, at once
            precisions = check_common_options(precisions, opset)
            for exporter in exporters:
                exporter.check_options(precisions)
            check_out_dir(out_dir, force)
            tmp = None
            try:
                with signals.held():  # no temporary folder without its cleanup
                    tmp = Path(_make_temp_dir(out_dir))
                tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
                steps = Steps(sum(steps_per_network(network_precisions(e, precisions)) for e in exporters) + 2, log)
                networks = {e.spec.name: export_network(e, tmp, precisions, opset, steps) for e in exporters}
                with steps("composed segments vs the monolithic denoiser"):
                    _record_composition(tmp, exporters, networks, log)
                with steps("writing manifest"):
                    data = new_manifest(family=source.family, config=source.config, model_extra=source.model_fields(),
                                        source=source.description, networks=networks, versions=_versions(),
                                        labels=source.labels)
                    write_json_atomic(tmp / MANIFEST_NAME, data)
                    write_manifest_digest(tmp)
                with signals.held():  # the swap's two renames run to the end
                    swap_into_place(tmp, out_dir, _old_listed(out_dir), log)
                    written = True
            except BaseException:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
    except Terminated as e:
        state = (f"{out_dir} had just been written and is complete" if written else
                 f"the previous artifact {out_dir} is unchanged" if out_dir.exists() else f"{out_dir} was not created")
        raise ExportInterrupted(f"export {e}: removed its temporary folder and lock; {state}", e.signum) from None
    log(f"wrote {out_dir} ({', '.join(precisions)})")
    return Manifest(data, out_dir)


def _record_composition(tmp: Path, exporters: list, networks: dict, log: Callable[[str], None]) -> None:
    """Check the segments compose to the denoiser (fp32, ExportError otherwise) and record it in the
    final segment's fp32 validation; an fp16-only export has no fp32 graph to check against."""
    segments = [e.spec for e in exporters if e.spec.extra.get("segment_of") == "denoiser"]
    if "fp32" not in networks["denoiser"]["graphs"]:
        log("      no fp32 graphs: the composition check (fp32) is skipped")
        return
    record = check_composition(tmp, exporters[0].spec, segments)
    networks["final"]["graphs"]["fp32"]["validation"]["composed_vs_denoiser"] = record
    log(f"      embed -> {len(segments) - 2} block segment(s) -> final vs denoiser: max rel err "
        f"{record['max_rel_err']:.2e} (bound {record['bound']:g})")


def _make_temp_dir(out_dir: Path) -> str:
    try:
        return tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent)
    except OSError as e:
        raise ExportOptionError(f"cannot write {out_dir}: {e.strerror or e} (creating a temporary folder beside it)") \
            from None


def prepare_out_dir(out_dir, force: bool, log: Callable[[str], None] = print) -> Path:
    """`--out` as the directory to write, refused at once when the export could not end well (see
    runtime.core.files.resolve_out_dir and check_out_dir); a symbolic link is followed, and said so."""
    path = resolve_out_dir(out_dir)
    if path != Path(out_dir):
        log(f"note: --out {out_dir} is a symbolic link; writing the directory it names, {path}")
    check_out_dir(path, force)
    return path


def check_out_dir(out_dir: Path, force: bool) -> None:
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


def _versions() -> dict:
    import onnxruntime
    import onnxscript
    return {"ditrt": runtime.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


# ---- what `ditrt export` exports ----------------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"
# The trained digits example (exporter/data/digits/README.md, examples/digits/train_digits.py): a DiT of
# depth 4, hidden 128, 4 heads on 8x8x4 latents of its own small VAE, 10 classes (the digits).
EXAMPLE_CHECKPOINT = DATA / "digits" / "dit.safetensors"
EXAMPLE_VAE = DATA / "digits" / "vae"
EXAMPLE_OVERRIDES = {"num_heads": 4}


def resolve_source(checkpoint: str | Path | None = None, example: bool = False, config_name: str | None = None,
                   random_init: bool = False, image_size: int | None = None, num_classes: int | None = None,
                   seed: int | None = None, num_heads: int | None = None, family: str = "dit",
                   transport: dict | None = None, revision: str | None = None,
                   ) -> tuple[ExportSource, str, Path | None]:
    """The export source for `ditrt export`'s options, the artifact's default name and the VAE folder
    that came with the checkpoint (a pipeline folder's or a hub repository's vae/), if any. CHECKPOINT
    is a path, a pipeline folder, a Hugging Face id or an official name (exporter.sources.locate).
    `transport` ({path_type, prediction}, SiT's create_transport names) says how a SiT was trained:
    no tensor records it, and only the Linear path with velocity prediction is implemented (others
    refused)."""
    from ditrt.runtime.core.validate import check_int

    from .checkpoints import load_checkpoint
    from .denoiser import source_from_checkpoint, source_from_random_init
    from .model import named_config
    if revision is not None and checkpoint is None:
        raise ExportOptionError("--revision pins a Hugging Face repository's commit: give the repository id (org/name)")
    if sum([checkpoint is not None, bool(example), bool(random_init)]) != 1:
        raise ExportOptionError("give exactly one of CHECKPOINT, --example or --config NAME --random-init")
    if random_init and not config_name:
        raise ExportOptionError("--random-init needs --config NAME (e.g. --config DiT-XL/2)")
    if config_name and not random_init:
        raise ExportOptionError("--config only applies with --random-init (a checkpoint's config comes from its tensors)")
    for flag, value, why in (("--image-size", image_size, "latent size comes from its pos_embed"),
                              ("--num-classes", num_classes, "classes come from its label embedding"),
                              ("--seed", seed, "weights are its own")):
        if value is not None and not random_init:
            raise ExportOptionError(f"{flag} only applies with --random-init (a checkpoint's {why})")
    overrides = {} if num_heads is None else {"num_heads": check_int(num_heads, "--num-heads", 1, 4096)}
    if transport:
        if family != "sit":
            raise ExportOptionError(f"--path-type / --prediction describe a SiT's transport; they do not apply to "
                                    f"--family {family}")
        from ditrt.runtime.spec.config import Transport, read_transport
        read_transport({**Transport().to_dict(), **transport}, None, ExportOptionError, where="the SiT's transport ")
    if random_init:
        size = 256 if image_size is None else check_int(image_size, "--image-size (pixels)", 8, 8192)
        classes = 1000 if num_classes is None else check_int(num_classes, "--num-classes", 1, 1 << 20)
        cfg = named_config(config_name, size, num_classes=classes, **overrides)
        name = config_name if config_name.startswith("DiT-") else f"DiT-{config_name}"
        return (source_from_random_init(cfg, 0 if seed is None else check_int(seed, "--seed", 0, 2**63), name, family),
                f"{name.replace('/', '-')}-{cfg.input_size * 8}-random", None)
    if example:
        ckpt = load_checkpoint(EXAMPLE_CHECKPOINT, **{**EXAMPLE_OVERRIDES, **overrides})
        return source_from_checkpoint(ckpt, family), "example", None
    from .sources import locate
    located = locate(checkpoint, revision, family)
    source = source_from_checkpoint(load_checkpoint(located.weights, **overrides), family)
    located.check_scheduler(family, source.family.default_process(source.config))
    source.labels = located.labels(source.config.num_classes)
    source.description.update(located.origin)
    return source, located.default_name, located.vae_dir


def export_command(checkpoint=None, example: bool = False, config_name=None, random_init: bool = False,
                   image_size=None, num_classes: int | None = None, seed: int | None = None, num_heads=None,
                   family: str = "dit",
                   out_dir=None, precisions=("fp32", "fp16"), opset: int = DEFAULT_OPSET, fp32_blocks=(), vae_dir=None,
                   no_vae: bool = False, force: bool = False, log: Callable[[str], None] = print,
                   transport: dict | None = None, revision: str | None = None,
                   quant: QuantOptions | None = None) -> Path:
    """`ditrt export`: resolve the source (and the VAE: `vae_dir`, else the one that came with the
    checkpoint, or the example's unless `no_vae`), export, return the artifact directory."""
    from .vae import load_vae
    if vae_dir is not None and no_vae:
        raise ExportOptionError("give --vae DIR or --no-vae, not both")
    inputs = [Input("the checkpoint", checkpoint), Input("the --vae folder", vae_dir)]
    if out_dir is not None:  # before the checkpoint is read: a bad --out is refused at once
        prepare_out_dir(out_dir, force, log=lambda m: None)
        check_output_folder("--out", out_dir, inputs)
    check_quant_options(quant or QuantOptions(), check_common_options(tuple(precisions), opset))
    source, default_name, bundled_vae = resolve_source(checkpoint, example, config_name, random_init, image_size,
                                                       num_classes, seed, num_heads, family, transport, revision)
    if example:
        bundled_vae = EXAMPLE_VAE
    if no_vae and bundled_vae is None:
        raise ExportOptionError("--no-vae applies to --example, pipeline folders and hub ids (which carry a VAE); a "
                                "checkpoint file exports the denoiser alone unless --vae DIR is given")
    vae = None
    if vae_dir is not None or (bundled_vae is not None and not no_vae):
        vae = load_vae(vae_dir if vae_dir is not None else bundled_vae, in_channels=source.config.in_channels)
    out_dir = Path(out_dir) if out_dir is not None else Path("engines") / default_name
    check_output_folder("--out", out_dir, inputs)
    export_artifact(source, out_dir, tuple(precisions), opset, force, tuple(fp32_blocks), log=log, vae=vae, quant=quant)
    return out_dir
