"""The request value objects (runtime/sampling/request.py) and the registry helpers: a sampler option
registered once reaches every entry point, the family filter, eta given twice, the progress lines."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt import cli as ditrt_cli
from ditrt import runtime
from ditrt.runtime.jobs import generate as G
from ditrt.runtime.core.errors import InputError
from ditrt.runtime.core.files import read_json
from ditrt.runtime.core.progress import JobProgress, ProgressLine
from ditrt.runtime.jobs.quality import QualityRun, parse_run
from ditrt.runtime.sampling.request import LoadOptions, SampleSpec, sampler_options
from ditrt.runtime.sampling.samplers import SAMPLERS, option_names, samplers_of
from ditrt.runtime.jobs.shards import plan_shards, read_shard
from sampler_variant import DummyOptionWorker, dummy_ddim

SEED, STEPS, CFG = 5, 3, 4.0
LOAD = LoadOptions(backend="onnxruntime", precision="fp32", threads=1)


def cli(*args):
    r = CliRunner().invoke(ditrt_cli.main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{type(r.exception).__name__}: {r.exception}"
    return r


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return runtime.load_pipeline(tiny_artifact, LOAD)


@pytest.fixture(scope="module")
def plain(pipe):
    """Four images with the registry's own DDIM (before any variant): the expected values are
    twice these, exactly (the variant scales by 1 + dummy)."""
    labels = G.balanced_labels(SEED, 0, 4, pipe.manifest.model.num_classes)
    return labels, pipe.sample(labels, num_steps=STEPS, sampler="ddim", cfg_scale=CFG, seed=SEED, progress=False)


def test_a_new_sampler_option_reaches_every_entry_point(tiny_artifact, pipe, plain, tmp_path, monkeypatch):
    """The dummy option lives in its registry entry only (tests/sampler_variant.py): the Python
    API, `ditrt sample --option`, a serve request's options, `ditrt generate --option` (its workers
    and its run record) and a quality configuration (`--compare dummy=1`) all take it."""
    from fastapi.testclient import TestClient

    from ditrt.runtime.jobs.batching import StepBatcher
    from ditrt.serve import create_app
    labels, expected = plain[0], 2 * plain[1]
    monkeypatch.setitem(SAMPLERS, "ddim", dummy_ddim())

    assert np.array_equal(pipe.sample(labels, num_steps=STEPS, sampler="ddim", cfg_scale=CFG, seed=SEED, dummy=1,
                                      progress=False), expected)

    out = tmp_path / "x.npy"
    r = cli("sample", tiny_artifact, "--labels", ",".join(map(str, labels)), "--steps", STEPS, "--sampler", "ddim",
            "--cfg-scale", CFG, "--seed", SEED, "--option", "dummy=1", "--backend", "onnxruntime", "--precision", "fp32",
            "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(out), expected)

    body = {"labels": labels.tolist(), "steps": STEPS, "sampler": "ddim", "cfg_scale": CFG, "seed": SEED,
            "options": {"dummy": 1}}
    with TestClient(create_app(StepBatcher(pipe, warm_up=False))) as client:
        answer = client.post("/v1/samples", json=body)
        assert answer.status_code == 200, answer.text
        assert np.array_equal(np.load(io.BytesIO(answer.content)), expected)
        assert client.get("/v1/model").json()["sampler_options"]["ddim"] == ["dummy"]  # eta has its own field

    run = tmp_path / "run"
    monkeypatch.setattr(G, "ShardWorker", DummyOptionWorker)  # the workers' processes register the variant too
    r = cli("generate", tiny_artifact, "--num-images", 4, "--batch", 3, "--shard-size", 2, "--steps", STEPS,
            "--sampler", "ddim", "--cfg-scale", CFG, "--seed", SEED, "--option", "dummy=1", "--backend", "onnxruntime",
            "--precision", "fp32", "--out", run, "--no-progress")
    assert r.exit_code == 0, r.output
    for shard in plan_shards(4, 2):  # the second starts at image 2: its noise is images 2 and 3 of the seed's
        samples, shard_labels = read_shard(run / shard.name, shard, "latents")
        assert np.array_equal(shard_labels, labels[shard.start:shard.stop])
        assert np.array_equal(samples, expected[shard.start:shard.stop])
    assert read_json(run / G.RECORD_NAME, "run record")["options"]["dummy"] == 1.0

    compared = parse_run("dummy=1", QualityRun("base", SampleSpec(sampler="ddim", steps=str(STEPS), cfg_scale=CFG)))
    assert compared.spec.options == {"dummy": 1.0}
    assert G.resolve_sampling(pipe.manifest, compared.spec, labels)["dummy"] == 1.0  # quality's check of each run
    batches = list(pipe.sample_batches(compared.spec.for_batch(None, seed=SEED), labels, 3))  # quality's loop
    assert np.array_equal(np.concatenate(batches), expected)


def test_without_the_variant_the_option_is_refused_everywhere(tiny_artifact, pipe, tmp_path):
    """The same requests against the registry as shipped: each entry point refuses `dummy`."""
    from ditrt.serve import SampleRequest
    with pytest.raises(InputError, match="dummy applies to no sampler only; ddim takes no dummy"):
        pipe.sample([1], num_steps=STEPS, sampler="ddim", dummy=1, progress=False)
    with pytest.raises(InputError, match="a sampler option"):
        SampleRequest.parse(b'{"labels": [1], "options": {"dummy": 1}}', 60.0)
    r = cli("sample", tiny_artifact, "--labels", 1, "--steps", STEPS, "--sampler", "ddim", "--option", "dummy=1",
            "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "ddim takes no dummy" in r.output


def test_eta_given_twice_is_refused(tiny_artifact, tmp_path):
    assert sampler_options(None, {"eta": 0.3}) == {"eta": 0.3} and sampler_options(0.5, {}) == {"eta": 0.5}
    with pytest.raises(InputError, match="eta is given twice"):
        sampler_options(0.5, {"eta": 0.3})
    r = cli("sample", tiny_artifact, "--labels", 1, "--steps", STEPS, "--sampler", "ddim", "--eta", 0.5,
            "--option", "eta=0.3", "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "eta is given twice" in r.output


def test_the_samplers_of_a_family():
    assert list(samplers_of("dit")) == ["ddpm", "ddim", "dpm++2m"]
    assert list(samplers_of("sit")) == ["ode-euler", "ode-heun2", "ode-dopri5", "sde-euler", "sde-heun"]
    assert option_names(samplers_of("sit").values()) == ["atol", "diffusion_form", "diffusion_norm", "last_step",
                                                          "last_step_size", "rtol"]
    assert option_names(samplers_of("dit").values()) == ["eta"]
    assert option_names(samplers_of("dit").values(), exclude=("eta",)) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_on_a_terminal_and_in_a_log():
    progress = G.Progress(images_done=5, images_total=10, shards_done=1, shards_total=2, computed=5, seconds=1.0)
    log = io.StringIO()
    JobProgress(log)(progress)
    assert log.getvalue() == "generate: 5/10 images, shard 1/2, 5.00 images/s, ETA 0:00:01\n"
    terminal = _Terminal()
    line = ProgressLine("generate", "generate: ", terminal)
    line.show(0.5, "half")
    assert terminal.getvalue() == "\rgenerate [" + "#" * 15 + "." * 15 + "] half\033[K"
    line.close()
    line.close()  # once: the line is ended
    assert terminal.getvalue().endswith("half\033[K\n") and terminal.getvalue().count("\n") == 1
    line.show(1.0, "done")  # a full bar ends its own line
    assert terminal.getvalue().endswith("] done\033[K\n")


def test_every_backend_checks_its_feeds_before_it_runs(pipe):
    """BackendBase: the feed check comes before the backend's own `infer` (ONNX Runtime here; a
    missing or misshapen input is the caller's error, not an engine failure)."""
    backend = pipe.backend
    feeds = backend.network.example_inputs(2)
    assert backend(feeds)[backend.network.output.name].shape[0] == 2
    latent = backend.network.input("latent").name
    with pytest.raises(InputError, match="takes inputs"):
        backend({k: v for k, v in feeds.items() if k != latent})
    with pytest.raises(InputError, match=f"input {latent} has shape \\(2, 1\\)"):
        backend({**feeds, latent: np.zeros((2, 1), np.float32)})
