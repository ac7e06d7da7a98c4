"""Hardening round three (issue 30), the Python side: one test per finding, named after it. Outputs
that would replace an input, special files and unbounded JSON, the adaptive samplers' call budget,
step specs past Python's int-string limit, run directories and locks, options given twice or
without the option they need. Each runs the real CLI or API on real files; a file that must survive
is compared byte for byte afterwards."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt import cli as ditrt_cli
from ditrt import runtime
from ditrt.runtime.jobs import generate as G
from ditrt.runtime.core.errors import ArtifactError, CallBudgetReached, InputError, ScheduleError
from ditrt.runtime.core.files import claimed_output, read_json
from ditrt.runtime.jobs.quality import QualityRun, parse_run
from ditrt.runtime.sampling.samplers import get_sampler, parse_options
from conftest import TINY_CHECKPOINT

HUGE = "9" * 5000  # past Python's 4300-digit int-string limit


def cli(*args):
    """The CLI in-process; a traceback (an exception other than SystemExit) fails the test."""
    r = CliRunner().invoke(ditrt_cli.main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"{type(r.exception).__name__} escaped: {r.exception}"
    return r


def subprocess_cli(*args, timeout=120):
    """The CLI in a child process, for cases that used to hang: a hang fails on the timeout."""
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def snapshot(*paths) -> dict:
    return {Path(p): Path(p).read_bytes() for p in paths}


def intact(saved: dict) -> bool:
    return all(path.is_file() and not path.is_symlink() and path.read_bytes() == data for path, data in saved.items())


@pytest.fixture
def art(tmp_path, tiny_artifact):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    return out


@pytest.fixture(scope="module")
def vae_art(tmp_path_factory, tiny_artifact_with_vae):
    out = tmp_path_factory.mktemp("vae") / "art"
    shutil.copytree(tiny_artifact_with_vae, out)
    return out


@pytest.fixture(scope="module")
def sit_art(sit_golden_artifact):
    return sit_golden_artifact  # conftest: the golden SiT, exported once per session


@pytest.fixture(scope="module")
def sit_pipe(sit_art):
    return runtime.load(sit_art, backend="onnxruntime", precision="fp32")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_artifact):
    """A finished two-image generate run (one shard)."""
    out = tmp_path_factory.mktemp("run") / "run"
    G.generate(G.GenerateJob(tiny_artifact, out, 2, sampling=G.SampleSpec(steps=2), batch=2, shard_size=2))
    return out


def generate_args(artifact, out, *extra):
    return ["generate", artifact, "--num-images", 2, "--steps", 2, "--shard-size", 2, "--batch", 2, "--out", out,
            "--no-progress", *extra]


# ---- no output may be an input ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256", "denoiser.fp32.onnx", "denoiser.fp16.onnx"])
def test_generate_npz_naming_a_file_of_the_artifact_is_refused(art, tmp_path, name):
    saved = snapshot(art / name)
    r = cli(*generate_args(art, tmp_path / "run", "--npz", art / name))
    assert r.exit_code == 2 and "an output never replaces an input" in r.output and name in r.output, r.output
    assert intact(saved) and not (tmp_path / "run").exists()  # refused before any work


def test_generate_npz_naming_the_run_record_or_a_shard_is_refused(tiny_artifact, run_dir):
    saved = snapshot(run_dir / "run.json", run_dir / "shards" / "000000.npz")
    for target, what in ((run_dir / "run.json", "the run record"), (run_dir / "shards" / "000000.npz", "shards")):
        r = cli(*generate_args(tiny_artifact, run_dir, "--resume", "--npz", target))
        assert r.exit_code == 2 and what in r.output, r.output
    assert intact(saved)


def test_generate_npz_naming_the_labels_file_is_refused(tiny_artifact, tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.array([1, 2]))
    saved = snapshot(labels)
    r = cli(*generate_args(tiny_artifact, tmp_path / "run", "--labels", labels, "--npz", labels))
    assert r.exit_code == 2 and "the --labels file" in r.output, r.output
    assert intact(saved)


def test_sample_out_naming_the_manifest_is_refused(art, tmp_path):
    saved = snapshot(art / "manifest.json")
    r = cli("sample", art, "--labels", 1, "--steps", 2, "--out", art / "manifest.json", "--no-progress")
    assert r.exit_code == 2 and "is the artifact's manifest.json" in r.output, r.output
    assert intact(saved) and runtime.load_manifest(art)


def test_sample_latents_naming_a_graph_is_refused(vae_art, tmp_path):
    saved = snapshot(vae_art / "denoiser.fp32.onnx")
    r = cli("sample", vae_art, "--labels", 1, "--steps", 2, "--out", tmp_path / "grid.png",
            "--latents", vae_art / "denoiser.fp32.onnx", "--no-progress")
    assert r.exit_code == 2 and "denoiser.fp32.onnx" in r.output and "never replaces an input" in r.output, r.output
    assert intact(saved) and not (tmp_path / "grid.png").exists()


def test_an_output_reaching_an_input_through_a_link_is_refused(art, tmp_path):
    """A symbolic link to the artifact's folder, and a hard link to its manifest (same inode)."""
    (tmp_path / "via").symlink_to(art)
    os.link(art / "manifest.json", tmp_path / "hard.npy")
    saved = snapshot(art / "manifest.json")
    for out in (tmp_path / "via" / "manifest.json", tmp_path / "hard.npy"):
        r = cli("sample", art, "--labels", 1, "--steps", 2, "--out", out, "--no-progress")
        assert r.exit_code == 2 and "the artifact's manifest.json" in r.output, r.output
    assert intact(saved)


def test_decode_out_dir_over_its_latents_input_is_refused(vae_art, tmp_path):
    latents = tmp_path / "000000.png"  # .npy bytes under the name decode's first per-image PNG takes
    with open(latents, "wb") as f:
        np.save(f, np.zeros((1, 4, 8, 8), np.float32))
    saved = snapshot(latents)
    r = cli("decode", vae_art, latents, "--out-dir", tmp_path)
    assert r.exit_code == 2 and "the latents input" in r.output, r.output
    assert intact(saved)


def test_quality_and_parity_reports_naming_the_manifest_are_refused(art):
    saved = snapshot(art / "manifest.json")
    r = cli("quality", art, "--json", art / "manifest.json", "--no-progress")
    assert r.exit_code == 2 and "is the artifact's manifest.json" in r.output, r.output
    for flag in ("--json", "--junit"):
        r = cli("parity", art, "--against", "reference", flag, art / "manifest.json")
        assert r.exit_code == 2 and "is the artifact's manifest.json" in r.output, r.output
    assert intact(saved)


def test_build_timing_cache_naming_a_graph_is_refused(art):
    saved = snapshot(art / "denoiser.fp16.onnx")
    r = cli("build", art, "--timing-cache", art / "denoiser.fp16.onnx")  # refused before TensorRT is looked for
    assert r.exit_code == 2 and "--timing-cache" in r.output and "denoiser.fp16.onnx" in r.output, r.output
    assert intact(saved)


def test_export_out_holding_its_own_checkpoint_is_refused(art):
    checkpoint = art / "weights.pt"
    shutil.copy(TINY_CHECKPOINT, checkpoint)
    saved = snapshot(checkpoint, art / "manifest.json")
    r = cli("export", checkpoint, "--out", art, "--force")
    assert r.exit_code == 2 and "holds the checkpoint" in r.output, r.output
    assert intact(saved)


# ---- special files and bounded JSON ---------------------------------------------------------------

def test_generate_labels_fifo_is_refused_without_blocking(tiny_artifact, tmp_path):
    os.mkfifo(tmp_path / "labels.npy")
    r = subprocess_cli(*generate_args(tiny_artifact, tmp_path / "run", "--labels", tmp_path / "labels.npy"))
    assert r.returncode == 2 and "labels file" in r.stderr and "not a regular file" in r.stderr, r.stderr


def test_resume_with_run_json_replaced_by_a_fifo_is_refused_without_blocking(tiny_artifact, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "run.json").unlink()
    os.mkfifo(run / "run.json")
    r = subprocess_cli(*generate_args(tiny_artifact, run, "--resume"))
    assert r.returncode == 2 and "run record" in r.stderr and "not a regular file" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["nested", "dev-zero"])
def test_run_json_nested_100k_deep_or_linked_to_dev_zero_is_a_clear_error(tiny_artifact, run_dir, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "run.json").unlink()
    if kind == "nested":
        (run / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        (run / "run.json").symlink_to("/dev/zero")
    r = cli(*generate_args(tiny_artifact, run, "--resume"))
    message = "nest 100000 deep" if kind == "nested" else "not a regular file"
    assert r.exit_code == 2 and message in r.output, r.output


def test_a_manifest_nested_100k_deep_is_an_artifact_error(art):
    (art / "manifest.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ArtifactError, match="unreadable manifest .* nest 100001 deep, above the 800"):
        runtime.load_manifest(art)


def test_json_nesting_is_counted_outside_strings(tmp_path):
    """Brackets inside strings are text: 800 levels load, 801 are refused (the C++ reader's kMaxDepth)."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"s": "[[[[" * 1000, "n": json.loads("[" * 799 + "]" * 799)}))
    assert read_json(path, "file")["s"].startswith("[[[[")
    path.write_text("[" * 801 + "]" * 801)
    with pytest.raises(InputError, match="nest 801 deep"):
        read_json(path, "file")


# ---- the call budget of adaptive samplers ---------------------------------------------------------

def test_dopri5_with_atol_rtol_1e_30_ends_with_the_call_budget(sit_pipe):
    """No float32 loop meets 1e-30: the default budget (1000 calls) ends it, naming what was reached."""
    with pytest.raises(CallBudgetReached, match=r"ode-dopri5 made 1000 model calls \(its max_model_calls\)"):
        sit_pipe.sample([1], sampler="ode-dopri5", atol=1e-30, rtol=1e-30, progress=False)
    with pytest.raises(CallBudgetReached, match="made 30 model calls"):
        sit_pipe.sample([1], sampler="ode-dopri5", atol=1e-30, rtol=1e-30, max_model_calls=30, progress=False)
    assert sit_pipe.last_stats is None or sit_pipe.last_stats.steps != 30  # the failed call records no stats
    assert sit_pipe.sample([1], sampler="ode-dopri5", max_model_calls=1000, progress=False).shape == (1, 4, 8, 8)


def test_max_model_calls_on_sample_and_generate(sit_art, tmp_path):
    r = cli("sample", sit_art, "--labels", 1, "--sampler", "ode-dopri5", "--option", "atol=1e-30", "--option",
            "rtol=1e-30", "--max-model-calls", 20, "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "made 20 model calls" in r.output and not (tmp_path / "x.npy").exists(), r.output
    r = cli("generate", sit_art, "--num-images", 1, "--out", tmp_path / "run", "--sampler", "ode-dopri5", "--option",
            "atol=1e-30", "--option", "rtol=1e-30", "--max-model-calls", 20, "--no-progress")
    assert r.exit_code == 2 and "made 20 model calls" in r.output, r.output


def test_a_5e_324_tolerance_is_refused_naming_the_tolerance(sit_art, tmp_path):
    for name in ("atol", "rtol"):
        with pytest.raises(InputError, match=rf"^{name} must be a number in \[1e-100, 1\], got 5e-324"):
            get_sampler("ode-dopri5").bind(**{name: 5e-324})
    r = cli("sample", sit_art, "--labels", 1, "--sampler", "ode-dopri5", "--option", "atol=5e-324", "--option",
            "rtol=5e-324", "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "must be a number in [1e-100, 1]" in r.output and "cfg_scale" not in r.output, r.output


def test_the_smallest_tolerance_still_integrates(sit_pipe):
    """1e-100, the bound (its derivation in runtime/sampling/flow.py): the step control stays finite and the
    loop ends with the budget, not with NaN blamed on cfg_scale."""
    with pytest.raises(CallBudgetReached):
        sit_pipe.sample([1], sampler="ode-dopri5", atol=1e-100, rtol=1e-100, max_model_calls=40, progress=False)


# ---- step specs past Python's int-string limit ----------------------------------------------------

def test_a_step_spec_of_5000_digits_is_a_clear_error(art, sit_pipe, tmp_path):
    pipe = runtime.load(art, backend="onnxruntime")
    for spec in (HUGE, f"ddim{HUGE}", f"2,{HUGE}", 10 ** 5000):
        with pytest.raises(ScheduleError, match="digits"):
            pipe.sample([1], num_steps=spec, progress=False)
    for spec in (HUGE, 10 ** 5000):
        with pytest.raises(InputError, match="digits"):
            sit_pipe.sample([1], num_steps=spec, progress=False)
    for command in (["sample", art, "--labels", 1, "--out", tmp_path / "x.npy"],
                    ["generate", art, "--num-images", 2, "--out", tmp_path / "run"],
                    ["quality", art, "--json", tmp_path / "q.json"]):
        r = cli(*command, "--steps", HUGE, "--no-progress")
        assert r.exit_code == 2 and "5000 digits" in r.output, r.output


def test_labels_of_5000_digits_are_a_clear_error(art, tmp_path):
    r = cli("sample", art, "--labels", HUGE, "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "5000 digits" in r.output, r.output


# ---- run directories and locks --------------------------------------------------------------------

@pytest.mark.parametrize("out", [".", "/", ""])
def test_generate_out_dot_root_or_empty_is_a_clear_error(tiny_artifact, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    r = cli(*generate_args(tiny_artifact, out))
    assert r.exit_code == 2 and "a run needs a directory of its own" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_holding_a_40_digit_pid_is_stale(tmp_path):
    (tmp_path / ".x.lock").write_text("1" * 40)
    messages = []
    with claimed_output(tmp_path / "x", messages.append):
        assert (tmp_path / ".x.lock").read_text() == str(os.getpid())
    assert any("stale lock" in m for m in messages)


# ---- options given twice, or without the one they need --------------------------------------------

def test_the_same_option_twice_is_refused(art, tmp_path):
    for args in (["--steps", 3, "--steps", 4], ["--seed", 1, "--seed=2"], ["--verify", "--no-verify"]):
        r = cli("sample", art, "--labels", 1, "--out", tmp_path / "x.npy", "--no-progress", *args)
        assert r.exit_code == 2 and "each option once" in r.output, r.output
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(InputError, match="atol is given twice"):
        parse_options(["atol=1e-3", "atol=1e-4"])
    r = cli("sample", art, "--labels", 1, "--steps", 2, "--labels", 2, "--out", tmp_path / "x.npy")
    assert r.exit_code == 2 and "--labels given twice" in r.output, r.output


def test_quality_compare_with_a_key_twice_is_refused():
    with pytest.raises(InputError, match="sets steps twice"):
        parse_run("steps=3,steps=4", QualityRun("base"))
    assert parse_run("steps=3,sampler=ddim", QualityRun("base")).spec.steps == "3"


def test_options_that_need_another_are_refused(art, tmp_path):
    r = cli("sample", art, "--labels", 1, "--steps", 2, "--max-model-calls", 5, "--out", tmp_path / "x.npy")
    assert r.exit_code == 2 and "applies to adaptive samplers only" in r.output, r.output
    r = cli("sample", art, "--labels", 1, "--steps", 2, "--backend", "onnxruntime", "--allow-plan-host-code",
            "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "applies to TensorRT plans" in r.output, r.output
    r = cli("parity", art, "--against", "reference", "--max-rel-err", "1e-3", "--atol", "1e-4")
    assert r.exit_code == 2 and "two different tests" in r.output, r.output
    r = cli("parity", art, "--against", "reference", "--max-rel-err", "1e-3", "--max-rel-err", "1e-4")
    assert r.exit_code == 2 and "twice" in r.output, r.output
    assert not (tmp_path / "x.npy").exists()
