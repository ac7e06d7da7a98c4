"""Layer 5, running a sampling request on an engine: the backend protocol and chunker, the backend
registry (ONNX Runtime, TensorRT in `trt/`), feature caching, and the pipeline (`load`, `Pipeline`,
`SampleRun`). Imports every layer below; never a job."""
