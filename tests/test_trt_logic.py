"""TensorRT support without TensorRT: the pure plan logic, Polygraphy's build configuration objects,
a static check that the TensorRT code speaks TensorRT 11.4's Python API, and the CPU fallbacks."""
from __future__ import annotations

import ast
import ctypes
import enum
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import ditrt.runtime.execution.trt.backend as trt_backend
from ditrt import runtime
from ditrt.runtime.execution.chunking import chunk_plan
from ditrt.runtime.spec.config import FAMILIES, DiTConfig, Diffusion
from ditrt.runtime.core.errors import ArtifactError, TensorRTUnavailable
from ditrt.runtime.artifact.manifest import engine_entry, load_manifest
from ditrt.runtime.spec.networks import denoiser_spec
from ditrt.runtime.artifact import versions
from ditrt.runtime.execution.trt import compat, settings
from ditrt.runtime.execution.trt.compat import check_engine_compat, choose_engine
from ditrt.runtime.execution.trt.settings import BuildFlags, EngineProfile, plan_filename

TINY = DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
DENOISER = denoiser_spec(TINY, FAMILIES["dit"], Diffusion())

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TRT_MODULES = [ROOT / "runtime" / "execution" / "trt" / "backend.py", ROOT / "runtime" / "jobs" / "build.py",
               ROOT / "runtime" / "execution" / "trt" / "device.py"]
H100 = "NVIDIA H100 80GB HBM3"


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ---- profile and plan names -----------------------------------------------------------------------

def test_profile_defaults_and_image_mapping():
    p = EngineProfile()
    assert (p.min_rows, p.opt_rows, p.max_rows) == (1, 16, 64)
    assert p.images_per_call(guided=True) == 32 and p.images_per_call(guided=False) == 64
    assert EngineProfile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("bounds, message", [
    ((0, 16, 64), "--min-batch must be a positive integer"),
    ((1, 16, 2.5), "--max-batch must be a positive integer"),
    ((1, True, 4), "--opt-batch must be a positive integer"),
    ((8, 4, 64), "min <= opt <= max, got --min-batch 8 --opt-batch 4 --max-batch 64"),
    ((1, 65, 64), "min <= opt <= max"),
])
def test_profile_validation(bounds, message):
    with pytest.raises(ValueError, match=message):
        EngineProfile(*bounds)


def test_profile_shapes_for_polygraphy():
    shapes = denoiser_spec(DiTConfig(input_size=32), FAMILIES["dit"], Diffusion()).profile_shapes(2, 16, 64)
    assert shapes == {"latent": ((2, 4, 32, 32), (16, 4, 32, 32), (64, 4, 32, 32)),
                      "timestep": ((2,), (16,), (64,)), "class_label": ((2,), (16,), (64,))}


def test_chunk_plan_chunks_above_max_and_pads_below_min():
    assert chunk_plan(16, 64) == [(0, 16, 16)]
    assert chunk_plan(130, 64) == [(0, 64, 64), (64, 128, 64), (128, 130, 2)]
    assert chunk_plan(3, 64, min_rows=4) == [(0, 3, 4)]  # padded up to the profile minimum
    assert chunk_plan(9, 4, min_rows=2) == [(0, 4, 4), (4, 8, 4), (8, 9, 2)]
    assert chunk_plan(9, None) == [(0, 9, 9)]  # no limit
    with pytest.raises(ValueError):
        chunk_plan(0, 64)


def test_parity_batches_stay_inside_the_profile():
    assert settings.parity_batches(EngineProfile()) == [1, 3]
    assert settings.parity_batches(EngineProfile(1, 2, 2)) == [1, 2]
    assert settings.parity_batches(EngineProfile(8, 16, 64)) == [8]


def test_plan_filenames():
    assert plan_filename("denoiser", "fp16", "sm90", "11.4.0.106") == "denoiser.fp16.sm90.trt11.4.0.106.plan"
    assert plan_filename("denoiser", "fp16", "sm120", "11.4.0") == "denoiser.fp16.sm120.trt11.4.0.plan"
    assert (plan_filename("denoiser", "fp16", "sm86", "10.13.0.35", "ampere+", True)
            == "denoiser.fp16.sm86.trt10.13.0.35.ampereplus.vc.plan")
    assert plan_filename("denoiser", "fp16", "sm89", "11.4.0.106", "same-cc") == "denoiser.fp16.sm89.trt11.4.0.106.samecc.plan"
    assert plan_filename("decoder", "fp32", "sm90", "11.4.0.106") == "decoder.fp32.sm90.trt11.4.0.106.plan"
    assert settings.timing_cache_filename("sm90", "11.4.0.106") == "timing.sm90.trt11.4.0.106.cache"
    for bad in [("denoiser", "fp16", "9.0", "11.4.0"), ("denoiser", "fp16", "sm90", "eleven"),
                ("denoiser", "fp16", "sm90", "11"), ("../x", "fp16", "sm90", "11.4"), ("denoiser", "int4", "sm90", "11.4")]:
        with pytest.raises(ValueError):
            plan_filename(*bad)


def test_compute_capability_and_version_parsing():
    for cc in ["9.0", (9, 0), "sm90"]:
        assert versions.parse_compute_capability(cc) == (9, 0)
    assert versions.sm_name((12, 0)) == "sm120" and versions.sm_name("10.3") == "sm103"
    assert versions.parse_version("11.4") == (11, 4, 0, 0) < versions.parse_version("11.4.0.106")
    with pytest.raises(ValueError):
        versions.parse_compute_capability("Hopper")


def test_build_flags_validation_and_cli_args():
    assert BuildFlags().cli_args() == ["--opt-level", "3"]
    flags = BuildFlags(5, "same-cc", True, 8.0)
    assert flags.cli_args() == ["--opt-level", "5", "--hardware-compat", "same-cc", "--version-compatible", "--workspace", "8"]
    assert flags.workspace_bytes == 8 * 2**30
    for kwargs, message in [({"opt_level": 6}, "--opt-level must be an integer from 0 to 5"),
                            ({"hardware_compat": "hopper"}, "--hardware-compat must be one of none, ampere\\+, same-cc"),
                            ({"workspace_gb": 0}, "--workspace \\(GB\\) must be a number > 0")]:
        with pytest.raises(ValueError, match=message):
            BuildFlags(**kwargs)


# ---- compatibility rules ----------------------------------------------------------------------------

def entry(trt_version="11.4.0.106", cc=(9, 0), gpu=H100, hardware_compat="none", version_compatible=False,
          file=None, built_utc="2026-11-01T00:00:00+00:00", graph_sha256=None) -> dict:
    profile, flags = EngineProfile(), BuildFlags(3, hardware_compat, version_compatible)
    return engine_entry(
        network=DENOISER, precision="fp16",
        file=file or plan_filename("denoiser", "fp16", versions.sm_name(cc), trt_version, hardware_compat, version_compatible),
        sha256="0" * 64, size=1, trt_version=trt_version, gpu_name=gpu, compute_capability=cc,
        driver_version="580.65.06", cuda_driver_version="13.0", cuda_runtime_version="13.0", profile=profile,
        flags=flags,
        graph={"file": "denoiser.fp16.onnx", "sha256": graph_sha256 or {"denoiser.fp16.onnx": "a" * 64}},
        build_seconds=1.0, built_utc=built_utc)


def test_entry_schema_is_plain_json():
    e = entry()
    assert json.loads(json.dumps(e)) == e
    assert e["network"] == "denoiser" and e["precision"] == "fp16"
    assert e["tensorrt"] == {"version": "11.4.0.106", "strongly_typed": True}
    assert e["gpu"] == {"name": H100, "compute_capability": "9.0", "sm": "sm90"}
    assert e["profile"]["max"] == 64 and e["profile"]["guided_images_per_call"] == 32
    assert e["profile"]["shapes"]["latent"] == [[1, 4, 8, 8], [16, 4, 8, 8], [64, 4, 8, 8]]
    assert e["build"]["opt_level"] == 3 and e["build"]["hardware_compat"] == "none"
    assert set(e["cuda"]) == {"driver_version", "driver_cuda_version", "runtime_cuda_version"}


@pytest.mark.parametrize("kwargs, here, ok, words", [
    ({}, ("11.4.0.106", (9, 0), H100), True, ["built for this GPU and TensorRT version"]),
    ({}, ("11.4.1.2", (9, 0), H100), False, ["built with TensorRT 11.4.0.106, this is TensorRT 11.4.1.2",
                                            "unless built with --version-compatible"]),
    ({"version_compatible": True}, ("11.5.0.1", (9, 0), H100), True, ["version-compatible plan from TensorRT 11.4.0.106"]),
    ({"version_compatible": True}, ("11.3.0.1", (9, 0), H100), False, ["runs only on the same or a newer TensorRT"]),
    ({"version_compatible": True, "trt_version": "10.13.0.35"}, ("11.4.0.106", (9, 0), H100), True, ["version-compatible"]),
    ({"version_compatible": True, "trt_version": "11.4.0.106"}, ("12.0.0.1", (9, 0), H100), False,
     ["do not cross from TensorRT 11 to 12"]),
    ({}, ("11.4.0.106", (8, 9), "NVIDIA L40S"), False, ["compute capability 9.0", "has 8.9", "--hardware-compat"]),
    ({}, ("11.4.0.106", (9, 0), "NVIDIA H100 PCIe"), True, ["built on NVIDIA H100 80GB HBM3, running on NVIDIA H100 PCIe",
                                                            "rebuild here for the best speed"]),
    ({"hardware_compat": "same-cc"}, ("11.4.0.106", (9, 0), "NVIDIA H100 PCIe"), True, ["hardware-compatible (same-cc)"]),
    ({"hardware_compat": "same-cc"}, ("11.4.0.106", (8, 0), "NVIDIA A100"), False, ["runs only on its compute capability"]),
    ({"hardware_compat": "ampere+"}, ("11.4.0.106", (8, 6), "NVIDIA A10"), True, ["hardware-compatible (ampere+)"]),
    ({"hardware_compat": "ampere+"}, ("11.4.0.106", (7, 5), "Tesla T4"), False, ["compute capability >= 8.0", "has compute capability 7.5"]),
])
def test_compatibility_rules(kwargs, here, ok, words):
    result = check_engine_compat(entry(**kwargs), *here, artifact="engines/xl")
    assert result.ok is ok, result.reason
    for word in words:
        assert word in result.reason
    if not ok:  # every refusal says exactly what to run, with the plan's own profile and flags
        flags = entry(**kwargs)["build"]
        command = result.reason.split("Rebuild it on this machine with: ")[1]
        assert command.startswith("ditrt build engines/xl --network denoiser --min-batch 1 --opt-batch 16 --max-batch 64 "
                                  "--opt-level 3")
        assert ("--version-compatible" in command) == flags["version_compatible"]
        assert (f"--hardware-compat {flags['hardware_compat']}" in command) == (flags["hardware_compat"] != "none")


def test_both_differences_are_named():
    ok, reason = check_engine_compat(entry(), "11.5.0.1", (8, 9), "NVIDIA L40S")
    assert not ok and "TensorRT 11.4.0.106, this is TensorRT 11.5.0.1" in reason and "has 8.9" in reason


def test_malformed_entry_is_refused_not_raised():
    ok, reason = check_engine_compat({"file": "x.plan"}, "11.4.0.106", (9, 0))
    assert not ok and "lacks a field" in reason and "ditrt build" in reason


def test_choose_engine_prefers_exact_native_newest_and_skips_missing_files():
    exact_old = entry(file="a.plan", built_utc="2026-01-01T00:00:00+00:00")
    exact_new = entry(file="b.plan", built_utc="2026-02-01T00:00:00+00:00")
    portable = entry(file="c.plan", hardware_compat="ampere+", built_utc="2026-03-01T00:00:00+00:00")
    older_vc = entry(file="d.plan", trt_version="11.3.0.1", version_compatible=True, built_utc="2026-04-01T00:00:00+00:00")
    other = entry(file="e.plan", cc=(8, 0), gpu="NVIDIA A100")
    everything = [older_vc, portable, exact_old, exact_new, other]
    here = ("11.4.0.106", (9, 0), H100)
    best, reasons = choose_engine(everything, *here, exists=lambda f: True)
    assert best["file"] == "b.plan" and len(reasons) == 1 and reasons[0].startswith("e.plan")
    best, reasons = choose_engine(everything, *here, exists=lambda f: f not in {"a.plan", "b.plan"})
    assert best["file"] == "c.plan" and sum("file is missing" in r for r in reasons) == 2
    assert choose_engine([older_vc], *here, exists=lambda f: True)[0]["file"] == "d.plan"
    best, reasons = choose_engine([exact_new], *here, exists=lambda f: True, graph_sha256={"denoiser.fp16.onnx": "b" * 64})
    assert best is None and "built from another graph" in reasons[0]


def test_messages():
    msg = compat.no_engine_message("engines/xl", [], [], "11.4.0.106", (9, 0), H100,
                                     settings.build_command("engines/xl", EngineProfile(), BuildFlags()))
    assert "engines/xl has no TensorRT engine" in msg and "ditrt build engines/xl --network denoiser --min-batch 1" in msg
    msg = compat.null_engine_message("x.plan", ["Serialization assertion failed: magic tag"], "ditrt build engines/xl")
    assert "returned no engine" in msg and "magic tag" in msg and "ditrt build engines/xl" in msg
    assert "TensorRT logged no error" in compat.null_engine_message("x.plan", [], "ditrt build a")
    err = TensorRTUnavailable("TensorRT is not installed")
    assert isinstance(err, RuntimeError) and "pip install 'ditrt[trt]'" in str(err) and "NVIDIA GPU" in str(err)


def test_engine_parity_bound_follows_the_fp16_graphs_export_bound():
    bound = DENOISER.export_bounds["fp16"]  # the engine inherits the graph's error, plus its own kernels'
    assert bound <= settings.parity_bound("fp16") == settings.FP16_PARITY_BOUND <= 2 * bound


# ---- Polygraphy build configuration (real Polygraphy objects, no TensorRT needed) -------------------

FAKE_TRT = SimpleNamespace(  # stands in for the enums tensorrt would supply
    HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS", SAME_COMPUTE_CAPABILITY="SAME_COMPUTE_CAPABILITY"),
    MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))
SPEC = DENOISER


def test_polygraphy_loader_chain_is_strongly_typed_with_one_batch_profile(tmp_path):
    from ditrt.runtime.jobs.build import engine_loader
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    cache = tmp_path / "timing.cache"
    loader = engine_loader(tmp_path / "denoiser.fp16.onnx", EngineProfile(2, 8, 16), BuildFlags(), SPEC, cache, FAKE_TRT)
    assert isinstance(loader, EngineBytesFromNetwork) and loader.timing_cache_path == str(cache)
    network, config = loader._network, loader._config
    assert isinstance(network, NetworkFromOnnxPath) and network.strongly_typed is True
    assert network.path == str(tmp_path / "denoiser.fp16.onnx")
    assert isinstance(config, CreateConfig)
    # No precision flags at all (TensorRT 11 has none; CreateConfig(fp16=True) raises there).
    assert not any([config.fp16, config.bf16, config.int8, config.fp8, config.precision_constraints])
    assert config.builder_optimization_level == 3 and config.timing_cache_path == str(cache)
    assert config.hardware_compatibility_level is None and not config.version_compatible
    assert config.memory_pool_limits is None
    [profile] = config.profiles
    assert list(profile) == ["latent", "timestep", "class_label"]
    assert tuple(profile["latent"]) == ((2, 4, 8, 8), (8, 4, 8, 8), (16, 4, 8, 8))
    assert tuple(profile["class_label"]) == ((2,), (8,), (16,))


@pytest.mark.parametrize("compat, level", [("ampere+", "AMPERE_PLUS"), ("same-cc", "SAME_COMPUTE_CAPABILITY")])
def test_polygraphy_config_portability_and_workspace(compat, level):
    from ditrt.runtime.jobs.build import config_kwargs
    from polygraphy.backend.trt import CreateConfig
    config = CreateConfig(**config_kwargs(EngineProfile(), BuildFlags(5, compat, True, 2.5), SPEC, "t.cache", FAKE_TRT))
    assert config.builder_optimization_level == 5 and config.hardware_compatibility_level == level
    assert config.version_compatible is True and config.memory_pool_limits == {"WORKSPACE": int(2.5 * 2**30)}


def test_calling_the_loader_without_tensorrt_fails_cleanly(tmp_path):
    from ditrt.runtime.jobs.build import engine_loader
    pytest.importorskip("polygraphy")
    if _importable("tensorrt"):
        pytest.skip("TensorRT is installed here")
    loader = engine_loader(tmp_path / "g.onnx", EngineProfile(), BuildFlags(), SPEC, tmp_path / "c", FAKE_TRT)
    with pytest.raises(Exception, match="tensorrt"):
        loader()


# ---- static check of the TensorRT API used ----------------------------------------------------------

def _api_names() -> set[str]:
    lines = (DATA / "tensorrt-11.4-python-names.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


API_NAMES = _api_names()
LEAN = json.loads((DATA / "tensorrt-11.4-lean-api.json").read_text())
MODULE_ALIASES = {"trt", "_trt"}
HOLDER_CLASS = {"engine": "ICudaEngine", "context": "IExecutionContext", "trt_runtime": "Runtime"}


def in_names_list(name: str) -> bool:
    """Listed, or the tail of a listed string at an identifier boundary. The list was extracted as
    whole strings from the compiled bindings, and the linker stores a string that ends another one
    inside it (tail merging): 'Logger' lives in 'ILogger', 'ERROR' in 'INTERNAL_ERROR', 'Runtime' in
    'IPluginV3OneRuntime', 'DataType' in 'PluginArgDataType'. So such names are absent as lines."""
    if name in API_NAMES:
        return True
    return any(len(s) > len(name) and s.endswith(name) and (s[-len(name) - 1] == "_" or name[0].isupper())
               for s in API_NAMES)


def _chains(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """Every maximal dotted chain rooted at a name (a.b.c), with its line."""
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)}
    chains = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                chains.append((node.lineno, [cur.id, *reversed(parts)]))
    return chains


def trt_api_problems(source: str) -> tuple[list[str], set[str]]:
    """Check every attribute taken from the tensorrt module (`trt`) or from a TensorRT object
    (held in engine/context/trt_runtime): against the TRT 11.4 names list, and, for the runtime
    classes, against the members of the real TRT 11.4 lean bindings. Returns (problems, names used)."""
    problems, used = [], set()
    for line, parts in _chains(ast.parse(source)):
        start = next((i for i, p in enumerate(parts) if p in MODULE_ALIASES or p.lstrip("_") in HOLDER_CLASS), None)
        if start is None or start == len(parts) - 1:
            continue
        head, rest = parts[start], parts[start + 1:]
        used.update(rest)
        where = f"line {line}: {'.'.join(parts)}"
        for name in rest:
            if not in_names_list(name):
                problems.append(f"{where}: {name!r} is not in TensorRT 11.4's Python API")
        if head in MODULE_ALIASES:
            scope = rest[0] if rest[0] in LEAN["classes"] else None
            for name in rest[1:]:
                if scope is None:
                    break
                if f"{scope}.{name}" in LEAN["classes"]:
                    scope = f"{scope}.{name}"
                elif name not in LEAN["classes"][scope]:
                    problems.append(f"{where}: {scope} has no member {name!r} in TensorRT 11.4")
                    break
                else:
                    scope = None
        else:
            cls = HOLDER_CLASS[head.lstrip("_")]
            if rest[0] not in LEAN["classes"][cls]:
                problems.append(f"{where}: {cls} has no member {rest[0]!r} in TensorRT 11.4")
    return problems, used


@pytest.mark.parametrize("path", TRT_MODULES, ids=lambda p: p.name)
def test_tensorrt_code_uses_only_tensorrt_11_api(path):
    problems, used = trt_api_problems(path.read_text())
    assert not problems, "\n".join(problems)
    if path.name == "backend.py":  # the check really sees the runtime's TensorRT calls
        assert {"Runtime", "deserialize_cuda_engine", "engine_host_code_allowed", "create_execution_context",
                "set_device_memory", "set_input_shape", "set_tensor_address", "execute_async_v3",
                "get_tensor_profile_shape", "TensorIOMode", "INPUT", "ILogger", "ERROR"} <= used
    elif path.name == "build.py":
        assert {"HardwareCompatibilityLevel", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY", "MemoryPoolType"} <= used


def test_api_check_catches_removed_and_misspelt_names():
    bad = ("config.set_flag(trt.BuilderFlag.FP16)\nconfig.set_flag(trt.BuilderFlag.BF16)\n"
           "context.execute_async_v2(bindings, stream)\nn = self._engine.num_bindings\nr = trt.Runtim(logger)\n"
           "trt_runtime.deserialize_engine(data)\n")
    problems, _ = trt_api_problems(bad)
    flagged = " ".join(problems)
    for name in ["'FP16'", "no member 'BF16'", "'execute_async_v2'", "'num_bindings'", "'Runtim'", "'deserialize_engine'"]:
        assert name in flagged, flagged
    good = "trt.Logger(trt.Logger.WARNING)\nx = trt.ILogger.Severity.ERROR\ntrt.DataType.HALF\ncontext.set_input_shape('a', s)\n"
    assert trt_api_problems(good)[0] == []


def test_names_list_rule_agrees_with_the_real_bindings_for_what_we_use():
    # The lean bindings' members we rely on are all accepted by the names-list rule, and the
    # fp16/bf16/int8 builder flags are gone in both sources.
    for cls in ("Runtime", "ICudaEngine", "IExecutionContext"):
        assert all(in_names_list(m) for m in LEAN["classes"][cls] if m in {"deserialize_cuda_engine", "execute_async_v3"}
                   or m.startswith("set_") or m.startswith("get_tensor"))
    assert not {"FP16", "BF16", "INT8", "FP8"} & set(LEAN["classes"]["BuilderFlag"])
    assert "FP16" not in API_NAMES and not in_names_list("FP16")


@pytest.mark.skipif(not _importable("tensorrt"), reason="TensorRT is not installed: the names list above is the check here")
def test_api_names_resolve_on_the_installed_tensorrt():
    import tensorrt as trt
    for path in TRT_MODULES:
        for _, parts in _chains(ast.parse(path.read_text())):
            if parts[0] == "trt":
                obj = trt
                for name in parts[1:]:
                    obj = getattr(obj, name)  # AttributeError names the missing piece


# ---- without TensorRT: imports, auto fallback, CLI ---------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make tensorrt and cuda-python unimportable, also on machines that have them."""
    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)


def test_runtime_and_build_modules_import_nothing_heavy():
    code = ("import sys, ditrt.runtime, ditrt.runtime.execution.trt.backend, ditrt.runtime.execution.trt.compat, ditrt.runtime.jobs.build, "
            "ditrt.runtime.execution.trt.device, ditrt.runtime.execution.trt.settings, ditrt.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorrt', 'polygraphy', 'cuda', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def artifact_with_engine(tmp_path, tiny_artifact):
    """A copy of the tiny artifact whose manifest lists a plan (an empty file) for an H100 + TRT 11.4."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, out)
    manifest = load_manifest(out)
    e = entry(graph_sha256=manifest.graph("denoiser", "fp16")["sha256"])
    (out / e["file"]).write_bytes(b"")
    manifest.data["engines"] = [e]
    manifest.save()
    return out


def test_auto_falls_back_to_onnxruntime_without_tensorrt(no_tensorrt, artifact_with_engine):
    from ditrt.runtime.execution.trt.compat import compatible_engine
    assert compatible_engine(load_manifest(artifact_with_engine)) is None
    pipe = runtime.load(artifact_with_engine, backend="auto")
    assert pipe.backend.name.startswith("onnxruntime")


def test_auto_does_not_look_for_tensorrt_when_the_artifact_has_no_engine(monkeypatch, tiny_artifact):
    import ditrt.runtime.execution.trt.device as rt
    calls = []
    monkeypatch.setattr(rt, "environment", lambda: calls.append(1))
    assert compat.compatible_engine(load_manifest(tiny_artifact)) is None and calls == []


def test_tensorrt_backend_without_tensorrt_says_how_to_install(no_tensorrt, tiny_artifact):
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed.*pip install 'ditrt\[trt\]'"):
        runtime.load(tiny_artifact, backend="tensorrt")


def test_engine_selection_and_rebuild_message_with_a_simulated_gpu(monkeypatch, artifact_with_engine):
    import ditrt.runtime.execution.trt.device as rt
    gpu = rt.GpuInfo(H100, (9, 0), "580.65.06", "13.0", "13.0")
    monkeypatch.setattr(rt, "environment", lambda: rt.Environment("11.4.0.106", gpu))
    manifest = load_manifest(artifact_with_engine)
    assert compat.compatible_engine(manifest)["file"] == "denoiser.fp16.sm90.trt11.4.0.106.plan"
    monkeypatch.setattr(rt, "environment", lambda: rt.Environment("11.5.0.3", gpu))
    assert compat.compatible_engine(manifest) is None
    with pytest.raises(ArtifactError) as info:
        trt_backend.TensorRTBackend.from_manifest(manifest)
    message = str(info.value)
    assert "no TensorRT plan in" in message and "built with TensorRT 11.4.0.106, this is TensorRT 11.5.0.3" in message
    assert (f"ditrt build {artifact_with_engine} --network denoiser --min-batch 1 --opt-batch 16 --max-batch 64 "
            "--opt-level 3") in message


def test_cli_build_without_tensorrt_prints_the_install_hint(no_tensorrt, tiny_artifact):
    from ditrt.cli import main
    result = CliRunner().invoke(main, ["build", str(tiny_artifact)])
    assert result.exit_code == 1, result.output
    assert "pip install 'ditrt[trt]'" in result.output and "NVIDIA GPU" in result.output
    assert load_manifest(tiny_artifact).engines == []  # nothing recorded
    skipped = CliRunner().invoke(main, ["build", str(tiny_artifact), "--skip-unavailable"])
    assert skipped.exit_code == 0 and "skipped the TensorRT build" in skipped.output
    assert load_manifest(tiny_artifact).engines == []


def test_cli_sample_on_tensorrt_without_it_exits_1_with_the_hint(no_tensorrt, tiny_artifact, tmp_path):
    from ditrt.cli import main
    result = CliRunner().invoke(main, ["sample", str(tiny_artifact), "--labels", "1", "--backend", "tensorrt",
                                       "--out", str(tmp_path / "x.npy")])
    assert result.exit_code == 1 and "pip install 'ditrt[trt]'" in result.output
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("args, message", [
    (["--min-batch", "8", "--opt-batch", "4"], "min <= opt <= max"),
    (["--opt-level", "7"], "--opt-level must be an integer from 0 to 5"),
    (["--workspace", "-1"], "--workspace (GB) must be a number > 0"),
])
def test_cli_build_rejects_bad_options_with_exit_2(tiny_artifact, args, message):
    from ditrt.cli import main
    result = CliRunner().invoke(main, ["build", str(tiny_artifact), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_build_rejects_an_artifact_without_fp16_graph(tmp_path, tiny_artifact):
    from ditrt.cli import main
    out = tmp_path / "fp32only"
    shutil.copytree(tiny_artifact, out)
    manifest = load_manifest(out)
    del manifest.data["networks"]["denoiser"]["graphs"]["fp16"]
    manifest.save()
    result = CliRunner().invoke(main, ["build", str(out)])
    assert result.exit_code == 2 and "has no fp16 denoiser graph" in result.output and "--precision fp16" in result.output
    assert CliRunner().invoke(main, ["build", str(tmp_path / "missing")]).exit_code == 2


# ---- TensorRTBackend on simulated TensorRT and CUDA ---------------------------------------------------
# The backend's own logic (buffers per batch size, copies, chunking, padding, CUDA graph capture and
# its fallback, teardown) runs here against stand-ins for tensorrt and cuda-python's runtime module:
# "device memory" is host memory, a "graph" replays the enqueues recorded during capture with the
# shapes and addresses they were captured with. The stand-ins only implement members that the real
# TensorRT 11.4 classes have (checked below).


class SimCuda:
    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    def __init__(self):
        self.memory: dict[int, ctypes.Array] = {}
        self.capture: list | None = None
        self.graphs_destroyed = 0

    def _alloc(self, nbytes):
        # Filled with 0xFF, as a debugging allocator would: an int64 label read from memory nobody
        # wrote is -1, which the simulated engine rejects.
        buf = ctypes.create_string_buffer(b"\xff" * max(int(nbytes), 1), max(int(nbytes), 1))
        self.memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capture = self.capture, None
        return 0, ops

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        for op in graph_exec:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        self.graphs_destroyed += 1
        return (0,)

    cudaGraphDestroy = cudaGraphExecDestroy
    cudaGetDeviceCount = staticmethod(lambda: (0, 1))
    cudaGetDevice = staticmethod(lambda: (0, 0))
    cudaGetDeviceProperties = staticmethod(lambda device: (0, SimpleNamespace(name=b"NVIDIA H100 80GB HBM3", major=9, minor=0)))
    cudaDriverGetVersion = cudaRuntimeGetVersion = staticmethod(lambda: (0, 13000))
    cudaStreamCreateWithFlags = staticmethod(lambda flags: (0, 7))
    cudaStreamSynchronize = cudaStreamDestroy = staticmethod(lambda stream: (0,))
    cudaGetErrorName = staticmethod(lambda error: (0, b"cudaErrorSimulated"))
    cudaGetLastError = staticmethod(lambda: (0,))


def formula(feeds):
    """The default simulated network: out[:, :4] = 2 latent + t / 1000, out[:, 4:] = label."""
    x, t, y = feeds["latent"], feeds["timestep"], feeds["class_label"]
    return {"model_output": np.concatenate([2 * x + t[:, None, None, None] / 1000,
                                            np.broadcast_to(y[:, None, None, None], (len(y), 4, 8, 8)).astype(np.float32)],
                                           axis=1)}


def sim_tensorrt(cuda: SimCuda, runtime_errors=(), fail_capture=False, names=("latent", "timestep", "class_label"),
                 compute=formula, profile=(2, 4, 8), num_classes=10):
    """A tensorrt stand-in for the tiny denoiser whose engine runs `compute(feeds) -> outputs`
    on its device buffers and rejects labels outside 0..num_classes in any row it is given."""
    Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")
    DataType = enum.Enum("DataType", "FLOAT HALF INT64 INT32")
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    Strategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC USER_MANAGED")
    io = {names[0]: (DataType.FLOAT, (-1, 4, 8, 8)), names[1]: (DataType.FLOAT, (-1,)),
          names[2]: (DataType.INT64, (-1,)), "model_output": (DataType.FLOAT, (-1, 8, 8, 8))}
    dtype = {DataType.FLOAT: np.float32, DataType.INT64: np.int64}
    low, opt, high = profile

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    def view(addr, shape, dt):
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(addr), dtype=dt).reshape(shape)

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_device_memory(self, memory, size):
            assert memory in cuda.memory and size >= 256

        def set_input_shape(self, name, shape):
            if not low <= shape[0] <= high:
                return False  # outside the profile
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shapes[names[0]][0], *io[name][1][1:])

        def set_tensor_address(self, name, memory):
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            rows, addr = self.shapes[names[0]][0], dict(self.addresses)  # what a graph bakes in

            def run():
                feeds = {std: view(addr[n], (rows, *io[n][1][1:]), dtype[io[n][0]]).copy()
                         for std, n in zip(("latent", "timestep", "class_label"), names)}
                labels = feeds["class_label"]
                assert ((labels >= 0) & (labels <= num_classes)).all(), f"engine got labels {labels}"
                view(addr["model_output"], (rows, 8, 8, 8), np.float32)[:] = compute(feeds)["model_output"]

            if cuda.capture is None:
                run()
            elif fail_capture:
                return False
            else:
                cuda.capture.append(run)
            return True

    class Engine:
        num_io_tensors = len(io)
        device_memory_size_v2 = 1024

        def get_tensor_name(self, index):
            return list(io)[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.OUTPUT if name == "model_output" else TensorIOMode.INPUT

        def get_tensor_dtype(self, name):
            return io[name][0]

        def get_tensor_shape(self, name):
            return io[name][1]

        def get_tensor_profile_shape(self, name, profile_index):
            return [(b, *io[name][1][1:]) for b in (low, opt, high)]

        def create_execution_context(self, strategy):
            assert strategy is Strategy.USER_MANAGED
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False
            for message in runtime_errors:
                logger.log(Severity.ERROR, message)
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            self.host_code_when_deserialising = self.engine_host_code_allowed
            if bytes(serialized_engine).startswith(b"PLAN"):
                return Engine()
            self.logger.log(Severity.ERROR, "Serialization assertion failed: magic tag does not match")
            return None

    return SimpleNamespace(__version__="11.4.0.106", ILogger=ILogger, Runtime=Runtime, DataType=DataType,
                           TensorIOMode=TensorIOMode, ExecutionContextAllocationStrategy=Strategy,
                           classes={"Runtime": Runtime, "ICudaEngine": Engine, "IExecutionContext": Context})


@pytest.fixture
def sim(monkeypatch, tmp_path):
    """Install the stand-ins; returns a factory for a backend over a plan file with a manifest entry."""
    import ditrt.runtime.execution.trt.device as rt
    state = SimpleNamespace(cuda=SimCuda())

    def install(**trt_kwargs):
        state.trt = sim_tensorrt(state.cuda, **trt_kwargs)
        monkeypatch.setattr(rt, "import_tensorrt", lambda: state.trt)
        monkeypatch.setattr(rt, "import_cudart", lambda: state.cuda)

    def make(plan_bytes=b"PLAN-sim", version_compatible=False, allow_host_code=False, **trt_kwargs):
        install(**trt_kwargs)
        plan = tmp_path / "denoiser.fp16.sm90.trt11.4.0.106.plan"
        plan.write_bytes(plan_bytes)
        e = entry(version_compatible=version_compatible, file=plan.name)
        e["sha256"] = hashlib.sha256(plan_bytes).hexdigest()
        return trt_backend.TensorRTBackend(plan, DENOISER, e, artifact="engines/tiny", allow_host_code=allow_host_code)

    state.install, state.make = install, make
    return state


def _inputs(n, seed=0):
    rng = np.random.default_rng([seed, n])
    return {"latent": rng.standard_normal((n, 4, 8, 8), dtype=np.float32),
            "timestep": rng.uniform(0, 999, n).astype(np.float32), "class_label": rng.integers(0, 11, n).astype(np.int64)}


def test_sim_stand_ins_only_use_real_tensorrt_members(sim):
    sim.make()
    for cls, fake in sim.trt.classes.items():
        members = {m for m in vars(fake) if not m.startswith("_")}
        assert members and members <= set(LEAN["classes"][cls]), members - set(LEAN["classes"][cls])


def test_backend_chunks_pads_and_replays_cuda_graphs(sim):
    backend = sim.make()
    assert (backend.profile.min_rows, backend.profile.max_rows, backend.max_batch, backend.min_batch) == (2, 8, 8, 2)
    for n in (1, 5, 11, 5, 1):  # 1: padded to the profile's 2 rows; 11: chunks of 8 and 3
        feeds = _inputs(n, seed=n * 7 + len(backend._slots))
        np.testing.assert_array_equal(backend(feeds)["model_output"], formula(feeds)["model_output"])
    assert sorted(backend._slots) == [2, 3, 5, 8] and not backend.graph_failures
    assert all(slot.graph_exec is not None and slot.runs >= 1 for slot in backend._slots.values())
    feeds = _inputs(11, seed=99)  # new inputs through the captured graphs (replay reads the refilled buffers)
    np.testing.assert_array_equal(backend(feeds)["model_output"], formula(feeds)["model_output"])
    bad = {**_inputs(2), "latent": np.zeros((2, 4, 8, 9), np.float32)}
    with pytest.raises(ValueError, match=r"latent has shape \(2, 4, 8, 9\); this engine takes \(2, 4, 8, 8\)"):
        backend(bad)


def test_backend_falls_back_to_plain_enqueue_when_capture_fails(sim):
    backend = sim.make(fail_capture=True)
    for seed in range(2):
        feeds = _inputs(4, seed)
        np.testing.assert_array_equal(backend(feeds)["model_output"], formula(feeds)["model_output"])
    assert list(backend.graph_failures) == [4] and "capture failed" in backend.graph_failures[4]
    assert backend._slots[4].graph_exec is None


def test_backend_bounds_its_cached_batch_sizes_and_frees_everything(sim):
    from ditrt.runtime.execution.trt.backend import MAX_CACHED_BATCHES
    backend = sim.make()
    for n in range(2, 9):
        backend(_inputs(n))
    assert len(backend._slots) == MAX_CACHED_BATCHES and sorted(backend._slots) == [5, 6, 7, 8]
    backend.close()
    assert sim.cuda.memory == {} and sim.cuda.graphs_destroyed == 2 * 7  # graph + its executable per size
    with pytest.raises(RuntimeError, match="closed"):
        backend(_inputs(2))


def test_backend_drops_a_batch_size_it_could_not_bind(sim):
    backend = sim.make()
    allocated = set(sim.cuda.memory)  # scratch only
    with pytest.raises(RuntimeError, match=r"TensorRT rejected shape \(9, 4, 8, 8\) for latent"):
        backend._slot(9)  # outside the profile
    assert 9 not in backend._slots and set(sim.cuda.memory) == allocated


def test_backend_max_batch(sim):
    assert sim.make().max_batch == 8
    from ditrt.runtime.execution.trt.backend import TensorRTBackend
    backend = sim.make()
    assert TensorRTBackend(backend.plan, DENOISER, backend.entry, max_batch=100).max_batch == 8  # capped at the profile
    assert TensorRTBackend(backend.plan, DENOISER, backend.entry, max_batch=3).max_batch == 3
    with pytest.raises(ValueError, match="below the engine profile's minimum of 2 rows"):
        TensorRTBackend(backend.plan, DENOISER, backend.entry, max_batch=1)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        TensorRTBackend(backend.plan, DENOISER, backend.entry, max_batch=0)


def test_backend_null_engine_carries_tensorrts_message_and_the_rebuild_command(sim):
    with pytest.raises(ArtifactError) as info:
        sim.make(plan_bytes=b"garbage")
    message = str(info.value)
    assert "returned no engine" in message and "magic tag does not match" in message
    assert "ditrt build engines/tiny --network denoiser --min-batch 1 --opt-batch 16 --max-batch 64 --opt-level 3" in message


def test_backend_refuses_a_plan_that_does_not_match_its_entry(sim, tmp_path):
    backend = sim.make()
    (tmp_path / backend.plan.name).write_bytes(b"PLAN-replaced")
    from ditrt.runtime.execution.trt.backend import TensorRTBackend
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        TensorRTBackend(backend.plan, DENOISER, backend.entry)


def test_backend_start_failure_and_wrong_io(sim):
    with pytest.raises(TensorRTUnavailable, match="TensorRT cannot start on this GPU: CUDA initialization failure"):
        sim.make(runtime_errors=["CUDA initialization failure with error: 35"])
    with pytest.raises(ArtifactError, match="the denoiser takes"):
        sim.make(names=("x", "t", "y"))


def test_version_compatible_plans_run_host_code_only_when_allowed(sim):
    with pytest.raises(ArtifactError, match="version-compatible plan: running it executes host code"):
        sim.make(version_compatible=True)
    backend = sim.make(version_compatible=True, allow_host_code=True)
    assert backend._trt_runtime.host_code_when_deserialising is True
    assert sim.make()._trt_runtime.host_code_when_deserialising is False


def test_engine_padding_rows_hold_valid_labels(sim):
    """One image under the 2-row profile minimum: the padding row must be a real row (the engine
    asserts every label it gets is in range; memory nobody wrote reads as label -1)."""
    backend = sim.make(profile=(4, 4, 8))
    feeds = _inputs(1)
    np.testing.assert_array_equal(backend(feeds)["model_output"], formula(feeds)["model_output"])


# ---- the build -> parity gate -> record path, on simulated TensorRT ---------------------------------

@pytest.fixture
def sim_build(sim, monkeypatch, tmp_path, tiny_artifact):
    """`build_engine` on a copy of the tiny artifact with simulated TensorRT: the "builder" returns
    plan bytes, and the simulated engine computes the real fp32 graph (ONNX Runtime) times
    (1 + error), so the parity gate sees a known deviation."""
    import ditrt.runtime.execution.trt.device as rt
    import ditrt.runtime.jobs.build as tb
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = load_manifest(art)
    reference = OnnxRuntimeBackend(manifest.graph_path("denoiser", "fp32"), manifest.network("denoiser"))
    state = SimpleNamespace(art=art, error=1e-3)

    def compute(feeds):
        return {"model_output": reference(feeds)["model_output"] * np.float32(1 + state.error)}

    sim.install(compute=compute, profile=(1, 2, 4))
    monkeypatch.setattr(tb, "require_toolchain", lambda: sim.trt)
    gpu = rt.GpuInfo(H100, (9, 0), "580.65.06", "13.0", "13.0")
    monkeypatch.setattr(rt, "environment", lambda: rt.Environment("11.4.0.106", gpu))
    monkeypatch.setattr(rt, "gpu_info", lambda: gpu)
    monkeypatch.setattr(tb, "engine_loader", lambda *args: (lambda: b"PLAN-built"))
    sys.modules.setdefault("polygraphy", SimpleNamespace(__version__="0.53.6"))
    return state


def test_build_records_a_plan_that_passes_its_gate_and_keeps_other_engines(sim_build):
    from ditrt.runtime.jobs.build import build_engine
    other = entry(file="denoiser.fp16.sm80.trt11.4.0.106.plan", cc=(8, 0), gpu="NVIDIA A100")
    manifest = load_manifest(sim_build.art)
    manifest.data["engines"] = [other]
    manifest.save()
    e = build_engine(sim_build.art, "denoiser", "fp16", EngineProfile(1, 2, 4), log=lambda m: None)
    assert e["parity"]["passed"] and 5e-4 < e["parity"]["max_rel_err"] < 2e-3  # the simulated 1e-3 deviation
    assert e["parity"]["reference"] == "onnxruntime-fp32 on denoiser.fp32.onnx"
    assert (sim_build.art / e["file"]).read_bytes() == b"PLAN-built"
    recorded = load_manifest(sim_build.art).engines
    assert [r["file"] for r in recorded] == [other["file"], e["file"]]  # the other GPU's plan stays
    assert recorded[1]["sha256"] == hashlib.sha256(b"PLAN-built").hexdigest()
    pipe = runtime.load(sim_build.art, backend="tensorrt")  # and the runtime picks it up
    assert pipe.backend.name == "tensorrt-fp16" and pipe.sample([1, 2], num_steps=4, progress=False).shape == (2, 4, 8, 8)


def test_build_discards_a_plan_that_fails_its_gate(sim_build):
    from ditrt.runtime.jobs.build import BuildError, build_engine
    sim_build.error = 0.05  # 5%: far outside the fp16 bound
    with pytest.raises(BuildError, match=r"failed its parity check against onnxruntime-fp32 on denoiser.fp32.onnx"):
        build_engine(sim_build.art, "denoiser", "fp16", EngineProfile(1, 2, 4), log=lambda m: None)
    assert load_manifest(sim_build.art).engines == []
    assert not any(p.suffix in (".plan", ".tmp") for p in sim_build.art.iterdir()), list(sim_build.art.iterdir())


def _cuda_runtime_names_used() -> set[str]:
    """cuda-python runtime members runtime/trt uses: _cuda("name", ...) calls and rt.name chains."""
    tree = ast.parse("\n".join((ROOT / "runtime" / "execution" / "trt" / f).read_text() for f in ("backend.py", "device.py")))
    names = {node.args[0].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_cuda"
             and node.args and isinstance(node.args[0], ast.Constant)}
    names |= {parts[parts.index("rt") + 1] for _, parts in _chains(tree) if "rt" in parts[:-1]}
    return names


def test_sim_cuda_covers_every_cuda_call_the_backend_makes():
    used = _cuda_runtime_names_used()
    assert {"cudaMemcpyAsync", "cudaStreamBeginCapture", "cudaGraphLaunch", "cudaMallocHost"} <= used
    assert all(hasattr(SimCuda, name) for name in used), used - set(dir(SimCuda))


@pytest.mark.skipif(not _importable("cuda.bindings"), reason="cuda-python is not installed")
def test_cuda_calls_exist_in_cuda_python():
    from cuda.bindings import runtime as cudart
    missing = {name for name in _cuda_runtime_names_used() if not hasattr(cudart, name)}
    assert not missing
    assert hasattr(cudart.cudaStreamCaptureMode, "cudaStreamCaptureModeThreadLocal")
    assert hasattr(cudart.cudaMemcpyKind, "cudaMemcpyHostToDevice")
