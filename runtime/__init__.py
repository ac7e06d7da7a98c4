"""ditrt runtime: schedules, the CFG sampling loop and its backends. Imports no torch."""
__version__ = "0.1.0"

from .manifest import ArtifactError, Manifest, load_manifest  # noqa: E402
from .pipeline import Pipeline, SampleStats, load  # noqa: E402
from .schedule import ScheduleError  # noqa: E402

__all__ = ["load", "Pipeline", "SampleStats", "Manifest", "load_manifest", "ArtifactError", "ScheduleError", "__version__"]
