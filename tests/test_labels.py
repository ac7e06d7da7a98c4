"""Class names (runtime/artifact/labels.py): id2label in the manifest, names resolved as diffusers'
DiTPipeline.get_label_ids does, in `sample`, `generate`, `quality` and `serve` requests."""
from __future__ import annotations

import io
import json
import shutil

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from hub_cache import ID2LABEL

from ditrt import cli, runtime
from ditrt.runtime.core.errors import ArtifactError
from ditrt.runtime.artifact.labels import ClassNames, LabelError, read_id2label, resolve_labels
from ditrt.runtime.artifact.manifest import write_manifest_digest

# ImageNet-style entries with the shapes real ones have: several synonyms, odd spacing, one name
# ("crane") shared by two classes.
ENTRIES = {"0": "tench, Tinca tinca", "1": " goldfish ,Carassius auratus", "2": "great white shark, white shark, man-eater",
           "3": "crane", "5": "crane, derrick", "7": "ice cream, icecream", "8": "bubble,"}


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def named_artifact(tmp_path_factory, tiny_artifact_with_vae):
    """The tiny artifact (10 classes, with a decoder) with class names in its manifest."""
    art = tmp_path_factory.mktemp("named") / "art"
    shutil.copytree(tiny_artifact_with_vae, art)
    data = json.loads((art / "manifest.json").read_text())
    data["id2label"] = ID2LABEL
    (art / "manifest.json").write_text(json.dumps(data))
    write_manifest_digest(art)
    return art


def test_names_resolve_as_diffusers_dit_pipeline_get_label_ids():
    """Every unambiguous synonym maps to the class diffusers' own DiTPipeline maps it to. The one
    name ditrt drops: the empty one a trailing comma makes ("bubble,"), which no --labels item can be."""
    from diffusers import DiTPipeline
    reference = DiTPipeline(transformer=None, vae=None, scheduler=None, id2label=ENTRIES)
    names = ClassNames({int(k): v for k, v in ENTRIES.items()})
    unambiguous = [name for name in reference.labels if name not in ("crane", "")]
    assert len(unambiguous) == 11
    assert [names.label_of(n) for n in unambiguous] == reference.get_label_ids(unambiguous)
    assert set(names.by_name) == set(reference.labels) - {""}  # the same names, "crane" included


def test_an_ambiguous_or_unknown_name_is_a_clear_error_and_numbers_pass():
    names = ClassNames({int(k): v for k, v in ENTRIES.items()})
    with pytest.raises(LabelError, match=r"class name 'crane' is ambiguous: it names classes 3 \('crane'\); "
                                         r"5 \('crane, derrick'\); give the class number"):
        names.label_of("crane")
    with pytest.raises(LabelError, match=r"unknown class name 'goldfsh'; close matches: 'goldfish'"):
        names.label_of("goldfsh")
    with pytest.raises(LabelError, match="unknown class name 'zebra'; no close match"):
        names.label_of("zebra")
    assert resolve_labels(["tench", "7", 9, " white shark "], names) == [0, 7, 9, 2]
    with pytest.raises(LabelError, match="this artifact has no class names"):
        resolve_labels(["tench"], None)


@pytest.mark.parametrize("value, message", [
    ([], "id2label must be an object"),
    ({"01": "x"}, "id2label key '01' is not a class label 0..9"),
    ({"10": "x"}, "id2label key '10' is not a class label 0..9"),
    ({"-1": "x"}, "id2label key '-1'"),
    ({"1": 3}, "id2label['1'] must be a non-empty string"),
    ({"1": ""}, "id2label['1'] must be a non-empty string"),
    ({"1": "x" * 4097}, "at most 4096 characters"),
])
def test_the_manifest_reader_refuses_bad_id2label(named_artifact, tmp_path, value, message):
    art = tmp_path / "art"
    shutil.copytree(named_artifact, art)
    data = json.loads((art / "manifest.json").read_text())
    data["id2label"] = value
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message.replace("[", r"\[").replace("(", r"\(")):
        runtime.load_manifest(art)
    assert read_id2label({"id2label": {"9": "x" * 4096}}, 10).label_of("9") == 9  # the bounds themselves pass


def test_sample_labels_by_name(named_artifact, tmp_path):
    """`ditrt sample ART --labels tench,goldfish` samples classes 0 and 1, bit for bit."""
    for name, labels in [("names", "tench,goldfish"), ("numbers", "0,1")]:
        r = invoke("sample", named_artifact, "--labels", labels, "--steps", 4, "--out", tmp_path / f"{name}.npy",
                   "--no-progress")
        assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "names.npy").tobytes() == np.load(tmp_path / "numbers.npy").tobytes()
    for labels, message in [("tench,crane", "class name 'crane' is ambiguous"),
                            ("goldfsh", "close matches: 'goldfish'"), ("tench,,1", "comma-separated class numbers or names")]:
        r = invoke("sample", named_artifact, "--labels", labels, "--steps", 4, "--out", tmp_path / "x.npy")
        assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "x.npy").exists()


def test_generate_balances_over_the_named_classes(named_artifact, tmp_path):
    from ditrt.runtime.jobs.generate import balanced_labels
    runs = {}
    for name, labels in [("names", "umbrella,tench,bubble"), ("numbers", "4,0,6")]:
        out = tmp_path / name
        r = invoke("generate", named_artifact, "--num-images", 6, "--out", out, "--labels", labels, "--steps", 2,
                   "--batch", 6, "--shard-size", 6, "--npz", tmp_path / f"{name}.npz", "--no-progress")
        assert r.exit_code == 0, r.output
        with np.load(tmp_path / f"{name}.npz") as z:
            runs[name] = (z["arr_0"].copy(), z["arr_1"].copy())
    want = np.array([4, 0, 6])[balanced_labels(0, 0, 6, 3)]  # generate's seeded balanced order over the 3 classes
    assert runs["names"][1].tolist() == want.tolist() and sorted(want.tolist()) == [0, 0, 4, 4, 6, 6]
    assert np.array_equal(runs["names"][0], runs["numbers"][0]) and np.array_equal(runs["names"][1], runs["numbers"][1])
    r = invoke("generate", named_artifact, "--num-images", 6, "--out", tmp_path / "bad", "--labels", "crane")
    assert r.exit_code == 2 and "ambiguous" in r.output


def test_serve_takes_labels_as_strings(named_artifact):
    from ditrt.runtime.jobs.batching import StepBatcher
    from test_serve import Server
    pipe = runtime.load(named_artifact, backend="onnxruntime-fp32", threads=1, decoder=False)
    with Server(StepBatcher(pipe)) as s, httpx.Client(base_url=s.url, timeout=60) as client:
        by_name = client.post("/v1/samples", json={"labels": ["tench", "white shark"], "steps": 3})
        by_number = client.post("/v1/samples", json={"labels": [0, 2], "steps": 3})
        assert by_name.status_code == 200 and by_number.status_code == 200, by_name.text
        assert np.load(io.BytesIO(by_name.content)).tobytes() == np.load(io.BytesIO(by_number.content)).tobytes()
        for labels, message in [(["crane"], "ambiguous"), (["tenhc"], "close matches: 'tench'")]:
            bad = client.post("/v1/samples", json={"labels": labels, "steps": 3})
            assert 400 <= bad.status_code < 500 and message in bad.text, bad.text
