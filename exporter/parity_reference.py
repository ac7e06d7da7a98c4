"""The PyTorch side of `ditrt parity`: the reference model of an artifact, golden generation and
per-block activation ranges (to decide which blocks an fp16 graph should keep float32)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditrt.runtime.errors import ArtifactError
from ditrt.runtime.manifest import Manifest
from ditrt.runtime.parity import Golden, make_golden
from ditrt.runtime.pipeline import Pipeline

from .checkpoints import load_checkpoint
from .model import DiT, random_init
from .torch_backend import TorchBackend

FP16_MAX = 65504.0


def reference_model(manifest: Manifest, checkpoint: str | Path | None = None) -> DiT:
    """The fp32 PyTorch model the artifact was exported from: its source checkpoint (sha256
    checked), `checkpoint` when given, or the same random init."""
    config = manifest.model
    source = manifest.data["source"]
    if checkpoint is None and source["kind"] == "random-init":
        return random_init(DiT(config), source["seed"])
    path = Path(checkpoint or source["path"])
    if checkpoint is not None and not path.is_file():
        raise ArtifactError(f"--checkpoint {path}: file not found")
    if not path.is_file():
        raise ArtifactError(f"the artifact's source checkpoint {path} is not on this machine; pass --checkpoint PATH "
                            "(or compare against a golden file saved where it was)")
    ckpt = load_checkpoint(path, num_heads=config.num_heads)
    if checkpoint is None and ckpt.sha256 != source["sha256"]:
        raise ArtifactError(f"{path} changed since the export (sha256 {ckpt.sha256[:12]}... vs {source['sha256'][:12]}... "
                            "in the manifest); pass the right --checkpoint or re-export")
    if ckpt.config != config:
        raise ArtifactError(f"{path} is a different model than the artifact's ({ckpt.config} vs {config})")
    return ckpt.build_model()


def reference_decoder(manifest: Manifest, precision: str = "fp32"):
    """The decoder network's source VAE folder (sha256 checked) as the exported module."""
    from .vae import DecoderGraph, load_vae
    source = manifest.network("decoder").extra.get("source", {})
    folder = Path(source.get("path", ""))
    if not folder.is_dir():
        raise ArtifactError(f"the decoder's source VAE folder {folder} is not on this machine (compare against a "
                            "golden file saved where it was)")
    loaded = load_vae(folder, in_channels=manifest.model.in_channels)
    if loaded.sha256 != source.get("sha256"):
        raise ArtifactError(f"{loaded.weights_path} changed since the export (sha256 differs from the manifest's); "
                            "re-export")
    return DecoderGraph(loaded, precision)


def reference_golden(manifest: Manifest, batches: list[int], steps: int, checkpoint: str | Path | None = None,
                     log: Callable[[str], None] = lambda m: None) -> Golden:
    backend = TorchBackend(reference_model(manifest, checkpoint), manifest.network("denoiser"))
    forward = {"denoiser": backend}
    if "decoder" in manifest.networks:
        from .torch_backend import DecoderBackend
        forward["decoder"] = DecoderBackend(reference_decoder(manifest), manifest.network("decoder"))
    meta = {"reference": "PyTorch fp32 eager (exporter.model)", "torch": torch.__version__,
            "artifact_source": manifest.data["source"]}
    return make_golden(forward, Pipeline(backend, manifest), manifest, batches, steps, meta, log)


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
