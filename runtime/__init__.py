"""ditrt runtime: schedules, samplers, the guided sampling loop and its backends. Imports no torch."""
__version__ = "0.3.0"

from .backends import BACKENDS, create_backend  # noqa: E402
from .config import FAMILIES  # noqa: E402
from .errors import ArtifactError, BackendError, DitrtError, InputError, ScheduleError, StepError  # noqa: E402
from .manifest import Manifest, load_manifest  # noqa: E402
from .noise import NOISE_VERSION  # noqa: E402
from .pipeline import Pipeline, SampleRun, SampleStats, load, load_pipeline  # noqa: E402
from .request import LoadOptions, SampleSpec  # noqa: E402
from .samplers import SAMPLERS  # noqa: E402

__all__ = ["load", "load_pipeline", "SampleSpec", "LoadOptions", "Pipeline", "SampleRun", "SampleStats", "Manifest", "load_manifest", "create_backend", "BACKENDS",
           "SAMPLERS", "FAMILIES", "NOISE_VERSION", "DitrtError", "InputError", "StepError", "ArtifactError",
           "ScheduleError", "BackendError", "__version__"]
