"""The one real-size test: DiT-XL/2 at 256 px through the fp16 export (external data, validation)."""
import subprocess
import sys

import numpy as np
import pytest

from ditrt import runtime


@pytest.mark.slow
def test_dit_xl2_fp16_export_with_external_data(tmp_path):
    out = tmp_path / "xl"
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "export", "--config", "DiT-XL/2", "--random-init",
                        "--image-size", "256", "--precision", "fp16", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = runtime.load_manifest(out)
    graph = manifest.graph("denoiser", "fp16")
    assert graph["files"] == ["denoiser.fp16.onnx", "denoiser.fp16.onnx.data"]  # 1.26 GB of weights: external
    assert graph["validation"]["onnxruntime_vs_reference"]["max_rel_err"] <= 5e-3
    assert manifest.data["model"]["parameters"] == 675_129_632
    manifest.verify_files("denoiser", "fp16")
    pipe = runtime.load(out, backend="onnxruntime", precision="fp16")
    x = pipe.backend({"latent": np.zeros((1, 4, 32, 32), np.float32), "timestep": np.array([999.0], np.float32),
                      "class_label": np.array([207])})["model_output"]
    assert x.shape == (1, 8, 32, 32) and np.isfinite(x).all()
