"""The PyTorch reference backend: the reference DiT behind the runtime's backend protocol."""
from __future__ import annotations

import numpy as np
import torch

from .model import DiT


class TorchBackend:
    def __init__(self, model: DiT, device: str = "cpu", max_batch: int | None = None):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.name = f"torch-{self.device.type}-{str(model.pos_embed.dtype).replace('torch.', '')}"

    @torch.no_grad()
    def __call__(self, latent: np.ndarray, timestep: np.ndarray, class_label: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(latent).to(self.device), torch.from_numpy(timestep).to(self.device),
                         torch.from_numpy(class_label).to(self.device))
        return out.float().cpu().numpy()
