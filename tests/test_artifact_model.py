"""The artifact model: the manifest is the single source of truth (edits change results or are
refused by name), schema 1 artifacts still load, one registry per extension point, one error
base class with exit codes by kind."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt import runtime
from ditrt.runtime.core.errors import ArtifactError, BackendError, InputError, StepError
from ditrt.runtime.artifact.manifest import load_manifest, upgrade_schema_1
from ditrt.runtime.core.files import sha256_file
from ditrt.runtime.sampling.samplers import SAMPLERS
from conftest import ROOT

NOISE_SEED = 5


@pytest.fixture
def edit(tmp_path, tiny_artifact):
    """A copy of the tiny artifact and a function that rewrites one manifest field."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)

    def change(*path, value=None, delete=False):
        data = json.loads((art / "manifest.json").read_text())
        node = data
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        (art / "manifest.json").write_text(json.dumps(data))
        return art

    change.art = art
    return change


def _sample(art, **kwargs):
    return runtime.load(art, backend="onnxruntime").sample([3, 7], num_steps=kwargs.pop("num_steps", 10),
                                                           seed=NOISE_SEED, progress=False, **kwargs)


def test_editing_the_diffusion_section_changes_the_result(edit):
    base = _sample(edit.art)
    np.testing.assert_array_equal(_sample(edit.art), base)  # deterministic
    edit("diffusion", "beta_start", value=2e-4)
    art = edit("diffusion", "beta_end", value=0.03)
    assert not np.allclose(_sample(art), base)
    edit("diffusion", "beta_start", value=0.3)
    art = edit("diffusion", "beta_end", value=0.9)  # alphas_cumprod underflows float32: refused at load (issue 30)
    with pytest.raises(ArtifactError, match="diffusion.beta_end 0.9 and diffusion.num_train_timesteps 1000 make a "
                                            "degenerate schedule"):
        _sample(art)
    edit("diffusion", "beta_start", value=1e-4)
    art = edit("diffusion", "beta_end", value=0.02)
    np.testing.assert_array_equal(_sample(art), base)
    art = edit("diffusion", "variance", value="fixed_large")  # the v channels are no longer used
    assert not np.allclose(_sample(art), base)
    art = edit("diffusion", "num_train_timesteps", value=500)
    assert runtime.load(art, backend="onnxruntime").sample([1], num_steps=10, progress=False).shape == (1, 4, 8, 8)


def test_the_manifest_defaults_are_used(edit):
    base = _sample(edit.art)
    art = edit("defaults", "guidance", value="standard")
    assert not np.allclose(_sample(art), base)
    np.testing.assert_array_equal(_sample(art, guidance="official"), base)  # an explicit argument wins
    edit("defaults", "guidance", value="official")
    ddim = _sample(edit.art, sampler="ddim")
    art = edit("defaults", "sampler", value="ddim")
    np.testing.assert_array_equal(_sample(art), ddim)
    art = edit("defaults", "steps", value="ddim5")
    pipe = runtime.load(art, backend="onnxruntime")
    pipe.sample([1], progress=False)
    assert pipe.last_stats.steps == 5
    art = edit("defaults", "cfg_scale", value=1.0)
    pipe = runtime.load(art, backend="onnxruntime")
    pipe.sample([1], num_steps=3, progress=False)
    assert pipe.last_stats.model_rows == 1  # cfg 1: no unconditional rows


@pytest.mark.parametrize("path, value, message", [
    (("networks", "denoiser", "inputs", 2, "condition", "null"), 3,
     "condition.null is 3, but it must equal num_classes = 10"),
    (("networks", "denoiser", "inputs", 2, "condition", "num_classes"), 11, "null is 10, but it must equal num_classes = 11"),
    (("networks", "denoiser", "inputs", 2, "dtype"), "int32", "do not match the model section"),
    (("networks", "denoiser", "inputs", 2, "condition", "kind"), "text", "condition.kind is 'text'"),
    (("networks", "denoiser", "inputs", 1, "role"), "condition", "do not match the model section|condition.kind"),
    (("guidance", "guided_channels", "official"), 100, r"guidance.guided_channels.official must be an integer from 1 to 4"),
    (("guidance", "guided_channels", "official"), -1, "from 1 to 4"),
    (("guidance", "guided_channels", "official"), 0, "from 1 to 4"),
    (("guidance", "guided_channels", "official"), "3", "must be an integer"),
    (("diffusion", "beta_schedule"), "cosine", "diffusion.beta_schedule must be one of 'linear', got 'cosine'"),
    (("diffusion", "variance"), "learned", "diffusion.variance must be one of .*got 'learned'"),
    (("diffusion", "clip_denoised"), True, "diffusion.clip_denoised is True"),
    (("diffusion", "beta_end"), 1.5, "0 < beta_start <= beta_end < 1"),
    (("diffusion", "prediction"), "v_prediction", "diffusion.prediction must be one of 'epsilon', got 'v_prediction'"),
    (("schema_version",), True, "schema version True"),
    (("schema_version",), 4, "re-export the artifact with this ditrt"),
    (("model", "family"), "flux", "unknown model family 'flux'"),
    (("model", "input_size"), "8", "model.input_size must be an integer"),
    (("model", "input_size"), 10**9, "model.input_size must be an integer from 1 to 1048576, got 1000000000"),
    (("model", "learn_sigma"), False, "model.out_channels is 8, but a dit with in_channels 4 and learn_sigma False outputs 4"),
    (("defaults", "sampler"), "euler", "defaults.sampler must be one of 'ddpm', 'ddim', 'dpm\\+\\+2m', got 'euler'"),
    (("defaults", "guidance"), "all", "defaults.guidance must be one of 'official', 'standard', got 'all'"),
    (("defaults", "eta"), 0.5, "defaults.eta is set, but the default sampler ddpm takes no eta"),
    (("defaults", "speed"), 1, "defaults has unknown keys"),
    (("networks", "denoiser", "graphs", "fp32", "file"), "../denoiser.fp32.onnx", "points outside the artifact"),
    (("networks", "denoiser", "graphs", "fp32", "file"), "/etc/passwd", "points outside the artifact"),
    (("networks", "denoiser", "graphs", "fp32", "file"), 7, "must be a file name inside the artifact"),
    (("networks", "denoiser", "graphs"), [], "networks.denoiser.graphs must be an object"),
    (("networks", "denoiser", "inputs"), [], "networks.denoiser.inputs must be a non-empty list"),
    (("networks",), {}, "networks must be an object with at least a denoiser"),
])
def test_manifest_values_the_runtime_cannot_honour_are_refused_by_name(edit, path, value, message):
    art = edit(*path, value=value)
    with pytest.raises(ArtifactError, match=message):
        runtime.load(art, backend="onnxruntime")


def test_a_missing_field_is_named(edit):
    art = edit("diffusion", "beta_end", delete=True)
    with pytest.raises(ArtifactError, match="diffusion.beta_end must be a number > 0, got None"):
        load_manifest(art)


def test_a_symbolic_link_out_of_the_artifact_is_refused(edit, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(edit.art / "denoiser.fp32.onnx", outside)
    (edit.art / "denoiser.fp32.onnx").unlink()
    (edit.art / "denoiser.fp32.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="resolves outside the artifact"):
        load_manifest(edit.art)


def test_fuzzed_manifests_load_cleanly_or_raise_project_errors(tiny_artifact, tmp_path):
    """Random type and value mutations of every field: a clean load or an ArtifactError, nothing else."""
    original = json.loads((tiny_artifact / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        paths.append(path)

    walk(original, ())
    replacements = [None, True, -1, 0, 10**12, 1.5, float("nan"), "x", [], {}, [1, 2], {"a": 1}]
    art = tmp_path / "fuzz"
    shutil.copytree(tiny_artifact, art)
    for trial in range(250):
        data = json.loads(json.dumps(original))
        path = paths[rng.integers(len(paths))]
        if not path:
            continue
        node = data
        for key in path[:-1]:
            node = node[key]
        if rng.random() < 0.2 and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = replacements[rng.integers(len(replacements))]
        (art / "manifest.json").write_text(json.dumps(data))
        try:
            load_manifest(art)
        except ArtifactError:
            pass


def test_schema_1_artifacts_load_and_sample_the_same(tmp_path, tiny_artifact):
    """A manifest written by ditrt 0.1 (tests/data), over this export's graph files."""
    art = tmp_path / "v1"
    shutil.copytree(tiny_artifact, art)
    v1 = json.loads((ROOT / "tests" / "data" / "manifest_schema1.json").read_text())
    assert v1["schema_version"] == 1 and "graphs" in v1 and "networks" not in v1
    for precision, graph in v1["graphs"].items():  # same graph files, this export's bytes
        graph["sha256"] = {name: sha256_file(art / name) for name in graph["sha256"]}
    (art / "manifest.json").write_text(json.dumps(v1))
    manifest = load_manifest(art)
    assert manifest.data["schema_version"] == 3 and manifest.data["upgraded_from_schema"] == 1
    assert manifest.defaults.sampler == "ddpm" and manifest.diffusion.variance == "learned_range"
    np.testing.assert_array_equal(_sample(art), _sample(tiny_artifact))
    assert upgrade_schema_1(v1)["networks"]["denoiser"]["graphs"] == v1["graphs"]


def test_sampler_registry_drives_cli_choices_and_parity_cases(tiny_artifact):
    from ditrt.cli import sample
    from ditrt.runtime.jobs.parity import loop_cases
    choices = next(p for p in sample.params if p.name == "sampler").type.choices
    assert list(choices) == list(SAMPLERS)
    cases = loop_cases(load_manifest(tiny_artifact), 4)  # a DiT artifact: the DiT family's samplers
    assert [c.sampler for c in cases] == [name for name, s in SAMPLERS.items() if s.family == "dit"] \
        == ["ddpm", "ddim", "dpm++2m"]


def test_a_multistep_sampler_plugs_in_through_the_registry(tiny_artifact, monkeypatch):
    """A sampler that carries state between steps: the loop hands each step the state the previous
    step returned, per run."""
    from ditrt.runtime.sampling import samplers
    seen = []

    def step(x, model_output, sched, k, noise, state):
        seen.append((k, state))
        return x * np.float32(0.5), (state or 0) + 1

    toy = samplers.Sampler("toy", "dit", "halves x", samplers.respaced_schedule, samplers.fixed_step_loop(step),
                           samplers.RESPACING_HELP, parity_steps=str, noise_draws=len, model_calls=len,
                           uses_noise=False)
    monkeypatch.setitem(samplers.SAMPLERS, "toy", toy)
    pipe = runtime.load(tiny_artifact, backend="onnxruntime")
    out = pipe.sample([1], num_steps=4, sampler="toy", seed=1, progress=False)
    start = pipe.start([1], num_steps=4, sampler="toy", seed=1).feeds()["latent"][:1]  # [x; null-row x]
    np.testing.assert_array_equal(out, start * np.float32(0.5 ** 4))
    assert seen == [(0, None), (1, 1), (2, 2), (3, 3)]
    with pytest.raises(InputError, match="eta applies to ddim only; toy takes no eta"):
        pipe.sample([1], num_steps=4, sampler="toy", eta=0.1, progress=False)


def test_backend_registry_names_are_shared(tiny_artifact):
    from ditrt.runtime.execution.backends import BACKENDS, backend_ids, parse_backend
    assert {"onnxruntime", "tensorrt", "torch"} <= set(BACKENDS)  # the built-in kinds (tests register stand-ins)
    assert "onnxruntime-fp16" in backend_ids() and "tensorrt-fp16" in backend_ids()
    manifest = load_manifest(tiny_artifact)
    for name in ("onnxruntime-fp32", "onnxruntime-fp16", "torch-fp32"):
        assert runtime.create_backend(manifest, name).name == name
    assert runtime.load(tiny_artifact, backend="onnxruntime", precision="fp16").backend.name == "onnxruntime-fp16"
    with pytest.raises(InputError, match="runs fp32, fp16 graphs, not 'int8'"):
        parse_backend("torch-int8")  # the torch backend runs no quantized graph


def test_cuda_io_binding_binds_inputs_and_outputs_on_the_chosen_device(tiny_artifact):
    """The CUDA EP path, with a recording stand-in for ONNX Runtime's IOBinding and OrtValues (no GPU
    here): every input and output buffer lives on the chosen device, and the feeds reach them."""
    from ditrt.runtime.execution.backends import OnnxRuntimeBackend
    backend = runtime.create_backend(load_manifest(tiny_artifact), "onnxruntime-fp32")
    calls = []

    class Value:
        def __init__(self, shape, dtype, device, device_id):
            self.where, self.data = (device, device_id), np.zeros(shape, dtype)

        def update_inplace(self, array):
            self.data[...] = array

        def numpy(self):
            return self.data

    class Binding:
        def bind_ortvalue_input(self, name, value):
            calls.append(("input", name, value.where))

        def bind_ortvalue_output(self, name, value):
            calls.append(("output", name, value.where))

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding, run_options=None):
            calls.append(("run",))

    class OrtValue:
        @staticmethod
        def ortvalue_from_shape_and_type(shape, dtype, device, device_id):
            return Value(shape, dtype, device, device_id)

    backend.session, backend.device, backend.device_id, backend.io_binding = Session(), "cuda", 1, True
    backend._ort = type("ort", (), {"OrtValue": OrtValue})
    feeds = {"latent": np.ones((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
             "class_label": np.zeros(2, np.int64)}
    out = OnnxRuntimeBackend.__call__(backend, feeds)
    assert out["model_output"].shape == (2, 8, 8, 8)
    assert [c[2] for c in calls if c[0] == "input"] == [("cuda", 1)] * 3
    assert [c[2] for c in calls if c[0] == "output"] == [("cuda", 1)]
    assert calls.count(("run",)) == 1
    assert (backend._bound[2].inputs["latent"].data == 1).all()  # the feed was copied into the device buffer


def test_error_kinds_decide_exit_codes(tiny_artifact, monkeypatch, tmp_path):
    from ditrt import cli
    assert issubclass(ArtifactError, InputError) and issubclass(BackendError, StepError)
    assert InputError.exit_code == 2 and StepError.exit_code == 1
    r = CliRunner().invoke(cli.main, ["sample", str(tiny_artifact), "--labels", "1", "--steps", "ddim300",
                                      "--out", str(tmp_path / "a.npy")])
    assert r.exit_code == 2 and "no integer stride" in r.output

    def failing_backend(self, feeds):
        raise BackendError("ONNX Runtime failed running denoiser.fp32.onnx: simulated")

    monkeypatch.setattr(runtime.execution.backends.OnnxRuntimeBackend, "__call__", failing_backend)
    r = CliRunner().invoke(cli.main, ["sample", str(tiny_artifact), "--labels", "1", "--steps", "4",
                                      "--backend", "onnxruntime", "--out", str(tmp_path / "b.npy")])
    assert r.exit_code == 1 and "simulated" in r.output and not (tmp_path / "b.npy").exists()

    def bug(self, feeds):
        raise KeyError("a bug in ditrt")

    monkeypatch.setattr(runtime.execution.backends.OnnxRuntimeBackend, "__call__", bug)
    r = CliRunner().invoke(cli.main, ["sample", str(tiny_artifact), "--labels", "1", "--steps", "4",
                                      "--backend", "onnxruntime", "--out", str(tmp_path / "c.npy")])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # a bug, not "bad input" (2)


# ---- integrity (issue 22): the manifest's digest, external data --------------------------------------

def _verify(art):
    from ditrt import cli
    return CliRunner().invoke(cli.main, ["verify", str(art)])


def test_ditrt_build_keeps_the_manifest_digest_current_but_never_blesses_a_hand_edit(edit):
    """record_engine (what `ditrt build` calls) edits the manifest legitimately: the digest follows.
    A manifest already edited by hand stays reported after it."""
    import hashlib
    art = edit.art
    plan = art / "denoiser.fp16.sm90.trt11.plan"
    plan.write_bytes(b"a plan")
    load_manifest(art).record_engine({"network": "denoiser", "file": plan.name, "sha256": sha256_file(plan)})
    assert (art / "manifest.sha256").read_text().split()[0] == hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    r = _verify(art)
    assert r.exit_code == 0 and "denoiser TensorRT plan" in r.output and "12/12 files match" in r.output, r.output  # manifest, 2 graphs x 5 networks, plan
    edit("defaults", "steps", value=25)  # by hand
    load_manifest(art).record_engine({"network": "denoiser", "file": plan.name, "sha256": sha256_file(plan)})
    r = _verify(art)
    assert r.exit_code == 1 and "edited since export" in r.output


def _with_external_data(art, listed: bool):
    """The fp32 graph re-saved with its weights in denoiser.fp32.onnx.data (as exports above 1 GiB
    write it); the manifest hashes the new graph, and lists the data file only when `listed`."""
    import onnx
    graph = art / "denoiser.fp32.onnx"
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location="denoiser.fp32.onnx.data")
    data = json.loads((art / "manifest.json").read_text())
    entry = data["networks"]["denoiser"]["graphs"]["fp32"]
    names = ["denoiser.fp32.onnx"] + (["denoiser.fp32.onnx.data"] if listed else [])
    entry["files"], entry["sha256"] = names, {name: sha256_file(art / name) for name in names}
    (art / "manifest.json").write_text(json.dumps(data))
    assert (art / "denoiser.fp32.onnx.data").stat().st_size > 100_000  # the weights moved out
    return art


@pytest.mark.parametrize("verify", [True, False])
def test_external_data_the_manifest_does_not_list_is_refused_at_load(edit, verify):
    art = _with_external_data(edit.art, listed=False)
    with pytest.raises(ArtifactError, match=r"reads external data the manifest does not list \(so it is not hashed\): "
                                            r"'denoiser.fp32.onnx.data'"):
        runtime.load(art, backend="onnxruntime", verify=verify)
    r = _verify(art)
    assert r.exit_code == 1 and "denoiser.fp32.onnx.data" in r.output and "not listed in the manifest" in r.output


def test_external_data_listed_and_hashed_loads_and_samples_the_same(edit, tiny_artifact):
    art = _with_external_data(edit.art, listed=True)
    np.testing.assert_array_equal(_sample(art), _sample(tiny_artifact))
    (art / "denoiser.fp32.onnx.data").write_bytes(b"\0" * (art / "denoiser.fp32.onnx.data").stat().st_size)
    with pytest.raises(ArtifactError, match="denoiser.fp32.onnx.data does not match its sha256"):
        runtime.load(art, backend="onnxruntime")
