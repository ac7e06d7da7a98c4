"""The trained example and `ditrt quality`: the README's example draws the digits it is asked for,
and the quality floor CI holds it to. Samples go through the exported ONNX graphs, the runtime's
samplers and guidance, and the decoder graph; a digit classifier trained on scikit-learn's real
digits (shipped with the example) reads them. A guidance or sampler bug fails these tests."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.jobs import quality
from ditrt.runtime.sampling.request import LoadOptions, SampleSpec

pytest.importorskip("sklearn", reason="ditrt quality compares with scikit-learn's digits (pip install 'ditrt[quality]')")

NUM_IMAGES = 200  # 20 per class: enough for accuracy; the Frechet distances are compared with a margin
# Measured at 200 images (seed 0): DDPM-250 3.57; DDIM-50 4.41, DPM-Solver++ 25 / 10 4.24 / 4.16, fp16 3.57.
# A fast configuration may be this much further from the real digits than DDPM-250 (a broken sampler or
# guidance lands far beyond it, or fails the accuracy floor first).
FRECHET_MARGIN = 2.0
ACCURACY_FLOOR = 0.9


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """`ditrt export --example`: the trained digits DiT and its VAE, fp32 and fp16 graphs."""
    from ditrt.exporter.artifact import export_command
    return export_command(example=True, out_dir=tmp_path_factory.mktemp("example") / "art", log=lambda m: None)


@pytest.fixture(scope="module")
def classifier():
    from ditrt.exporter.artifact import DATA
    return quality.DigitClassifier.load(DATA / "digits" / "classifier.npz")


@pytest.fixture(scope="module")
def report(example, classifier):
    base = quality.QualityRun("fp32 DDPM-250", SampleSpec(sampler="ddpm", steps=250, cfg_scale=4.0),
                              LoadOptions(backend="onnxruntime", precision="fp32"))
    runs = [base] + [
        quality.parse_run(text, base) for text in ("sampler=ddim,steps=50", "sampler=dpm++2m,steps=25",
                                                   "sampler=dpm++2m,steps=10", "sampler=ddim,steps=50,precision=fp16")]
    return quality.compare(example, runs, classifier, NUM_IMAGES, seed=0, batch=100)


def test_every_configuration_draws_the_digits_asked_for(report):
    for row in report["runs"]:
        print(f"{row['run']:<40} accuracy {row['accuracy']:.3f}  Frechet {row['frechet_distance']:.3f}  "
              f"{row['images_per_s']:.1f} images/s")
        assert row["accuracy"] >= ACCURACY_FLOOR, row


def test_fast_configurations_stay_near_ddpm_250(report):
    reference = report["runs"][0]["frechet_distance"]
    assert reference < 8  # the real digits' own floor is 0; random images land near 60
    for row in report["runs"][1:]:
        assert row["frechet_distance"] <= reference + FRECHET_MARGIN, row
        assert row["speed_vs_first"] > 1  # each is cheaper than 250 DDPM steps


def test_real_digits_score_perfectly_against_themselves(report):
    ref = report["real_digits_self_check"]
    assert ref["accuracy"] > 0.99 and ref["frechet_distance"] < 1e-9 and ref["precision"] > 0.99


def test_unguided_samples_are_less_accurate(example, classifier):
    """cfg 1 (no guidance) reads as the asked class less often than cfg 4: guidance is what the
    accuracy floor measures."""
    base = quality.QualityRun("cfg 4", SampleSpec(sampler="ddim", steps=25), LoadOptions(backend="onnxruntime"))
    runs = [base, quality.parse_run("cfg_scale=1", base)]
    rows = quality.compare(example, runs, classifier, 100, seed=1)["runs"]
    assert rows[0]["accuracy"] >= ACCURACY_FLOOR and rows[1]["accuracy"] < rows[0]["accuracy"] - 0.1


def test_the_readme_grid_shows_the_requested_digits(example, classifier, tmp_path):
    """The README's main job: `ditrt sample engines/example --labels 3,7,1,5 --steps 50 --out ...png`."""
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "sample", str(example), "--labels", "3,7,1,5", "--steps", "50",
                        "--out", str(tmp_path / "sample.png"), "--out-dir", str(tmp_path / "each"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    images = np.stack([np.asarray(Image.open(tmp_path / "each" / f"{i:06d}.png"), np.float32) for i in range(4)])
    as_decoded = images.transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1)  # back to [-1, 1] (to_uint8's inverse)
    assert list(classifier.predict(as_decoded)) == [3, 7, 1, 5]


def test_cli_quality_prints_a_table_and_writes_json(example, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "quality", str(example), "--num-images", "20", "--sampler",
                        "ddim", "--steps", "10", "--compare", "steps=5", "--json", str(tmp_path / "q.json"),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "steps=5" in r.stdout and "speed_vs_first" in r.stdout
    data = json.loads((tmp_path / "q.json").read_text())
    assert [row["run"] for row in data["runs"]] == ["base", "steps=5"] and data["noise"]
    bad = subprocess.run([sys.executable, "-m", "ditrt.cli", "quality", str(example), "--compare", "steps"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "key=value" in bad.stderr


def test_cli_quality_compares_caches_with_block_evaluations(example, tmp_path):
    """The acceptance form: --compare cache=taylorseer,cache_interval=3 --compare
    cache=first-block,threshold=0.05 --json FILE; block_evaluations on every row, uncached too."""
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "quality", str(example), "--num-images", "20", "--sampler",
                        "ddim", "--steps", "12", "--batch", "10", "--compare", "cache=taylorseer,cache_interval=3",
                        "--compare", "cache=first-block,threshold=0.05", "--json", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["runs"]
    depth = runtime.load_manifest(example).model.depth
    assert [row["cache"] for row in rows] == ["none", "taylorseer", "first-block"]
    assert rows[0]["block_evaluations"] == depth * 12
    assert rows[1]["block_evaluations"] == depth * 6  # full calls 0, 1, 2, 4, 7, 10 of 12
    assert depth * 12 >= rows[2]["block_evaluations"] >= depth + 11  # block 0 every call, the rest once at least
    assert all(0 <= row["accuracy"] <= 1 and row["frechet_distance"] >= 0 for row in rows)
