"""Backends: `backend(latent, timestep, class_label) -> model_output`, numpy in and out.

latent float32 (B, C, H, W), timestep float32 (B,) original-scale, class_label int64 (B,);
model_output float32 (B, out_channels, H, W). `max_batch` (None: unlimited) is the largest B
one call takes; `run_batched` splits larger requests into chunks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

INPUT_NAMES = ("latent", "timestep", "class_label")
OUTPUT_NAME = "model_output"


class Backend(Protocol):
    name: str
    max_batch: int | None

    def __call__(self, latent: np.ndarray, timestep: np.ndarray, class_label: np.ndarray) -> np.ndarray: ...


def run_batched(backend: Backend, latent: np.ndarray, timestep: np.ndarray, class_label: np.ndarray) -> np.ndarray:
    limit = backend.max_batch
    if not limit or len(latent) <= limit:
        return backend(latent, timestep, class_label)
    return np.concatenate([backend(latent[s:s + limit], timestep[s:s + limit], class_label[s:s + limit])
                           for s in range(0, len(latent), limit)])


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU EP, or the CUDA EP with IOBinding where onnxruntime-gpu is installed
    (it replaces the onnxruntime package; never install both)."""

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int | None = None,
                 max_batch: int | None = None):
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown ONNX Runtime device {device!r}; use cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("ONNX Runtime has no CUDA execution provider here: install onnxruntime-gpu "
                               "(pip uninstall onnxruntime && pip install 'ditrt[gpu]')")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # TF32 off: fp32 parity is the point of the fp32 graph.
        providers = ([("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
                     if device == "cuda" else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.device = device
        self.max_batch = max_batch
        self.name = f"onnxruntime-{device}"
        self._ort = ort

    def __call__(self, latent: np.ndarray, timestep: np.ndarray, class_label: np.ndarray) -> np.ndarray:
        feeds = dict(zip(INPUT_NAMES, (latent, timestep, class_label)))
        if self.device == "cpu":
            return self.session.run([OUTPUT_NAME], feeds)[0]
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
        binding.bind_output(OUTPUT_NAME, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def onnxruntime_device() -> str:
    """cuda when onnxruntime-gpu with a usable CUDA EP is installed, else cpu."""
    import onnxruntime as ort
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
