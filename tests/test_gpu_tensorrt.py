"""TensorRT on a GPU: build tiny engines from the golden checkpoint's fp16 graph and reproduce the
official DDPM loop through the runtime. Run with `pytest -m gpu`; skipped, with the reason, where
TensorRT, cuda-python or an NVIDIA GPU is missing."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from ditrt import runtime
from conftest import max_rel_err
from ditrt.runtime.core.errors import ArtifactError
from ditrt.runtime.artifact.manifest import load_manifest
from ditrt.runtime.execution.trt.settings import FP16_PARITY_BOUND, BuildFlags, EngineProfile
from ditrt.runtime.core.errors import TensorRTUnavailable

pytestmark = pytest.mark.gpu
PROFILE = EngineProfile(1, 4, 8)  # the golden loop runs 2 images = 4 rows; 8 leaves room for chunking tests


@pytest.fixture(scope="module")
def trt_env():
    from ditrt.runtime.execution.trt.device import environment
    try:
        env = environment()
        from ditrt.runtime.jobs.build import require_toolchain
        require_toolchain()
    except TensorRTUnavailable as e:
        pytest.skip(f"needs TensorRT, Polygraphy, cuda-python and an NVIDIA GPU: {e.missing}")
    return env


def _build(tiny_artifact, tmp_path_factory, name: str, flags: BuildFlags):
    from ditrt.runtime.jobs.build import build_engine
    out = tmp_path_factory.mktemp(name) / "tiny"
    shutil.copytree(tiny_artifact, out)
    return out, build_engine(out, "denoiser", "fp16", PROFILE, flags, log=print)


@pytest.fixture(scope="module")
def built(trt_env, tiny_artifact, tmp_path_factory):
    return _build(tiny_artifact, tmp_path_factory, "trt", BuildFlags(opt_level=3))


def _golden_ddpm(pipe, golden):
    noise = (golden["ddpm_initial_noise"], golden["ddpm_step_noise"])
    return pipe.sample([3, 7], num_steps="10", sampler="ddpm", cfg_scale=4.0, guidance="official", noise=noise,
                       progress=False)


def test_build_records_a_parity_checked_engine(trt_env, built):
    out, entry = built
    plan = out / entry["file"]
    assert entry["file"] == f"denoiser.fp16.{trt_env.gpu.sm}.trt{trt_env.trt_version}.plan"
    assert plan.is_file() and hashlib.sha256(plan.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["tensorrt"] == {"version": trt_env.trt_version, "strongly_typed": True}
    assert entry["gpu"]["name"] == trt_env.gpu.name and entry["profile"]["max"] == 8
    assert (out / f"timing.{trt_env.gpu.sm}.trt{trt_env.trt_version}.cache").is_file()
    parity = entry["parity"]
    print(json.dumps(parity, indent=1))
    assert parity["passed"] and parity["max_rel_err"] <= FP16_PARITY_BOUND
    assert parity["reference"].endswith("denoiser.fp32.onnx")
    assert [r["batch"] for r in parity["runs"]] == [1, 3]
    assert all(r["cuda_graph"] == "captured" for r in parity["runs"]), parity["runs"]
    assert load_manifest(out).engines == [entry]
    assert not list(out.glob(".*.tmp"))  # no temporary plan left behind


def test_golden_ddpm_loop_on_tensorrt(built, golden):
    out, _ = built
    pipe = runtime.load(out, backend="auto")
    assert pipe.backend.name == "tensorrt-fp16"
    err = max_rel_err(_golden_ddpm(pipe, golden), golden["ddpm_samples"])
    print(f"TensorRT fp16, 10-step DDPM loop vs official: max rel err {err:.2e}")
    # The per-forward bound holds for the loop: on ONNX Runtime the fp16 graph's loop error (5e-4)
    # equals its per-forward error, it does not grow over the 10 steps.
    assert err <= FP16_PARITY_BOUND
    assert not pipe.backend.graph_failures


def test_chunking_and_cuda_graphs_do_not_change_results(built):
    from ditrt.runtime.execution.trt.backend import TensorRTBackend
    out, _ = built
    manifest = load_manifest(out)
    rng = np.random.default_rng(0)
    rows = 11  # above the profile's max of 8: chunked into 8 + 3
    feeds = {"latent": rng.standard_normal((rows, 4, 8, 8), dtype=np.float32),
             "timestep": np.linspace(999, 0, rows).astype(np.float32), "class_label": (np.arange(rows) % 11).astype(np.int64)}
    with TensorRTBackend.from_manifest(manifest) as graphs, \
            TensorRTBackend.from_manifest(manifest, cuda_graphs=False) as plain, \
            TensorRTBackend.from_manifest(manifest, max_batch=2) as small:
        assert graphs.max_batch == 8 and small.max_batch == 2
        reference = plain(feeds)["model_output"]
        scale = np.abs(reference).max()
        # Same plan, same batch sizes: same kernels, so a graph replay reproduces the plain enqueue.
        np.testing.assert_allclose(graphs(feeds)["model_output"], reference, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(graphs(feeds)["model_output"], reference, rtol=0, atol=1e-6 * scale)  # graph replay
        # Other batch sizes may pick other fp16 kernels: within the engine's fp16 bound.
        assert np.abs(small(feeds)["model_output"] - reference).max() <= FP16_PARITY_BOUND * scale
        assert set(graphs._slots) == {8, 3} and set(small._slots) == {2, 1}


def test_incompatible_entry_is_refused_before_deserialising(built, tmp_path):
    out, _ = built
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    manifest = load_manifest(copy)
    manifest.engines[0]["tensorrt"]["version"] = "10.0.0.1"
    manifest.save()
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.0\.0\.1.*ditrt build"):
        runtime.load(copy, backend="tensorrt")
    assert runtime.load(copy, backend="auto").backend.name.startswith("onnxruntime")


def test_corrupt_plan_gives_tensorrts_own_error(built, tmp_path):
    from ditrt.runtime.execution.trt.backend import TensorRTBackend
    out, entry = built
    plan = tmp_path / entry["file"]
    data = bytearray((out / entry["file"]).read_bytes())
    data[:64] = b"\0" * 64
    plan.write_bytes(bytes(data))
    corrupt = {**entry, "sha256": hashlib.sha256(bytes(data)).hexdigest()}
    with pytest.raises(ArtifactError, match="returned no engine") as info:
        TensorRTBackend(plan, load_manifest(out).network("denoiser"), corrupt, artifact=str(out))
    assert "TensorRT said" in str(info.value) and "ditrt build" in str(info.value)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        TensorRTBackend(plan, load_manifest(out).network("denoiser"), entry, artifact=str(out))


def test_portable_build_runs_and_rebuild_replaces_its_entry(trt_env, tiny_artifact, tmp_path_factory, golden):
    from ditrt.runtime.jobs.build import build_engine
    hardware = "ampere+" if trt_env.gpu.compute_capability >= (8, 0) else "none"
    flags = BuildFlags(opt_level=0, hardware_compat=hardware, version_compatible=True)
    out, entry = _build(tiny_artifact, tmp_path_factory, "portable", flags)
    assert entry["file"].endswith(".vc.plan") and entry["build"]["version_compatible"]
    with pytest.raises(ArtifactError, match="executes host code"):
        runtime.load(out, backend="tensorrt")  # an explicit allowance is needed
    pipe = runtime.load(out, backend="tensorrt", allow_plan_host_code=True)
    assert max_rel_err(_golden_ddpm(pipe, golden), golden["ddpm_samples"]) <= FP16_PARITY_BOUND
    again = build_engine(out, "denoiser", "fp16", PROFILE, BuildFlags(opt_level=1, hardware_compat=hardware, version_compatible=True),
                         log=print)
    engines = load_manifest(out).engines
    assert len(engines) == 1 and engines[0]["file"] == again["file"] and engines[0]["build"]["opt_level"] == 1


def test_build_without_fp16_graph_is_an_input_error(trt_env, tiny_artifact, tmp_path):
    from ditrt.runtime.jobs.build import build_engine
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, copy)
    manifest = load_manifest(copy)
    del manifest.data["networks"]["denoiser"]["graphs"]["fp16"]
    manifest.save()
    with pytest.raises(ArtifactError, match="no fp16 denoiser graph"):
        build_engine(copy, "denoiser", "fp16", PROFILE, BuildFlags(), log=print)
