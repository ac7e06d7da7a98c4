"""ditrt exporter: the reference DiT, checkpoint loading, ONNX export and TensorRT engine building.

Import submodules directly (exporter.model, exporter.checkpoints, ...): this package itself imports
nothing heavy, so torch-free commands (ditrt build) can use exporter.trt_build without torch."""
