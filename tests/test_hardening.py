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
from ditrt.runtime.errors import ArtifactError, InputError, StepError
from ditrt.runtime.files import atomic_output, claimed_output
from ditrt.runtime.manifest import load_manifest
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
    assert r.returncode == 0 and "2/2 files match the manifest" in r.stdout


def test_cfg_scale_1e39_is_refused_in_float32(art, tmp_path):
    r = ditrt("sample", art, "--labels", "1", "--steps", "4", "--cfg-scale", "1e39", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "cfg_scale must be a finite float32 number" in r.stderr and no_traceback(r)
    assert not (tmp_path / "x.npy").exists()


def test_a_nan_result_fails_the_step_and_writes_nothing(art, tmp_path, monkeypatch):
    """A backend whose output turns non-finite: the loop names the step and the backend."""
    from ditrt.runtime.backends import OnnxRuntimeBackend
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
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load .*denoiser.fp32.onnx"):
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
