"""Numerical parity: metrics, the deterministic check set, golden files and reports. No torch.

A golden file (.npz) holds the inputs, the injected noise and the reference outputs of every
check, so comparing a backend against it needs only the runtime.
"""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..execution.chunking import Backend, run_chunked
from ..core.errors import InputError
from ..core.files import atomic_output, write_json_atomic
from ..sampling.noise import SeededNoise
from ..sampling.samplers import SAMPLERS, samplers_of
from ..core.validate import check_int

GOLDEN_FORMAT = "ditrt.golden/2"  # version 1 (denoiser inputs as latent/timestep/class_label) still loads
# Default bounds on max |actual - reference| / max |reference|, by graph precision and check kind.
# fp32: ~3e-7 per forward and ~5e-7 over 25-step loops measured; loops can amplify differences up to
#   ~100x (tests/golden/README.md), hence 1e-4 for loops.
# fp16: ~5e-4 per forward measured (golden tiny and DiT-XL/2), ~3e-4 over 25-step loops (errors
#   partly average out); 5e-3 / 1e-2 leave a 10x margin and still catch real faults.
# int8 / fp8: the export bounds per forward (runtime/networks.EXPORT_BOUNDS); loops: LOOP_INT8 below.
DEFAULT_MAX_REL_ERR = {"fp32": {"forward": 1e-5, "loop": 1e-4}, "fp16": {"forward": 5e-3, "loop": 1e-2},
                       "int8": {"forward": 8e-2, "loop": 1.5e-1}, "fp8": {"forward": 2.5e-1, "loop": 5e-1}}
# A TensorRT fp32 plan may run matmuls and convolutions in TF32 (10-bit mantissa, ~5e-4 per op): its
# build-time parity bound (runtime/execution/trt/settings.FP32_PARITY_BOUND), and twice that over a loop.
BACKEND_MAX_REL_ERR = {"tensorrt-fp32": {"forward": 5e-3, "loop": 1e-2}}


def compare(actual: np.ndarray, reference: np.ndarray) -> dict:
    """max abs error, max error relative to the reference's largest magnitude, cosine similarity,
    and the worst element's index."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise InputError(f"shape {actual.shape} does not match the reference's {reference.shape}")
    finite = np.isfinite(actual)
    diff = np.where(finite, np.abs(actual - reference), np.inf)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    scale = float(np.abs(reference).max())
    norms = float(np.linalg.norm(actual) * np.linalg.norm(reference)) if finite.all() else float("nan")
    return {
        "max_abs_err": float(diff[worst]),
        "max_rel_err": float(diff[worst] / scale) if scale else float(diff[worst]),
        "cosine": float(np.vdot(actual, reference) / norms) if norms else (1.0 if finite.all() else float("nan")),
        "worst_index": [int(i) for i in worst],
        "worst_actual": float(actual[worst]),
        "worst_reference": float(reference[worst]),
    }


# ---- the check set ---------------------------------------------------------------------------------

@dataclass
class ForwardCase:
    name: str
    network: str
    feeds: dict[str, np.ndarray]


@dataclass
class LoopCase:
    name: str
    sampler: str
    steps: str | int
    labels: np.ndarray
    initial: np.ndarray
    step_noise: np.ndarray
    cfg_scale: float = 4.0
    guidance: str = "official"


def forward_cases(manifest, batches: list[int], seed: int = 0, networks: list[str] | None = None) -> list[ForwardCase]:
    """One case per network and batch size, from each network's deterministic example inputs."""
    return [ForwardCase(f"{name} forward batch {b}", name, spec.example_inputs(b, seed))
            for name, spec in manifest.networks.items() if networks is None or name in networks for b in batches]


def loop_cases(manifest, steps: int, seed: int = 0, num_images: int = 2) -> list[LoopCase]:
    """One loop per sampler of the artifact's family (its own step spec for about `steps` model
    calls), official guidance at scale 4, injected noise."""
    model = manifest.model
    labels = np.array([(1 + 7 * i) % model.num_classes for i in range(num_images)], dtype=np.int64)
    cases = []
    for sampler in samplers_of(manifest.family.name).values():
        spec = sampler.parity_steps(steps)
        draws = sampler.noise_draws(sampler.schedule(manifest.process, spec))
        noise = SeededNoise(seed, num_images, model.latent_shape)
        initial = noise.initial()
        step_noise = np.stack([noise.step(i) for i in range(draws)]) if draws else \
            np.zeros((0, num_images, *model.latent_shape), np.float32)
        cases.append(LoopCase(f"loop {sampler.name} {spec}", sampler.name, spec, labels, initial, step_noise))
    return cases


def run_forward(backend: Backend, case: ForwardCase) -> np.ndarray:
    return run_chunked(backend, case.feeds)[backend.network.output.name]


def run_loop(pipeline, case: LoopCase, max_model_calls: int | None = None) -> np.ndarray:
    """The case's loop; `max_model_calls` budgets the adaptive samplers' loops (the others make a fixed count)."""
    budget = max_model_calls if SAMPLERS[case.sampler].adaptive else None
    return pipeline.sample(case.labels, num_steps=case.steps, sampler=case.sampler, cfg_scale=case.cfg_scale,
                           guidance=case.guidance, noise=(case.initial, case.step_noise), progress=False,
                           max_model_calls=budget)


# ---- golden files ----------------------------------------------------------------------------------

@dataclass
class Golden:
    forward: list[tuple[ForwardCase, np.ndarray]]
    loops: list[tuple[LoopCase, np.ndarray]]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        meta = {**self.meta, "format": GOLDEN_FORMAT, "forward": [], "loops": []}
        for i, (case, out) in enumerate(self.forward):
            meta["forward"].append({"name": case.name, "network": case.network, "inputs": list(case.feeds)})
            arrays.update({f"forward{i}_{name}": value for name, value in case.feeds.items()})
            arrays[f"forward{i}_output"] = out
        for i, (case, out) in enumerate(self.loops):
            meta["loops"].append({"name": case.name, "sampler": case.sampler, "steps": case.steps,
                                  "cfg_scale": case.cfg_scale, "guidance": case.guidance})
            arrays.update({f"loop{i}_labels": case.labels, f"loop{i}_initial": case.initial,
                           f"loop{i}_step_noise": case.step_noise, f"loop{i}_output": out})
        with atomic_output(path, suffix=".npz") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Golden":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"golden file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(str(data["meta"]))
        except Exception as e:
            raise InputError(f"unreadable golden file {path}: {e}") from None
        version = meta.get("format") if isinstance(meta, dict) else None
        if version not in (GOLDEN_FORMAT, "ditrt.golden/1"):
            raise InputError(f"{path} is not a ditrt golden file (format {version!r}); "
                             "make one with `ditrt parity ARTIFACT --save-golden PATH`")
        try:
            forward = [(_forward_case(data, i, entry), data[f"forward{i}_output"]) for i, entry in enumerate(meta["forward"])]
            loops = [(LoopCase(m["name"], m["sampler"], m["steps"], data[f"loop{i}_labels"], data[f"loop{i}_initial"],
                               data[f"loop{i}_step_noise"], m["cfg_scale"], m["guidance"]), data[f"loop{i}_output"])
                     for i, m in enumerate(meta["loops"])]
        except (KeyError, TypeError) as e:
            raise InputError(f"golden file {path} is incomplete: {e} is missing") from None
        if not forward and not loops:
            raise InputError(f"golden file {path} holds no checks (its forward and loop lists are empty)")
        return cls(forward, loops, {k: v for k, v in meta.items() if k not in ("forward", "loops")})

    def check_matches(self, manifest) -> None:
        model = manifest.model
        want = {"in_channels": model.in_channels, "input_size": model.input_size,
                "out_channels": manifest.family.output_channels(model), "num_classes": model.num_classes,
                "family": manifest.family.name}
        have = {"family": "dit", **self.meta.get("model", {})}  # goldens made before SiT name no family
        differs = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if differs:
            raise InputError("the golden file was made for another model: " +
                             ", ".join(f"{k} {a} (golden) vs {b} (artifact)" for k, (a, b) in differs.items()))


def _forward_case(data: dict, i: int, entry) -> ForwardCase:
    if isinstance(entry, str):  # format 1: denoiser inputs under fixed names
        entry = {"name": entry, "network": "denoiser", "inputs": ["latent", "timestep", "class_label"]}
    return ForwardCase(entry["name"], entry["network"], {name: data[f"forward{i}_{name}"] for name in entry["inputs"]})


def load_golden(path, manifest, given_options: list[str] = ()) -> Golden:
    """A golden file for this artifact. Options that shape the reference's checks (`--steps`,
    `--batch`) cannot apply to a file that holds its own checks: refused rather than ignored."""
    if given_options:
        raise InputError(f"{' and '.join(given_options)} cannot apply to a golden file: it holds its own checks "
                         "(save another with --save-golden)")
    golden = Golden.load(path)
    golden.check_matches(manifest)
    return golden


def make_golden(forward_backends: dict[str, Backend], pipeline, manifest, batches: list[int], steps: int,
                meta: dict, log: Callable[[str], None] = lambda m: None, max_model_calls: int | None = None) -> Golden:
    """Run the reference once over the check set: `forward_backends` by network name."""
    forward = []
    for case in forward_cases(manifest, batches, networks=list(forward_backends)):
        log(f"reference: {case.name}")
        forward.append((case, run_forward(forward_backends[case.network], case)))
    loops = []
    for case in loop_cases(manifest, steps):
        log(f"reference: {case.name}")
        loops.append((case, run_loop(pipeline, case, max_model_calls)))
    model_meta = {**{k: getattr(manifest.model, k) for k in ("in_channels", "input_size", "num_classes")},
                  "out_channels": manifest.family.output_channels(manifest.model), "family": manifest.family.name}
    return Golden(forward, loops, {**meta, "model": model_meta, "batches": batches, "steps": steps})


# ---- checking and reports ----------------------------------------------------------------------------

@dataclass
class Threshold:
    max_rel_err: float | None = None  # max error relative to the reference's largest magnitude
    atol: float | None = None  # or an allclose test: |a - r| <= atol + rtol |r| everywhere
    rtol: float | None = None

    def passes(self, actual: np.ndarray, reference: np.ndarray, metrics: dict) -> bool:
        if not np.all(np.isfinite(actual)):
            return False
        if self.atol is not None or self.rtol is not None:
            return bool(np.allclose(actual, reference, rtol=self.rtol or 0.0, atol=self.atol or 0.0))
        return metrics["max_rel_err"] <= self.max_rel_err

    def describe(self) -> str:
        if self.atol is not None or self.rtol is not None:
            return f"atol {self.atol or 0:g} + rtol {self.rtol or 0:g}"
        return f"max rel err <= {self.max_rel_err:g}"


@dataclass
class CheckResult:
    backend: str
    check: str
    output: str
    passed: bool
    threshold: str
    metrics: dict
    seconds: float
    error: str | None = None


def check_backend(name: str, backend: Backend, pipeline, golden: Golden,
                  thresholds: dict[str, Threshold], max_model_calls: int | None = None) -> list[CheckResult]:
    """Every forward and loop check of the golden file on one backend. `thresholds` by kind."""
    results = []
    network = backend.network.name
    checks = [("forward", case, ref, lambda c=case: run_forward(backend, c))
              for case, ref in golden.forward if case.network == network]
    if pipeline is not None:
        checks += [("loop", case, ref, lambda c=case: run_loop(pipeline, c, max_model_calls)) for case, ref in golden.loops]
    for kind, case, ref, run in checks:
        output = backend.network.output.name if kind == "forward" else "latents"
        start = time.perf_counter()
        try:
            actual = run()
        except Exception as e:  # a backend that crashes fails its check; the report still completes
            results.append(CheckResult(name, case.name, output, False, thresholds[kind].describe(), {},
                                       time.perf_counter() - start, f"{type(e).__name__}: {e}"))
            continue
        metrics = compare(actual, ref)
        results.append(CheckResult(name, case.name, output, thresholds[kind].passes(actual, ref, metrics),
                                   thresholds[kind].describe(), metrics, time.perf_counter() - start))
    return results


def format_table(results: list[CheckResult]) -> str:
    header = ("backend", "check", "output", "max_abs_err", "max_rel_err", "cosine", "worst element", "bound", "result")
    rows = [header]
    for r in results:
        m = r.metrics
        worst = (f"{r.output}[{','.join(map(str, m['worst_index']))}] {m['worst_actual']:.6g} vs {m['worst_reference']:.6g}"
                 if m else r.error or "")
        rows.append((r.backend, r.check, r.output, f"{m['max_abs_err']:.3e}" if m else "-",
                     f"{m['max_rel_err']:.3e}" if m else "-", f"{m['cosine']:.8f}" if m else "-", worst,
                     r.threshold, "PASS" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def write_json(results: list[CheckResult], path: str | Path, meta: dict) -> None:
    write_json_atomic(Path(path), {"passed": all(r.passed for r in results), **meta,
                                   "checks": [asdict(r) for r in results]})


def write_junit(results: list[CheckResult], path: str | Path) -> None:
    """JUnit XML: one testsuite per backend, one testcase per check."""
    root = ET.Element("testsuites", name="ditrt.parity", tests=str(len(results)),
                      failures=str(sum(not r.passed for r in results)))
    for backend in dict.fromkeys(r.backend for r in results):
        mine = [r for r in results if r.backend == backend]
        suite = ET.SubElement(root, "testsuite", name=f"ditrt.parity.{backend}", tests=str(len(mine)),
                              failures=str(sum(not r.passed for r in mine)),
                              time=f"{sum(r.seconds for r in mine):.3f}")
        for r in mine:
            case = ET.SubElement(suite, "testcase", classname=f"ditrt.parity.{backend}", name=r.check,
                                 time=f"{r.seconds:.3f}")
            detail = json.dumps(r.metrics) if r.metrics else (r.error or "")
            if not r.passed:
                message = (f"{r.output}: max rel err {r.metrics['max_rel_err']:.3e} at {r.metrics['worst_index']} "
                           f"({r.threshold})" if r.metrics else f"{r.output}: {r.error}")
                ET.SubElement(case, "failure", message=message).text = detail
            else:
                ET.SubElement(case, "system-out").text = detail
    with atomic_output(path, suffix=".xml") as f:
        ET.ElementTree(root).write(f, encoding="utf-8", xml_declaration=True)


# ---- orchestration: what `ditrt parity` runs ---------------------------------------------------------

def check_bound_options(max_rel_errs=(), atol: float | None = None, rtol: float | None = None) -> None:
    """What the bounds' options may not combine to, checked before any work: --max-rel-err with
    --atol/--rtol (two tests: one would be ignored), the same backend (or every backend) twice."""
    if max_rel_errs and (atol is not None or rtol is not None):
        raise InputError("--max-rel-err and --atol/--rtol are two different tests; give one of them")
    keys = [str(item).rpartition("=")[0] for item in max_rel_errs]
    for key in keys:
        if keys.count(key) > 1:  # the last one would silently win
            raise InputError(f"--max-rel-err sets the bound of {key or 'every backend'} twice; give each one bound")


def thresholds(names: list[str], max_rel_errs=(), atol: float | None = None, rtol: float | None = None) -> dict:
    """Per backend id and check kind: `max_rel_errs` items "X" (every backend) or "BACKEND=X",
    an allclose test (atol/rtol), or the defaults of the backend's precision."""
    from ..core.validate import check_number
    check_bound_options(max_rel_errs, atol, rtol)
    overrides: dict[str, float] = {}
    for item in max_rel_errs:
        key, _, value = str(item).rpartition("=")
        try:
            bound = check_number(float(value), "--max-rel-err", 0, low_open=True)
        except ValueError:
            raise InputError(f"--max-rel-err takes X or BACKEND=X, got {item!r}") from None
        for name in (names if not key else [key]):
            if name not in names:
                raise InputError(f"--max-rel-err names backend {name!r}, which is not in --backends ({', '.join(names)})")
            if name in overrides:  # the last one would silently win
                raise InputError(f"--max-rel-err sets the bound of {name} twice ({item!r} after another); give each "
                                 "backend one bound")
            overrides[name] = bound

    for what, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None:
            check_number(value, what, 0)
    table = {}
    for name in names:
        defaults = BACKEND_MAX_REL_ERR.get(name, DEFAULT_MAX_REL_ERR[name.rpartition("-")[2]])
        table[name] = {kind: (Threshold(atol=atol, rtol=rtol) if atol is not None or rtol is not None
                              else Threshold(max_rel_err=overrides.get(name, bound)))
                       for kind, bound in defaults.items()}
    return table


def integrity_checks(manifest, backend) -> list[CheckResult]:
    """The graph files an ONNX Runtime backend runs, against the manifest's sha256: a changed file
    is a failed check, and the numeric checks still run so the report shows what the change does.
    (TensorRT plans are checked when they load.)"""
    from ..artifact.manifest import file_problem
    if not backend.name.startswith("onnxruntime-"):
        return []
    return [CheckResult(backend.name, f"sha256 {file}", file, problem is None, "equal to the manifest", {}, 0.0, problem)
            for file, (recorded, actual) in manifest.file_hashes(backend.network.name, backend.precision).items()
            for problem in [file_problem(recorded, actual)]]


def run_parity(manifest, golden: Golden, backend_names: list[str], max_rel_errs=(), atol: float | None = None,
               rtol: float | None = None, threads: int | None = None, checkpoint=None,
               log: Callable[[str], None] = lambda m: None, max_model_calls: int | None = None) -> list[CheckResult]:
    """Every check of `golden` on every named backend and network of the artifact, with the
    bounds of `thresholds`. Every backend is made before any check runs (a missing one fails at
    once). They load with verify=False: parity reports a changed file as a failed sha256 check and
    still runs the numbers, so the report shows what the change does."""
    from ..execution import pipeline as P
    from ..execution.backends import create_backend
    if not backend_names:
        raise InputError("parity needs at least one backend")
    if max_model_calls is not None:
        from ..execution.pipeline import MODEL_CALLS_LIMIT
        check_int(max_model_calls, "--max-model-calls", 1, MODEL_CALLS_LIMIT)
    instances = {}  # (backend id, network) -> backend
    for name in backend_names:
        for network in manifest.networks:
            if _quantized_elsewhere(manifest, name, network):
                continue  # int8 / fp8 graphs are the denoiser's; the decoder has no recipe
            backend = create_backend(manifest, name, network=network, threads=threads, checkpoint=checkpoint,
                                     verify=False)
            instances[(backend.name, network)] = backend
    bounds = thresholds(sorted({b.name for b in instances.values()}), max_rel_errs, atol, rtol)
    results = []
    for (name, network), backend in instances.items():
        log(f"checking {name} on the {network} ...")
        results += integrity_checks(manifest, backend)
        pipeline = P.Pipeline(backend, manifest) if network == "denoiser" else None
        results += check_backend(name, backend, pipeline, golden, bounds[name], max_model_calls)
    return results


def with_precision(backends: list[str], precision: str | None) -> list[str]:
    """`ditrt parity --precision P`: each backend kind named without a precision runs its P graph."""
    return [b if precision is None or "-" in b else f"{b}-{precision}" for b in backends]


def _quantized_elsewhere(manifest, backend: str, network: str) -> bool:
    """A quantized backend id for a network that has no quantized graph (the decoder)."""
    from ..spec.networks import QUANTIZED_PRECISIONS
    precision = backend.rpartition("-")[2]
    return network != "denoiser" and precision in QUANTIZED_PRECISIONS and precision not in manifest.precisions(network)


def summary(results: list[CheckResult]) -> str:
    failed = [r for r in results if not r.passed]
    return (f"parity: {len(results) - len(failed)}/{len(results)} checks passed" +
            (f"; FAILED: {', '.join(f'{r.backend} {r.check}' for r in failed)}" if failed else ""))
