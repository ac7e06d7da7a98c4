"""The PyTorch reference backend: an artifact's source models behind the runtime's backend protocol
(named tensors in and out), registered with the runtime as backend kind `torch` through the
`ditrt.backends` entry point (pyproject.toml), so the runtime never imports the exporter. torch is
imported when a backend is made: listing the kind costs nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ditrt.runtime.execution.backends import BackendKind
from ditrt.runtime.execution.chunking import BackendBase
from ditrt.runtime.core.errors import BackendError, InputError
from ditrt.runtime.artifact.manifest import Manifest
from ditrt.runtime.spec.networks import NetworkSpec


class TorchBackend(BackendBase):
    """A torch module over a network's named tensors (inputs in the spec's order, its one output)."""

    def __init__(self, module, network: NetworkSpec, device: str = "cpu", max_batch: int | None = None,
                 precision: str = "fp32"):
        import torch
        super().__init__(network, "torch", precision, max_batch)
        self.model = module.eval().to(device)
        self.device = torch.device(device)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self.network.input_names]
        with torch.no_grad():
            return {self.network.output.name: self.model(*args).float().cpu().numpy()}


def reference_backend(manifest: Manifest, network: str, precision: str, checkpoint: str | Path | None = None,
                      device: str = "cpu", max_batch: int | None = None, **_) -> TorchBackend:
    """The artifact's source model in PyTorch (the registry's `torch` backend)."""
    try:
        from .model import set_precision
        from .reference import reference_decoder, reference_model
    except ImportError as e:
        raise BackendError(f"the torch backend needs PyTorch and ditrt[export] ({e})") from None
    if network == "decoder":  # diffusers' AutoencoderKL, as the official scripts decode
        return TorchBackend(reference_decoder(manifest, precision), manifest.network("decoder"), device, max_batch,
                            precision)
    if network != "denoiser":
        raise InputError(f"the torch backend has no reference for the {network} network")
    model = reference_model(manifest, checkpoint)
    if precision == "fp16":
        model = set_precision(model, "fp16")
    return TorchBackend(model, manifest.network("denoiser"), device, max_batch, precision)


TORCH_BACKEND = BackendKind("torch", "the PyTorch reference model (needs torch and the source weights)",
                            ("fp32", "fp16"), "fp32", reference_backend)
