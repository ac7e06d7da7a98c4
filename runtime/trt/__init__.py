"""TensorRT, one module per job, none of which imports tensorrt at import time:

- `versions`: GPU compute capabilities and TensorRT version strings;
- `settings`: what a plan is built with and called (profile, flags, names, the rebuild command);
- `compat`: which plan may run here (the rules, the choice, the messages);
- `device`: this machine's TensorRT, CUDA runtime and GPU;
- `backend`: running a plan (the runtime's `tensorrt` backend);
- `build`: `ditrt build` (a plan per network, parity-checked, recorded in the manifest).
"""
