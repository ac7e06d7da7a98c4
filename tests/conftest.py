"""Shared fixtures: the official golden vectors and the tiny golden artifact (exported once)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
TINY_CHECKPOINT = GOLDEN_DIR / "dit_official_layout.pt"  # the official golden model (shared/golden)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (a golden), read into memory and the file closed."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    return read_npz(GOLDEN_DIR / "official_vectors.npz")


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((GOLDEN_DIR / "official_vectors.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from ditrt.exporter.checkpoints import load_checkpoint
    return load_checkpoint(TINY_CHECKPOINT, num_heads=4)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    """The golden checkpoint exported to fp32 and fp16 ONNX (validated at export)."""
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_checkpoint
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_artifact(source_from_checkpoint(tiny_checkpoint), out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def sit_golden_artifact(tmp_path_factory) -> Path:
    """The golden SiT (tests/golden/sit) exported by the CLI, in a subprocess (fp32 and fp16 graphs);
    shared read-only: a test that changes it works on a copy."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("sit") / "art"
    r = subprocess.run([sys.executable, "-m", "ditrt.cli", "export", str(GOLDEN_DIR / "sit" / "sit_official_layout.pt"),
                        "--family", "sit", "--num-heads", "4", "--out", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    return out


def max_rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    """Max abs error relative to the reference's largest magnitude (the project's parity metric)."""
    return float(np.abs(np.asarray(actual, np.float64) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="session")
def tiny_artifact_with_vae(tmp_path_factory, tiny_checkpoint) -> Path:
    """The golden checkpoint and the golden small VAE (tests/golden/vae/vae) in one artifact."""
    from ditrt.exporter.artifact import export_artifact
    from ditrt.exporter.denoiser import source_from_checkpoint
    from ditrt.exporter.vae import load_vae
    out = tmp_path_factory.mktemp("artifacts") / "tiny_vae"
    export_artifact(source_from_checkpoint(tiny_checkpoint), out, log=lambda m: None,
                    vae=load_vae(GOLDEN_DIR / "vae" / "vae", in_channels=4))
    return out


QUANT_CALIB = {"calib_images": 8, "calib_steps": 10, "calib_seed": 0}  # tiny: the tests' calibration


def export_quantized(out: Path, precisions=("fp32", "int8", "fp8"), vae: bool = True, **calibration) -> Path:
    """The digits example exported with quantized graphs (needs ditrt[quant]), calibrated on a few
    short trajectories."""
    from ditrt.exporter.artifact import EXAMPLE_VAE, export_artifact, resolve_source
    from ditrt.exporter.quantize import QuantOptions
    from ditrt.exporter.vae import load_vae
    import torch
    source, _, _ = resolve_source(example=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: on a loaded machine two OpenMP threads wait on each other 30x longer
    try:
        export_artifact(source, out, precisions, log=lambda m: None,
                        quant=QuantOptions(**{**QUANT_CALIB, **calibration}),
                        vae=load_vae(EXAMPLE_VAE, in_channels=source.config.in_channels) if vae else None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def quant_artifact(tmp_path_factory) -> Path:
    """The digits example with fp32, int8 and fp8 denoiser graphs and its fp32 decoder."""
    pytest.importorskip("modelopt.torch.quantization", reason="int8 / fp8 graphs need pip install 'ditrt[quant]'")
    return export_quantized(tmp_path_factory.mktemp("artifacts") / "quant")


# ---- the C++ runtime through its C ABI (tests/cpp_abi.py): test_cpp_runtime, test_cpp_sit, test_cpp_hardening

@pytest.fixture(scope="session")
def release_build() -> Path:
    from cpp_abi import build_cpp
    return build_cpp("release", ["-DCMAKE_BUILD_TYPE=Release"])


@pytest.fixture(scope="session")
def sanitize_build() -> Path:
    from cpp_abi import SANITIZE_CXX, SANITIZE_FLAGS, build_cpp
    return build_cpp("sanitize", ["-DCMAKE_BUILD_TYPE=Sanitize", f"-DCMAKE_CXX_FLAGS={SANITIZE_CXX}",
                                  f"-DCMAKE_C_FLAGS={SANITIZE_CXX}", f"-DCMAKE_EXE_LINKER_FLAGS={SANITIZE_FLAGS}",
                                  f"-DCMAKE_SHARED_LINKER_FLAGS={SANITIZE_FLAGS}",
                                  f"-DCMAKE_MODULE_LINKER_FLAGS={SANITIZE_FLAGS}", "-DDITRT_BUILD_EXAMPLES=OFF"])


@pytest.fixture(scope="session")
def lib(release_build):
    from cpp_abi import Lib, library
    return Lib(library(release_build))


@pytest.fixture(scope="session")
def cpp_artifact(tiny_artifact_with_vae) -> Path:
    """The tiny golden DiT and the small golden VAE in one artifact (manifest schema 3)."""
    assert json.loads((tiny_artifact_with_vae / "manifest.json").read_text())["schema_version"] == 3
    return tiny_artifact_with_vae


@pytest.fixture(scope="session")
def cpp_pipe(lib, cpp_artifact):
    from cpp_abi import opened_pipeline
    yield from opened_pipeline(lib, cpp_artifact)


@pytest.fixture(scope="session")
def python_pipe(cpp_artifact):
    from cpp_abi import python_fp32
    return python_fp32(cpp_artifact)
