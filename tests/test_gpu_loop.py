"""The GPU side of issue 29, as far as it runs without a GPU: the seeded stream computed through
another array module (`normal_on(xp, ...)`: CuPy on a GPU, here numpy behind a recording proxy
standing in for it), the CUDA EP's provider options and the CUDA-graph refusals. On a machine with
CuPy and a GPU, the device stream must equal the host stream bit for bit; with onnxruntime-gpu,
IOBinding and CUDA graphs must give session.run's outputs. Those tests skip elsewhere, saying why;
bench/gpu_loop_bench.py runs them on a lent device (bench/README.md)."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from ditrt.runtime.sampling import noise
from ditrt.runtime.execution.backends import OnnxRuntimeBackend, cuda_provider_options
from ditrt.runtime.core.errors import InputError

DATA = Path(__file__).resolve().parent / "data" / "host_loop"


class RecordingNumpy(types.SimpleNamespace):
    """numpy as an array module: every function the stream takes from `xp` is recorded."""

    def __init__(self):
        super().__init__(used=set())

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(np, name)


def test_the_stream_through_an_array_module_is_the_stream():
    """normal_on(xp) takes its array functions from xp (here numpy standing in for CuPy) and gives
    the bits of noise.normal (the specification, held to tests/data/noise_table.json elsewhere)."""
    xp = RecordingNumpy()
    got = noise.normal_on(xp, 42, [3, 0, 7], 250, (4, 5, 6))
    want = noise.normal(42, [3, 0, 7], 250, (4, 5, 6))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # every array-creating or elementwise function of the transform came from xp
    assert {"frexp", "sqrt", "where", "multiply", "right_shift", "bitwise_and", "arange", "empty",
            "full_like"} <= xp.used


def test_cuda_provider_options():
    assert cuda_provider_options(1) == {"use_tf32": 0, "device_id": 1}
    assert cuda_provider_options(0, cuda_graph=True) == {"use_tf32": 0, "device_id": 0, "enable_cuda_graph": 1}


def test_cuda_graphs_are_refused_without_the_cuda_ep_or_io_binding(tmp_path):
    from ditrt import runtime
    from test_host_loop import _tiny_graph
    spec = runtime.load_manifest(DATA / "dit").network("denoiser")
    _tiny_graph(tmp_path / "tiny.onnx")
    with pytest.raises(InputError, match="cuda_graph needs the CUDA EP"):
        OnnxRuntimeBackend(tmp_path / "tiny.onnx", spec, "fp32", "cpu", cuda_graph=True)


# ---- on a GPU ------------------------------------------------------------------------------------

def _cupy_or_skip():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # not installed, no driver, no device
        pytest.skip(f"the device noise stream needs CuPy and a CUDA GPU ({type(e).__name__}: {e})")
    return cupy


def _cuda_ep_or_skip():
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("IOBinding on the device and CUDA graphs need onnxruntime-gpu's CUDA EP (not installed here)")


@pytest.mark.gpu
def test_device_noise_is_the_host_stream_bit_for_bit():
    cupy = _cupy_or_skip()
    for images, draw, shape in (([0, 1, 2, 3, 4, 5, 6, 7], 1, (4, 32, 32)), ([5, 2**40], 250, (4, 5, 7))):
        got = cupy.asnumpy(noise.normal_on(cupy, 7, images, draw, shape))
        np.testing.assert_array_equal(got.view(np.uint32), noise.normal(7, images, draw, shape).view(np.uint32))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_io_binding_and_graphs_give_session_run_outputs(tmp_path, cuda_graph):
    _cuda_ep_or_skip()
    from ditrt import runtime
    from test_host_loop import _tiny_graph
    spec = runtime.load_manifest(DATA / "dit").network("denoiser")
    _tiny_graph(tmp_path / "tiny.onnx")
    plain = OnnxRuntimeBackend(tmp_path / "tiny.onnx", spec, "fp32", "cpu")
    bound = OnnxRuntimeBackend(tmp_path / "tiny.onnx", spec, "fp32", "cuda", cuda_graph=cuda_graph)
    for call, rows in enumerate((2, 4, 2, 4, 2)):
        feeds = spec.example_inputs(rows)
        feeds["latent"] = feeds["latent"] + np.float32(call)
        np.testing.assert_array_equal(bound(feeds)["model_output"], plain(feeds)["model_output"])
