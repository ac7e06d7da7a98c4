"""`ditrt quality --plot` (runtime/jobs/plots.py) and `quality --labels`: a real quality run drawn as a
PNG, each configuration named; block evaluations as a second cost axis when the rows carry them."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from ditrt import cli
from ditrt.runtime.jobs import plots
from ditrt.runtime.core.errors import InputError

pytest.importorskip("sklearn", reason="ditrt quality compares with scikit-learn's digits (pip install 'ditrt[quality]')")
pytest.importorskip("matplotlib", reason="--plot draws with matplotlib (pip install 'ditrt[quality]')")

from test_labels import named_artifact  # noqa: E402,F401 - the fixture: the tiny artifact with class names


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_quality_plot_and_labels_by_name(named_artifact, tmp_path):  # noqa: F811
    r = invoke("quality", named_artifact, "--num-images", 20, "--steps", 3, "--compare", "steps=2",
               "--labels", "tench,goldfish", "--json", tmp_path / "q.json", "--plot", tmp_path / "q.png", "--no-progress")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["labels"] == "tench,goldfish" and "over classes tench,goldfish" in r.output
    with Image.open(tmp_path / "q.png") as image:
        assert image.format == "PNG"
        assert image.size == (990, 756)  # 11 x 4.2 inches per cost row at 90 dpi: images/s, block evaluations (every row has them)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def _report(with_blocks: bool) -> dict:
    rows = [{"run": name, "frechet_distance": fd, "accuracy": acc, "images_per_s": speed,
             **({"block_evaluations": blocks} if with_blocks else {})}
            for name, fd, acc, speed, blocks in [("base", 3.3, 0.99, 7.0, 1000), ("sampler=ddim,steps=50", 4.0, 0.99, 22.0, 200),
                                                 ("cache=2", 4.4, 0.98, 35.0, 120)]]
    return {"num_images": 1000, "seed": 0, "runs": rows}


def test_the_plot_names_every_configuration_and_adds_block_evaluations(tmp_path):
    figure = plots.draw_report(_report(with_blocks=True))
    axes = figure.axes
    assert len(axes) == 4  # (images/s, block evaluations) x (Frechet, accuracy)
    assert [ax.get_xlabel() for ax in axes] == ["images/s"] * 2 + ["block evaluations"] * 2
    assert [ax.get_ylabel().split(" (")[0] for ax in axes] == ["Fréchet distance", "digit accuracy"] * 2
    for ax in axes:
        assert sorted(t.get_text() for t in ax.texts) == sorted(["base", "sampler=ddim,steps=50", "cache=2"])
    assert [tuple(p) for p in axes[2].collections[0].get_offsets()] == [(1000, 3.3), (200, 4.0), (120, 4.4)]
    plots.plot_report(_report(with_blocks=True), tmp_path / "two.png")
    with Image.open(tmp_path / "two.png") as image:
        assert image.size == (990, 756)  # two cost rows
    assert len(plots.draw_report(_report(with_blocks=False)).axes) == 2


def test_plot_refusals(tmp_path, monkeypatch, named_artifact):  # noqa: F811
    r = invoke("quality", named_artifact, "--num-images", 20, "--plot", tmp_path / "q.svg")
    assert r.exit_code == 2 and "--plot writes a PNG" in r.output and list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="no configurations"):
        plots.draw_report({"runs": []})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(InputError, match=r"--plot needs matplotlib: pip install 'ditrt\[quality\]'"):
        plots.check_plot_target(tmp_path / "q.png")
