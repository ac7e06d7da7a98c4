"""The PyTorch reference backend: the reference DiT behind the runtime's backend protocol
(named tensors in and out), registered as backend kind `torch`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import Manifest
from ditrt.runtime.networks import NetworkSpec, denoiser_spec

from .model import DiT, set_precision


class TorchBackend:
    def __init__(self, model: DiT, network: NetworkSpec | None = None, device: str = "cpu",
                 max_batch: int | None = None, precision: str = "fp32"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.network = network or denoiser_spec(model.config)
        self.max_batch = max_batch
        self.min_batch = 1
        self.precision = precision
        self.name = f"torch-{precision}"

    @torch.no_grad()
    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.network.check_feeds(feeds)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self.network.input_names]
        return {self.network.output_names[0]: self.model(*args).float().cpu().numpy()}


def reference_backend(manifest: Manifest, network: str, precision: str, checkpoint: str | Path | None = None,
                      device: str = "cpu", max_batch: int | None = None) -> TorchBackend:
    """The artifact's source model in PyTorch (the registry's `torch` backend)."""
    from .parity_reference import reference_decoder, reference_model
    if network == "decoder":  # diffusers' AutoencoderKL, as the official scripts decode
        return DecoderBackend(reference_decoder(manifest, precision), manifest.network("decoder"), device, max_batch,
                              precision)
    if network != "denoiser":
        raise InputError(f"the torch backend has no reference for the {network} network")
    model = reference_model(manifest, checkpoint)
    if precision == "fp16":
        model = set_precision(model, "fp16")
    return TorchBackend(model, manifest.network("denoiser"), device, max_batch, precision)


class DecoderBackend(TorchBackend):
    """The VAE decoder reference (exporter.vae.DecoderGraph over diffusers' AutoencoderKL)."""

    def __init__(self, graph, network: NetworkSpec, device: str = "cpu", max_batch: int | None = None,
                 precision: str = "fp32"):
        self.model = graph.eval().to(device)
        self.device = torch.device(device)
        self.network, self.max_batch, self.min_batch, self.precision = network, max_batch, 1, precision
        self.name = f"torch-{precision}"
