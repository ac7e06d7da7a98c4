"""Feature caching on the exported denoiser's segments: FirstBlockCache and TaylorSeer, with
diffusers' option names and defaults (`diffusers.hooks.FirstBlockCacheConfig`,
`TaylorSeerCacheConfig`). See docs/caching.md.

An artifact holds the denoiser also as segments (exporter/segments.py): `embed` (latent, time,
condition -> hidden states and the adaLN conditioning), the block ranges `blocks_0_1` and
`blocks_1_<depth>`, and `final`. A cached model call runs `embed` and `final` on every row and
decides, row by row, whether the transformer blocks run:

- first-block: block 0 always runs; its residual (output - input) is compared with the one of the
  row's last full call: mean |r - r_prev| / mean |r_prev|. At or below `threshold` the remaining
  blocks are skipped and the residual they added at that full call is added instead (diffusers'
  FBCHeadBlockHook / FBCBlockHook, per block stack).
- taylorseer: full calls on diffusers' schedule (the first `disable_cache_before_step` calls, then
  every `cache_interval`-th, and all from `disable_cache_after_step`); in between, the residual
  of the whole block stack (hidden states after the last block - after `embed`) is forecast from
  the row's last `max_order + 1` full calls by Newton's divided differences in the call index.
  With max_order 1 that is diffusers' f(k) + d (f(k) - f(k')) / (k - k'); for higher orders
  diffusers divides every difference by the latest gap, which is exact only for linear
  trajectories, while the Newton form is exact for polynomials up to max_order on any grid.
  diffusers hooks each block's attention by default; here the unit is the block stack (its "lite"
  mode skips whole blocks the same way).

State is per row (image, and under guidance its conditional and unconditional rows separately)
and per request (`RunCache`, one per `SampleRun`): rows of several requests share engine calls in
the step-level batcher, never state, and an image's decisions do not depend on its batch.
`cache="none"` never touches the segments: the monolithic graph, today's bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .chunking import run_chunked
from ..core.errors import InputError
from ..spec.networks import QUANTIZED_PRECISIONS
from ..core.validate import check_choice, check_int, check_number

NONE = "none"


@dataclass(frozen=True)
class CacheOption:
    default: object
    check: Callable[[object, str], object]  # (value, what) -> the value, InputError otherwise
    help: str


def _int_option(low: int, none_ok: bool = False):
    def check(value, what):
        if none_ok and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
            return None
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise InputError(f"{what} must be an integer >= {low}{' or none' if none_ok else ''}, got {value!r}") \
                    from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return check_int(value, what, low)
    return check


def _float_option(low: float):
    def check(value, what):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise InputError(f"{what} must be a number >= {low:g}, got {value!r}") from None
        return check_number(value, what, low)
    return check


@dataclass(frozen=True)
class CacheMethod:
    name: str
    description: str
    options: dict[str, CacheOption]
    new_state: Callable[[dict], object]  # options -> one row's state
    evaluate: Callable  # (segments, hidden, conditioning, rows) -> (hidden after the blocks, blocks run per row)
    min_blocks: int = 1


CACHES: dict[str, CacheMethod] = {}


def register_cache(method: CacheMethod) -> None:
    if method.name in CACHES or method.name == NONE:
        raise ValueError(f"cache {method.name!r} is already registered")
    CACHES[method.name] = method


def cache_names() -> list[str]:
    return [NONE, *CACHES]


@dataclass(frozen=True)
class CacheSettings:
    method: CacheMethod
    options: dict  # every option, checked, defaults filled in

    def to_dict(self) -> dict:
        return {"cache": self.method.name, "cache_options": dict(self.options)}


def cache_settings(cache: str | None = NONE, cache_options: dict | None = None) -> CacheSettings | None:
    """The checked settings of a cache name and its options (None for "none"); InputError for an
    unknown cache or option, or an option out of range."""
    name = check_choice(NONE if cache is None else cache, "cache", cache_names())
    options = {} if cache_options is None else cache_options
    if not isinstance(options, dict):
        raise InputError(f"cache_options must be an object of option names to values, got {options!r}")
    if name == NONE:
        if options:
            raise InputError(f"cache_options {sorted(options)} given, but cache is 'none': choose a cache "
                             f"({', '.join(CACHES)})")
        return None
    method = CACHES[name]
    unknown = [k for k in options if k not in method.options]
    if unknown:
        raise InputError(f"unknown cache option {unknown[0]!r} for {name}; it takes {', '.join(method.options)}")
    checked = {k: o.check(options.get(k, o.default), f"{name} option {k}") if k in options else o.default
               for k, o in method.options.items()}
    return CacheSettings(method, checked)


def parse_cache_options(items) -> dict:
    """`NAME=VALUE` strings (the CLI's repeatable --cache-option) as a dict of strings; the cache
    checks and converts them."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise InputError(f"--cache-option takes NAME=VALUE (e.g. cache_interval=4), got {item!r}")
        if key in out:  # the last one would silently win
            raise InputError(f"cache option {key} is given twice (--cache-option {key}=...); give it once")
        out[key] = value.strip()
    return out


def cache_option_names() -> set[str]:
    return {name for method in CACHES.values() for name in method.options}


# ---- which samplers cache --------------------------------------------------------------------------

# Two model calls per step at the same time (predictor, corrector): a forecast in the call index
# would treat them as two steps apart.
TWO_CALLS_PER_STEP = ("ode-heun2", "sde-heun")


def refusal(method: CacheMethod, sampler, schedule) -> str | None:
    """Why `method` cannot run with this sampler, or None."""
    if sampler.model_calls(schedule) is None:
        return (f"{sampler.name} chooses its steps by an error estimate of the model's output, which a cached "
                "output would bias (it accepts steps whose error it cannot see); sample it uncached or use "
                "ode-euler")
    if method.name == "taylorseer" and sampler.name in TWO_CALLS_PER_STEP:
        return (f"{sampler.name} makes two model calls per step at one time; taylorseer forecasts in the call "
                "index, one call per step (use first-block, or ode-euler / sde-euler)")
    return None


# ---- per-row state ---------------------------------------------------------------------------------

def relative_change(residual: np.ndarray, previous: np.ndarray) -> float:
    """diffusers' first-block measure: mean |r - r_prev| / mean |r_prev| (inf when r_prev is 0)."""
    scale = float(np.abs(previous, dtype=np.float64).mean())
    diff = float(np.abs(residual.astype(np.float64) - previous).mean())
    return diff / scale if scale else float("inf")


@dataclass
class FirstBlockState:
    threshold: float
    head_residual: np.ndarray | None = None  # block 0's residual at the last full call
    tail_residual: np.ndarray | None = None  # what the remaining blocks added then

    def should_compute(self, head_residual: np.ndarray) -> bool:
        if self.head_residual is None:
            return True
        return relative_change(head_residual, self.head_residual) > self.threshold


def first_block_evaluate(segments: "Segments", hidden: np.ndarray, conditioning: np.ndarray, rows: list):
    after_first = segments.run_blocks(0, hidden, conditioning)
    head = after_first - hidden
    compute = np.array([state.should_compute(head[i]) for i, (state, _) in enumerate(rows)])
    out = after_first.copy()
    full = np.flatnonzero(compute)
    if len(full):
        out[full] = segments.run_blocks(slice(1, None), after_first[full], conditioning[full])
    for i, (state, _) in enumerate(rows):
        if compute[i]:
            state.head_residual, state.tail_residual = head[i], out[i] - after_first[i]
        else:
            out[i] = after_first[i] + state.tail_residual
    depth = segments.depth
    return out, np.where(compute, depth, 1)


def taylorseer_computes(step: int, options: dict) -> bool:
    """diffusers' TaylorSeerCacheHook._measure_should_compute for the 0-based call index."""
    before, interval, after = (options["disable_cache_before_step"], options["cache_interval"],
                               options["disable_cache_after_step"])
    return step < before or (step - before - 1) % interval == 0 or (after is not None and step >= after)


def newton_forecast(steps: list[int], values: list[np.ndarray], at: int) -> np.ndarray:
    """The polynomial through (steps[i], values[i]) (latest first) evaluated at `at`, in Newton's
    divided-difference form anchored at the latest point: exact for polynomials of degree
    len(steps) - 1."""
    table = [np.asarray(v, np.float64) for v in values]
    result, product = table[0].copy(), 1.0
    for order in range(1, len(steps)):
        table = [(table[i] - table[i + 1]) / (steps[i] - steps[i + order]) for i in range(len(table) - 1)]
        product *= at - steps[order - 1]
        result += table[0] * product
    return result.astype(np.float32)


@dataclass
class TaylorSeerState:
    options: dict
    steps: list[int] = field(default_factory=list)  # the full calls kept (latest first)
    features: list[np.ndarray] = field(default_factory=list)

    def should_compute(self, step: int) -> bool:
        return not self.steps or taylorseer_computes(step, self.options)

    def update(self, step: int, feature: np.ndarray) -> None:
        keep = self.options["max_order"] + 1
        self.steps = [step, *self.steps][:keep]
        self.features = [feature, *self.features][:keep]

    def predict(self, step: int) -> np.ndarray:
        return newton_forecast(self.steps, self.features, step)


def taylorseer_evaluate(segments: "Segments", hidden: np.ndarray, conditioning: np.ndarray, rows: list):
    compute = np.array([state.should_compute(step) for state, step in rows])
    out = np.empty_like(hidden)
    full = np.flatnonzero(compute)
    if len(full):
        out[full] = segments.run_blocks(slice(0, None), hidden[full], conditioning[full])
    for i, (state, step) in enumerate(rows):
        if compute[i]:
            state.update(step, out[i] - hidden[i])
        else:
            out[i] = hidden[i] + state.predict(step)
    return out, np.where(compute, segments.depth, 0)


register_cache(CacheMethod(
    "first-block", "FirstBlockCache: skip blocks 1.. while block 0's residual barely changes",
    {"threshold": CacheOption(0.05, _float_option(0.0), "skip while the relative change is at most this")},
    lambda o: FirstBlockState(o["threshold"]), first_block_evaluate, min_blocks=2))
register_cache(CacheMethod(
    "taylorseer", "TaylorSeer: forecast the block stack's residual between full calls",
    {"cache_interval": CacheOption(5, _int_option(1), "full calls every this many calls"),
     "disable_cache_before_step": CacheOption(3, _int_option(0), "full calls before this call index"),
     "disable_cache_after_step": CacheOption(None, _int_option(0, none_ok=True), "full calls from this index on"),
     "max_order": CacheOption(1, _int_option(0), "the forecast's polynomial order")},
    lambda o: TaylorSeerState(dict(o)), taylorseer_evaluate))


# ---- segments and runs -----------------------------------------------------------------------------

class Segments:
    """The segment backends of one pipeline (embed, the block ranges in order, final)."""

    def __init__(self, backends: dict):
        specs = {name: b.network for name, b in backends.items()}
        self.embed, self.final = backends["embed"], backends["final"]
        ranges = sorted((tuple(s.extra["blocks"]), name) for name, s in specs.items() if "blocks" in s.extra)
        self.blocks = [backends[name] for _, name in ranges]
        self.depth = ranges[-1][0][1] if ranges else 0

    def run_blocks(self, which, hidden: np.ndarray, conditioning: np.ndarray) -> np.ndarray:
        chosen = [self.blocks[which]] if isinstance(which, int) else self.blocks[which]
        for backend in chosen:
            hidden = run_chunked(backend, {"hidden_states": hidden, "conditioning": conditioning})["hidden_states_out"]
        return hidden


class RunCache:
    """One request's cache: a state per model row and the block evaluations so far."""

    def __init__(self, settings: CacheSettings, rows: int):
        self.settings = settings
        self.states = [settings.method.new_state(settings.options) for _ in range(rows)]
        self.blocks_run = 0  # summed over rows

    def block_evaluations(self) -> float:
        """Transformer-block evaluations in units of one batch-wide block (depth per full call)."""
        return self.blocks_run / len(self.states)


def start_cache(manifest, sampler, schedule, cache, cache_options, rows: int,
                precision: str | None = None) -> RunCache | None:
    """The run's cache (None for "none"), refused with the reason for a sampler, artifact or
    precision it cannot serve (`precision`: the denoiser's graph; segments have no quantized ones)."""
    settings = cache_settings(cache, cache_options)
    if settings is None:
        return None
    method = settings.method
    why = refusal(method, sampler, schedule)
    if why:
        raise InputError(f"cache {method.name} does not run with sampler {why}")
    segments = [n for n, s in manifest.networks.items() if s.extra.get("segment_of") == "denoiser"]
    if not segments:
        raise InputError(f"{manifest.directory} has no denoiser segments (exported before feature caching); "
                         f"export it again to use cache {method.name}")
    if precision in QUANTIZED_PRECISIONS:  # segments export fp32 / fp16 only: a cached step would change precision
        raise InputError(f"cache {method.name} runs the denoiser's segments, which have fp32 and fp16 graphs only; this "
                         f"pipeline runs the {precision} graph: load it with precision fp32 or fp16 to cache")
    if manifest.model.depth < method.min_blocks:
        raise InputError(f"cache {method.name} needs at least {method.min_blocks} transformer blocks; this model has "
                         f"{manifest.model.depth}")
    return RunCache(settings, rows)


def denoise(pipeline, runs: list, feeds: dict[str, np.ndarray], backend) -> np.ndarray:
    """The denoiser's output for the runs' rows (their feeds concatenated, in order): uncached runs'
    rows through the monolithic graph (`backend`), cached runs' rows through the segments, each row
    with its own state."""
    output_name = pipeline.backend.network.output.name
    if all(run.cache is None for run in runs):
        return run_chunked(backend, feeds)[output_name]
    bounds = np.cumsum([0, *(run.rows for run in runs)])
    cached = np.concatenate([np.arange(a, b) for run, a, b in zip(runs, bounds, bounds[1:]) if run.cache is not None])
    plain = np.setdiff1d(np.arange(bounds[-1]), cached)
    parts = {}
    if len(plain):
        parts["plain"] = (plain, run_chunked(backend, {k: v[plain] for k, v in feeds.items()})[output_name])
    rows = [(state, run.steps_done) for run in runs if run.cache is not None for state in run.cache.states]
    parts["cached"] = (cached, _cached_output(pipeline.segments(), {k: v[cached] for k, v in feeds.items()}, rows,
                                              [run for run in runs if run.cache is not None], output_name))
    first = next(iter(parts.values()))[1]
    out = np.empty((bounds[-1], *first.shape[1:]), first.dtype)
    for index, values in parts.values():
        out[index] = values
    return out


def _cached_output(segments: Segments, feeds, rows: list, runs: list, output_name: str) -> np.ndarray:
    method = runs[0].cache.settings.method
    if any(run.cache.settings.method is not method for run in runs):  # the batcher mixes requests' caches
        return _by_method(segments, feeds, rows, runs, output_name)
    embedded = run_chunked(segments.embed, feeds)
    hidden, conditioning = embedded["hidden_states"], embedded["conditioning"]
    after, blocks = method.evaluate(segments, hidden, conditioning, rows)
    offset = 0
    for run in runs:
        run.cache.blocks_run += int(blocks[offset:offset + run.rows].sum())
        offset += run.rows
    return run_chunked(segments.final, {"hidden_states": after, "conditioning": conditioning})[output_name]


def _by_method(segments, feeds, rows, runs, output_name) -> np.ndarray:
    bounds = np.cumsum([0, *(run.rows for run in runs)])
    out = None
    for method in {id(run.cache.settings.method): run.cache.settings.method for run in runs}.values():
        chosen = [i for i, run in enumerate(runs) if run.cache.settings.method is method]
        index = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in chosen])
        values = _cached_output(segments, {k: v[index] for k, v in feeds.items()}, [rows[j] for j in index],
                                [runs[i] for i in chosen], output_name)
        if out is None:
            out = np.empty((bounds[-1], *values.shape[1:]), values.dtype)
        out[index] = values
    return out
