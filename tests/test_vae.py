"""The VAE decode stage: loading diffusers AutoencoderKL folders, the exported decoder graphs
against the golden images, and the uint8/PNG conventions of the official scripts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN_DIR, ROOT, max_rel_err, read_npz

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ditrt.exporter.decoder import DecoderExporter  # noqa: E402
from ditrt.exporter.onnx_export import ExportOptionError, Steps, check_common_options, export_network  # noqa: E402
from ditrt.runtime.spec.networks import EXPORT_BOUNDS as MAX_REL_ERR  # noqa: E402


def decoder_file(precision: str) -> str:
    return f"decoder.{precision}.onnx"
from ditrt.exporter.vae import DecoderGraph, VaeError, load_vae  # noqa: E402
from ditrt.runtime.core.images import (NonFiniteImageError, ImageError, check_finite, grid, to_uint8,  # noqa: E402
                                  write_per_image, write_png)
from ditrt.runtime.core.files import sha256_file  # noqa: E402
from helpers import read_png  # noqa: E402

EXAMPLE_VAE = ROOT / "tests" / "golden" / "vae" / "vae"  # the golden small VAE (shared/golden/vae/vae)
VAE_GOLDEN = GOLDEN_DIR / "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Pixels where the exported fp32 decoder's uint8 output differs from the golden one (by exactly one
# level, at quantisation boundaries), measured with ONNX Runtime 1.32 on x86-64; the official float32
# code on two machines differs in the same way (~1e-6 relative).
MAX_BOUNDARY_PIXELS = {"per_image": 12, "grid": 12}  # measured: 6 and 6


@pytest.fixture(scope="module")
def vae_golden() -> dict[str, np.ndarray]:
    return read_npz(VAE_GOLDEN / "vae_vectors.npz")


@pytest.fixture(scope="module")
def example_vae():
    return load_vae(EXAMPLE_VAE, in_channels=4)


@pytest.fixture(scope="module")
def decoder_artifact(tmp_path_factory, example_vae) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("decoder")
    section = export_network(DecoderExporter(example_vae, (4, 8, 8)), out, ("fp32", "fp16"), 20, Steps(5, lambda m: None))
    return out, section


def _ort(path: Path, latents: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["image"], {"latent": latents})[0]


@pytest.fixture(scope="module")
def onnx_fp32_images(decoder_artifact, vae_golden) -> np.ndarray:
    out, _ = decoder_artifact
    return _ort(out / decoder_file("fp32"), vae_golden["latents"])


# ---- loading -------------------------------------------------------------------------------------

def test_load_example(example_vae):
    assert example_vae.scaling_factor == 0.18215
    assert example_vae.latent_channels == 4
    assert example_vae.format == "safetensors"
    assert example_vae.sha256 == sha256_file(EXAMPLE_VAE / WEIGHTS)
    assert example_vae.upsampling == 8
    assert not example_vae.model.training
    assert example_vae.notes == []
    assert example_vae.source()["sha256"] == example_vae.sha256


def test_decoder_graph_is_vae_decode(example_vae, vae_golden):
    latents = torch.from_numpy(vae_golden["latents"])
    graph = DecoderGraph(example_vae, "fp32")
    assert graph.decoder.conv_in.weight is example_vae.model.decoder.conv_in.weight  # no second copy
    with torch.no_grad():
        ours = graph(latents)
        official = example_vae.model.decode(latents / 0.18215).sample
    assert ours.dtype == torch.float32
    assert torch.equal(ours, official)
    assert max_rel_err(ours.numpy(), vae_golden["images"]) <= 1e-5  # torch 2.14 (golden) vs this torch


def test_fp16_decoder_graph_keeps_the_interface(example_vae, vae_golden):
    graph = DecoderGraph(example_vae, "fp16")
    with torch.no_grad():
        out = graph(torch.from_numpy(vae_golden["latents"]))
    assert out.dtype == torch.float32
    assert max_rel_err(out.numpy(), vae_golden["images"]) <= MAX_REL_ERR["fp16"]
    assert next(example_vae.model.parameters()).dtype == torch.float32  # the loaded model is untouched
    norms = [m for m in graph.modules() if type(m).__name__ == "_Float32GroupNorm"]
    assert norms and not any(isinstance(m, torch.nn.GroupNorm) for m in graph.modules())


def test_bin_weights_and_default_scaling(tmp_path, example_vae):
    folder = tmp_path / "vae"
    folder.mkdir()
    config = json.loads((EXAMPLE_VAE / "config.json").read_text())
    del config["scaling_factor"]
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({k: v.half() for k, v in example_vae.model.state_dict().items()}, folder / "diffusion_pytorch_model.bin")
    loaded = load_vae(folder)
    assert loaded.format == "bin" and loaded.scaling_factor == 0.18215
    assert any("no scaling_factor" in n for n in loaded.notes)
    assert any("float16" in n for n in loaded.notes)


def _broken(tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    shutil.copytree(EXAMPLE_VAE, folder)
    return folder


def test_error_missing_folder(tmp_path):
    with pytest.raises(VaeError, match=r"VAE folder not found: .*nowhere"):
        load_vae(tmp_path / "nowhere")


def test_error_missing_config(tmp_path):
    folder = _broken(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(VaeError, match=r"config\.json not found"):
        load_vae(folder)
    with pytest.raises(VaeError, match=r"it has a vae/ subfolder: pass .*vae"):  # a pipeline folder
        load_vae(_broken(tmp_path / "pipeline").parent)


def test_error_wrong_class(tmp_path):
    folder = _broken(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(VaeError, match=r"config\.json has _class_name 'AutoencoderTiny'.*AutoencoderKL"):
        load_vae(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(VaeError, match=r"unreadable VAE config .*config\.json"):
        load_vae(folder)


def test_error_truncated_weights(tmp_path):
    folder = _broken(tmp_path)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(VaeError, match=r"unreadable safetensors file .*diffusion_pytorch_model\.safetensors "
                                       r"\(truncated or corrupt\)"):
        load_vae(folder)
    (folder / WEIGHTS).unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(VaeError, match=r"unreadable checkpoint .*diffusion_pytorch_model\.bin"):
        load_vae(folder)
    (folder / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(VaeError, match=r"no weights file: expected diffusion_pytorch_model\.safetensors"):
        load_vae(folder)


def test_error_renamed_key(tmp_path, example_vae):
    from safetensors.torch import save_file
    folder = _broken(tmp_path)
    state = {k: v.contiguous() for k, v in example_vae.model.state_dict().items()}
    state["decoder.conv_out.weight_renamed"] = state.pop("decoder.conv_out.weight")
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(VaeError) as e:
        load_vae(folder)
    message = str(e.value)
    assert "diffusion_pytorch_model.safetensors does not match the AutoencoderKL" in message
    assert "missing keys (1): decoder.conv_out.weight" in message
    assert "unexpected keys (1): decoder.conv_out.weight_renamed" in message


def test_error_latent_channels(tmp_path):
    with pytest.raises(VaeError, match=r"config\.json: the VAE has 4 latent channels but the DiT produces 8-channel"):
        load_vae(EXAMPLE_VAE, in_channels=8)
    folder = _broken(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(VaeError, match=r"the VAE has 8 latent channels but the DiT produces 4-channel"):
        load_vae(folder, in_channels=4)


def test_error_pickled_object_in_bin(tmp_path):
    folder = _broken(tmp_path)
    (folder / WEIGHTS).unlink()
    torch.save({"decoder.conv_out.weight": torch.zeros(1), "extra": Path("x")}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(VaeError, match=r"objects other than tensors"):
        load_vae(folder)


# ---- export --------------------------------------------------------------------------------------

def test_fp32_graph_reproduces_golden(onnx_fp32_images, vae_golden):
    err = max_rel_err(onnx_fp32_images, vae_golden["images"])
    print(f"fp32 ONNX vs golden images: max rel err {err:.3g}")
    assert err <= 1e-5


def test_fp16_graph_reproduces_golden(decoder_artifact, vae_golden):
    out, _ = decoder_artifact
    images = _ort(out / decoder_file("fp16"), vae_golden["latents"])
    err = max_rel_err(images, vae_golden["images"])
    print(f"fp16 ONNX vs golden images: max rel err {err:.3g}")
    assert np.isfinite(images).all() and err <= MAX_REL_ERR["fp16"]


def test_manifest_section(decoder_artifact, example_vae):
    out, section = decoder_artifact
    assert section["inputs"] == [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, 8, 8], "role": "latent",
                                  "meaning": section["inputs"][0]["meaning"]}]
    assert section["outputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert (section["batch_axis"], section["batch_unit"], section["scaling_factor"]) == (0, "images", 0.18215)
    assert section["source"]["sha256"] == example_vae.sha256
    assert sorted(section["graphs"]) == ["fp16", "fp32"]
    for precision, graph in section["graphs"].items():
        assert graph["file"] == decoder_file(precision) and graph["files"] == [graph["file"]]
        assert graph["sha256"] == {graph["file"]: sha256_file(out / graph["file"])}
        assert graph["bytes"] == (out / graph["file"]).stat().st_size
        v = graph["validation"]
        assert v["checker_full_check"] and v["strict_shape_inference"] and v["tensorrt_lint"]["ok"]
        assert v["normalisation_in_float32"]
        assert v["onnxruntime_vs_reference"]["max_rel_err"] <= MAX_REL_ERR[precision]
        assert [r["batch"] for r in v["onnxruntime_vs_reference"]["runs"]] == [1, 3]
    assert section["graphs"]["fp16"]["compute_dtype"] == "float16"
    json.dumps(section)  # the manifest is JSON


def test_export_refuses_bad_options(example_vae):
    with pytest.raises(ExportOptionError, match="unknown precision"):
        check_common_options(("int4",), 20)
    with pytest.raises(ExportOptionError, match="the VAE has 4 latent channels, the DiT takes 8"):
        DecoderExporter(example_vae, (8, 8, 8)).check_options(("fp32",))


# ---- uint8 conventions and PNGs ------------------------------------------------------------------

def test_to_uint8_matches_sample_ddp(vae_golden):
    assert np.array_equal(to_uint8(vae_golden["images"]), vae_golden["per_image_uint8"])


def test_grid_matches_save_image(vae_golden):
    assert np.array_equal(grid(vae_golden["images"]), vae_golden["grid_uint8"])
    single = grid(vae_golden["images"][:1])  # make_grid returns one image unpadded
    assert single.shape == (64, 64, 3)
    assert np.array_equal(grid(vae_golden["images"][:3]).shape, (68, 200, 3))


def _boundary_check(ours_u8, golden_u8, ours_float, golden_float, to_level) -> int:
    """Count differing pixels; each must differ by one level, with a level boundary between the two
    float values (the only way float32 noise can change a truncated uint8)."""
    diff = ours_u8.astype(int) - golden_u8.astype(int)
    assert np.abs(diff).max() <= 1
    where = np.nonzero(diff)
    a, b = to_level(ours_float)[where], to_level(golden_float)[where]
    assert (np.floor(a) != np.floor(b)).all()
    return int(np.count_nonzero(diff))


def test_uint8_of_exported_decoder_differs_only_at_boundaries(onnx_fp32_images, vae_golden):
    ours, gold = onnx_fp32_images, vae_golden["images"]
    per_image = _boundary_check(to_uint8(ours), vae_golden["per_image_uint8"], ours.transpose(0, 2, 3, 1),
                                gold.transpose(0, 2, 3, 1), lambda x: np.clip(x * np.float32(127.5) + np.float32(128), 0, 255))
    g = grid(ours)

    def grid_level(images):  # the pre-truncation grid values; padding is 0 in both
        x = np.clip(images, -1, 1).astype(np.float32)
        return np.clip((x + np.float32(1)) / np.float32(2) * np.float32(255) + np.float32(0.5), 0, 255)
    cells = [(slice(2 + 66 * (k // 4), 66 + 66 * (k // 4)), slice(2 + 66 * (k % 4), 66 + 66 * (k % 4))) for k in range(8)]
    assert all(np.array_equal(g[r, c], grid(ours[k:k + 1])) for k, (r, c) in enumerate(cells))
    grid_pixels = sum(_boundary_check(grid(ours[k:k + 1]), vae_golden["grid_uint8"][r, c], grid_level(ours[k]).transpose(1, 2, 0),
                                      grid_level(gold[k]).transpose(1, 2, 0), lambda x: x)
                      for k, (r, c) in enumerate(cells))
    assert np.count_nonzero(g != vae_golden["grid_uint8"]) == grid_pixels
    print(f"boundary values: per-image {per_image} of {gold.size}, grid {grid_pixels} of {vae_golden['grid_uint8'].size}")
    assert per_image <= MAX_BOUNDARY_PIXELS["per_image"]
    assert grid_pixels <= MAX_BOUNDARY_PIXELS["grid"]


def test_golden_pngs_read_back():
    with np.load(VAE_GOLDEN / "vae_vectors.npz") as z:
        assert np.array_equal(read_png(VAE_GOLDEN / "sample_grid.png"), z["grid_uint8"])
        for i in range(8):
            assert np.array_equal(read_png(VAE_GOLDEN / f"{i:06d}.png"), z["per_image_uint8"][i])


def test_written_pngs_read_back(tmp_path, vae_golden):
    path = write_png(tmp_path / "sample.png", vae_golden["grid_uint8"])
    assert np.array_equal(read_png(path), vae_golden["grid_uint8"])
    paths = write_per_image(tmp_path / "samples", vae_golden["per_image_uint8"], start_index=8)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(8, 16)]
    assert all(np.array_equal(read_png(p), a) for p, a in zip(paths, vae_golden["per_image_uint8"]))
    write_png(path, vae_golden["per_image_uint8"][0])  # a regular file is replaced
    assert np.array_equal(read_png(path), vae_golden["per_image_uint8"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.png", "samples"]


def test_write_png_refuses_directories_and_bad_arrays(tmp_path, vae_golden):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="exists and is not a regular file"):
        write_png(tmp_path / "dir.png", vae_golden["grid_uint8"])
    with pytest.raises(ImageError, match="expected a uint8"):
        write_png(tmp_path / "a.png", vae_golden["images"][0])


def test_write_png_leaves_nothing_half_written(tmp_path, vae_golden, monkeypatch):
    from PIL import Image
    (tmp_path / "old.png").write_bytes(b"old")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", failing_save)
    for name in ("new.png", "old.png"):
        with pytest.raises(OSError, match="disk full"):
            write_png(tmp_path / name, vae_golden["grid_uint8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"old"


def test_check_finite(vae_golden):
    images = vae_golden["images"].copy()
    check_finite(images, "decoder", "fp16")
    images[2, 0, 5, 5] = np.nan
    images[6, 1, 0, 0] = np.inf
    with pytest.raises(NonFiniteImageError, match=r"decoder network \(fp16 graph\) produced 2 non-finite values "
                                                  r"\(NaN/inf\) in image\(s\) 2, 6; .*--decoder-precision fp32"):
        check_finite(images, "decoder", "fp16")
    with pytest.raises(NonFiniteImageError, match=r"\(fp32 graph\).*check the sampler"):
        check_finite(images, "decoder", "fp32")


def test_images_module_imports_no_torch():
    code = ("import sys, numpy as np; import ditrt.runtime.core.images as m; "
            "m.to_uint8(np.zeros((1, 3, 2, 2), np.float32)); m.grid(np.zeros((2, 3, 2, 2), np.float32)); "
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules and 'PIL' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
