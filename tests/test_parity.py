"""`ditrt parity`: passes on a correct artifact, fails (exit 1) naming the output and worst element
on a corrupted one, runs against a saved golden without torch, writes valid JSON and JUnit."""
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ditrt.runtime.jobs.parity import Golden, compare

FAST = ["--steps", "4", "--batch", "1,3"]


def _ditrt(*args, no_torch=False):
    if no_torch:  # run the CLI in a process where importing torch is impossible
        code = ("import sys; sys.modules['torch'] = None\nfrom ditrt.cli import main\n"
                f"main({[str(a) for a in args]!r})")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def golden_file(tmp_path_factory, tiny_artifact):
    path = tmp_path_factory.mktemp("golden") / "tiny_golden.npz"
    r = _ditrt("parity", tiny_artifact, "--save-golden", path, *FAST)
    assert r.returncode == 0, r.stderr
    return path


def test_passes_on_a_correct_artifact_against_the_reference(tiny_artifact, tmp_path):
    r = _ditrt("parity", tiny_artifact, "--against", "reference", *FAST, "--json", tmp_path / "r.json",
               "--junit", tmp_path / "r.xml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity: 20/20 checks passed" in r.stdout  # denoiser, its 4 segments (feature caching), decoder... per backend
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and len(report["checks"]) == 20
    forward = [c for c in report["checks"] if c["check"].startswith("denoiser forward")]
    assert all(set(c["metrics"]) >= {"max_abs_err", "max_rel_err", "cosine", "worst_index"} for c in forward)
    assert {c["check"] for c in report["checks"]} >= {"denoiser forward batch 1", "denoiser forward batch 3", "loop ddpm 4", "loop ddim ddim4"}


def test_golden_file_holds_inputs_noise_and_outputs(golden_file, tiny_artifact):
    golden = Golden.load(golden_file)
    timesteps = np.concatenate([case.feeds["timestep"] for case, _ in golden.forward])
    labels = np.concatenate([case.feeds["class_label"] for case, _ in golden.forward])
    assert timesteps.min() == 0 and timesteps.max() == 999 and np.any(timesteps % 1 != 0)
    assert 10 in labels and np.any(labels < 10)  # null class and real classes
    assert [c.sampler for c, _ in golden.loops] == ["ddpm", "ddim", "dpm++2m"]
    assert golden.loops[0][0].step_noise.shape == (4, 2, 4, 8, 8)


def test_against_golden_needs_no_torch(golden_file, tiny_artifact, tmp_path):
    r = _ditrt("parity", tiny_artifact, "--against", golden_file, "--json", tmp_path / "g.json", no_torch=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checks passed" in r.stdout
    r = _ditrt("parity", tiny_artifact, "--against", "reference", no_torch=True)
    assert r.returncode == 2 and "needs PyTorch" in r.stderr  # parity: 1 only for numbers out of bounds


def _corrupt(artifact, tmp_path):
    """Copy the artifact and perturb one weight of the fp32 graph's initializers."""
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    path = bad / "denoiser.fp32.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.endswith("final_layer.linear.weight") or
                list(i.dims) == [32, 64] or list(i.dims) == [64, 32])
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))
    return bad


def test_fails_with_exit_1_naming_output_and_worst_element(golden_file, tiny_artifact, tmp_path):
    bad = _corrupt(tiny_artifact, tmp_path)
    r = _ditrt("parity", bad, "--against", golden_file, "--backends", "onnxruntime-fp32", "--junit", tmp_path / "j.xml",
               "--json", tmp_path / "j.json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "model_output[" in r.stdout and "latents[" in r.stdout
    assert "sha256 denoiser.fp32.onnx" in r.stdout.split("FAILED:")[1]
    report = json.loads((tmp_path / "j.json").read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert any(c["output"] == "model_output" and c["metrics"]["worst_index"] for c in failed)
    suites = ET.parse(tmp_path / "j.xml").getroot()
    cases = suites.findall(".//testcase")
    assert len(cases) == len(report["checks"])  # one testcase per check
    failures = [c for c in cases if c.find("failure") is not None]
    assert failures and "model_output" in failures[1].find("failure").get("message")


def test_junit_has_one_testcase_per_check_per_backend(golden_file, tiny_artifact, tmp_path):
    r = _ditrt("parity", tiny_artifact, "--against", golden_file, "--backends", "onnxruntime-fp32,onnxruntime-fp16",
               "--junit", tmp_path / "ok.xml")
    assert r.returncode == 0
    root = ET.parse(tmp_path / "ok.xml").getroot()
    assert root.tag == "testsuites" and root.get("failures") == "0"
    assert [s.get("name") for s in root.findall("testsuite")] == ["ditrt.parity.onnxruntime-fp32", "ditrt.parity.onnxruntime-fp16"]
    counts = [(len(s.findall("testcase")), int(s.get("tests"))) for s in root.findall("testsuite")]
    assert counts == [(10, 10)] * 2, counts  # the denoiser's 6 checks and one per segment (feature caching)


def test_threshold_flags_override_defaults(golden_file, tiny_artifact):
    r = _ditrt("parity", tiny_artifact, "--against", golden_file, "--backends", "onnxruntime-fp16", "--max-rel-err", "onnxruntime-fp16=1e-7")
    assert r.returncode == 1 and "max rel err <= 1e-07" in r.stdout
    r = _ditrt("parity", tiny_artifact, "--against", golden_file, "--backends", "onnxruntime-fp32", "--atol", "1e-3", "--rtol", "1e-3")
    assert r.returncode == 0 and "atol 0.001 + rtol 0.001" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--backends", "onnxruntime-fp32"], "exactly one of"),
    (["--against", "missing.npz"], "golden file not found"),
    (["--against", "reference", "--backends", "onnx"], "unknown backend"),
    (["--against", "reference", "--max-rel-err", "tensorrt-fp16=0.1"], "not in --backends"),
    (["--against", "reference", "--batch", "0"], "--batch sizes must be an integer from 1"),
    (["--against", "reference", "--backends", "tensorrt"], "TensorRT is not installed"),
])
def test_usage_and_artifact_errors_exit_2(tiny_artifact, args, message):
    r = _ditrt("parity", tiny_artifact, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_artifact_errors_exit_2(tmp_path):
    r = _ditrt("parity", tmp_path, "--against", "reference")
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_golden_for_another_model_is_refused(golden_file, tmp_path):
    art = tmp_path / "other"
    r = _ditrt("export", "--config", "DiT-S/8", "--random-init", "--image-size", "64", "--num-classes", "3",
               "--precision", "fp32", "--out", art)
    assert r.returncode == 0, r.stderr
    r = _ditrt("parity", art, "--against", golden_file, "--backends", "onnxruntime-fp32")
    assert r.returncode == 2 and "made for another model" in r.stderr


def test_activation_ranges_and_fp32_blocks(tiny_artifact, tmp_path):
    r = _ditrt("parity", tiny_artifact, "--activation-ranges", "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert all(b["residual"] > 0 and b["mlp_fc1"] > 0 for b in report["blocks"])
    assert "flagged blocks" in r.stdout
    # A headroom so large that every block is flagged: the suggestion names them all.
    r = _ditrt("parity", tiny_artifact, "--activation-ranges", "--headroom", "1e9")
    assert "--fp32-blocks 0,1" in r.stdout


def test_compare_metrics():
    ref = np.array([[1.0, -4.0], [2.0, 0.5]])
    m = compare(ref + np.array([[0, 0.4], [0, 0]]), ref)
    assert m["max_abs_err"] == pytest.approx(0.4) and m["max_rel_err"] == pytest.approx(0.1)
    assert m["worst_index"] == [0, 1] and 0.99 < m["cosine"] < 1
    bad = ref.copy()
    bad[1, 0] = np.nan
    assert compare(bad, ref)["worst_index"] == [1, 0] and compare(bad, ref)["max_rel_err"] == float("inf")
