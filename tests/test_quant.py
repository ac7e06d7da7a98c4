"""Quantized denoiser graphs (issue 27): ModelOpt int8 / fp8 QDQ graphs of the digits example,
calibrated on sampling trajectories, on real ONNX Runtime sessions. Tests that need ModelOpt skip
with the reason where `ditrt[quant]` is not installed; the error naming the extra is tested by
making the import fail."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import QUANT_CALIB, export_quantized
from ditrt import runtime
from ditrt.cli import main
from ditrt.runtime.core.errors import ArtifactError, InputError
from ditrt.runtime.artifact.manifest import load_manifest
from ditrt.runtime.jobs.parity import compare

INT8 = "denoiser.int8.onnx"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trajectory_feeds(manifest, rows: int = 8) -> dict:
    """Denoiser inputs the sampler really produces: states of a DDIM-10 run of the fp32 graph
    (not the calibration's seed, sampler or steps), at several timesteps."""
    pipe = runtime.load(manifest.directory, backend="onnxruntime", precision="fp32", decoder=False)
    run = pipe.start(np.arange(rows // 2), num_steps=10, sampler="ddim", seed=123)
    feeds = []
    while not run.done:
        f = run.feeds()
        feeds.append(f)
        run.advance(pipe.backend(f)["model_output"])
    return feeds[::3]


# ---- the graph and its recipe -------------------------------------------------------------------

def test_int8_graph_is_qdq_and_matches_fp32_within_the_recorded_bound(quant_artifact):
    manifest = load_manifest(quant_artifact)
    entry = manifest.graph("denoiser", "int8")
    assert entry["file"] == INT8 and entry["compute_dtype"] == "int8"
    graph = onnx.load(str(quant_artifact / INT8))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") > 0
    validation = entry["validation"]
    assert validation["qdq_nodes"] == {"QuantizeLinear": ops.count("QuantizeLinear"),
                                       "DequantizeLinear": ops.count("DequantizeLinear")}
    recorded = validation["onnxruntime_vs_reference"]
    assert recorded["max_rel_err"] <= recorded["bound"] == 8e-2
    fp32 = runtime.load(quant_artifact, backend="onnxruntime", precision="fp32", decoder=False).backend
    int8 = runtime.load(quant_artifact, backend="onnxruntime", precision="int8", decoder=False).backend
    assert int8.name == "onnxruntime-int8"
    for feeds in _trajectory_feeds(manifest):
        err = compare(int8(feeds)["model_output"], fp32(feeds)["model_output"])["max_rel_err"]
        # int8 rounding must show (a graph that silently ran fp32 would not), within the bound
        assert 1e-4 < err <= recorded["bound"], (feeds["timestep"][0], err)


def test_recipe_fields_are_read_back(quant_artifact):
    import modelopt

    from ditrt.exporter.quantize import EXCLUDED_LAYERS
    manifest = load_manifest(quant_artifact)
    recipe = manifest.quantization("denoiser", "int8")
    assert recipe.precision == "int8" and recipe.config == "INT8_DEFAULT_CFG"
    assert recipe.modelopt_version == modelopt.__version__
    assert recipe.calibration.sampler == manifest.defaults.sampler == "ddpm"
    assert (recipe.calibration.steps, recipe.calibration.images, recipe.calibration.seed) == (10, 8, 0)
    assert recipe.excluded_layers == EXCLUDED_LAYERS
    raw = manifest.graph("denoiser", "int8")["quantization"]
    # one calibration batch (8 images <= 16 per batch) of 10 guided steps: 10 model calls of 16 rows
    assert raw["calibration"]["model_calls"] == 10 and raw["calibration"]["cfg_scale"] == manifest.defaults.cfg_scale
    assert manifest.quantization("denoiser", "fp8").config == "FP8_DEFAULT_CFG"
    with pytest.raises(ArtifactError, match="no fp16 denoiser graph"):
        manifest.quantization("denoiser", "fp16")


def test_the_decoder_stays_fp32(quant_artifact):
    manifest = load_manifest(quant_artifact)
    assert manifest.precisions("decoder") == ["fp32"]
    with pytest.raises(ArtifactError, match="the decoder has no quantization recipe"):
        runtime.create_backend(manifest, "onnxruntime", "int8", "decoder")
    pipe = runtime.load(quant_artifact, backend="onnxruntime", precision="int8")
    assert pipe.decoder.precision == "fp32"
    images = pipe.decode(pipe.sample([3, 7], num_steps=5, progress=False))
    assert images.shape == (2, 3, 64, 64) and np.isfinite(images).all()


def test_segments_stay_fp32_and_an_int8_pipeline_refuses_a_cache(quant_artifact):
    """Feature caching runs the segments, which have no quantized graphs: an int8 pipeline asked to
    cache is refused before any model call, instead of silently running fp32 segments."""
    manifest = load_manifest(quant_artifact)
    assert manifest.precisions("embed") == ["fp32"] and "int8" in manifest.precisions("denoiser")
    pipe = runtime.load(quant_artifact, backend="onnxruntime", precision="int8", decoder=False)
    with pytest.raises(InputError, match="segments, which have fp32 and fp16 graphs only; this pipeline runs the int8"):
        pipe.sample([3, 7], num_steps=5, sampler="ddim", cache="taylorseer", progress=False)
    assert pipe.last_stats is None or pipe.last_stats.steps == 0
    fp32 = runtime.load(quant_artifact, backend="onnxruntime", precision="fp32", decoder=False)
    assert np.isfinite(fp32.sample([3, 7], num_steps=5, sampler="ddim", cache="taylorseer", progress=False)).all()


def test_calibration_is_deterministic_and_follows_its_seed(quant_artifact, tmp_path):
    again = export_quantized(tmp_path / "again", ("int8",), vae=False)
    assert _sha(again / INT8) == _sha(quant_artifact / INT8)
    assert load_manifest(again).graph("denoiser", "int8")["sha256"][INT8] == _sha(quant_artifact / INT8)
    other = export_quantized(tmp_path / "other", ("int8",), vae=False, calib_seed=1)
    assert _sha(other / INT8) != _sha(quant_artifact / INT8)  # other trajectories, other scales


def test_sampling_int8_is_torch_free(quant_artifact, tmp_path):
    out = tmp_path / "lat.npy"
    code = f"""
import sys
sys.modules['torch'] = None  # any torch import now fails
from ditrt import runtime
pipe = runtime.load({str(quant_artifact)!r}, backend="onnxruntime", precision="int8")
assert pipe.backend.name == "onnxruntime-int8"
x = pipe.sample([1, 2], num_steps=4, progress=False)
assert x.shape == (2, 4, 8, 8)
from ditrt.cli import main
main(['sample', {str(quant_artifact)!r}, '--labels', '3,7', '--steps', '4', '--precision', 'int8',
      '--out', {str(out)!r}])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fp32 = runtime.load(quant_artifact, backend="onnxruntime", precision="fp32").sample([3, 7], num_steps=4,
                                                                                        progress=False)
    int8 = np.load(out)
    assert int8.shape == fp32.shape and 0 < np.abs(int8 - fp32).max() < 0.5 * np.abs(fp32).max()


# ---- fp8: for TensorRT ----------------------------------------------------------------------------

def test_fp8_graph_is_for_tensorrt_and_onnxruntime_refuses_it(quant_artifact):
    manifest = load_manifest(quant_artifact)
    entry = manifest.graph("denoiser", "fp8")
    graph = onnx.load(str(quant_artifact / entry["file"]))
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert ("trt", "TRT_FP8QuantizeLinear") in ops and ("trt", "TRT_FP8DequantizeLinear") in ops
    assert entry["validation"]["tensorrt_lint"]["ok"]
    fake = entry["validation"]["fake_quant_vs_reference"]
    assert fake["max_rel_err"] <= fake["bound"] == 2.5e-1
    with pytest.raises(InputError, match="fp8 graphs are for TensorRT"):
        runtime.load(quant_artifact, backend="onnxruntime", precision="fp8")
    import onnxruntime as ort  # the measurement the refusal rests on: ONNX Runtime cannot load it
    with pytest.raises(Exception, match="TRT_FP8QuantizeLinear"):
        ort.InferenceSession(str(quant_artifact / entry["file"]))


# ---- integrity and bad input --------------------------------------------------------------------

def test_a_tampered_int8_graph_is_refused_by_sha256(quant_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(quant_artifact, art)
    data = bytearray((art / INT8).read_bytes())
    data[len(data) // 2] ^= 1
    (art / INT8).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        runtime.load(art, backend="onnxruntime", precision="int8")
    result = CliRunner().invoke(main, ["verify", str(art)])
    assert result.exit_code == 1 and INT8 in result.output


def test_a_quantized_graph_without_its_recipe_is_refused(quant_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(quant_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    decoder_graph = data["networks"]["decoder"]["graphs"]["fp32"]
    data["networks"]["decoder"]["graphs"]["int8"] = dict(decoder_graph)  # int8 for a network with no recipe
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"networks.decoder.graphs.int8.quantization must be an object"):
        load_manifest(art)
    del data["networks"]["decoder"]["graphs"]["int8"]
    data["networks"]["denoiser"]["graphs"]["int8"]["quantization"]["calibration"]["steps"] = 0
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"quantization.calibration.steps must be"):
        load_manifest(art)


@pytest.mark.parametrize("args, message", [
    (["--calib-images", "0"], "--calib-images must be an integer from 1 to"),
    (["--calib-steps", "0"], "--calib-steps must be"),
    (["--quant-config", "INT4_AWQ_CFG"], "unknown --quant-config 'INT4_AWQ_CFG'; use one of INT8_DEFAULT_CFG, "
                                         "INT8_SMOOTHQUANT_CFG, FP8_DEFAULT_CFG"),
    (["--quant-config", "FP8_DEFAULT_CFG"], "applies to fp8; add it to --precision"),
    (["--precision", "fp32,int4"], "unknown precision(s) ['int4']"),
])
def test_bad_quantization_options_exit_2_with_nothing_written(tmp_path, args, message):
    out = tmp_path / "art"
    base = [] if "--precision" in args else ["--precision", "fp32,int8"]  # each option once: a repeat is refused
    result = CliRunner().invoke(main, ["export", "--example", *base, "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_int8_without_modelopt_names_the_extra(tmp_path):
    out = tmp_path / "art"
    code = f"""
import sys
sys.modules['modelopt'] = None  # as if ditrt[quant] were not installed
from ditrt.cli import main
main(['export', '--example', '--precision', 'fp32,int8', '--out', {str(out)!r}])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "NVIDIA ModelOpt, which is not installed" in r.stderr and "pip install 'ditrt[quant]'" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- the commands that take --precision int8 ------------------------------------------------------

def test_quality_compares_int8_with_fp32(quant_artifact, tmp_path):
    report = tmp_path / "q.json"
    result = CliRunner().invoke(main, ["quality", str(quant_artifact), "--num-images", "20", "--steps", "ddim5",
                                       "--sampler", "ddim", "--backend", "onnxruntime", "--compare", "precision=int8",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["runs"]
    assert [r["backend"] for r in rows] == ["onnxruntime-fp32", "onnxruntime-int8"]
    assert all(0 <= r["accuracy"] <= 1 and r["frechet_distance"] >= 0 for r in rows)


def test_parity_runs_the_int8_graph_against_the_reference(quant_artifact, tmp_path):
    report = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["parity", str(quant_artifact), "--against", "reference", "--precision", "int8",
                                       "--steps", "5", "--batch", "1,3", "--json", str(report)])
    assert result.exit_code == 0, result.output
    checks = json.loads(report.read_text())
    assert {c["backend"] for c in checks["checks"]} == {"onnxruntime-int8"}, checks.keys()
    assert not any("decoder" in c["check"] for c in checks["checks"])  # the decoder has no int8 graph


def test_generate_and_serve_take_int8(quant_artifact, tmp_path):
    out = tmp_path / "gen"
    result = CliRunner().invoke(main, ["generate", str(quant_artifact), "--num-images", "4", "--steps", "3",
                                       "--precision", "int8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert "int8" in json.dumps(run)
    serve_help = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "int8" in serve_help


def test_build_plans_the_int8_denoiser_and_an_fp16_decoder_without_tensorrt(quant_artifact, monkeypatch):
    from ditrt.runtime.core.errors import TensorRTUnavailable
    from ditrt.runtime.jobs import build
    from ditrt.runtime.execution.trt.settings import parity_bound, plan_filename
    jobs = []
    monkeypatch.setattr(build, "build_engine", lambda art, name, precision, profile, flags, log: jobs.append(
        (name, precision)) or {})
    build.build_all(quant_artifact, precision="int8")
    assert jobs == [("denoiser", "int8"), ("decoder", "fp32")]  # the decoder has no int8 graph, nor fp16 here
    assert plan_filename("denoiser", "int8", "sm90", "11.4.0") == "denoiser.int8.sm90.trt11.4.0.plan"
    assert parity_bound("int8") == load_manifest(quant_artifact).graph("denoiser", "int8")["validation"][
        "onnxruntime_vs_reference"]["bound"]
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["build", str(quant_artifact), "--network", "denoiser", "--precision", "int8",
                                       "--skip-unavailable"])
    if not isinstance(result.exception, (TensorRTUnavailable, type(None))):
        raise result.exception
    assert result.exit_code == 0 and "skipped the TensorRT build" in result.output
