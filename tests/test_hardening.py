"""The red-team cases of the hardening review, one test per case (named after it): silent wrong
results, lost or destroyed files, raw tracebacks and wrong exit codes, resources, misleading
messages. Each runs the real CLI or API on real files."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditrt import runtime
from ditrt.runtime.core.errors import ArtifactError, InputError, StepError
from ditrt.runtime.core.files import atomic_output, claimed_output
from ditrt.runtime.artifact.manifest import load_manifest
from conftest import TINY_CHECKPOINT


def ditrt(*args):
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True)


def no_traceback(r):
    return "Traceback" not in r.stderr


@pytest.fixture
def art(tmp_path, tiny_artifact):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    return out


# ---- silent wrong results -----------------------------------------------------------------------

def test_flipped_bytes_in_a_graph_are_refused_at_load(art, tmp_path):
    graph = art / "denoiser.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[-200:-196] = bytes(b ^ 0xFF for b in data[-200:-196])
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="denoiser.fp32.onnx does not match its sha256"):
        runtime.load(art, backend="onnxruntime")
    r = ditrt("sample", art, "--labels", "1", "--steps", "4", "--backend", "onnxruntime", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "does not match its sha256" in r.stderr and not (tmp_path / "x.npy").exists()
    assert ditrt("verify", art).returncode == 1
    # the documented opt-out still runs the changed graph
    assert runtime.load(art, backend="onnxruntime", verify=False).sample([1], num_steps=3, progress=False).shape == (1, 4, 8, 8)


def test_verify_passes_on_a_clean_artifact(art):
    r = ditrt("verify", art)
    assert r.returncode == 0 and "11/11 files match the manifest" in r.stdout  # the manifest, fp32 + fp16 of the denoiser and 4 segments


def test_cfg_scale_1e39_is_refused_in_float32(art, tmp_path):
    r = ditrt("sample", art, "--labels", "1", "--steps", "4", "--cfg-scale", "1e39", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "cfg_scale must be a finite float32 number" in r.stderr and no_traceback(r)
    assert not (tmp_path / "x.npy").exists()


def test_a_nan_result_fails_the_step_and_writes_nothing(art, tmp_path, monkeypatch):
    """A backend whose output turns non-finite: the loop names the step and the backend."""
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    real = OnnxRuntimeBackend.__call__

    def overflowing(self, feeds):
        out = real(self, feeds)
        out["model_output"][:] = np.inf
        return out

    monkeypatch.setattr(OnnxRuntimeBackend, "__call__", overflowing)
    with pytest.raises(StepError, match=r"NaN or inf at step 1/4 \(timestep 999\) on onnxruntime-fp32"):
        runtime.load(art, backend="onnxruntime").sample([1], num_steps=4, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "--image-size (pixels) must be an integer from 8 to 8192"),
    (["--num-heads", "0"], "--num-heads must be an integer from 1 to 4096"),
    (["--num-heads", "7"], "hidden_size 384 is not divisible by num_heads 7"),
])
def test_export_options_are_refused_not_replaced(tmp_path, args, message):
    r = ditrt("export", "--config", "DiT-S/8", "--random-init", "--image-size", "64", "--num-classes", "3", *args,
              "--out", tmp_path / "x")
    r = r if args[0] != "--image-size" else ditrt("export", "--config", "DiT-S/8", "--random-init", *args,
                                                   "--out", tmp_path / "x")
    assert r.returncode == 2 and message in r.stderr and no_traceback(r), r.stderr
    assert not (tmp_path / "x").exists()


def test_num_heads_with_random_init_is_honoured(tmp_path):
    r = ditrt("export", "--config", "DiT-S/8", "--random-init", "--image-size", "64", "--num-classes", "3",
              "--num-heads", "12", "--precision", "fp32", "--out", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    assert load_manifest(tmp_path / "x").model.num_heads == 12


def test_an_empty_golden_file_is_refused(art, tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, meta=np.array(json.dumps({"format": "ditrt.golden/2", "forward": [], "loops": [], "model": {}})))
    r = ditrt("parity", art, "--against", path)
    assert r.returncode == 2 and "holds no checks" in r.stderr


def test_parity_steps_and_batch_with_a_golden_file_are_refused(art, tmp_path):
    r = ditrt("parity", art, "--save-golden", tmp_path / "g.npz", "--steps", "3", "--batch", "1")
    assert r.returncode == 0, r.stderr
    r = ditrt("parity", art, "--against", tmp_path / "g.npz", "--steps", "50", "--batch", "7")
    assert r.returncode == 2 and "--steps and --batch cannot apply to a golden file" in r.stderr


def test_sample_eta_with_ddpm_and_max_batch_0_are_refused(art, tmp_path):
    r = ditrt("sample", art, "--labels", "1", "--eta", "0.5", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "eta applies to ddim only; ddpm takes no eta" in r.stderr
    r = ditrt("sample", art, "--labels", "1", "--max-batch", "0", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "max_batch must be a positive integer" in r.stderr


# ---- lost or destroyed files ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "device"])
def test_out_never_replaces_what_is_not_a_regular_file(art, tmp_path, kind):
    target = tmp_path / "target"
    if kind == "symlink":
        (tmp_path / "real.txt").write_text("mine")
        target.symlink_to(tmp_path / "real.txt")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target = "/dev/null"
    r = ditrt("sample", art, "--labels", "1", "--steps", "3", "--out", target, "--no-progress")
    assert r.returncode == 2 and "is not a regular file" in r.stderr and no_traceback(r), r.stderr
    if kind == "symlink":
        assert target.is_symlink() and (tmp_path / "real.txt").read_text() == "mine"
    if kind == "device":
        assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_out_under_a_file_is_a_clear_error(art, tmp_path):
    (tmp_path / "file").write_text("x")
    r = ditrt("sample", art, "--labels", "1", "--steps", "3", "--out", tmp_path / "file" / "x.npy", "--no-progress")
    assert r.returncode == 2 and "cannot write" in r.stderr and no_traceback(r)


def test_a_racing_export_to_the_same_out_fails_clearly(tmp_path):
    out = tmp_path / "x"
    with claimed_output(out):  # another export holds the claim (this process: alive)
        r = ditrt("export", "--example", "--out", out, "--precision", "fp32")
    assert r.returncode == 2 and "is writing" in r.stderr and not out.exists()


def test_a_stale_lock_of_a_dead_process_is_removed(tmp_path):
    out = tmp_path / "x"
    (tmp_path / ".x.lock").write_text("999999")
    messages = []
    with claimed_output(out, messages.append):
        pass
    assert any("stale lock" in m for m in messages) and not (tmp_path / ".x.lock").exists()


def test_force_killed_mid_swap_is_recovered_on_the_next_run(tmp_path, tiny_artifact):
    out = tmp_path / "x"
    shutil.copytree(tiny_artifact, tmp_path / ".x.old-999999")  # the state a kill between the renames leaves
    messages = []
    with claimed_output(out, messages.append):
        pass
    assert (out / "manifest.json").is_file() and load_manifest(out)
    assert any("recovered the previous artifact" in m for m in messages)


def test_stale_temp_folders_of_killed_exports_are_removed(tmp_path):
    out = tmp_path / "x"
    stale = tmp_path / ".x.tmp-999999-abcd"
    stale.mkdir()
    (stale / "denoiser.fp32.onnx").write_bytes(b"0" * 1000)
    r = ditrt("export", "--example", "--out", out, "--precision", "fp32")
    assert r.returncode == 0 and not stale.exists() and "left by a killed export" in r.stderr


def test_force_keeps_files_it_did_not_create(art):
    (art / "timing.sm90.trt11.4.0.106.cache").write_bytes(b"timings")
    (art / "notes.txt").write_text("mine")
    r = ditrt("export", "--example", "--out", art, "--precision", "fp32", "--force")
    assert r.returncode == 0, r.stderr
    assert (art / "timing.sm90.trt11.4.0.106.cache").read_bytes() == b"timings" and (art / "notes.txt").read_text() == "mine"
    assert "kept notes.txt" in r.stderr and not (art / "denoiser.fp16.onnx").exists()  # the old graph went


# ---- raw tracebacks, wrong exit codes -------------------------------------------------------------

def test_a_truncated_graph_is_an_artifact_error_not_a_traceback(art, tmp_path):
    graph = art / "denoiser.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    # read (without its data) for its external-data references before ONNX Runtime sees it
    with pytest.raises(ArtifactError, match="denoiser.fp32.onnx is not a readable ONNX graph: DecodeError"):
        runtime.load(art, backend="onnxruntime", verify=False)
    r = ditrt("sample", art, "--labels", "1", "--no-verify", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and no_traceback(r)


def test_a_shape_edit_in_the_manifest_is_refused_by_name(art):
    data = json.loads((art / "manifest.json").read_text())
    data["model"]["input_size"] = 16
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="networks.denoiser inputs/outputs .* do not match the model section"):
        runtime.load(art)


def test_parity_exits_2_when_it_cannot_run(art, tmp_path):
    (art / "denoiser.fp16.onnx").write_bytes(b"garbage")
    r = ditrt("parity", art, "--against", "reference", "--backends", "onnxruntime-fp16", "--steps", "3", "--batch", "1")
    assert r.returncode == 2 and no_traceback(r)


def test_a_full_disk_leaves_no_zero_byte_report(tmp_path):
    with pytest.raises(InputError, match="is not a regular file"):
        with atomic_output("/dev/full") as f:
            f.write(b"x")


# ---- checkpoints --------------------------------------------------------------------------------

def _edited_checkpoint(tmp_path, name, edit):
    sd = torch.load(TINY_CHECKPOINT, weights_only=True)
    edit(sd)
    path = tmp_path / f"{name}.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("3d_patch", lambda sd: sd.update({"x_embedder.proj.weight": sd["x_embedder.proj.weight"][:, :, 0]}),
     "a DiT patch embedding is a 4-D convolution kernel"),
    ("zero_kernel", lambda sd: sd.update({"x_embedder.proj.weight": torch.zeros(64, 4, 0, 0)}), "has an empty shape"),
    ("non_string_key", lambda sd: sd.update({5: torch.zeros(1)}), "keys must be strings"),
    ("sparse", lambda sd: sd.update({"pos_embed": sd["pos_embed"].to_sparse()}), "sparse or other non-dense"),
    ("nan_weights", lambda sd: sd["final_layer.linear.weight"].__setitem__((0, 0), float("nan")),
     "NaN or inf weights in final_layer.linear.weight"),
])
def test_odd_checkpoints_are_refused_with_the_reason(tmp_path, name, edit, message):
    r = ditrt("inspect", _edited_checkpoint(tmp_path, name, edit), "--num-heads", "4")
    assert r.returncode == 2 and message in r.stderr and no_traceback(r), r.stderr


def test_a_code_executing_pickle_is_named_as_such(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"a": Evil()}, path)
    r = ditrt("inspect", path)
    assert r.returncode == 2 and "unsupported GLOBAL posix.system" in r.stderr and "pwned" not in r.stdout


def test_a_legacy_non_zip_checkpoint_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(torch.load(TINY_CHECKPOINT, weights_only=True), path, _use_new_zipfile_serialization=False)
    r = ditrt("inspect", path, "--num-heads", "4")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("heads, message", [('"four"', "num_attention_heads must be a positive integer"),
                                            ("0", "num_attention_heads must be a positive integer")])
def test_bad_diffusers_head_counts_are_refused(tmp_path, tiny_checkpoint, heads, message):
    from helpers import save_diffusers
    folder = tmp_path / "dit"
    weights = save_diffusers(tiny_checkpoint.state_dict, tiny_checkpoint.config, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": json.loads(heads)}))
    r = ditrt("inspect", weights)
    assert r.returncode == 2 and message in r.stderr and no_traceback(r), r.stderr


# ---- resources and messages -----------------------------------------------------------------------

def test_threads_are_bounded_by_the_machine(art):
    with pytest.raises(InputError, match=r"threads must be an integer from 1 to \d+ \(this machine has \d+ cores\)"):
        runtime.load(art, backend="onnxruntime", threads=10**6)


def test_seed_minus_one_names_the_seed(art, tmp_path):
    r = ditrt("sample", art, "--labels", "1", "--seed", "-1", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "seed must be a non-negative integer" in r.stderr


def test_an_fp16_only_artifact_samples_with_its_fp16_graph(tmp_path):
    r = ditrt("export", "--example", "--out", tmp_path / "x", "--precision", "fp16")
    assert r.returncode == 0
    pipe = runtime.load(tmp_path / "x", backend="onnxruntime")
    assert pipe.backend.name == "onnxruntime-fp16"


def test_a_missing_checkpoint_option_says_not_found(art):
    r = ditrt("parity", art, "--against", "reference", "--checkpoint", "missing.pt")
    assert r.returncode == 2 and "--checkpoint missing.pt: file not found" in r.stderr


def test_integrity_covers_the_files_actually_used(art):
    """The graph's own file must be among the hashed files: a manifest that hashes only other
    names is refused, so verification always covers what ONNX Runtime opens."""
    data = json.loads((art / "manifest.json").read_text())
    graph = data["networks"]["denoiser"]["graphs"]["fp32"]
    graph["sha256"] = {"unrelated.bin": "0" * 64}
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"sha256 must map every file \(the graph's included\)"):
        load_manifest(art)


def test_out_on_a_filesystem_that_refuses_files_is_a_clear_error(art):
    """/proc accepts no new files, even from root (a read-only disk behaves the same way)."""
    r = ditrt("sample", art, "--labels", "1", "--steps", "3", "--out", "/proc/ditrt-test.npy", "--no-progress")
    assert r.returncode == 2 and "cannot write /proc/ditrt-test.npy" in r.stderr and no_traceback(r), r.stderr


# ==== round two (issue 22) ==========================================================================
# One test per case of the second red-team pass, named after it. CLI cases run in-process through
# click's runner where a subprocess is not the point (no torch import per case); `exited` requires a
# clean exit (SystemExit), never an exception escaping the command.

import contextlib
import hashlib
import resource
import signal
import time
from pathlib import Path

from click.testing import CliRunner

from ditrt import cli as ditrt_cli
from ditrt.runtime.core.files import Terminated, signals_raise
from ditrt.runtime.jobs.outputs import OutputPlan


def run_cli(*args):
    r = CliRunner().invoke(ditrt_cli.main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"{type(r.exception).__name__} escaped: {r.exception}"  # a traceback, not an error message
    return r


def edit_manifest(art, edit):
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return art


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return runtime.load(tiny_artifact, backend="onnxruntime")


# ---- silent wrong results: now refused or honoured -----------------------------------------------

def test_sample_out_npy_with_latents_npy_is_refused(art, tmp_path):
    r = run_cli("sample", art, "--labels", "1", "--steps", "3", "--out", tmp_path / "a.npy", "--latents",
                tmp_path / "b.npy", "--no-progress")
    assert r.exit_code == 2 and "already writes the latents" in r.output
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "b.npy").exists()


def test_decoder_precision_without_images_is_refused(art, tmp_path):
    r = run_cli("sample", art, "--labels", "1", "--steps", "3", "--decoder-precision", "fp32", "--out",
                tmp_path / "a.npy", "--no-progress")
    assert r.exit_code == 2 and "--decoder-precision fp32 applies only when images are written" in r.output
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.parametrize("headroom", ["-1", "nan", "0", "0.5", "inf"])
def test_headroom_below_1_or_nan_is_refused(art, headroom):
    r = run_cli("parity", art, "--activation-ranges", "--headroom", headroom)
    assert r.exit_code == 2 and "--headroom must be a" in r.output and ">= 1" in r.output, r.output


def test_manifest_defaults_eta_is_honoured_for_a_sampler_that_takes_eta(art):
    base = runtime.load(art, backend="onnxruntime")
    explicit = base.sample([1, 2], num_steps=5, sampler="ddim", eta=1.0, seed=3, progress=False)
    assert not np.array_equal(explicit, base.sample([1, 2], num_steps=5, sampler="ddim", seed=3, progress=False))
    edit_manifest(art, lambda d: d["defaults"].update(sampler="ddim", eta=1.0))
    pipe = runtime.load(art, backend="onnxruntime")
    np.testing.assert_array_equal(pipe.sample([1, 2], num_steps=5, seed=3, progress=False), explicit)
    # an explicit eta still wins over the manifest's
    np.testing.assert_array_equal(pipe.sample([1, 2], num_steps=5, eta=0.0, seed=3, progress=False),
                                  base.sample([1, 2], num_steps=5, sampler="ddim", eta=0.0, seed=3, progress=False))


def test_manifest_defaults_eta_is_refused_when_the_default_sampler_takes_none(art):
    edit_manifest(art, lambda d: d["defaults"].update(eta=0.5))
    with pytest.raises(ArtifactError, match="defaults.eta is set, but the default sampler ddpm takes no eta"):
        runtime.load(art, backend="onnxruntime")


def test_a_float64_backend_output_still_samples_float32(art, monkeypatch):
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    base = runtime.load(art, backend="onnxruntime").sample([1, 4], num_steps=4, seed=2, progress=False)
    real = OnnxRuntimeBackend.__call__
    monkeypatch.setattr(OnnxRuntimeBackend, "__call__",
                        lambda self, feeds: {k: v.astype(np.float64) for k, v in real(self, feeds).items()})
    out = runtime.load(art, backend="onnxruntime").sample([1, 4], num_steps=4, seed=2, progress=False)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, base)  # float32 values widened and narrowed again: the same bits


# ---- integrity: the manifest's own digest ---------------------------------------------------------

def test_export_records_the_manifest_digest_in_a_sidecar(tiny_artifact):
    line = (tiny_artifact / "manifest.sha256").read_text()
    assert line == hashlib.sha256((tiny_artifact / "manifest.json").read_bytes()).hexdigest() + "  manifest.json\n"
    r = subprocess.run(["sha256sum", "-c", "manifest.sha256"], cwd=tiny_artifact, capture_output=True, text=True)
    assert r.returncode == 0 and "manifest.json: OK" in r.stdout


def test_verify_reports_a_manifest_edited_since_export(art):
    before = runtime.load(art, backend="onnxruntime").sample([1], num_steps=5, seed=1, progress=False)
    edit_manifest(art, lambda d: d["diffusion"].update(beta_end=0.03))
    r = run_cli("verify", art)
    assert r.exit_code == 1 and "manifest.json" in r.output and "edited since export" in r.output
    assert "FAILED: manifest.json" in r.output
    # runtime.load keeps working on the edited manifest (verify is the integrity tool), and honours it
    after = runtime.load(art, backend="onnxruntime").sample([1], num_steps=5, seed=1, progress=False)
    assert not np.allclose(after, before)


def test_verify_accept_manifest_edits_records_a_deliberate_edit(art):
    edit_manifest(art, lambda d: d["defaults"].update(steps=50))
    r = run_cli("verify", art, "--accept-manifest-edits")
    assert r.exit_code == 0 and "accepted the current manifest.json" in r.output, r.output
    assert (art / "manifest.sha256").read_text().split()[0] == hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    assert run_cli("verify", art).exit_code == 0
    edit_manifest(art, lambda d: d["defaults"].update(steps=60))  # a later edit is reported again
    assert run_cli("verify", art).exit_code == 1


def test_accept_manifest_edits_never_records_a_manifest_that_does_not_load(art):
    sidecar = (art / "manifest.sha256").read_text()
    edit_manifest(art, lambda d: d["diffusion"].update(beta_end=2.0))
    r = run_cli("verify", art, "--accept-manifest-edits")
    assert r.exit_code == 2 and "beta_end" in r.output and (art / "manifest.sha256").read_text() == sidecar


@pytest.mark.parametrize("sidecar", [None, "garbage\n", "0" * 64 + "  manifest.json\n", "directory"])
def test_verify_fails_on_a_missing_or_garbled_manifest_digest(art, sidecar):
    path = art / "manifest.sha256"
    path.unlink()
    if sidecar == "directory":
        path.mkdir()
    elif sidecar is not None:
        path.write_text(sidecar)
    r = run_cli("verify", art)
    assert r.exit_code == 1 and "FAILED: manifest.json" in r.output and "--accept-manifest-edits" in r.output


def test_an_artifact_without_a_denoiser_graph_is_unusable(art):
    edit_manifest(art, lambda d: d["networks"]["denoiser"].update(graphs={}))
    r = run_cli("verify", art)
    assert r.exit_code == 2 and "networks.denoiser.graphs lists no graph" in r.output
    with pytest.raises(ArtifactError, match="lists no graph"):
        runtime.load(art)


# ---- tracebacks instead of errors: each ends in a DitrtError --------------------------------------

def test_steps_superscript_two_is_refused(art, pipe, tmp_path):
    r = run_cli("sample", art, "--labels", "1", "--steps", "²", "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code == 2 and "step spec '²'" in r.output and not (tmp_path / "x.npy").exists()
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        with pytest.raises(InputError, match="²"):
            pipe.sample([1], num_steps="²", sampler=sampler, progress=False)


@pytest.mark.parametrize("option", ["sampler", "guidance"])
@pytest.mark.parametrize("value", [["ddim"], {"official": 3}, ("ddim",)])
def test_sampler_or_guidance_as_a_list_or_dict_is_refused(pipe, option, value):
    with pytest.raises(InputError, match=f"unknown {option}"):
        pipe.sample([1], num_steps=3, progress=False, **{option: value})


def test_cfg_scale_10_to_the_400_is_refused(pipe):
    with pytest.raises(InputError, match="cfg_scale must be a finite number, got a value beyond the float range"):
        pipe.sample([1], num_steps=3, cfg_scale=10**400, progress=False)


@pytest.mark.parametrize("which", ["initial", "steps"])
def test_noise_arrays_of_strings_are_refused(pipe, which):
    initial, steps = np.zeros((1, 4, 8, 8), np.float32), np.zeros((3, 1, 4, 8, 8), np.float32)
    if which == "initial":
        initial = np.full(initial.shape, "a")
    else:
        steps = np.full(steps.shape, "x")
    with pytest.raises(InputError, match=f"injected {'initial' if which == 'initial' else 'step'} noise must be a float array"):
        pipe.sample([1], num_steps=3, noise=(initial, steps), progress=False)


@pytest.mark.parametrize("artifact", [None, 3, b"engines/x"])
def test_runtime_load_of_none_an_int_or_bytes_is_refused(artifact):
    with pytest.raises(ArtifactError, match="an artifact is a directory path"):
        runtime.load(artifact)


def test_advance_after_the_last_step_is_refused(pipe):
    run = pipe.start([1], num_steps=2)
    while not run.done:
        run.advance(np.zeros((run.rows, 8, 8, 8), np.float32))
    with pytest.raises(InputError, match="this run is finished .*advance was called again"):
        run.advance(np.zeros((run.rows, 8, 8, 8), np.float32))
    with pytest.raises(InputError, match="takes no more feeds"):
        run.feeds()


@pytest.mark.parametrize("output, message", [
    (np.zeros((2, 8, 4, 4), np.float32), r"model_output has shape \(2, 8, 4, 4\)"),
    (np.zeros((3, 8, 8, 8), np.float32), r"model_output has shape \(3, 8, 8, 8\)"),
    (np.zeros(3, np.float32), r"model_output has shape \(3,\)"),
    (None, "model_output must be a float array, got object"),
    (np.full((2, 8, 8, 8), "a"), "model_output must be a float array, got <U1"),
    ([[1.0], [1.0, 2.0]], "model_output is not an array"),
])
def test_advance_with_the_wrong_shape_or_dtype_is_refused(pipe, output, message):
    run = pipe.start([1], num_steps=2)
    with pytest.raises(InputError, match=message):
        run.advance(output)
    assert run.steps_done == 0  # the refused call changed nothing: the run still takes its first output
    run.advance(np.zeros((2, 8, 8, 8), np.float32))


@pytest.mark.parametrize("field", ["sampler", "guidance"])
@pytest.mark.parametrize("value", [["ddim"], {"a": 1}])
def test_manifest_defaults_sampler_or_guidance_as_a_list_or_dict_is_refused(art, field, value):
    edit_manifest(art, lambda d: d["defaults"].update({field: value}))
    with pytest.raises(ArtifactError, match=f"manifest field defaults.{field} must be one of"):
        runtime.load(art)
    assert run_cli("verify", art).exit_code == 2


def test_a_graph_file_that_is_a_symlink_loop_is_refused(art):
    graph = art / "denoiser.fp32.onnx"
    graph.unlink()
    graph.symlink_to("denoiser.fp32.onnx")  # itself
    with pytest.raises(ArtifactError, match=r"graphs.fp32.file \('denoiser.fp32.onnx'\) cannot be resolved"):
        runtime.load(art)
    r = run_cli("verify", art)
    assert r.exit_code == 2 and "cannot be resolved" in r.output


def test_parity_with_source_path_an_integer_is_refused(art):
    edit_manifest(art, lambda d: d["source"].update(path=5))
    r = run_cli("parity", art, "--against", "reference", "--steps", "2", "--batch", "1")
    assert r.exit_code == 2 and "source.path must be the checkpoint's path, got 5" in r.output


@pytest.mark.parametrize("content", ["zero bytes", "no images"])
def test_decode_of_an_empty_npy_is_refused(art, tmp_path, content):
    path = tmp_path / "latents.npy"
    if content == "zero bytes":
        path.write_bytes(b"")
    else:
        np.save(path, np.zeros((0, 4, 8, 8), np.float32))
    r = run_cli("decode", art, path, "--out", tmp_path / "grid.png")
    assert r.exit_code == 2 and f"latents {path}" in r.output and "Aborted" not in r.output
    assert not (tmp_path / "grid.png").exists()


def test_decode_of_a_npy_whose_header_claims_95_gib_is_refused_before_allocation(art, tmp_path):
    path = tmp_path / "huge.npy"
    images = 95 * 2**30 // (4 * 8 * 8 * 4)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (images, 4, 8, 8)})
        f.write(b"\0" * 4096)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_cli("decode", art, path, "--out", tmp_path / "grid.png")
    assert r.exit_code == 2 and f"the header says ({images}, 4, 8, 8) float32" in r.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB more, not 95


@pytest.mark.parametrize("shape, message", [
    ((2**62, 4, 8, 8), "the header says"),  # its size wraps around int64 to 0 bytes: the empty file would match
    ((-1, 4, 8, 8), "has a negative size"),
])
def test_decode_of_a_npy_whose_header_size_wraps_around_is_refused(art, tmp_path, shape, message):
    path = tmp_path / "wrap.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
    r = run_cli("decode", art, path, "--out", tmp_path / "grid.png")
    assert r.exit_code == 2 and message in r.output, r.output


def test_decode_of_a_fifo_is_refused_without_blocking(art, tmp_path):
    os.mkfifo(tmp_path / "latents.npy")  # opening it would wait for a writer forever
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "decode", str(art), str(tmp_path / "latents.npy"), "--out",
                        str(tmp_path / "grid.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not a regular file" in r.stderr


@pytest.mark.parametrize("value", [None, 3, ["a.npy"]])
def test_load_latents_of_a_non_path_is_refused(value):
    from ditrt.runtime.jobs.outputs import load_latents
    with pytest.raises(InputError, match="latents must be a .npy path"):
        load_latents(value)


@pytest.mark.parametrize("network", [["denoiser"], {"denoiser": 1}, None])
def test_create_backend_with_a_network_that_is_no_name_is_refused(pipe, network):
    with pytest.raises(ArtifactError, match="has no .* network"):
        runtime.create_backend(pipe.manifest, "onnxruntime", None, network)


def test_export_image_size_1000000_is_refused(tmp_path):
    r = run_cli("export", "--config", "DiT-S/8", "--random-init", "--image-size", "1000000", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--image-size (pixels) must be an integer from 8 to 8192, got 1000000" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_port_out_of_range_is_refused(art, port):
    r = run_cli("serve", art, "--port", port)
    assert r.exit_code == 2 and f"Invalid value for '--port': {port} is not in the range 0<=x<=65535" in r.output


@pytest.mark.parametrize("out", [".", "", "/", "..", "ancestor"])
def test_export_out_that_names_no_directory_of_its_own_is_refused(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = str(tmp_path) if out == "ancestor" else out
    r = run_cli("export", "--example", "--out", out, "--precision", "fp32", "--force")
    assert r.exit_code == 2 and "--out" in r.output and "give the artifact's own folder" in r.output, r.output
    assert "[1/" not in r.output  # refused before any export step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not any(work.iterdir())


@pytest.mark.parametrize("kind", ["dangling", "loop", "file"])
def test_export_out_a_bad_symlink_is_refused_before_the_export_runs(tmp_path, kind):
    link = tmp_path / "link"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nowhere")
    elif kind == "loop":
        link.symlink_to(link)
    else:
        (tmp_path / "file.txt").write_text("mine")
        link.symlink_to(tmp_path / "file.txt")
    r = run_cli("export", "--example", "--out", link, "--precision", "fp32", "--force")
    assert r.exit_code == 2 and f"--out {link} is a symbolic link" in r.output and "[1/" not in r.output, r.output
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["link"] + (["file.txt"] if kind == "file" else []))


@contextlib.contextmanager
def small_tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root with mount rights only: the test is skipped elsewhere)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_export_out_on_a_read_only_filesystem_is_refused(tmp_path):
    r = run_cli("export", "--example", "--out", "/proc/ditrt-export-test", "--precision", "fp32")
    assert r.exit_code == 2 and "cannot write /proc/ditrt-export-test" in r.output and "[1/" not in r.output, r.output
    with small_tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        r = run_cli("export", "--example", "--out", ro / "x", "--precision", "fp32")
        assert r.exit_code == 2 and f"cannot write {ro / 'x'}: Read-only file system" in r.output, r.output


def test_a_directory_in_place_of_the_lock_file_is_refused_and_kept(tmp_path):
    lock = tmp_path / ".x.lock"
    lock.mkdir()
    (lock / "mine.txt").write_text("mine")
    r = run_cli("export", "--example", "--out", tmp_path / "x", "--precision", "fp32")
    assert r.exit_code == 2 and f"{lock} is in the way and is not ditrt's lock file" in r.output, r.output
    assert (lock / "mine.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def _file_size_limit(limit: int):
    """preexec_fn: files of this process may not grow beyond `limit` bytes (a full quota, without root)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_sample_out_on_a_full_disk_is_a_clear_error_and_leaves_nothing(art, tmp_path):
    out = tmp_path / "x.npy"
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "sample", str(art), "--labels", ",".join(["1"] * 64),
                        "--steps", "2", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       preexec_fn=_file_size_limit(16 << 10))  # 64 latents of 1 KiB each do not fit
    assert r.returncode == 2 and f"cannot write {out}: " in r.stderr and no_traceback(r), r.stderr
    assert "a full disk or a file size limit" in r.stderr  # numpy's short write carries no errno
    assert list(tmp_path.iterdir()) == [art]  # no partial file, no temporary file
    with small_tmpfs(tmp_path / "full", "size=16k") as full:
        r = run_cli("sample", art, "--labels", ",".join(["1"] * 64), "--steps", "2", "--out", full / "x.npy",
                    "--no-progress")
        assert r.exit_code == 2 and f"cannot write {full / 'x.npy'}: " in r.output, r.output
        assert list(full.iterdir()) == []


def test_sample_out_dir_on_a_full_disk_leaves_no_partial_set_of_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((8, 3, 64, 64), dtype=np.float32)  # noise: PNGs of ~12 KiB that do not compress
    with small_tmpfs(tmp_path / "full", "size=48k") as full:
        (full / "keep").mkdir()
        (full / "keep" / "000007.png").write_bytes(b"an earlier run's image")
        for folder in (full / "new", full / "keep"):
            plan = OutputPlan(None, None, folder).checked()
            with pytest.raises(InputError, match=f"cannot write {folder}/0000\\d\\d.png: No space left on device"):
                plan.write(np.zeros((8, 4, 8, 8), np.float32), lambda latents: images)
        assert sorted(p.name for p in full.iterdir()) == ["keep"]  # the folder this run made went again
        assert [p.name for p in (full / "keep").iterdir()] == ["000007.png"]  # a file it did not add stays
        assert (full / "keep" / "000007.png").read_bytes() == b"an earlier run's image"


# ---- --out through a symbolic link, temp cleanup, signals -----------------------------------------

def _export_tiny(out, force=True, log=lambda m: None):
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.checkpoints import load_checkpoint
    from ditrt.exporter.denoiser import source_from_checkpoint
    return export_artifact(source_from_checkpoint(load_checkpoint(TINY_CHECKPOINT, num_heads=4)), out, ("fp32",),
                           force=force, log=log)


def test_out_a_symlink_to_an_artifact_with_force_writes_its_target_and_keeps_the_link(art, tmp_path):
    (art / "notes.txt").write_text("mine")
    link = tmp_path / "current"
    link.symlink_to(art)
    messages = []
    _export_tiny(link, log=messages.append)
    assert link.is_symlink() and link.resolve() == art.resolve()  # never rewritten
    assert (art / "notes.txt").read_text() == "mine" and (art / "manifest.sha256").is_file()
    assert not (art / "denoiser.fp16.onnx").exists()  # the old artifact's own graph went: replaced
    assert any("is a symbolic link; writing the directory it names" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "current"]  # no .old-PID, no lock, no temp
    assert run_cli("verify", link).exit_code == 0


def test_temp_cleanup_leaves_a_symlink_alone_and_says_so(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.bin").write_bytes(b"x" * 100)
    for name in (".x.tmp-999999-abcd", ".x.old-999999"):
        (tmp_path / name).symlink_to(tmp_path / "elsewhere")
    messages = []
    with claimed_output(tmp_path / "x", messages.append):
        pass
    assert (tmp_path / ".x.tmp-999999-abcd").is_symlink() and (tmp_path / ".x.old-999999").is_symlink()
    assert (tmp_path / "elsewhere" / "data.bin").read_bytes() == b"x" * 100 and not (tmp_path / "x").exists()
    assert not any("removed" in m or "recovered" in m for m in messages), messages
    assert sum("left .x." in m and "alone" in m for m in messages) == 2


def test_signals_are_held_over_a_swap_and_raised_after_it():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as raised:
        with signals_raise() as signals:
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # delivered here, held
                finished = True
    assert finished and raised.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone again


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_export_runs_the_cleanup_and_keeps_the_old_artifact(art, tmp_path, sig, code):
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    export = subprocess.Popen([sys.executable, "-m", "ditrt.cli", "export", "--example", "--no-vae", "--out", str(art),
                               "--precision", "fp32", "--force"], stderr=subprocess.PIPE, text=True)
    seen = []
    for line in export.stderr:  # wait until the graph export runs (its temporary folder exists)
        seen.append(line)
        if "exporting fp32 denoiser graph" in line:
            assert any(p.name.startswith(".art.tmp-") for p in tmp_path.iterdir())
            export.send_signal(sig)
            break
    rest = export.stderr.read()
    assert export.wait(timeout=120) == code, "".join(seen) + rest
    assert f"export interrupted by {signal.Signals(sig).name}" in rest and f"the previous artifact {art} is unchanged" in rest
    assert "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no lock, no temporary folder
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before


@pytest.mark.parametrize("args, message", [
    (["--save-golden", "g.npz", "--json", "r.json"], "--json does not apply with --save-golden"),
    (["--save-golden", "g.npz", "--backends", "onnxruntime-fp32", "--junit", "r.xml"],
     "--backends and --junit do not apply with --save-golden"),
    (["--activation-ranges", "--backends", "onnxruntime-fp32"], "--backends does not apply with --activation-ranges"),
    (["--against", "reference", "--headroom", "4"], "--headroom does not apply with --against"),
])
def test_parity_options_a_mode_would_ignore_are_refused(tiny_artifact, tmp_path, args, message):
    r = ditrt("parity", tiny_artifact, *[str(tmp_path / a) if a.endswith((".npz", ".json", ".xml")) else a for a in args])
    assert r.returncode == 2 and message in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--seed", "3"], "--seed only applies with --random-init"),
    (["--num-classes", "10"], "--num-classes only applies with --random-init"),
    (["--no-vae"], "--no-vae applies to --example"),
])
def test_export_options_a_checkpoint_would_ignore_are_refused(tmp_path, args, message):
    r = ditrt("export", TINY_CHECKPOINT, "--num-heads", "4", *args, "--out", tmp_path / "x")
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "x").exists()
