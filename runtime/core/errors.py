"""The project's errors: one base class, and two kinds that decide the CLI's exit code.

- `InputError` (exit 2): the caller's input cannot work: an option value, a file, an artifact or
  manifest, a checkpoint. Fix the input and run again.
- `StepError` (exit 1): the input was fine but a step failed: export validation, a TensorRT
  build, a backend failing mid-loop, a missing toolchain (TensorRT, a GPU).

Anything else that escapes is a bug in ditrt and is reported as one (a traceback), never as bad
input. `InputError` is also a `ValueError` and `StepError` a `RuntimeError`, so callers that
catch the built-in kinds keep working.
"""
from __future__ import annotations


class DitrtError(Exception):
    """Base of every error ditrt raises on purpose."""
    exit_code = 1


class InputError(DitrtError, ValueError):
    """Bad input: options, files, artifacts, manifests, checkpoints (exit code 2)."""
    exit_code = 2


class StepError(DitrtError, RuntimeError):
    """A step failed on valid input (exit code 1)."""
    exit_code = 1


class ArtifactError(InputError):
    """A missing, corrupt or incompatible artifact or manifest, with the reason in the message."""


class ScheduleError(InputError):
    """An impossible step specification for the chosen sampler."""


class CallBudgetReached(InputError):
    """An adaptive sampler made its budget of model calls (max_model_calls) without reaching the end:
    its tolerances ask for more than the budget allows."""


class BackendError(StepError):
    """A backend (ONNX Runtime, TensorRT, a callback) failed while running a network."""


TENSORRT_INSTALL_HINT = ("TensorRT engines need TensorRT, Polygraphy and cuda-python: pip install 'ditrt[trt]', "
                         "and an NVIDIA GPU with its driver. Without them, use the ONNX Runtime backend "
                         "(--backend onnxruntime).")


class TensorRTUnavailable(StepError):
    """tensorrt, polygraphy or cuda-python is missing, or there is no usable NVIDIA GPU: the
    message says which, and how to install what is missing."""

    def __init__(self, missing: str):
        super().__init__(f"{missing}. {TENSORRT_INSTALL_HINT}")
        self.missing = missing


class QueueFull(InputError):
    """A batching scheduler's queue is at its limit; retry later (HTTP 429)."""


class RequestTimeout(StepError, TimeoutError):
    """A request did not finish within its timeout."""


class SchedulerClosed(StepError):
    """The batching scheduler was closed before the request finished (or it was submitted after)."""
