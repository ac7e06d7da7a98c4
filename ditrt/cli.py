"""The `ditrt` command line. Commands that only need the runtime (sample, build, parity against a
saved golden) import no torch; exporter modules are imported inside the commands that need them."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ditrt import runtime
from ditrt.runtime.backends import BACKENDS, backend_ids
from ditrt.runtime.errors import DitrtError
from ditrt.runtime.files import atomic_output, write_json_atomic
from ditrt.runtime.samplers import SAMPLERS

EXAMPLE_OVERRIDES = {"num_heads": 4}  # the golden tiny model: depth 2, hidden 64, 4 heads, 10 classes


def example_checkpoint() -> Path:
    import ditrt.exporter
    return Path(ditrt.exporter.__file__).resolve().parent / "data" / "dit_tiny_official.pt"


class InputError(click.ClickException):
    """Bad input (file, artifact, option value): exit code 2, like a usage error."""
    exit_code = 2


class StepFailed(click.ClickException):
    """A failed step (validation, build, a backend mid-loop, a missing toolchain): exit code 1."""
    exit_code = 1


def _require_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise StepFailed(f"`ditrt {command}` needs PyTorch (the runtime does not): "
                                   "pip install torch==2.13.0 (CPU) or a CUDA build, then pip install 'ditrt[export]'") from None


def _int_list(value: str | None, what: str) -> list[int]:
    if value is None or value == "":
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {value!r}") from None


@contextmanager
def project_errors(all_input: bool = False):
    """The project's errors become their exit code with their message: InputError 2, StepError 1
    (with `all_input`, every error is 2: `parity` keeps 1 for numbers out of bounds). Anything else
    is a bug in ditrt and keeps its traceback."""
    try:
        yield
    except DitrtError as e:
        raise (InputError if all_input or e.exit_code == 2 else StepFailed)(str(e)) from None
    except StepFailed as e:
        if all_input:
            raise InputError(e.message) from None
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(runtime.__version__, prog_name="ditrt")
def main() -> None:
    """ditrt: DiT to ONNX and TensorRT, with a torch-free CFG sampling runtime.

    Typical flow: `ditrt export` -> `ditrt build` (TensorRT, optional) -> `ditrt sample` / `ditrt parity`.
    """


# ---- inspect ------------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--num-heads", type=int, help="Attention heads, when no named config matches depth x hidden.")
@click.option("--input-size", type=int, help="Latent side, when the checkpoint has no pos_embed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(checkpoint: Path, num_heads: int | None, input_size: int | None, as_json: bool) -> None:
    """Show a checkpoint's format, inferred config, parameters and GMACs per forward."""
    _require_torch("inspect")
    from ditrt.exporter.checkpoints import describe, load_checkpoint
    from ditrt.exporter.model import get_2d_sincos_pos_embed, macs_per_forward
    overrides = {k: v for k, v in (("num_heads", num_heads), ("input_size", input_size)) if v is not None}
    with project_errors():
        ckpt = load_checkpoint(checkpoint, **overrides)
    cfg = ckpt.config
    params = sum(t.numel() for t in ckpt.state_dict.values())
    grid = cfg.input_size // cfg.patch_size
    pos = ckpt.state_dict["pos_embed"].double().numpy()[0]
    pos_dev = float(abs(pos - get_2d_sincos_pos_embed(cfg.hidden_size, grid)).max())
    info = {"path": str(checkpoint), "format": ckpt.format, "sha256": ckpt.sha256,
            "named_config": _named(cfg), "config": {**cfg.to_dict(), "out_channels": cfg.out_channels},
            "image_size": cfg.input_size * 8, "parameters": params,
            "gmacs_per_forward": round(macs_per_forward(cfg) / 1e9, 3),
            "pos_embed_max_deviation_from_sincos": pos_dev, "notes": ckpt.notes}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{checkpoint}: {ckpt.format} DiT checkpoint ({info['named_config'] or 'custom config'})")
    click.echo(f"  {describe(cfg)}, mlp_ratio {cfg.mlp_ratio}, out_channels {cfg.out_channels}")
    click.echo(f"  image size {info['image_size']} px, parameters {params:,}, {info['gmacs_per_forward']} GMACs per forward per sample")
    click.echo(f"  pos_embed: max deviation from the sin-cos formula {pos_dev:.3g}")
    click.echo(f"  sha256 {ckpt.sha256}")
    for note in ckpt.notes:
        click.echo(f"  note: {note}")
    click.echo("  problems: none (every key and shape matches the official layout)")


def _named(cfg) -> str | None:
    from dataclasses import replace
    from ditrt.exporter.model import DIT_CONFIGS
    return next((name for name, c in DIT_CONFIGS.items()
                 if replace(c, input_size=cfg.input_size, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma) == cfg), None)


# ---- export -------------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--example", is_flag=True, help="Use the embedded tiny DiT (the official golden weights) as the checkpoint.")
@click.option("--config", "config_name", help="Named config (DiT-XL/2, DiT-S/4, ...) for --random-init.")
@click.option("--random-init", is_flag=True, help="Random weights for --config (for trying things without a checkpoint).")
@click.option("--image-size", type=int, help="Image side in pixels (latent = /8); only with --random-init.")
@click.option("--num-classes", type=int, default=1000, show_default=True, help="Classes, only with --random-init.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init.")
@click.option("--num-heads", type=int, help="Override: attention heads (checkpoints of custom configs).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Artifact directory [engines/<name>].")
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (18..25).")
@click.option("--precision", default="fp32,fp16", show_default=True, help="Graphs to write: fp32, fp16 or both.")
@click.option("--fp32-blocks", default="", help="Block indices kept float32 in the fp16 graph, e.g. 0,27.")
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path),
              help="A diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema): adds its decoder as a second network "
                   "[--example embeds a small one].")
@click.option("--no-vae", is_flag=True, help="With --example: export the denoiser only.")
@click.option("--force", is_flag=True, help="Overwrite an existing artifact directory.")
def export(checkpoint, example, config_name, random_init, image_size, num_classes, seed, num_heads, out_dir, opset,
           precision, fp32_blocks, vae_dir, no_vae, force) -> None:
    """Export a checkpoint (or a random-init named config) to ONNX with a validated manifest."""
    _require_torch("export")
    from ditrt.exporter.checkpoints import load_checkpoint
    from ditrt.exporter.model import named_config
    from ditrt.exporter.onnx_export import export_artifact, source_from_checkpoint, source_from_random_init

    chosen = [bool(checkpoint), example, random_init]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of CHECKPOINT, --example or --config NAME --random-init")
    if random_init and not config_name:
        raise click.UsageError("--random-init needs --config NAME (e.g. --config DiT-XL/2)")
    if config_name and not random_init:
        raise click.UsageError("--config only applies with --random-init (a checkpoint's config comes from its tensors)")
    if image_size is not None and not random_init:
        raise click.UsageError("--image-size only applies with --random-init (a checkpoint's latent size comes from its pos_embed)")
    if num_heads is not None and num_heads < 1:
        raise InputError(f"--num-heads must be a positive integer, got {num_heads}")
    if image_size is not None and image_size < 8:
        raise InputError(f"--image-size must be a positive multiple of 8 (pixels), got {image_size}")
    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    with project_errors():
        if random_init:
            cfg = named_config(config_name, 256 if image_size is None else image_size, num_classes=num_classes,
                               **({"num_heads": num_heads} if num_heads else {}))
            source = source_from_random_init(cfg, seed, config_name if config_name.startswith("DiT-") else f"DiT-{config_name}")
            default_name = f"{source.config_name.replace('/', '-')}-{cfg.input_size * 8}-random"
        else:
            path = example_checkpoint() if example else checkpoint
            overrides = dict(EXAMPLE_OVERRIDES) if example else {}
            if num_heads:
                overrides["num_heads"] = num_heads
            source = source_from_checkpoint(load_checkpoint(path, **overrides))
            default_name = "example" if example else Path(path).stem
        out_dir = out_dir or Path("engines") / default_name
        if vae_dir and no_vae:
            raise InputError("give --vae DIR or --no-vae, not both")
        vae = None
        if vae_dir or (example and not no_vae):
            from ditrt.exporter.vae import load_vae
            vae = load_vae(vae_dir or example_checkpoint().parent / "example_vae",
                           in_channels=source.model.config.in_channels)
        export_artifact(source, out_dir, precisions, opset, force, tuple(_int_list(fp32_blocks, "--fp32-blocks")),
                        log=lambda m: click.echo(m, err=True), vae=vae)
    click.echo(str(out_dir))


# ---- sample -------------------------------------------------------------------------------------

BACKEND_CHOICES = ["auto", *BACKENDS, *backend_ids()]


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--labels", required=True, help="Comma-separated class labels, one image each (e.g. 207,360).")
@click.option("--steps", help="Steps [the manifest's default, 250]: ddpm/ddim take N, ddimN or section counts a,b,c.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler [the manifest's default, ddpm].")
@click.option("--cfg-scale", type=float, help="Guidance scale [manifest default, 4.0]; <= 1 runs no unconditional rows.")
@click.option("--guidance", type=click.Choice(["official", "standard"]),
              help="official: channels 0..2 (the released model's quirk); standard: all latent channels [manifest default].")
@click.option("--eta", type=float, help="DDIM eta in [0, 1] [0]; only for samplers that take it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Non-negative seed of the per-image noise.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="auto, a backend kind, or KIND-PRECISION.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), help="Graph precision [fp16 on TensorRT, else fp32].")
@click.option("--threads", type=int, help="ONNX Runtime CPU threads.")
@click.option("--max-batch", type=int, help="Largest batch per backend call, in rows (bigger requests are chunked).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every file the backend reads against the manifest's sha256 first.")
@click.option("--allow-plan-host-code", is_flag=True,
              help="Let a version-compatible TensorRT plan run the host code it embeds (only plans you trust).")
@click.option("--decoder-precision", type=click.Choice(["fp32", "fp16"]),
              help="Decoder graph precision [fp32 on ONNX Runtime, fp16 on TensorRT]; fp32 avoids fp16 VAE overflow.")
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="A .png grid (as sample.py writes it; needs a decoder), any other name: .npy latents "
                   "[sample.png with a decoder, else latents.npy].")
@click.option("--out-dir", type=click.Path(path_type=Path),
              help="Also write one PNG per image, 000000.png ... (as sample_ddp.py names them; needs a decoder).")
@click.option("--latents", "latents_path", type=click.Path(path_type=Path), help="Also keep the latents as .npy.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sample(artifact, labels, steps, sampler, cfg_scale, guidance, eta, seed, backend, precision, threads, max_batch,
           verify, allow_plan_host_code, decoder_precision, out_path, out_dir, latents_path, progress) -> None:
    """Run the CFG sampling loop on an artifact; write a PNG grid (and per-image PNGs) with its
    decoder, and/or the latents (N, C, H, W) float32 as .npy."""
    label_list = _int_list(labels, "--labels")
    with project_errors():
        manifest = runtime.load_manifest(artifact)
        has_decoder = "decoder" in manifest.networks
        out_path = out_path or Path("sample.png" if has_decoder else "latents.npy")
        wants_images = out_path.suffix.lower() == ".png" or out_dir is not None
        pipe = runtime.load(artifact, backend=backend, precision=precision, threads=threads, max_batch=max_batch,
                            allow_plan_host_code=allow_plan_host_code, verify=verify, decoder=wants_images and has_decoder,
                            decoder_precision=decoder_precision if wants_images and has_decoder else None)
        latents = pipe.sample(label_list, num_steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                              guidance=guidance, seed=seed, eta=eta, progress=progress)
        written = []
        keep = latents_path or (out_path if out_path.suffix.lower() != ".png" else None)
        if wants_images and not has_decoder:
            keep = keep or out_path.with_suffix(".npy")
            save_npy_atomic(keep, latents)
            raise runtime.InputError(f"{artifact} has no decoder network, so no images can be written (export with "
                                     f"--vae DIR to add one); the latents were written to {keep}")
        if keep:
            save_npy_atomic(keep, latents)
            written.append(f"{keep} {tuple(latents.shape)}")
        if wants_images:
            written += _write_images(pipe.decoder, latents, out_path if out_path.suffix.lower() == ".png" else None, out_dir)
    s = pipe.last_stats
    d = pipe.manifest.defaults
    click.echo(f"{len(label_list)} images x {s.steps} steps ({sampler or d.sampler}, cfg "
               f"{d.cfg_scale if cfg_scale is None else cfg_scale} {guidance or d.guidance}) on {pipe.backend.name}: "
               f"{s.total_s:.2f} s, {s.steps_per_s:.2f} steps/s, runtime overhead {100 * s.overhead_fraction:.2f}% "
               f"-> {', '.join(written)}")


def _write_images(decoder, latents, grid_path: Path | None, out_dir: Path | None) -> list[str]:
    """Decode (with a progress line) and write the grid and/or the per-image PNGs."""
    import time
    from ditrt.runtime import images
    from ditrt.runtime.pipeline import decode
    start = time.perf_counter()
    click.echo(f"decoding {len(latents)} images on {decoder.name} ...", err=True)
    decoded = decode(decoder, latents)
    click.echo(f"decoded {len(latents)} images {tuple(decoded.shape[1:])} in {time.perf_counter() - start:.2f} s", err=True)
    written = []
    if grid_path is not None:
        images.write_png(grid_path, images.grid(decoded))
        written.append(f"{grid_path} (grid of {len(decoded)})")
    if out_dir is not None:
        paths = images.write_per_image(out_dir, images.to_uint8(decoded))
        written.append(f"{out_dir}/{paths[0].name}..{paths[-1].name}")
    return written


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="PNG grid, as sample.py writes it.")
@click.option("--out-dir", type=click.Path(path_type=Path), help="One PNG per image, 000000.png ...")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--decoder-precision", type=click.Choice(["fp32", "fp16"]), help="Decoder graph precision.")
@click.option("--threads", type=int, help="ONNX Runtime CPU threads.")
@click.option("--verify/--no-verify", default=True, show_default=True)
def decode(artifact, latents, out_path, out_dir, backend, decoder_precision, threads, verify) -> None:
    """Decode saved latents (N, C, H, W) .npy with ARTIFACT's VAE decoder into PNGs."""
    import numpy as np
    if out_path is None and out_dir is None:
        raise click.UsageError("give --out GRID.png and/or --out-dir DIR")
    with project_errors():
        manifest = runtime.load_manifest(artifact)
        manifest.network("decoder")
        try:
            array = np.load(latents, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise runtime.InputError(f"cannot read latents {latents}: {e}") from None
        decoder = runtime.create_backend(manifest, backend, decoder_precision, "decoder", threads=threads, verify=verify)
        click.echo(", ".join(_write_images(decoder, array, out_path, out_dir)))


# ---- verify -------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def verify(artifact) -> None:
    """Check every file of ARTIFACT (graphs, external data, TensorRT plans) against the manifest.

    Exit code 0: everything matches; 1: a file is missing or changed; 2: the artifact or its
    manifest is unusable.
    """
    with project_errors():
        results = runtime.load_manifest(artifact).verify_all()
    width = max(len(str(name)) for name, _, _ in results)
    for name, what, problem in results:
        click.echo(f"{str(name):<{width}}  {what:<28} {'ok' if problem is None else 'FAIL: ' + problem}")
    failed = [name for name, _, problem in results if problem]
    click.echo(f"verify: {len(results) - len(failed)}/{len(results)} files match the manifest" +
               (f"; FAILED: {', '.join(map(str, failed))}" if failed else ""))
    sys.exit(1 if failed else 0)


# ---- parity -------------------------------------------------------------------------------------



@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--against", help="'reference' (the PyTorch model, needs torch) or a golden .npz saved with --save-golden.")
@click.option("--backends", default="onnxruntime-fp32,onnxruntime-fp16", show_default=True,
              help=f"Comma-separated backend ids: {', '.join(backend_ids())} (a kind alone: its default precision).")
@click.option("--steps", type=int, default=25, show_default=True,
              help=f"Model calls of each sampler's loop check ({', '.join(SAMPLERS)}).")
@click.option("--batch", "batches", default="1,3,8", show_default=True, help="Batch sizes of the per-forward checks.")
@click.option("--max-rel-err", "max_rel_errs", multiple=True,
              help="Bound on max error relative to the reference's largest magnitude: X for every backend, or BACKEND=X. Repeatable.")
@click.option("--atol", type=float, help="Use an allclose test |a - r| <= atol + rtol |r| instead of --max-rel-err.")
@click.option("--rtol", type=float, help="See --atol.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON report.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Write a JUnit XML report (one testcase per check).")
@click.option("--save-golden", type=click.Path(path_type=Path), help="Run the PyTorch reference once and save inputs, noise and outputs.")
@click.option("--activation-ranges", is_flag=True, help="Largest |activation| per block and branch, flagged near the fp16 range.")
@click.option("--headroom", type=float, default=8.0, show_default=True, help="--activation-ranges flags branches above 65504 / headroom.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Weights for the PyTorch reference, if the manifest's source path is not here.")
@click.option("--threads", type=int, help="ONNX Runtime CPU threads.")
def parity(artifact, against, backends, steps, batches, max_rel_errs, atol, rtol, json_path, junit_path, save_golden,
           activation_ranges, headroom, checkpoint, threads) -> None:
    """Numerical parity of an artifact's backends against the PyTorch reference or a golden file.

    Exit code 0: every check within bounds; 1: some check out of bounds; 2: usage or artifact error.
    """
    from ditrt.runtime import parity as P
    modes = [bool(against), bool(save_golden), activation_ranges]
    if sum(modes) != 1:
        raise click.UsageError("give exactly one of --against, --save-golden or --activation-ranges")
    with project_errors(all_input=True):
        manifest = runtime.load_manifest(artifact)
        batch_list = _int_list(batches, "--batch")
        if not batch_list or min(batch_list) < 1:
            raise InputError("--batch needs positive batch sizes")
        if steps < 2:
            raise InputError("--steps must be at least 2")
        if activation_ranges:
            return _activation_ranges(manifest, checkpoint, headroom, json_path)
        if save_golden:
            _require_torch("parity --save-golden")
            from ditrt.exporter.parity_reference import reference_golden
            golden = reference_golden(manifest, batch_list, steps, checkpoint, log=lambda m: click.echo(m, err=True))
            golden.save(save_golden)
            click.echo(f"saved {len(golden.forward)} forward and {len(golden.loops)} loop references to {save_golden}")
            return
        if against == "reference":
            _require_torch("parity --against reference")
            from ditrt.exporter.parity_reference import reference_golden
            golden = reference_golden(manifest, batch_list, steps, checkpoint, log=lambda m: click.echo(m, err=True))
        else:
            ctx = click.get_current_context()
            given = [f"--{name}" for name in ("steps", "batch") if ctx.get_parameter_source(
                "batches" if name == "batch" else name) == click.core.ParameterSource.COMMANDLINE]
            if given:
                raise InputError(f"{' and '.join(given)} cannot apply to a golden file: it holds its own checks "
                                 "(save another with --save-golden)")
            golden = P.Golden.load(against)
            golden.check_matches(manifest)
        names = [b.strip() for b in backends.split(",") if b.strip()]
        if not names:
            raise InputError(f"--backends needs at least one of {', '.join(backend_ids())}")
        instances = {}  # (backend id, network) -> backend
        for name in names:
            for network in manifest.networks:
                # verify=False: parity reports a changed file as a failed sha256 check and still runs
                # the numbers, so the report shows what the change does.
                backend = runtime.create_backend(manifest, name, network=network, threads=threads,
                                                 checkpoint=checkpoint, verify=False)
                instances[(backend.name, network)] = backend
        thresholds = _parity_thresholds(sorted({b.name for b in instances.values()}), max_rel_errs, atol, rtol)
    results = []
    for (name, network), backend in instances.items():
        click.echo(f"checking {name} on the {network} ...", err=True)
        results += _integrity_checks(manifest, backend)
        pipeline = runtime.Pipeline(backend, manifest) if network == "denoiser" else None
        results += P.check_backend(name, backend, pipeline, golden, thresholds[name])
    click.echo(P.format_table(results))
    failed = [r for r in results if not r.passed]
    meta = {"artifact": str(artifact), "against": against, "golden": golden.meta, "backends": sorted(thresholds)}
    with project_errors():
        if json_path:
            P.write_json(results, json_path, meta)
        if junit_path:
            P.write_junit(results, junit_path)
    click.echo(f"parity: {len(results) - len(failed)}/{len(results)} checks passed" +
               (f"; FAILED: {', '.join(f'{r.backend} {r.check}' for r in failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


def _parity_thresholds(names, max_rel_errs, atol, rtol) -> dict:
    """Per backend id and check kind: --max-rel-err X / BACKEND=X, --atol/--rtol, or the defaults
    of the backend's precision."""
    from ditrt.runtime.parity import DEFAULT_MAX_REL_ERR, Threshold
    overrides: dict[str, float] = {}
    for item in max_rel_errs:
        key, _, value = item.rpartition("=")
        try:
            bound = float(value)
        except ValueError:
            raise InputError(f"--max-rel-err takes X or BACKEND=X, got {item!r}") from None
        for name in (names if not key else [key]):
            if name not in names:
                raise InputError(f"--max-rel-err names backend {name!r}, which is not in --backends ({', '.join(names)})")
            overrides[name] = bound
    table = {}
    for name in names:
        defaults = DEFAULT_MAX_REL_ERR[name.rpartition("-")[2]]
        table[name] = {kind: (Threshold(atol=atol, rtol=rtol) if atol is not None or rtol is not None
                              else Threshold(max_rel_err=overrides.get(name, bound)))
                       for kind, bound in defaults.items()}
    return table


def _integrity_checks(manifest, backend) -> list:
    """The files a graph backend runs, against the manifest's sha256: a changed file is a failed
    check, and the numeric checks still run so the report shows what the change does. (TensorRT
    plans are checked when they load.)"""
    from ditrt.runtime.parity import CheckResult
    if not backend.name.startswith("onnxruntime-"):
        return []
    results = []
    for file, (recorded, actual) in manifest.file_hashes(backend.network.name, backend.precision).items():
        error = (None if actual == recorded else "missing" if actual is None
                 else f"sha256 {actual[:16]}... differs from the manifest's {recorded[:16]}...")
        results.append(CheckResult(backend.name, f"sha256 {file}", file, error is None, "equal to the manifest", {},
                                   0.0, error))
    return results


def _activation_ranges(manifest, checkpoint, headroom, json_path) -> None:
    import numpy as np
    _require_torch("parity --activation-ranges")
    from ditrt.exporter.parity_reference import activation_ranges, reference_model
    k = manifest.model.num_classes
    report = activation_ranges(reference_model(manifest, checkpoint), [0, 100, 250, 500, 750, 999],
                               [0, k // 2, k - 1, k], headroom=headroom)
    cols = ["block", *list(report["blocks"][0])[1:8], "status"]
    click.echo("  ".join(f"{c:>9}" for c in cols))
    for b in report["blocks"]:
        click.echo("  ".join(f"{b[c]:>9.4g}" if isinstance(b[c], float) else f"{b[c]!s:>9}" for c in cols))
    click.echo(f"flag above {report['flag_above']:.0f} (fp16 max {report['fp16_max']:.0f} / headroom {headroom:g}); "
               f"flagged blocks: {report['flagged_blocks'] or 'none'}; {report['suggestion']}")
    if "decoder" in manifest.networks:
        from ditrt.exporter.parity_reference import decoder_activation_ranges, reference_decoder
        spec = manifest.network("decoder")
        latents = np.concatenate([spec.example_inputs(4, seed)[spec.input_names[0]] * scale
                                  for seed, scale in ((0, 1.0), (1, 3.0))])  # typical and 3-sigma latents
        decoder = decoder_activation_ranges(reference_decoder(manifest), latents, headroom)
        for row in decoder["stages"]:
            click.echo(f"decoder {row['stage']:>16}  max |activation| {row['max_abs']:>10.4g}  {row['status']}")
        click.echo(f"decoder: flagged stages: {decoder['flagged_stages'] or 'none'}; {decoder['suggestion']}")
        report = {**report, "decoder": decoder}
    if json_path:
        write_json_atomic(json_path, report)


def save_npy_atomic(path: Path, array) -> None:
    import numpy as np
    with atomic_output(path, suffix=".npy") as f:
        np.save(f, array)


# ---- build --------------------------------------------------------------------------------------

from ditrt.runtime.trt_plan import HARDWARE_COMPAT as _HARDWARE_COMPAT  # noqa: E402  (pure: no TensorRT import)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--network", default="all", show_default=True,
              help="Network to build: denoiser, decoder, or all of the artifact's networks.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Graph to build from (fp32: a strongly typed build of the fp32 graph).")
@click.option("--decoder-precision", type=click.Choice(["fp16", "fp32"]),
              help="Precision of the decoder plan [--precision]; fp32 avoids fp16 VAE overflow (NaN / black images).")
@click.option("--min-batch", type=int, help="Smallest engine batch, in the network's unit [1].")
@click.option("--opt-batch", type=int, help="Engine batch TensorRT tunes for [denoiser 16 rows, decoder 4 images].")
@click.option("--max-batch", type=int,
              help="Largest engine batch [denoiser 64 rows, decoder 8 images]. The denoiser counts rows: with "
                   "guidance each image is 2 rows, so 64 = 32 guided images per call; the runtime chunks larger requests.")
@click.option("--opt-level", type=int, default=3, show_default=True, help="Builder optimisation level, 0..5.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file, read and updated [ARTIFACT/timing.<sm>.trt<version>.cache].")
@click.option("--hardware-compat", type=click.Choice(_HARDWARE_COMPAT), default="none", show_default=True,
              help="none: this GPU model only; ampere+: any GPU of compute capability >= 8.0; same-cc: any GPU "
                   "of this compute capability (portable plans may be slower).")
@click.option("--version-compatible", is_flag=True,
              help="The plan also runs on newer TensorRT releases of the same major (may be slower).")
@click.option("--workspace", type=float, help="Builder workspace limit in GB [TensorRT's default].")
@click.option("--skip-unavailable", is_flag=True,
              help="Where TensorRT or a GPU is missing, say so and exit 0 (for scripts that build where possible).")
def build(artifact, network, precision, decoder_precision, min_batch, opt_batch, max_batch, opt_level, timing_cache,
          hardware_compat, version_compatible, workspace, skip_unavailable) -> None:
    """Build TensorRT plans from ARTIFACT's graphs and record them in the manifest.

    The network is strongly typed (TensorRT 11 has no fp16 flag: precision comes from the graph).
    Each plan is parity-checked against ONNX Runtime on the fp32 graph before it is recorded. Needs
    pip install 'ditrt[trt]' and an NVIDIA GPU; torch is not needed.
    """
    import contextlib
    from ditrt.runtime.trt_build import build_engine
    from ditrt.runtime.trt_plan import BuildFlags, EngineProfile, default_profile
    with project_errors():
        manifest = runtime.load_manifest(artifact)
        networks = list(manifest.networks) if network == "all" else [manifest.network(network).name]
        batch_options = [v for v in (min_batch, opt_batch, max_batch) if v is not None]
        if batch_options and len(networks) > 1:
            raise InputError(f"--min-batch/--opt-batch/--max-batch are in one network's unit; this artifact has "
                             f"{', '.join(networks)}: add --network NAME")
        flags = BuildFlags(opt_level, hardware_compat, version_compatible, workspace,
                           str(timing_cache) if timing_cache else None)
        jobs = []
        for name in networks:
            spec = manifest.network(name)
            base = default_profile(spec)
            low = base.min_rows if min_batch is None else min_batch
            high = base.max_rows if max_batch is None else max_batch
            opt = opt_batch if opt_batch is not None else max(low, min(base.opt_rows, high))
            plan_precision = (decoder_precision or precision) if name == "decoder" else precision
            jobs.append((name, plan_precision, EngineProfile(low, opt, high)))
    built = []
    for name, plan_precision, profile in jobs:
        try:
            with project_errors(), contextlib.redirect_stdout(sys.stderr):  # Polygraphy logs to stdout
                built.append(build_engine(artifact, name, plan_precision, profile, flags,
                                          log=lambda m: click.echo(m, err=True)))
        except StepFailed as e:
            if skip_unavailable and _is_unavailable(e):
                click.echo(f"skipped the TensorRT build: {e.message}", err=True)
                return
            raise
    for entry in built:
        click.echo(str(Path(artifact) / entry["file"]))


def _is_unavailable(error: click.ClickException) -> bool:
    cause = error.__context__
    from ditrt.runtime.trt_plan import TensorRTUnavailable
    return isinstance(cause, TensorRTUnavailable)


# ---- serve --------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, help="Most rows per backend call [the backend's limit]; requests join while they fit.")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Waiting requests before 429.")
@click.option("--policy", type=click.Choice(["step", "serial", "request"]), default="step", show_default=True,
              help="step: continuous batching; serial: one request at a time; request: whole-request batches.")
@click.option("--timeout", type=float, help="Per-request timeout in seconds [none].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--threads", type=int, help="ONNX Runtime CPU threads.")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve (pip install 'ditrt[ray]').")
@click.option("--replicas", type=int, default=1, show_default=True, help="Ray Serve replicas, each with its own scheduler.")
@click.option("--address", help="Ray cluster address (auto: the running cluster) [a local Ray].")
def serve(artifact, host, port, max_batch, max_queue, policy, timeout, backend, threads, use_ray, replicas, address):
    """Serve class-conditional sampling over HTTP: POST /v1/samples, GET /v1/health, GET /v1/model."""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from ditrt import serve as serving
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"ditrt serve needs fastapi and uvicorn: pip install 'ditrt[serve]' ({e})") from None
    options = dict(backend=backend, threads=threads, max_batch=max_batch, max_queue=max_queue, policy=policy,
                   timeout=timeout)
    with project_errors():
        if use_ray:
            try:
                import ray  # noqa: F401
            except ImportError:
                raise runtime.InputError("--ray needs Ray Serve: pip install 'ditrt[ray]'") from None
            click.echo(f"ditrt serve on Ray Serve: {replicas} replica(s) at http://{host}:{port}", err=True)
            serving.serve_ray(artifact, address=address, replicas=replicas, host=host, port=port, **options)
            return
        batcher = serving.make_batcher(artifact, **options)
        click.echo(f"ditrt serve {artifact} on {batcher.pipeline.backend.name} (policy {policy}, max batch "
                   f"{batcher.max_batch}) at http://{host}:{port}", err=True)
    serving.serve_uvicorn(batcher, host, port)


if __name__ == "__main__":
    sys.exit(main())
