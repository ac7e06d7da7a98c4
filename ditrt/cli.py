"""The `ditrt` command line: each command parses its options, calls one library function and
prints. Commands that only need the runtime (sample, decode, verify, build, serve, parity against a
saved golden) import no torch; exporter modules are imported inside the commands that need them.

Exit codes: 0 success; 1 a failed step (`StepError`: validation, a build, a backend mid-loop,
NaN/inf, a missing toolchain; `parity`: numbers out of bounds); 2 bad input (`InputError`: usage,
files, artifacts, option values; `parity`: anything that keeps the checks from running).
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ditrt import runtime
from ditrt.runtime.execution.backends import BACKENDS, backend_ids
from ditrt.runtime.core.errors import DitrtError, InputError, TensorRTUnavailable
from ditrt.runtime.sampling.samplers import SAMPLERS
from ditrt.runtime.execution.cache import cache_names, parse_cache_options
from ditrt.runtime.sampling.request import LoadOptions
from ditrt.serve.parsing import DEFAULT_TIMEOUT_S, HttpLimits  # no fastapi: the app imports it when made


class _Failed(click.ClickException):
    """A DitrtError as click reports it: its message, its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def project_errors(all_input: bool = False):
    """The project's errors become their exit code with their message: InputError 2, StepError 1
    (with `all_input`, every error is 2: `parity` keeps 1 for numbers out of bounds). Anything else
    is a bug in ditrt and keeps its traceback."""
    try:
        yield
    except DitrtError as e:
        raise _Failed(str(e), 2 if all_input else e.exit_code) from None


def _require_torch(command: str, exit_code: int = 1) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise _Failed(f"`ditrt {command}` needs PyTorch (the runtime does not): pip install torch==2.13.0 (CPU) or a "
                      "CUDA build, then pip install 'ditrt[export]'", exit_code) from None


def _int_list(value: str | None, what: str) -> list[int]:
    if not value:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not all(item.lstrip("-").isascii() and item.lstrip("-").isdigit() for item in items):
        raise _Failed(f"{what} must be comma-separated integers, got {value[:80]!r}", 2)
    if any(len(item) > 20 for item in items):  # checked before int(): past 4300 digits Python refuses the conversion
        raise _Failed(f"{what}: an integer of {max(map(len, items))} digits; these are labels or indices (at most 20 "
                      "digits)", 2)
    return [int(v) for v in items]


def _log(message: str) -> None:
    click.echo(message, err=True)


BACKEND_CHOICES = ["auto", *BACKENDS, *backend_ids()]
PRECISIONS = click.Choice(["fp32", "fp16", "int8", "fp8"])  # int8 / fp8: the denoiser's quantized graphs
DECODER_PRECISIONS = click.Choice(["fp32", "fp16"])

# Options several commands take word for word (sampling_options, `serve`; --threads also `decode`, `parity`).
BACKEND_OPTION = click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                              help="auto, a backend kind, or KIND-PRECISION.")
PRECISION_OPTION = click.option("--precision", type=PRECISIONS, help="Graph precision [fp16 on TensorRT, else fp32].")
THREADS_OPTION = click.option("--threads", type=int, help="ONNX Runtime CPU threads.")
HOST_CODE_OPTION = click.option("--allow-plan-host-code", is_flag=True,
                                help="Let a version-compatible TensorRT plan run the host code it embeds (only plans "
                                     "you trust).")
MAX_MODEL_CALLS_OPTION = click.option(
    "--max-model-calls", type=int, help="Model calls an adaptive sampler (ode-dopri5) may make per sampling call before "
                                        "it stops with an error [1000]; fixed-step samplers refuse it.")
PUBLIC_KEY_OPTION = click.option("--public-key", type=click.Path(path_type=Path),
                                 help="Refuse the artifact unless its signature (model.sig, `ditrt sign`) verifies with "
                                      "this PEM public key and covers every file in it (pip install 'ditrt[sign]').")
PRIVATE_KEY_HELP = "PEM EC private key (pip install 'ditrt[sign]')"
DECODER_PRECISION_OPTION = click.option("--decoder-precision", type=DECODER_PRECISIONS,
                                        help="Decoder graph precision [fp32 on ONNX Runtime, fp16 on TensorRT]; fp32 "
                                             "avoids fp16 VAE overflow.")


class _Command(click.Command):
    """A command that refuses an option given twice (click lets the last one win silently), and
    both sides of a --x/--no-x switch; options declared `multiple` repeat as documented."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeated(self, ctx, args)
        return super().parse_args(ctx, args)


def _refuse_repeated(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts}
    seen: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        flag = arg.split("=", 1)[0] if arg.startswith("--") else arg
        param = options.get(flag)
        if param is not None:
            if not param.multiple and param.name in seen:
                first = seen[param.name]
                what = f"{flag} given twice" if first == flag else f"{first} and {flag} given together (one option)"
                raise click.UsageError(f"{what}: give each option once (the last would silently win)", ctx)
            seen[param.name] = flag
            if not param.is_flag and "=" not in arg:
                i += 1  # its value, whatever it looks like
        i += 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(runtime.__version__, prog_name="ditrt")
def main() -> None:
    """ditrt: DiT and SiT to ONNX and TensorRT, with a torch-free guided sampling runtime.

    Typical flow: `ditrt export` -> `ditrt build` (TensorRT, optional) -> `ditrt sample` / `ditrt parity`.
    """


main.command_class = _Command  # every command refuses a repeated option


# ---- inspect ------------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--num-heads", type=int, help="Attention heads, when no named config matches depth x hidden.")
@click.option("--input-size", type=int, help="Latent side, when the checkpoint has no pos_embed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(checkpoint: Path, num_heads: int | None, input_size: int | None, as_json: bool) -> None:
    """Show a checkpoint's format, inferred config, parameters and GMACs per forward."""
    _require_torch("inspect")
    from ditrt.exporter.checkpoints import inspect_checkpoint
    overrides = {k: v for k, v in (("num_heads", num_heads), ("input_size", input_size)) if v is not None}
    with project_errors():
        info = inspect_checkpoint(checkpoint, **overrides)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    cfg = info["config"]
    click.echo(f"{checkpoint}: {info['format']} DiT-layout checkpoint ({info['named_config'] or 'custom config'})")
    click.echo(f"  {info['description']}, mlp_ratio {cfg['mlp_ratio']}, out_channels {cfg['out_channels']}")
    click.echo(f"  image size {info['image_size']} px, parameters {info['parameters']:,}, {info['gmacs_per_forward']} "
               "GMACs per forward per sample")
    click.echo(f"  pos_embed: max deviation from the sin-cos formula {info['pos_embed_max_deviation_from_sincos']:.3g}")
    click.echo(f"  family: {info['family']}")
    click.echo(f"  sha256 {info['sha256']}")
    for note in info["notes"]:
        click.echo(f"  note: {note}")
    click.echo("  problems: none (every key and shape matches the official layout)")


# ---- export -------------------------------------------------------------------------------------

@main.command()
@click.argument("checkpoint", required=False)
@click.option("--example", is_flag=True, help="Use the embedded example model (and its VAE) as the checkpoint.")
@click.option("--family", type=click.Choice(list(runtime.FAMILIES)), default="dit", show_default=True,
              help="How the checkpoint was trained: dit (DDPM, eps) or sit (flow matching, velocity). No tensor "
                   "tells them apart.")
@click.option("--path-type", type=click.Choice(["Linear", "GVP", "VP"]),
              help="--family sit: the interpolant the SiT was trained with [Linear; the others are refused: not implemented].")
@click.option("--prediction", type=click.Choice(["velocity", "score", "noise"]),
              help="--family sit: what the SiT predicts [velocity; the others are refused: not implemented].")
@click.option("--config", "config_name", help="Named config (DiT-XL/2, DiT-S/4, ...) for --random-init.")
@click.option("--random-init", is_flag=True, help="Random weights for --config (for trying things without a checkpoint).")
@click.option("--image-size", type=int, help="Image side in pixels (latent = /8); only with --random-init.")
@click.option("--num-classes", type=int, help="Classes, only with --random-init [1000].")
@click.option("--seed", type=int, help="Seed for --random-init [0].")
@click.option("--num-heads", type=int, help="Override: attention heads (checkpoints of custom configs).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Artifact directory [engines/<name>].")
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (18..25).")
@click.option("--precision", default="fp32,fp16", show_default=True,
              help="Graphs to write: any of fp32, fp16, int8, fp8 (int8 / fp8: the denoiser, with ditrt[quant]).")
@click.option("--calib-images", type=int, help="int8 / fp8: images whose sampling trajectories calibrate [64].")
@click.option("--calib-steps", type=int, help="int8 / fp8: steps of each calibration trajectory (default sampler) [25].")
@click.option("--calib-seed", type=int, help="int8 / fp8: seed of the calibration labels and noise [0].")
@click.option("--quant-config", "quant_configs", multiple=True,
              help="ModelOpt config per quantized precision: INT8_DEFAULT_CFG (int8 default), INT8_SMOOTHQUANT_CFG, "
                   "FP8_DEFAULT_CFG (fp8 default). Repeatable.")
@click.option("--fp32-blocks", default="", help="Block indices kept float32 in the fp16 graph, e.g. 0,27.")
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path),
              help="A diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema): adds its decoder as a second network "
                   "[--example embeds a small one].")
@click.option("--no-vae", is_flag=True, help="With --example: export the denoiser only.")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--revision", help="With a Hugging Face id: the commit (or branch, tag) to fetch [main].")
def export(checkpoint, example, family, path_type, prediction, config_name, random_init, image_size, num_classes, seed,
           num_heads, out_dir, opset, precision, calib_images, calib_steps, calib_seed, quant_configs, fp32_blocks,
           vae_dir, no_vae, force, revision) -> None:
    """Export a checkpoint (a file, a diffusers DiTPipeline folder, a Hugging Face id or an official checkpoint
    name; or a random-init named config) to ONNX with a validated manifest."""
    _require_torch("export")
    from ditrt.exporter.artifact import export_command
    from ditrt.exporter.quantize import quant_options
    with project_errors():
        quant = quant_options(calib_images, calib_steps, calib_seed, quant_configs)
        out = export_command(checkpoint, example, config_name, random_init, image_size, num_classes, seed, num_heads,
                             family, out_dir, tuple(p.strip() for p in precision.split(",") if p.strip()), opset,
                             _int_list(fp32_blocks, "--fp32-blocks"), vae_dir, no_vae, force, log=_log,
                             transport={k: v for k, v in (("path_type", path_type), ("prediction", prediction)) if v},
                             revision=revision, quant=quant)
    click.echo(str(out))


# ---- sample -------------------------------------------------------------------------------------

def sampling_options(command):
    """The options that say what to sample and how the pipeline loads: `ditrt sample`'s, shared
    with `ditrt generate`."""
    options = [
        click.option("--steps", help="Steps [the manifest's default]: ddpm/ddim take N, ddimN or section counts a,b,c; "
                                     "dpm++2m and the SiT samplers the number of steps."),
        click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler [the manifest's default]."),
        click.option("--cfg-scale", type=float,
                     help="Guidance scale [manifest default]; <= 1 runs no unconditional rows."),
        click.option("--guidance", type=click.Choice(["official", "standard"]),
                     help="official: channels 0..2 (the released models' quirk); standard: all latent channels "
                          "[manifest default]."),
        click.option("--eta", type=float, help="DDIM eta in [0, 1] [0]; only for samplers that take it."),
        click.option("--option", "sampler_options", multiple=True, metavar="NAME=VALUE",
                     help="A sampler option, e.g. atol=1e-6 for ode-dopri5 (repeatable; refused by samplers that "
                          "take none)."),
        MAX_MODEL_CALLS_OPTION,
        click.option("--seed", type=int, default=0, show_default=True, help="Non-negative seed of the per-image noise."),
        click.option("--cache", type=click.Choice(cache_names()), default="none", show_default=True,
                     help="Feature caching on the denoiser's segments (docs/caching.md): first-block or taylorseer."),
        click.option("--cache-option", "cache_options", multiple=True, metavar="NAME=VALUE",
                     help="A cache option with diffusers' names, e.g. threshold=0.05 (first-block) or "
                          "cache_interval=4 (taylorseer) (repeatable)."),
        BACKEND_OPTION,
        PRECISION_OPTION,
        THREADS_OPTION,
        click.option("--max-batch", type=int,
                     help="Largest batch per backend call, in rows (bigger requests are chunked)."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Check every file the backend reads against the manifest's sha256 first."),
        HOST_CODE_OPTION,
        DECODER_PRECISION_OPTION,
        PUBLIC_KEY_OPTION,
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--labels", required=True,
              help="Comma-separated class labels or class names, one image each (e.g. 207,360 or tench,goldfish).")
@sampling_options
@click.option("--image-offset", type=int, default=0, show_default=True,
              help="Image j of this call draws the noise of image OFFSET + j of the seed's stream (and its PNG is "
                   "named OFFSET + j): reproduces images of a `ditrt generate` run.")
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="A .png grid (as sample.py writes it; needs a decoder), any other name: .npy latents "
                   "[sample.png with a decoder, else latents.npy].")
@click.option("--out-dir", type=click.Path(path_type=Path),
              help="Also write one PNG per image, 000000.png ... (as sample_ddp.py names them; needs a decoder).")
@click.option("--latents", "latents_path", type=click.Path(path_type=Path),
              help="Also keep the latents as .npy (with a .png --out).")
def sample(artifact, labels, image_offset, out_path, out_dir, latents_path, **options) -> None:
    """Run the guided sampling loop on an artifact; write a PNG grid (and per-image PNGs) with its
    decoder, and/or the latents (N, C, H, W) float32 as .npy."""
    from dataclasses import replace
    from ditrt.runtime.jobs.outputs import OutputPlan
    from ditrt.runtime.artifact.labels import split_labels
    with project_errors():
        label_list = split_labels(labels)  # numbers or names: the pipeline resolves names from the manifest
        spec, load = _sampling_request(options, label_list, image_offset)
        if load.public_key is not None:  # before the manifest is even read
            from ditrt.runtime.artifact.signing import require_signature
            require_signature(artifact, load.public_key)
        manifest = runtime.load_manifest(artifact)
        plan = OutputPlan.from_options(out_path, out_dir, latents_path, "decoder" in manifest.networks,
                                       load.decoder_precision)
        plan.refuse_inputs(manifest.inputs(), len(label_list), image_offset)
        pipe = runtime.load_pipeline(artifact, replace(load, decoder=plan.decodes))
        latents = pipe.sample_spec(spec, progress=options["progress"])
        written = plan.write(latents, pipe.decode, log=_log, first_index=image_offset)
    s, d = pipe.last_stats, pipe.manifest.defaults
    click.echo(f"{len(label_list)} images x {s.steps} model calls ({spec.sampler or d.sampler}, cfg "
               f"{d.cfg_scale if spec.cfg_scale is None else spec.cfg_scale} {spec.guidance or d.guidance}, noise "
               f"{runtime.NOISE_VERSION}) on {pipe.backend.name}: {s.total_s:.2f} s, {s.steps_per_s:.2f} calls/s, "
               f"runtime overhead {100 * s.overhead_fraction:.2f}% -> {', '.join(written)}")


def _sampling_request(options: dict, labels=None, image_offset: int = 0):
    """(SampleSpec, LoadOptions) from the options `sampling_options` adds: the one place the CLI
    builds them (`sample`, `generate`, `quality`)."""
    from ditrt.runtime.sampling.request import LoadOptions, SampleSpec, sampler_options
    from ditrt.runtime.sampling.samplers import parse_options
    o = options
    spec = SampleSpec(labels=labels, sampler=o["sampler"], steps=o["steps"], guidance=o["guidance"],
                      cfg_scale=o["cfg_scale"], seed=o["seed"], image_offset=image_offset,
                      options=sampler_options(o["eta"], parse_options(o["sampler_options"])),
                      max_model_calls=o["max_model_calls"], cache=o["cache"],
                      cache_options=parse_cache_options(o["cache_options"]))
    load = LoadOptions(backend=o["backend"], precision=o["precision"], threads=o["threads"], max_batch=o["max_batch"],
                       verify=o["verify"], decoder_precision=o["decoder_precision"],
                       allow_plan_host_code=o["allow_plan_host_code"], public_key=o["public_key"])
    return spec, load


# ---- generate -----------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--num-images", type=int, required=True, help="Images to generate (50000 for FID-50K).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="The run directory: run.json (the run record), shards/, png/.")
@click.option("--labels", default="balanced", show_default=True,
              help="balanced: every class the same count, in a seeded order; random: seeded uniform; FILE.npy "
                   "with --num-images class labels; or comma-separated class numbers or names (tench,goldfish) "
                   "balanced over. Image i's label depends only on (seed, i).")
@sampling_options
@click.option("--batch", type=int, default=32, show_default=True, help="Images per sampling call within a shard.")
@click.option("--shard-size", type=int, default=256, show_default=True,
              help="Images per shard: the unit written, recorded, retried and resumed.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (each loads the pipeline once), or Ray actors with --ray.")
@click.option("--ray", "use_ray", is_flag=True, help="Run the workers as Ray actors (pip install 'ditrt[ray]').")
@click.option("--address", help="Ray cluster address [a local Ray started here].")
@click.option("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor [0].")
@click.option("--npz", "npz_path", type=click.Path(path_type=Path),
              help="Also write the ADM evaluator's .npz: arr_0 uint8 (N, H, W, 3), the labels as arr_1 and labels.")
@click.option("--png", is_flag=True, help="Also write png/NNNNNN.png per image (as sample_ddp.py names them).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out: verify its finished shards, compute the missing ones. A different "
                   "artifact or option is refused.")
@click.option("--private-key", type=click.Path(path_type=Path),
              help=f"Sign the run record (run.sig beside run.json) after every shard, so that --resume --public-key "
                   f"refuses a rewritten record ({PRIVATE_KEY_HELP}).")
def generate(artifact, num_images, out_dir, labels, batch, shard_size, workers, use_ray, address, gpus_per_worker,
             npz_path, png, resume, private_key, **options) -> None:
    """Generate N images in resumable shards, as the official sample_ddp.py (for FID or synthetic
    data): identical whatever the number of workers. Prints one JSON summary line."""
    from ditrt.runtime.jobs import generate as G
    from ditrt.runtime.core.progress import JobProgress
    with project_errors():
        spec, load = _sampling_request(options)
        job = G.GenerateJob(artifact, out_dir, num_images, labels, spec.seed, spec, batch, shard_size, png, npz_path,
                            resume, private_key, load)
        try:
            summary = G.generate(job, G.Workers(workers, use_ray, address, gpus_per_worker),
                                 progress=JobProgress() if options["progress"] else None, log=_log)
        except G.RunMismatch as e:  # the record's option names, said as this command's flags
            raise InputError(e.describe(_generate_flag)) from None
    click.echo(json.dumps(summary.to_dict()))


# A run record's options by the flag that sets them (a sampler's own options are --option NAME=VALUE).
GENERATE_FLAGS = {"num_images": "--num-images", "seed": "--seed", "labels": "--labels", "shard_size": "--shard-size",
                  "batch": "--batch", "sampler": "--sampler", "num_steps": "--steps", "cfg_scale": "--cfg-scale",
                  "guidance": "--guidance", "eta": "--eta", "backend": "--backend", "precision": "--precision",
                  "max_batch": "--max-batch", "decoder_precision": "--decoder-precision",
                  "output": "output (images with a decoder, latents without)"}


def _generate_flag(option: str) -> str:
    return GENERATE_FLAGS.get(option, f"--option {option}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--num-images", type=int, default=1000, show_default=True,
              help="Images per configuration (balanced labels; image i's label and noise from (seed, i)).")
@sampling_options
@click.option("--compare", "compares", multiple=True, metavar="KEY=VALUE,...",
              help="Another configuration over the base options above, e.g. 'sampler=ddim,steps=50' or "
                   "'precision=fp16' or 'cache=taylorseer,cache_interval=3' (keys: sampler, steps, cfg_scale, "
                   "guidance, eta, backend, precision, decoder_precision, cache, a cache option, or a sampler option). Repeatable; each is scored against the first (the base).")
@click.option("--batch", type=int, default=100, show_default=True, help="Images per sampling call.")
@click.option("--classifier", type=click.Path(path_type=Path),
              help="The digit classifier (.npz) [the one shipped with the example, exporter/data/digits].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--labels", default="balanced", show_default=True,
              help="balanced: every class; or comma-separated class numbers or names (e.g. 3,7) the images are "
                   "balanced over.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Also draw Frechet distance and accuracy against images/s (and block evaluations) as a PNG "
                   "(needs matplotlib: pip install 'ditrt[quality]').")
def quality(artifact, num_images, compares, batch, classifier, json_path, labels, plot_path, **options) -> None:
    """Score what each configuration costs: sample N images, decode them and report the digit
    classifier's accuracy, the Frechet distance, precision and recall against the real digits,
    and images/s, each relative to the first configuration (the digits example; needs
    scikit-learn: pip install 'ditrt[quality]')."""
    import ditrt.exporter
    from ditrt.runtime.jobs import quality as Q
    from ditrt.runtime.core.files import Input, check_outputs, write_json_atomic
    from ditrt.runtime.jobs.plots import check_plot_target, plot_report
    with project_errors():
        if plot_path:
            check_plot_target(plot_path)
        spec, load = _sampling_request(options)
        base = Q.QualityRun("base", spec, load)
        runs = [base, *(Q.parse_run(text, base) for text in compares)]
        path = classifier or Path(ditrt.exporter.__file__).resolve().parent / "data" / "digits" / "classifier.npz"
        check_outputs([("--json", json_path), ("--plot", plot_path)],
                      [*runtime.load_manifest(artifact).inputs(), Input("the --classifier", path)])
        report = Q.compare(artifact, runs, Q.DigitClassifier.load(path), num_images, spec.seed, batch, load.threads,
                           log=_log if options["progress"] else lambda m: None, labels=labels)
        if json_path:
            write_json_atomic(json_path, report)
        if plot_path:
            _log(f"wrote {plot_report(report, plot_path)}")
    click.echo(Q.format_report(report))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="PNG grid, as sample.py writes it.")
@click.option("--out-dir", type=click.Path(path_type=Path), help="One PNG per image, 000000.png ...")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--decoder-precision", type=DECODER_PRECISIONS, help="Decoder graph precision.")
@THREADS_OPTION
@click.option("--verify/--no-verify", default=True, show_default=True)
def decode(artifact, latents, out_path, out_dir, backend, decoder_precision, threads, verify) -> None:
    """Decode saved latents (N, C, H, W) .npy with ARTIFACT's VAE decoder into PNGs."""
    from ditrt.runtime.core.files import Input
    from ditrt.runtime.jobs.outputs import OutputPlan, load_latents
    from ditrt.runtime.execution.pipeline import decode as run_decoder
    if out_path is None and out_dir is None:
        raise click.UsageError("give --out GRID.png and/or --out-dir DIR")
    if out_path is not None and out_path.suffix.lower() != ".png":
        raise click.UsageError(f"--out {out_path}: decode writes a PNG grid (a .png name)")
    with project_errors():
        manifest = runtime.load_manifest(artifact)
        plan = OutputPlan(None, out_path, out_dir).checked()
        array = load_latents(latents, manifest.model.latent_shape)
        plan.refuse_inputs([*manifest.inputs(), Input("the latents input", latents)], len(array))
        decoder = runtime.create_backend(manifest, backend, decoder_precision, "decoder", threads=threads, verify=verify)
        click.echo(", ".join(plan.write(array, lambda x: run_decoder(decoder, x), log=_log)))


# ---- verify -------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--accept-manifest-edits", is_flag=True,
              help="Record the current manifest.json as intended (rewrites manifest.sha256) after a deliberate "
                   "edit; the manifest must still load. Then verify as usual.")
@click.option("--public-key", type=click.Path(path_type=Path),
              help="Also check the artifact's signature (model.sig) with this PEM public key, and every file it "
                   "covers: a changed, added or removed file fails (pip install 'ditrt[sign]').")
def verify(artifact, accept_manifest_edits, public_key) -> None:
    """Check ARTIFACT: the manifest against the digest recorded at export (manifest.sha256), and
    every file it names (graphs, external data, TensorRT plans) against the manifest; with
    --public-key, its signature and every file the signature covers.

    Exit code 0: everything matches; 1: a file is missing or changed, or the manifest was edited
    since export, or the signature is missing or does not verify; 2: the artifact or its manifest
    is unusable (no denoiser graph, a bad field).
    """
    from ditrt.runtime.artifact.manifest import DIGEST_NAME, write_manifest_digest
    if accept_manifest_edits and public_key is not None:
        raise click.UsageError("--accept-manifest-edits rewrites manifest.sha256, which the signature covers: verify "
                               "with --public-key first, then sign again after the edit")
    with project_errors():
        manifest = runtime.load_manifest(artifact)  # a manifest that does not load is never accepted
        if accept_manifest_edits:
            digest = write_manifest_digest(manifest.directory)
            click.echo(f"accepted the current manifest.json (sha256 {digest[:16]}...): recorded in {DIGEST_NAME}")
        results = manifest.verify_all()
        if public_key is not None:
            from ditrt.runtime.artifact.signing import verify_path
            results += [(r.name, r.what, r.problem) for r in verify_path(manifest.directory, public_key)]
    width = max(len(str(name)) for name, _, _ in results)
    for name, what, problem in results:
        click.echo(f"{str(name):<{width}}  {what:<28} {'ok' if problem is None else 'FAIL: ' + problem}")
    failed = list(dict.fromkeys(name for name, _, problem in results if problem))
    against = "the manifest" + (" and its signature" if public_key is not None else "")
    bad = sum(1 for _, _, problem in results if problem)
    click.echo(f"verify: {len(results) - bad}/{len(results)} files match {against}" +
               (f"; FAILED: {', '.join(map(str, failed))}" if failed else ""))
    sys.exit(1 if failed else 0)


# ---- sign ---------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--private-key", type=click.Path(path_type=Path), required=True, help=PRIVATE_KEY_HELP + ".")
def sign(artifact, private_key) -> None:
    """Sign ARTIFACT with OpenSSF model-signing: ARTIFACT/model.sig covers every file in the folder
    (manifest, manifest.sha256, graphs, data files, plans). The artifact must verify first
    (`ditrt verify`): a changed file is never signed. Check with `ditrt verify ARTIFACT --public-key PUB`."""
    from ditrt.runtime.artifact.signing import sign_artifact
    with project_errors():
        signature, count = sign_artifact(artifact, private_key)
    click.echo(f"signed {count} files of {artifact}: {signature}")


# ---- parity -------------------------------------------------------------------------------------

@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--against", help="'reference' (the PyTorch model, needs torch) or a golden .npz saved with --save-golden.")
@click.option("--backends", default="onnxruntime-fp32,onnxruntime-fp16", show_default=True,
              help=f"Comma-separated backend ids: {', '.join(backend_ids())} (a kind alone: its default precision).")
@click.option("--steps", type=int, help="Model calls of each sampler's loop check against reference [25].")
@click.option("--batch", "batches", help="Batch sizes of the per-forward checks against reference [1,3,8].")
@click.option("--max-rel-err", "max_rel_errs", multiple=True,
              help="Bound on max error relative to the reference's largest magnitude: X for every backend, or BACKEND=X. Repeatable.")
@click.option("--atol", type=float, help="Use an allclose test |a - r| <= atol + rtol |r| instead of --max-rel-err.")
@click.option("--rtol", type=float, help="See --atol.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON report.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Write a JUnit XML report (one testcase per check).")
@click.option("--save-golden", type=click.Path(path_type=Path), help="Run the PyTorch reference once and save inputs, noise and outputs.")
@click.option("--activation-ranges", is_flag=True, help="Largest |activation| per block and branch, flagged near the fp16 range.")
@click.option("--headroom", type=float, default=8.0, show_default=True, help="--activation-ranges flags branches above 65504 / headroom (>= 1).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Weights for the PyTorch reference, if the manifest's source path is not here.")
@click.option("--precision", type=PRECISIONS,
              help="Graph precision of each --backends kind named without one [without --backends: onnxruntime-PRECISION].")
@THREADS_OPTION
@MAX_MODEL_CALLS_OPTION
@PUBLIC_KEY_OPTION
def parity(artifact, against, backends, steps, batches, max_rel_errs, atol, rtol, json_path, junit_path, save_golden,
           activation_ranges, headroom, checkpoint, precision, threads, max_model_calls, public_key) -> None:
    """Numerical parity of an artifact's backends against the PyTorch reference or a golden file.

    Exit code 0: every check within bounds; 1: some check out of bounds; 2: usage or artifact error.
    """
    from ditrt.runtime.jobs import parity as P
    from ditrt.runtime.core.files import Input, check_outputs
    if sum([bool(against), bool(save_golden), activation_ranges]) != 1:
        raise click.UsageError("give exactly one of --against, --save-golden or --activation-ranges")
    mode = "--against" if against else "--save-golden" if save_golden else "--activation-ranges"
    used = {"--against": {"backends", "steps", "batches", "max_rel_errs", "atol", "rtol", "json_path", "junit_path",
                          "checkpoint", "threads", "max_model_calls", "precision"},
            "--save-golden": {"steps", "batches", "checkpoint", "max_model_calls"},
            "--activation-ranges": {"headroom", "json_path", "checkpoint"}}[mode]
    ctx = click.get_current_context()
    unused = [p.opts[0] for p in ctx.command.params if p.name not in used | {"artifact", "against", "save_golden",
                                                                              "activation_ranges", "public_key"}
              and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if unused:
        raise click.UsageError(f"{' and '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply with {mode}")
    with project_errors(all_input=True):
        P.check_bound_options(max_rel_errs, atol, rtol)  # before the reference runs
    needs_torch = activation_ranges or save_golden or against == "reference"
    if needs_torch:
        _require_torch("parity --against reference" if against else "parity", exit_code=2)
    with project_errors(all_input=True):
        if public_key is not None:
            from ditrt.runtime.artifact.signing import require_signature
            require_signature(artifact, public_key)
        manifest = runtime.load_manifest(artifact)
        check_outputs([("--json", json_path), ("--junit", junit_path), ("--save-golden", save_golden)],
                      [*manifest.inputs(), Input("the --against golden file", None if against in (None, "reference")
                                                 else Path(against)), Input("the --checkpoint", checkpoint)])
        if activation_ranges:
            from ditrt.exporter.parity_reference import activation_report, format_activation_report
            report = activation_report(manifest, checkpoint, headroom)
            click.echo(format_activation_report(report))
            if json_path:
                from ditrt.runtime.core.files import write_json_atomic
                write_json_atomic(json_path, report)
            return
        if against == "reference" or save_golden:
            from ditrt.exporter.parity_reference import reference_golden
            golden = reference_golden(manifest, _int_list(batches, "--batch") if batches else [1, 3, 8],
                                      25 if steps is None else steps, checkpoint, log=_log,
                                      max_model_calls=max_model_calls)
        else:
            given = [flag for flag, value in (("--steps", steps), ("--batch", batches)) if value is not None]
            golden = P.load_golden(against, manifest, given)
        if save_golden:
            golden.save(save_golden)
            click.echo(f"saved {len(golden.forward)} forward and {len(golden.loops)} loop references to {save_golden}")
            return
        if precision and ctx.get_parameter_source("backends") != click.core.ParameterSource.COMMANDLINE:
            backends = "onnxruntime"
        names = [b.strip() for b in backends.split(",") if b.strip()]
        results = P.run_parity(manifest, golden, P.with_precision(names, precision), max_rel_errs,
                               atol, rtol, threads, checkpoint, log=_log, max_model_calls=max_model_calls)
    click.echo(P.format_table(results))
    meta = {"artifact": str(artifact), "against": against, "golden": golden.meta,
            "backends": sorted({r.backend for r in results})}
    with project_errors(all_input=True):
        if json_path:
            P.write_json(results, json_path, meta)
        if junit_path:
            P.write_junit(results, junit_path)
    click.echo(P.summary(results))
    sys.exit(0 if all(r.passed for r in results) else 1)


# ---- build --------------------------------------------------------------------------------------

from ditrt.runtime.execution.trt.settings import HARDWARE_COMPAT as _HARDWARE_COMPAT  # noqa: E402  (pure: no TensorRT import)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--network", default="all", show_default=True,
              help="Network to build: denoiser, decoder, or all of the artifact's networks.")
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8", "fp8"]), default="fp16", show_default=True,
              help="Graph to build from (fp32: a strongly typed build of the fp32 graph; int8 / fp8: of the denoiser's "
                   "QDQ graph; the decoder then builds fp16, or fp32 without an fp16 graph).")
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
              help="none: GPUs of this compute capability (other models with a TensorRT warning; rebuild there for the best "
                   "tactics); ampere+: any GPU of compute capability >= 8.0; same-cc: any GPU "
                   "of this compute capability (portable plans may be slower).")
@click.option("--version-compatible", is_flag=True,
              help="The plan also runs on newer TensorRT releases of the same major, and across the majors TensorRT "
                   "supports (8 -> 10, 10 -> 11); it embeds host code (may be slower).")
@click.option("--workspace", type=float, help="Builder workspace limit in GB [TensorRT's default].")
@click.option("--skip-unavailable", is_flag=True,
              help="Where TensorRT or a GPU is missing, say so and exit 0 (for scripts that build where possible).")
@click.option("--private-key", type=click.Path(path_type=Path),
              help="Re-sign the artifact after the build (its old signature must verify with this key's public key "
                   "first). A signed artifact is refused without it: the plans would not be covered. "
                   f"{PRIVATE_KEY_HELP}.")
def build(artifact, network, precision, decoder_precision, min_batch, opt_batch, max_batch, opt_level, timing_cache,
          hardware_compat, version_compatible, workspace, skip_unavailable, private_key) -> None:
    """Build TensorRT plans from ARTIFACT's graphs and record them in the manifest.

    The network is strongly typed (TensorRT 11 has no fp16 flag: precision comes from the graph).
    Each plan is parity-checked against ONNX Runtime on the fp32 graph before it is recorded. Needs
    pip install 'ditrt[trt]' and an NVIDIA GPU; torch is not needed.
    """
    import contextlib
    from ditrt.runtime.jobs.build import build_all
    from ditrt.runtime.artifact.signing import check_before_build, sign_after_build
    from ditrt.runtime.execution.trt.settings import BuildFlags
    try:
        with project_errors(), contextlib.redirect_stdout(sys.stderr):  # Polygraphy logs to stdout
            check_before_build(artifact, private_key)
            flags = BuildFlags(opt_level, hardware_compat, version_compatible, workspace,
                               str(timing_cache) if timing_cache else None)
            built = build_all(artifact, network, precision, decoder_precision, min_batch, opt_batch, max_batch, flags,
                              log=_log)
            if private_key is not None:
                _log(f"re-signed {artifact}: {sign_after_build(artifact, private_key)}")
    except _Failed as e:
        if skip_unavailable and isinstance(e.__context__, TensorRTUnavailable):
            _log(f"skipped the TensorRT build: {e.message}")
            return
        raise
    for entry in built:
        click.echo(str(Path(artifact) / entry["file"]))


# ---- serve --------------------------------------------------------------------------------------

RAY_ONLY = ("replicas", "address")  # serve options that apply to --ray only
SERVER_HTTP = HttpLimits()  # the server's defaults, stated once (ditrt/serve/parsing.py)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--policy", type=click.Choice(["step", "serial", "request"]), default="step", show_default=True,
              help="step: continuous batching; serial: one request at a time; request: whole-request batches.")
@BACKEND_OPTION
@PRECISION_OPTION
@THREADS_OPTION
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every file the backends read against the manifest's sha256 first.")
@HOST_CODE_OPTION
@DECODER_PRECISION_OPTION
@PUBLIC_KEY_OPTION
@click.option("--max-batch", type=int, help="Rows per denoiser call [the engine's limit; else 64 on a GPU, 16 on a CPU].")
@click.option("--max-rows", type=int, help="Rows of the running requests together [--max-batch].")
@click.option("--max-images", type=int, help="Images (labels) per request [--max-rows / 2].")
@click.option("--max-steps", type=int, help="Model calls per request; adaptive samplers stop there [1000].")
@click.option("--max-queue", type=int, help="Requests admitted and waiting to start [64].")
@click.option("--decode-batch", type=int, help="Images per decoder call [the engine's limit; else 8 GPU, 4 CPU].")
@click.option("--max-body-bytes", type=int, default=SERVER_HTTP.max_body_bytes, show_default=True,
              help="Largest request body (413).")
@click.option("--body-timeout", type=float, default=SERVER_HTTP.body_timeout, show_default=True,
              help="Seconds to receive a body (408).")
@click.option("--discard-bytes", type=int, default=SERVER_HTTP.discard_bytes, show_default=True,
              help="A body refused with 413 is read and dropped up to this many bytes (within --body-timeout), so "
                   "a client that sends before it reads gets the answer; 0: close at once.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True,
              help="A request's deadline in seconds, and the most it may ask for; admission refuses (429) what "
                   "would miss it.")
@click.option("--drain-timeout", type=float, default=SERVER_HTTP.drain_timeout, show_default=True,
              help="On SIGTERM: seconds to finish admitted requests (new ones get 503), then exit 0.")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve (pip install 'ditrt[ray]').")
@click.option("--replicas", type=int, default=1, show_default=True, help="Ray Serve replicas, each with its own scheduler.")
@click.option("--address", help="Ray cluster address (auto: the running cluster) [a local Ray].")
def serve(artifact, host, port, policy, backend, precision, threads, verify, allow_plan_host_code, decoder_precision,
          public_key, max_batch, max_rows, max_images, max_steps, max_queue, decode_batch, max_body_bytes,
          body_timeout, discard_bytes, timeout, drain_timeout, use_ray, replicas, address):
    """Serve class-conditional sampling over HTTP: POST /v1/samples, GET /v1/model, /v1/health,
    /v1/health/live, /v1/health/ready, /metrics (docs/serving.md). Bounded by default; SIGTERM drains."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in RAY_ONLY
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given and not use_ray:
        raise click.UsageError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --ray only "
                               f"(Ray Serve); add --ray or leave {'it' if len(given) == 1 else 'them'} out")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from ditrt import serve as serving
    except ImportError as e:
        raise _Failed(f"ditrt serve needs fastapi, uvicorn and prometheus_client: pip install 'ditrt[serve]' ({e})",
                      2) from None
    with project_errors():
        http = serving.HttpLimits(max_body_bytes, body_timeout, drain_timeout, discard_bytes=discard_bytes)
        load = LoadOptions(backend=backend, precision=precision, threads=threads, verify=verify,
                           decoder_precision=decoder_precision, allow_plan_host_code=allow_plan_host_code,
                           public_key=public_key)
        serving.run(artifact, host, port, use_ray, replicas, address, http, log=_log, load=load, policy=policy,
                    timeout=timeout, max_batch=max_batch, max_rows=max_rows, max_images=max_images,
                    max_steps=max_steps, max_queue=max_queue, decode_batch=decode_batch)


if __name__ == "__main__":
    sys.exit(main())
