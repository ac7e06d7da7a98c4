"""ditrt runtime: schedules, samplers, the guided sampling loop and its backends. Imports no torch.

Six layers, each a sub-package that imports only the ones before it (tests/test_architecture.py):
`core` (errors, validators, files, progress, images), `spec` (config, families, network specs, the
manifest's rules), `sampling` (schedules, samplers, flow, noise, the request objects), `artifact`
(the manifest, labels, signing), `execution` (backends, TensorRT, caching, the pipeline) and `jobs`
(batching, generate, quality, parity, build). docs/architecture.md draws them.

The modules' earlier flat names (`ditrt.runtime.backends`, `ditrt.runtime.trt.compat`, ...) still
import: each is the moved module itself, not a copy (`MOVED` below)."""
import importlib
import importlib.abc
import importlib.util
import sys

from .core.version import __version__
from .execution.backends import BACKENDS, create_backend
from .spec.config import FAMILIES
from .core.errors import ArtifactError, BackendError, DitrtError, InputError, ScheduleError, StepError
from .artifact.manifest import Manifest, load_manifest
from .sampling.noise import NOISE_VERSION
from .execution.pipeline import Pipeline, SampleRun, SampleStats, load, load_pipeline
from .sampling.request import LoadOptions, SampleSpec
from .sampling.samplers import SAMPLERS

__all__ = ["load", "load_pipeline", "SampleSpec", "LoadOptions", "Pipeline", "SampleRun", "SampleStats", "Manifest",
           "load_manifest", "create_backend", "BACKENDS", "SAMPLERS", "FAMILIES", "NOISE_VERSION", "DitrtError",
           "InputError", "StepError", "ArtifactError", "ScheduleError", "BackendError", "__version__"]

# The flat names of ditrt <= 0.3's modules -> where each module lives now. Code written against the flat
# layout (services, plugins registering a backend through `ditrt.runtime.backends`) keeps working.
MOVED = {
    **{name: f"core.{name}" for name in ("errors", "validate", "files", "portable", "progress", "images")},
    **{name: f"spec.{name}" for name in ("schema", "config", "conditioning", "networks", "quantization")},
    **{name: f"sampling.{name}" for name in ("schedule", "dpm_solver", "flow", "samplers", "noise", "prefetch",
                                             "request")},
    **{name: f"artifact.{name}" for name in ("labels", "manifest", "signing")},
    **{name: f"execution.{name}" for name in ("chunking", "backends", "cache", "pipeline")},
    **{name: f"jobs.{name}" for name in ("batching", "generate", "workers", "shards", "outputs", "quality", "plots",
                                         "parity")},
    "trt": "execution.trt", "trt.backend": "execution.trt.backend", "trt.compat": "execution.trt.compat",
    "trt.device": "execution.trt.device", "trt.settings": "execution.trt.settings",
    "trt.versions": "artifact.versions", "trt.build": "jobs.build",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `ditrt.runtime.<flat name>` as the module it moved to: the same module object, so a
    registry or a monkeypatch seen through either name is the same."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(f"{__name__}.")
        if prefix or rest not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=rest == "trt")

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name[len(__name__) + 1:]]}")
        self.specs = getattr(self, "specs", {})
        self.specs[spec.name] = module.__spec__  # the import system sets __spec__ to the alias's next
        return module

    def exec_module(self, module):  # already executed under its own name: give it back its own spec
        module.__spec__ = self.specs.pop(module.__spec__.name)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name):  # `ditrt.runtime.backends` as an attribute, before anything imported it
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
