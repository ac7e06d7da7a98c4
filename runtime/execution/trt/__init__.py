"""TensorRT, one module per job, none of which imports tensorrt at import time:

- `settings`: what a plan is built with and called (profile, flags, names, the rebuild command);
- `compat`: which plan may run here (the rules, the choice, the messages);
- `device`: this machine's TensorRT, CUDA runtime and GPU;
- `backend`: running a plan (the runtime's `tensorrt` backend).

Two TensorRT modules live in other layers: the version names an engine entry records
(`ditrt.runtime.artifact.versions`, read by the manifest) and `ditrt build`, a job
(`ditrt.runtime.jobs.build`).
"""
