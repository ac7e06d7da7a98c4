"""ditrt exporter: the PyTorch side. The reference models (model.py), checkpoint and VAE loading,
the one ONNX export loop (onnx_export.py) with one exporter per network (denoiser.py, decoder.py),
artifacts (artifact.py), the torch reference backend and parity references.

Import submodules directly (ditrt.exporter.artifact, ...): this package imports nothing itself, so
the `torch` backend plugin can be listed without importing torch."""
