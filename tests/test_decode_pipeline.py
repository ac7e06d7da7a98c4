"""The decoder as the artifact's second network: exported beside the denoiser, decoded by the
torch-free runtime, written as PNGs the way the official scripts write them."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ditrt import runtime
from ditrt.runtime.core import images
from ditrt.runtime.core.errors import ArtifactError, StepError
from ditrt.runtime.artifact.manifest import load_manifest
from conftest import GOLDEN_DIR, max_rel_err, read_npz
from helpers import read_png  # noqa: E402


def ditrt(*args):
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def vae_golden():
    return read_npz(GOLDEN_DIR / "vae" / "vae_vectors.npz")


def test_the_manifest_describes_the_decoder(tiny_artifact_with_vae):
    manifest = load_manifest(tiny_artifact_with_vae)
    spec = manifest.network("decoder")
    assert spec.batch_unit == "images" and spec.extra["scaling_factor"] == 0.18215
    assert list(spec.inputs[0].shape) == ["batch", 4, 8, 8] and list(spec.outputs[0].shape) == ["batch", 3, 64, 64]
    assert manifest.precisions("decoder") == ["fp32", "fp16"]
    for precision in ("fp32", "fp16"):
        manifest.verify_files("decoder", precision)


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_pipeline_decode_reproduces_the_golden_images(tiny_artifact_with_vae, vae_golden, precision, bound):
    pipe = runtime.load(tiny_artifact_with_vae, backend="onnxruntime", decoder_precision=precision)
    assert pipe.decoder.name == f"onnxruntime-{precision}"
    decoded = pipe.decode(vae_golden["latents"])
    assert decoded.dtype == np.float32 and decoded.shape == (8, 3, 64, 64)
    assert max_rel_err(decoded, vae_golden["images"]) <= bound
    assert decoded.min() < -1 or decoded.max() > 1  # not clamped


def test_decode_chunks_by_the_decoder_max_batch(tiny_artifact_with_vae, vae_golden):
    whole = runtime.load(tiny_artifact_with_vae, backend="onnxruntime").decode(vae_golden["latents"])
    small = runtime.load(tiny_artifact_with_vae, backend="onnxruntime", decoder_max_batch=3)
    np.testing.assert_allclose(small.decode(vae_golden["latents"]), whole, rtol=1e-6, atol=1e-6)


def test_sample_writes_the_grid_and_per_image_pngs(tiny_artifact_with_vae, tmp_path):
    r = ditrt("sample", tiny_artifact_with_vae, "--labels", "3,7,1", "--steps", "6", "--out", tmp_path / "grid.png",
              "--out-dir", tmp_path / "each", "--latents", tmp_path / "l.npy", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "decoding 3 images" in r.stderr and "grid of 3" in r.stdout
    latents = np.load(tmp_path / "l.npy")
    decoded = runtime.load(tiny_artifact_with_vae, backend="onnxruntime").decode(latents)
    np.testing.assert_array_equal(read_png(tmp_path / "grid.png"), images.grid(decoded))
    per_image = images.to_uint8(decoded)
    for i in range(3):
        np.testing.assert_array_equal(read_png(tmp_path / "each" / f"{i:06d}.png"), per_image[i])
    r = ditrt("decode", tiny_artifact_with_vae, tmp_path / "l.npy", "--out", tmp_path / "again.png")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(read_png(tmp_path / "again.png"), images.grid(decoded))


def test_an_artifact_without_decoder_refuses_images_before_sampling(tiny_artifact, tmp_path):
    r = ditrt("sample", tiny_artifact, "--labels", "1", "--steps", "4", "--out", tmp_path / "x.png", "--no-progress")
    assert r.returncode == 2 and "has no decoder network" in r.stderr and "--vae DIR" in r.stderr
    assert "sampling" not in r.stderr and list(tmp_path.iterdir()) == []  # refused before any work
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ArtifactError, match="has no decoder network"):
        runtime.load(tiny_artifact, backend="onnxruntime").decode(np.zeros((1, 4, 8, 8), np.float32))
    r = ditrt("decode", tiny_artifact, tmp_path / "x.npy", "--out", tmp_path / "y.png")
    assert r.returncode == 2 and "no decoder network" in r.stderr


def test_non_finite_decoder_output_is_an_error_naming_network_and_precision(tiny_artifact_with_vae, monkeypatch):
    pipe = runtime.load(tiny_artifact_with_vae, backend="onnxruntime", decoder_precision="fp16")
    real = type(pipe.decoder).__call__

    def overflow(self, feeds):
        out = real(self, feeds)
        out["image"][0, 0, 0, 0] = np.inf
        return out

    monkeypatch.setattr(type(pipe.decoder), "__call__", overflow)
    with pytest.raises(StepError, match=r"decoder network \(fp16 graph\).*--decoder-precision fp32"):
        pipe.decode(np.zeros((2, 4, 8, 8), np.float32))


def test_decode_refuses_wrong_latents(tiny_artifact_with_vae):
    pipe = runtime.load(tiny_artifact_with_vae, backend="onnxruntime")
    with pytest.raises(runtime.InputError, match="the decoder takes float"):
        pipe.decode(np.zeros((2, 4, 16, 16), np.float32))
    with pytest.raises(runtime.InputError, match="NaN or inf"):
        pipe.decode(np.full((1, 4, 8, 8), np.nan, np.float32))


def test_manifest_decoder_fields_are_checked(tiny_artifact_with_vae, tmp_path):
    import shutil
    art = tmp_path / "a"
    shutil.copytree(tiny_artifact_with_vae, art)
    data = json.loads((art / "manifest.json").read_text())
    data["networks"]["decoder"]["scaling_factor"] = "0.18215"
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="networks.decoder.scaling_factor must be a number in \\(0, 1000\\]"):
        load_manifest(art)


def test_parity_covers_the_decoder(tiny_artifact_with_vae, tmp_path):
    r = ditrt("parity", tiny_artifact_with_vae, "--save-golden", tmp_path / "g.npz", "--steps", "3", "--batch", "1,2")
    assert r.returncode == 0, r.stderr
    r = ditrt("parity", tiny_artifact_with_vae, "--against", tmp_path / "g.npz", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert {c["check"] for c in checks} >= {"decoder forward batch 1", "decoder forward batch 2", "sha256 decoder.fp16.onnx"}


def test_activation_ranges_cover_the_decoder(tiny_artifact_with_vae, tmp_path):
    r = ditrt("parity", tiny_artifact_with_vae, "--activation-ranges", "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "a.json").read_text())["decoder"]
    assert [s["stage"] for s in report["stages"]][:3] == ["post_quant_conv", "conv_in", "mid_block"]
    assert report["flagged_stages"] == [] and all(s["max_abs"] > 0 for s in report["stages"])
    r = ditrt("parity", tiny_artifact_with_vae, "--activation-ranges", "--headroom", "1e6")
    assert "--decoder-precision fp32" in r.stdout
