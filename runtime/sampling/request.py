"""The value objects every entry point builds once and passes whole: what to sample (`SampleSpec`)
and how to load the pipeline that samples it (`LoadOptions`).

The CLI (`sample`, `generate`, `quality`), a serve request, the Python API (`Pipeline.sample` /
`start` and `runtime.load` keep their keywords and build one) and a generate run each make one, and
from there it travels unchanged: `Pipeline.sample_spec` / `start_spec`, `StepBatcher.submit_spec`,
the generate workers, the quality runs. A field is None where the manifest's default applies. The
spec is validated in one place, `SampleRun` (runtime/execution/pipeline.py), against the artifact's manifest:
every path starts a run with it (generate and quality before any work, on a stand-in backend).

A sampler's own options (eta, atol, a new one) live in `options` by their registry names: a new
option needs only its registry entry (runtime/sampling/samplers.py), nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import InputError


def sampler_options(eta: Any = None, options: dict | None = None) -> dict:
    """The sampler options of a call that gives eta on its own (--eta, the body's `eta`, the `eta=`
    keyword) beside the others; eta given both ways is refused (one would silently win)."""
    options = dict(options or {})
    if eta is not None:
        if options.get("eta") is not None:
            raise InputError("eta is given twice (as eta and as a sampler option); give it once")
        options["eta"] = eta
    return options


@dataclass(frozen=True)
class SampleSpec:
    """One sampling request. `labels`: class numbers or names, one image each (a generate or
    quality run sets them per batch, `for_batch`); `steps` an int or a step spec string; `options`
    the sampler's own options (eta among them), checked by the sampler's registry entry;
    `max_model_calls` an adaptive sampler's budget (None: pipeline.MAX_MODEL_CALLS); `cache` /
    `cache_options` feature caching (runtime/execution/cache.py); `precision` is room for a per-request
    precision (not read yet: the loaded pipeline's precision applies)."""
    labels: Any = None
    sampler: str | None = None
    steps: int | str | None = None
    guidance: str | None = None
    cfg_scale: float | None = None
    seed: int = 0
    image_offset: int = 0  # image j draws the noise of image image_offset + j of the seed's stream
    options: dict = field(default_factory=dict)
    max_model_calls: int | None = None
    cache: str = "none"
    cache_options: dict = field(default_factory=dict)
    precision: str | None = None

    def for_batch(self, labels, image_offset: int = 0, seed: int | None = None) -> "SampleSpec":
        """This spec for a batch of a larger job: its labels, the index of its first image and the
        job's seed (image i from (seed, i), whatever the batch)."""
        return replace(self, labels=labels, image_offset=image_offset, seed=self.seed if seed is None else seed)


@dataclass(frozen=True)
class LoadOptions:
    """How `runtime.load` opens an artifact (see its docstring): the backend ("auto", a kind or an
    id), the denoiser's precision (None: the kind's default), ONNX Runtime threads, the largest
    rows per call, file verification, the decoder (None: when the artifact has one) and its
    precision and batch, TensorRT plan host code, and a public key the signature must verify with."""
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    max_batch: int | None = None
    verify: bool = True
    decoder: bool | None = None
    decoder_precision: str | None = None
    decoder_max_batch: int | None = None
    allow_plan_host_code: bool = False
    public_key: Path | str | None = None

    def backend_options(self) -> dict:
        """The create_backend keywords every network of the pipeline shares."""
        return {"threads": self.threads, "allow_plan_host_code": self.allow_plan_host_code, "verify": self.verify}
