"""The runtime's sampling loop against the official golden loops, on ONNX Runtime and PyTorch."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ditrt import runtime
from conftest import max_rel_err
from ditrt.runtime.execution.chunking import run_chunked
from ditrt.runtime.core.errors import ArtifactError
from ditrt.runtime.artifact.manifest import load_manifest

LOOPS = [("ddpm", "10", "ddpm_samples"), ("ddim", "ddim10", "ddim_samples")]


def _golden_loop(pipe, golden, sampler, spec):
    noise = (golden["ddpm_initial_noise"], golden["ddpm_step_noise"])
    return pipe.sample([3, 7], num_steps=spec, sampler=sampler, cfg_scale=4.0, guidance="official", noise=noise,
                       progress=False)


@pytest.mark.parametrize("sampler,spec,key", LOOPS)
def test_onnxruntime_fp32_reproduces_the_official_loops(tiny_artifact, golden, sampler, spec, key):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime", precision="fp32")
    assert max_rel_err(_golden_loop(pipe, golden, sampler, spec), golden[key]) <= 1e-4


@pytest.mark.parametrize("sampler,spec,key", LOOPS)
def test_torch_reference_backend_reproduces_the_official_loops(tiny_artifact, tiny_checkpoint, golden, sampler, spec, key):
    pipe = runtime.Pipeline(runtime.create_backend(load_manifest(tiny_artifact), "torch-fp32"), load_manifest(tiny_artifact))
    assert pipe.backend.name == "torch-fp32"
    assert max_rel_err(_golden_loop(pipe, golden, sampler, spec), golden[key]) <= 1e-4


@pytest.mark.parametrize("sampler,spec,key", LOOPS)
def test_fp16_graph_full_loop_deviation(tiny_artifact, golden, sampler, spec, key):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime", precision="fp16")
    err = max_rel_err(_golden_loop(pipe, golden, sampler, spec), golden[key])
    print(f"fp16 graph, 10-step {sampler} loop vs official: max rel err {err:.2e}")
    assert err <= 5e-3  # measured ~5e-4: fp16 per-forward error (5e-4) does not grow over the loop


def test_golden_timesteps_are_the_chains_we_run(golden):
    from ditrt.runtime.spec.config import Diffusion
    from ditrt.runtime.sampling.schedule import respaced_schedule
    official = Diffusion()
    assert list(respaced_schedule(official, "10").model_timesteps) == list(golden["ddpm_timesteps"])
    assert list(respaced_schedule(official, "ddim10").model_timesteps) == list(golden["ddim_timesteps"])


def test_seeded_sampling_is_reproducible_across_runs_and_chunking(tiny_artifact):
    results = []
    for max_batch in (None, 1, 3):
        pipe = runtime.load(tiny_artifact, backend="onnxruntime", max_batch=max_batch)
        results.append(pipe.sample([1, 2, 5], num_steps=12, seed=7, progress=False))
    results.append(runtime.load(tiny_artifact, backend="onnxruntime").sample([1, 2, 5], num_steps=12, seed=7, progress=False))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    other = runtime.load(tiny_artifact, backend="onnxruntime").sample([1, 2, 5], num_steps=12, seed=8, progress=False)
    assert not np.allclose(other, results[0])


def test_an_image_does_not_depend_on_its_batch(tiny_artifact):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    together = pipe.sample([4, 4, 9], num_steps="ddim5", sampler="ddim", seed=3, progress=False)
    alone = pipe.sample([4], num_steps="ddim5", sampler="ddim", seed=3, progress=False)
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-5)


class Recording:
    """A real ONNX Runtime backend with batch bounds, recording the feeds of each call."""

    def __init__(self, backend, max_batch, min_batch=1):
        self.backend, self.max_batch, self.min_batch, self.calls = backend, max_batch, min_batch, []
        self.name, self.network = "recording", backend.network

    def __call__(self, feeds):
        self.calls.append({k: v.copy() for k, v in feeds.items()})
        return self.backend(feeds)


def _feeds(n):
    rng = np.random.default_rng(0)
    return {"latent": rng.standard_normal((n, 4, 8, 8), dtype=np.float32),
            "timestep": np.linspace(0, 999, n).astype(np.float32), "class_label": np.arange(n) % 11}


def test_run_chunked_splits_and_concatenates(tiny_artifact):
    backend = runtime.load(tiny_artifact, backend="onnxruntime").backend
    feeds = _feeds(5)
    chunked = Recording(backend, 2)
    out = run_chunked(chunked, feeds)["model_output"]
    assert [len(c["latent"]) for c in chunked.calls] == [2, 2, 1] and out.shape == (5, 8, 8, 8)
    np.testing.assert_allclose(out, backend(feeds)["model_output"], rtol=1e-6, atol=1e-6)


def test_run_chunked_pads_small_calls_with_valid_rows(tiny_artifact):
    """An engine whose profile starts at 4 rows gets 4: the padding repeats a real row (labels in
    range, finite latents) and is dropped from the output."""
    backend = runtime.load(tiny_artifact, backend="onnxruntime").backend
    feeds = _feeds(6)
    padded = Recording(backend, max_batch=4, min_batch=4)
    out = run_chunked(padded, feeds)["model_output"]
    assert [len(c["latent"]) for c in padded.calls] == [4, 4] and out.shape == (6, 8, 8, 8)
    last = padded.calls[1]
    for name in feeds:
        np.testing.assert_array_equal(last[name][:2], feeds[name][4:])
        np.testing.assert_array_equal(last[name][2:], np.repeat(feeds[name][4:5], 2, axis=0))
    np.testing.assert_allclose(out, backend(feeds)["model_output"], rtol=1e-6, atol=1e-6)


def test_scale_at_most_one_runs_no_unconditional_rows(tiny_artifact):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    a = pipe.sample([3], num_steps=5, cfg_scale=1.0, seed=0, progress=False)
    assert pipe.last_stats.model_rows == 1
    b = pipe.sample([3], num_steps=5, cfg_scale=1.5, seed=0, progress=False)
    assert pipe.last_stats.model_rows == 2 and not np.allclose(a, b)


def test_standard_guidance_differs_from_official(tiny_artifact, golden):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    noise = (golden["ddpm_initial_noise"], golden["ddpm_step_noise"])
    official = pipe.sample([3, 7], num_steps=10, noise=noise, progress=False)
    standard = pipe.sample([3, 7], num_steps=10, noise=noise, guidance="standard", progress=False)
    assert max_rel_err(standard, official) > 1e-3


def test_ddim_eta_uses_the_noise(tiny_artifact):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    a = pipe.sample([1], num_steps="ddim5", sampler="ddim", eta=0.0, seed=0, progress=False)
    b = pipe.sample([1], num_steps="ddim5", sampler="ddim", eta=1.0, seed=0, progress=False)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("kwargs,message", [
    (dict(class_labels=[10]), r"class labels \[10\] out of range: this model has classes 0..9"),
    (dict(class_labels=[-1, 3]), "out of range"),
    (dict(class_labels=[]), "non-empty"),
    (dict(class_labels=[1.5]), "must be integers"),
    (dict(class_labels=[1], num_steps=0), "must be positive"),
    (dict(class_labels=[1], num_steps="ddim300"), "no integer stride"),
    (dict(class_labels=[1], num_steps=1001), "cannot take 1001 steps"),
    (dict(class_labels=[1], num_steps=2.5), "must be an int or a step spec"),
    (dict(class_labels=[1], sampler="euler"), "unknown sampler"),
    (dict(class_labels=[1], guidance="all"), "unknown guidance"),
    (dict(class_labels=[1], sampler="ddim", eta=2.0), r"eta must be a number in \[0, 1\]"),
    (dict(class_labels=[1], sampler="ddpm", eta=0.5), "eta applies to ddim only; ddpm takes no eta"),
    (dict(class_labels=[1], cfg_scale=1e39), "cfg_scale must be a finite float32 number"),
    (dict(class_labels=[1], seed=-1), "seed must be a non-negative integer"),
    (dict(class_labels=[1], num_steps=3, noise=(np.full((1, 4, 8, 8), np.nan), np.zeros((3, 1, 4, 8, 8)))),
     "injected initial noise contains NaN"),
    (dict(class_labels=[1], num_steps=3, noise=(np.zeros((1, 4, 8, 8)), np.zeros((2, 1, 4, 8, 8)))),
     r"step noise has shape \(2, 1, 4, 8, 8\); expected \(3, 1, 4, 8, 8\)"),
    (dict(class_labels=[1, 2], num_steps=3, noise=(np.zeros((1, 4, 8, 8)), np.zeros((3, 2, 4, 8, 8)))),
     "initial noise has shape"),
])
def test_bad_sample_arguments(tiny_artifact, kwargs, message):
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    with pytest.raises(runtime.InputError, match=message):
        pipe.sample(progress=False, **kwargs)


def test_bad_artifacts(tmp_path, tiny_artifact):
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        runtime.load(tmp_path / "none")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        runtime.load(tmp_path)
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema version 99"):
        runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "schema": "other"}))
    with pytest.raises(ArtifactError, match="not a ditrt manifest"):
        runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(data))  # graphs listed but not present here
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        runtime.load(tmp_path, backend="onnxruntime")
    with pytest.raises(runtime.InputError, match="unknown backend"):
        runtime.load(tiny_artifact, backend="tvm")


def test_corrupt_graph_is_caught_by_its_hash(tmp_path, tiny_artifact):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    graph = art / "denoiser.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_manifest(art).verify_files("denoiser", "fp32")


def test_a_same_size_rewrite_after_a_first_load_is_caught(tmp_path, tiny_artifact):
    """The hash cache (runtime/files.sha256_file) must not hand back the first hash for a file
    rewritten in place with the same size: its key holds mtime and ctime, not just path and size."""
    import os
    import shutil
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    runtime.load(art, backend="onnxruntime", decoder=False)  # hashes (and caches) every graph file
    graph = art / "denoiser.fp32.onnx"
    before = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    with open(graph, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert graph.stat().st_ino == before.st_ino and graph.stat().st_size == before.st_size
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        runtime.load(art, backend="onnxruntime", decoder=False)


def test_runtime_imports_no_torch(tiny_artifact):
    code = f"""
import sys
sys.modules['torch'] = None  # any torch import now fails
from ditrt import runtime
pipe = runtime.load({str(tiny_artifact)!r}, backend='onnxruntime')
x = pipe.sample([1, 2], num_steps=4, progress=False)
assert x.shape == (2, 4, 8, 8)
print('torch-free ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "torch-free ok" in r.stdout, r.stderr


def test_cli_sample(tmp_path, tiny_artifact):
    out = tmp_path / "lat.npy"
    code = f"""
import sys
sys.modules['torch'] = None
from ditrt.cli import main
main(['sample', {str(tiny_artifact)!r}, '--labels', '3,7', '--steps', '10', '--out', {str(out)!r}, '--backend', 'onnxruntime'])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 images x 10 model calls" in r.stdout and "calls/s" in r.stdout and "10/10 steps" in r.stderr
    assert np.load(out).shape == (2, 4, 8, 8)
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "sample", str(tiny_artifact), "--labels", "3,70",
                        "--out", str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert r.returncode == 2 and "out of range" in r.stderr and not (tmp_path / "x.npy").exists()
