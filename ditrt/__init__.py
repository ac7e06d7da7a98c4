"""ditrt: DiT to ONNX and TensorRT, with a torch-free CFG sampling runtime."""
from ditrt.runtime import __version__

__all__ = ["__version__"]
