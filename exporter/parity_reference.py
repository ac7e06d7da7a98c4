"""The PyTorch side of `ditrt parity`: the reference model of an artifact, golden generation and
per-block activation ranges (to decide which blocks an fp16 graph should keep float32)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditrt.runtime.core.errors import InputError
from ditrt.runtime.artifact.manifest import Manifest
from ditrt.runtime.jobs.parity import Golden, make_golden
from ditrt.runtime.execution.pipeline import Pipeline
from ditrt.runtime.core.validate import check_number

from .model import DiT
from .reference import reference_decoder, reference_model
from .torch_backend import TorchBackend

FP16_MAX = 65504.0


def reference_golden(manifest: Manifest, batches: list[int], steps: int, checkpoint: str | Path | None = None,
                     log: Callable[[str], None] = lambda m: None, max_model_calls: int | None = None) -> Golden:
    """Run the PyTorch reference once over the check set: per-forward checks at `batches` and one
    loop of about `steps` model calls per sampler of the artifact's family (`max_model_calls`
    budgets the adaptive ones)."""
    from ditrt.runtime.core.validate import check_int
    if not batches:
        raise InputError("--batch needs at least one batch size")
    batches = [check_int(b, "--batch sizes", 1, 4096) for b in batches]
    steps = check_int(steps, "--steps", 2, 10_000)
    backend = TorchBackend(reference_model(manifest, checkpoint), manifest.network("denoiser"))
    forward = {"denoiser": backend}
    if "decoder" in manifest.networks:
        forward["decoder"] = TorchBackend(reference_decoder(manifest), manifest.network("decoder"))
    meta = {"reference": "PyTorch fp32 eager (exporter.model)", "torch": torch.__version__,
            "artifact_source": manifest.data.get("source")}
    return make_golden(forward, Pipeline(backend, manifest), manifest, batches, steps, meta, log, max_model_calls)


BRANCHES = {  # name -> (module path inside a block, whether to record its input instead of its output)
    "adaLN": ("adaLN_modulation", False),
    "attn_in": ("attn", True),  # modulated LayerNorm output
    "qkv": ("attn.qkv", False),
    "attn_out": ("attn.proj", False),
    "mlp_fc1": ("mlp.fc1", False),  # GELU input
    "mlp_out": ("mlp.fc2", False),
    "residual": ("", False),  # the block's output: the residual stream
}


def activation_ranges(model: DiT, timesteps: list[float], labels: list[int], seed: int = 0,
                      headroom: float = 8.0) -> dict:
    """Largest |activation| per block and branch over every (timestep, label) pair, run in fp32.
    A block is flagged when a branch exceeds FP16_MAX / headroom (later ops such as
    x * (1 + scale) can still grow it) and marked as overflowing above FP16_MAX."""
    cfg = model.config
    peaks = np.zeros((cfg.depth, len(BRANCHES)))
    hooks = []
    for b, block in enumerate(model.blocks):
        for j, (module_path, use_input) in enumerate(BRANCHES.values()):
            module = block.get_submodule(module_path) if module_path else block

            def record(mod, inputs, output, b=b, j=j, use_input=use_input):
                value = inputs[0] if use_input else output
                peaks[b, j] = max(peaks[b, j], float(value.detach().abs().max()))
            hooks.append(module.register_forward_hook(record))
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([float(v) for v in timesteps for _ in labels])
    y = torch.tensor([int(v) for _ in timesteps for v in labels])
    x = torch.randn(len(t), cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    try:
        with torch.no_grad():
            model.float()(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    limit = FP16_MAX / headroom
    blocks = []
    for b in range(cfg.depth):
        row = dict(zip(BRANCHES, peaks[b].tolist()))
        worst = max(row, key=row.get)
        status = "overflow" if row[worst] >= FP16_MAX else "near" if row[worst] >= limit else "ok"
        blocks.append({"block": b, **row, "worst_branch": worst, "fraction_of_fp16_max": row[worst] / FP16_MAX,
                       "status": status})
    flagged = [b["block"] for b in blocks if b["status"] != "ok"]
    return {"timesteps": list(timesteps), "labels": list(labels), "fp16_max": FP16_MAX, "headroom": headroom,
            "flag_above": limit, "blocks": blocks, "flagged_blocks": flagged,
            "suggestion": (f"ditrt export ... --fp32-blocks {','.join(map(str, flagged))}" if flagged
                           else "every block stays well inside the fp16 range")}


def decoder_activation_ranges(graph, latents: np.ndarray, headroom: float = 8.0) -> dict:
    """Largest |activation| at each stage of the VAE decoder (post_quant_conv, conv_in, the mid
    block, each up block, the output conv) over DiT-scale `latents`, run in fp32, flagged like
    the denoiser's blocks. fp16 VAE decoders are the best-known source of NaN / black images: a
    flagged stage means build the decoder in fp32 (--decoder-precision fp32)."""
    stages = {"post_quant_conv": graph.post_quant_conv, "conv_in": graph.decoder.conv_in,
              "mid_block": graph.decoder.mid_block,
              **{f"up_block {i}": block for i, block in enumerate(graph.decoder.up_blocks)},
              "conv_out": graph.decoder.conv_out}
    peaks: dict[str, float] = {}
    hooks = []
    for name, module in stages.items():
        if module is None:
            continue

        def record(mod, inputs, output, name=name):
            peaks[name] = max(peaks.get(name, 0.0), float(output.detach().abs().max()))
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            graph.float()(torch.from_numpy(np.asarray(latents, np.float32)))
    finally:
        for h in hooks:
            h.remove()
    limit = FP16_MAX / headroom
    rows = [{"stage": name, "max_abs": value, "fraction_of_fp16_max": value / FP16_MAX,
             "status": "overflow" if value >= FP16_MAX else "near" if value >= limit else "ok"}
            for name, value in peaks.items()]
    flagged = [r["stage"] for r in rows if r["status"] != "ok"]
    return {"fp16_max": FP16_MAX, "headroom": headroom, "flag_above": limit, "stages": rows, "flagged_stages": flagged,
            "suggestion": ("build the decoder in fp32: ditrt build ARTIFACT --decoder-precision fp32" if flagged
                           else "every decoder stage stays well inside the fp16 range")}


def activation_report(manifest: Manifest, checkpoint=None, headroom: float = 8.0) -> dict:
    """`ditrt parity --activation-ranges`: the denoiser's blocks over timesteps across its range and
    labels (the null class included), and the decoder's stages over typical and 3-sigma latents."""
    headroom = check_number(headroom, "--headroom", 1.0)  # below 1 the flag line would sit above fp16's range
    k = manifest.model.num_classes
    low, high = manifest.network("denoiser").input("time").range
    times = [low + (high - low) * f for f in (0, 0.1, 0.25, 0.5, 0.75, 1.0)]
    report = activation_ranges(reference_model(manifest, checkpoint), times, [0, k // 2, k - 1, k], headroom=headroom)
    if "decoder" in manifest.networks:
        spec = manifest.network("decoder")
        name = spec.input("latent").name
        latents = np.concatenate([spec.example_inputs(4, seed)[name] * scale for seed, scale in ((0, 1.0), (1, 3.0))])
        report["decoder"] = decoder_activation_ranges(reference_decoder(manifest), latents, headroom)
    return report


def format_activation_report(report: dict) -> str:
    cols = ["block", *list(report["blocks"][0])[1:8], "status"]
    lines = ["  ".join(f"{c:>9}" for c in cols)]
    for b in report["blocks"]:
        lines.append("  ".join(f"{b[c]:>9.4g}" if isinstance(b[c], float) else f"{b[c]!s:>9}" for c in cols))
    lines.append(f"flag above {report['flag_above']:.0f} (fp16 max {report['fp16_max']:.0f} / headroom "
                 f"{report['headroom']:g}); flagged blocks: {report['flagged_blocks'] or 'none'}; {report['suggestion']}")
    decoder = report.get("decoder")
    if decoder:
        for row in decoder["stages"]:
            lines.append(f"decoder {row['stage']:>16}  max |activation| {row['max_abs']:>10.4g}  {row['status']}")
        lines.append(f"decoder: flagged stages: {decoder['flagged_stages'] or 'none'}; {decoder['suggestion']}")
    return "\n".join(lines)
