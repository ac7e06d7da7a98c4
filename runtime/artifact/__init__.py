"""Layer 4, an artifact folder: the manifest (one reader, one writer), class names, signatures and
the GPU / TensorRT version names an engine entry records. Imports `core`, `spec` and `sampling`
(the manifest's defaults name a sampler)."""
