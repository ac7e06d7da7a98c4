"""Issue 30's C++ findings, each against the Python side: signed artifacts verified by the C ABI
(ditrt_open_signed, OpenSSL) on folders signed by `ditrt sign`, and tampered; degenerate
training schedules refused at load by both readers, naming the field (the DDIM crash); the C
step-spec and number parsers exactly as strict as Python's, by a differential test over the
issue's inputs and a generated set. The folder checks also run under ASan + UBSan."""
from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cpp_abi import ARTIFACT_ERROR, I64, INVALID_ARGUMENT, OK, SANITIZER_ENV, SCHEDULE_ERROR, VP, CppPipeline
from helpers import openssl_key_pair, swap_graph_and_its_digests
from test_cpp_runtime import _both_refuse, _edited_artifact, _open_status

# ---- signed artifacts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_cases(tmp_path_factory, cpp_artifact):
    """Folders signed by the Python side (`ditrt sign`), then each tampered one way: name ->
    (folder, the file C++ must name or None when it must open)."""
    pytest.importorskip("model_signing", reason="signing needs model-signing: pip install 'ditrt[sign]'")
    from ditrt.runtime.artifact.signing import sign_artifact
    root = tmp_path_factory.mktemp("cpp-signed")
    keys = {"key": openssl_key_pair(root, "key"), "other": openssl_key_pair(root, "other")}
    master = root / "master"
    shutil.copytree(cpp_artifact, master)
    sign_artifact(master, keys["key"][0])
    cases = {}

    def case(name, tamper, named):
        folder = root / name
        shutil.copytree(master, folder)
        tamper(folder)
        cases[name] = (folder, named)

    def flip_signature(folder):
        import base64
        bundle = json.loads((folder / "model.sig").read_text())
        sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
        sig[8] ^= 0x01
        bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
        (folder / "model.sig").write_text(json.dumps(bundle))

    def rewrite_statement(folder):  # a statement re-encoded with a changed digest, the old signature kept
        import base64
        bundle = json.loads((folder / "model.sig").read_text())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        statement["predicate"]["resources"][0]["digest"] = "0" * 64
        bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        (folder / "model.sig").write_text(json.dumps(bundle))

    def resign_inconsistent_statement(folder):  # signed by the key itself, but its subject does not hash its resources
        import base64
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        bundle = json.loads((folder / "model.sig").read_text())
        envelope = bundle["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        statement["subject"][0]["digest"]["sha256"] = "0" * 64
        payload = json.dumps(statement).encode()
        kind = envelope["payloadType"].encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)  # DSSE's pre-authentication encoding
        private = serialization.load_pem_private_key(keys["key"][0].read_bytes(), None)
        envelope["payload"] = base64.b64encode(payload).decode()
        envelope["signatures"][0]["sig"] = base64.b64encode(private.sign(pae, ec.ECDSA(hashes.SHA256()))).decode()
        (folder / "model.sig").write_text(json.dumps(bundle))

    case("intact", lambda f: None, None)
    case("swapped-graph", lambda folder: swap_graph_and_its_digests(folder, "fp32"), "denoiser.fp32.onnx")
    case("added-file", lambda f: (f / "extra.txt").write_text("x"), "extra.txt")
    case("removed-file", lambda f: (f / "decoder.fp16.onnx").unlink(), "decoder.fp16.onnx")
    case("flipped-signature", flip_signature, "model.sig")
    case("rewritten-statement", rewrite_statement, "model.sig")
    case("unsigned", lambda f: (f / "model.sig").unlink(), "not signed")
    case("inconsistent-statement", resign_inconsistent_statement, "does not match its resources")
    return keys, cases


def _check(build: Path, public: Path, folders: list[Path], env=None) -> list[tuple[int, str]]:
    proc = subprocess.run([str(build / "tests" / "ditrt_signature_check"), str(public), *map(str, folders)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [(int(status), message) for status, message in (line.split("\t", 1) for line in proc.stdout.splitlines())]


@pytest.mark.parametrize("kind", ["release", "sanitize"])
def test_cpp_verifies_python_signed_bundles_and_names_each_tampered_file(signed_cases, release_build, kind, request):
    keys, cases = signed_cases
    build = release_build if kind == "release" else request.getfixturevalue("sanitize_build")
    verdicts = _check(build, keys["key"][1], [folder for folder, _ in cases.values()],
                      SANITIZER_ENV if kind == "sanitize" else None)
    from ditrt.runtime.artifact.signing import verify_path
    for (name, (folder, named)), (status, message) in zip(cases.items(), verdicts):
        python_ok = all(r.problem is None for r in verify_path(folder, keys["key"][1]))
        if named is None:
            assert status == OK and python_ok, (name, message)
        else:
            assert status == ARTIFACT_ERROR and named in message and not python_ok, (name, message)
    assert "changed since signing" in verdicts[1][1] and "added since signing" in verdicts[2][1]
    assert "removed since signing" in verdicts[3][1] and "does not verify" in verdicts[4][1]
    (status, message), = _check(build, keys["other"][1], [cases["intact"][0]])  # another key
    assert status == ARTIFACT_ERROR and "does not verify" in message


def test_open_signed_without_a_key_is_open_and_a_bad_key_is_an_argument_error(lib, signed_cases, tmp_path):
    keys, cases = signed_cases
    fn = lib.lib.ditrt_open_signed
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_char_p, VP, ctypes.c_uint32, ctypes.c_char_p, ctypes.POINTER(VP)]
    pipe = CppPipeline(lib, cases["intact"][0])
    try:
        for key, status, text in [(None, OK, ""), (keys["key"][0], INVALID_ARGUMENT, "not an EC public key"),
                                  (tmp_path / "none.pem", INVALID_ARGUMENT, "No such file")]:
            handle = VP()
            got = fn(str(cases["swapped-graph"][0]).encode(), pipe.executor, 0,
                     None if key is None else str(key).encode(), ctypes.byref(handle))
            assert got == status and text in lib.error(), (key, got, lib.error())
            lib.lib.ditrt_close(handle)
    finally:
        pipe.close()


# ---- degenerate schedules -----------------------------------------------------------------------------

def _float32_alphas_cumprod_end(beta_start: float, beta_end: float, n: int) -> tuple[float, float]:
    """float32 of the training schedule's first and last alphas_cumprod, computed here from the
    official formula (numpy linspace and cumprod, float64)."""
    ac = np.cumprod(1.0 - np.linspace(beta_start, beta_end, n, dtype=np.float64))
    return float(np.float32(ac[0])), float(np.float32(ac[-1]))


@pytest.mark.parametrize("field, edit", [
    ("diffusion.beta_end", {"beta_end": 0.5}), ("diffusion.beta_end", {"beta_end": 0.9}),
    ("diffusion.beta_end", {"beta_end": 0.99999}), ("diffusion.num_train_timesteps", {"num_train_timesteps": 100000}),
    ("diffusion.beta_start", {"beta_start": 1e-9}),
], ids=["beta_end 0.5", "beta_end 0.9", "beta_end 0.99999", "T 100000", "beta_start 1e-9"])
def test_the_issue_degenerate_schedules_are_refused_at_load_by_both_readers(lib, cpp_pipe, cpp_artifact, tmp_path,
                                                                             field, edit):
    def change(m):
        m["diffusion"].update(edit)
        m["defaults"].update(sampler="ddim", steps="ddim10")
    directory = _edited_artifact(cpp_artifact, tmp_path, change)
    message = _both_refuse(lib, cpp_pipe.executor, directory, field)
    assert "degenerate schedule" in message


@pytest.mark.parametrize("beta_end", [0.02, 0.15, 0.1646, 0.1648, 0.17, 0.3])
def test_both_readers_accept_exactly_the_schedules_whose_float32_alphas_cumprod_is_normal(lib, cpp_pipe, cpp_artifact,
                                                                                         tmp_path, beta_end):
    """The boundary: accepted iff float32(ac[-1]) >= 2^-126 (between beta_end 0.1646 and 0.1648 for T = 1000);
    an accepted one samples DDIM (eta 0 and 1) in C++ to a status, never a crash."""
    from ditrt.runtime.core.errors import ArtifactError
    from ditrt.runtime.artifact.manifest import load_manifest
    first, last = _float32_alphas_cumprod_end(1e-4, beta_end, 1000)
    expected = first < 1.0 and last >= 2.0 ** -126
    assert expected == (beta_end <= 0.1646)  # the boundary, found by bisection on the formula (about 0.16469)
    directory = _edited_artifact(cpp_artifact, tmp_path, lambda m: m["diffusion"].update(beta_end=beta_end))
    for f in ("denoiser.fp32.onnx", "denoiser.fp16.onnx", "decoder.fp32.onnx", "decoder.fp16.onnx"):
        shutil.copy(cpp_artifact / f, directory / f)
    try:
        load_manifest(directory)
        python_ok = True
    except ArtifactError:
        python_ok = False
    status, message = _open_status(lib, cpp_pipe.executor, directory, 1)
    assert python_ok == expected and (status == OK) == expected, (beta_end, last, message)
    if expected:
        pipe = CppPipeline(lib, directory, flags=1)
        try:
            for eta in (0, 1):
                status, _ = pipe.sample([1], sampler="ddim", steps="ddim5", eta=eta, cfg_scale=1.0)
                assert status in (OK, 9), (beta_end, eta, status, lib.error())  # 9: DITRT_STEP_ERROR (NaN/inf)
        finally:
            pipe.close()


def test_python_ddim_step_at_eta_0_needs_no_noise_even_on_a_degenerate_table():
    """The TypeError of issue 30 (sigma = 0 * NaN, then sigma * None): at eta 0 sigma is exactly 0."""
    from ditrt.runtime.sampling import samplers, schedule
    betas = np.linspace(1e-4, 0.9, 1000)  # the issue's beta_end 0.9: alphas_cumprod underflows, 0/0 in ddim
    with np.errstate(all="ignore"):
        sched = schedule.schedule_from_betas(betas, np.arange(1000))
    assert np.float32(sched.alphas_cumprod[-1]) == 0
    x = np.ones((1, 4, 2, 2), np.float32)
    with np.errstate(all="ignore"):
        out = samplers.ddim_step(x, np.zeros((1, 8, 2, 2), np.float32), sched, 999, None, eta=0.0)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="needs noise"):  # eta != 0 without noise: a clear error, not a TypeError
        with np.errstate(all="ignore"):
            samplers.ddim_step(x, np.zeros((1, 8, 2, 2), np.float32), sched, 500, None, eta=1.0)


# ---- the parsers: C exactly as strict as Python --------------------------------------------------------

ISSUE_SPECS = ["25\n", "\n25", "\r25", "25\v", "\f25", "25", " 25\t", "ddim25\n", "ddim\t25", "10,\n20", "10 ,20",
               "\t10,20 ", "25\r\n", "0025", "\v", "", " "]
ISSUE_NUMBERS = ["0x1p2", "0X10", "4", " 4.0 ", "4\n", "\n4", "\v4\f", "\r4", "1_0", "1__0", "_1", "1_", "1_.5",
                 "1._5", "1.5_0", "1e1_0", "1e_1", ".5", "5.", ".", "e5", "1e", "1e+5", "+inf", "-Infinity", "nAn",
                 "nan(1)", "infinity", "inf_", "1e999", "-1e-400", "+.5e-0_1", "\x1c4", "4\x1f", "1,5", "4.0f", "+-1",
                 "--1", "0_0", "1 0", ""]


def _generated(alphabet: str, count: int, seed: int, max_len: int = 7) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


def _python_calls(manifest, sampler: str, spec: str):
    from ditrt.runtime.core.errors import ScheduleError
    from ditrt.runtime.sampling.samplers import SAMPLERS
    try:
        return SAMPLERS[sampler].model_calls(SAMPLERS[sampler].schedule(manifest.process, spec))
    except ScheduleError:
        return None


def _cpp_calls(lib, pipe, sampler: str, spec: str):
    options, k = VP(), I64()
    assert lib.lib.ditrt_options_create(ctypes.byref(options)) == OK
    try:
        assert lib.lib.ditrt_options_set(options, b"sampler", sampler.encode()) == OK
        status = lib.lib.ditrt_options_set(options, b"steps", spec.encode())
        if status == OK:
            status = lib.lib.ditrt_num_steps(pipe.pipe, options, ctypes.byref(k))
        assert status in (OK, SCHEDULE_ERROR, INVALID_ARGUMENT), (spec, status, lib.error())
        return k.value if status == OK else None
    finally:
        lib.lib.ditrt_options_release(options)


def test_step_specs_c_and_python_accept_the_same_and_count_the_same_calls(lib, cpp_pipe, cpp_artifact):
    from ditrt.runtime.artifact.manifest import load_manifest
    manifest = load_manifest(cpp_artifact)
    specs = ISSUE_SPECS + _generated("0123456789 \t\n\r\v\f,ddim", 1500, 30) + _generated("12 \t\n,", 500, 31, 5)
    disagreements = []
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        for spec in specs:
            python, cpp = _python_calls(manifest, sampler, spec), _cpp_calls(lib, cpp_pipe, sampler, spec)
            if python != cpp:
                disagreements.append((sampler, spec, python, cpp))
    assert not disagreements, disagreements[:10]
    for spec in ["25\n", "\n25", "\r25", "25\v", "\f25"]:
        assert _cpp_calls(lib, cpp_pipe, "ddim", spec) is None and _cpp_calls(lib, cpp_pipe, "dpm++2m", spec) is None


def _python_float(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def test_numbers_c_accepts_exactly_what_python_float_accepts(lib):
    texts = ISSUE_NUMBERS + _generated("0123456789._eE+-xXpPinfaINFA \t\n\v\f\r,", 3000, 32, 8)
    texts = [t for t in texts if t.isascii() and "\0" not in t]
    disagreements = []
    for key in (b"cfg_scale", b"eta"):
        for text in texts:
            options = VP()
            assert lib.lib.ditrt_options_create(ctypes.byref(options)) == OK
            status = lib.lib.ditrt_options_set(options, key, text.encode())
            lib.lib.ditrt_options_release(options)
            if (status == OK) != (_python_float(text) is not None):
                disagreements.append((key, text, status, _python_float(text)))
    assert not disagreements, disagreements[:10]
    assert _python_float("0x1p2") is None


def test_a_number_with_whitespace_or_underscores_means_what_python_reads(cpp_pipe):
    """The parsed value, not only the verdict: the same latents for '4', ' 4.0\\n' and '0.4e0_1'."""
    status, base = cpp_pipe.sample([1, 2], sampler="ddim", steps="ddim3", cfg_scale="4")
    assert status == OK
    for text in (" 4.0\n", "\f4\v", "0.4e0_1", "+4.000_0"):
        status, latents = cpp_pipe.sample([1, 2], sampler="ddim", steps="ddim3", cfg_scale=text)
        assert status == OK and np.array_equal(latents, base), text
    status, latents = cpp_pipe.sample([1, 2], sampler="ddim", steps="ddim3", cfg_scale="4.5")
    assert status == OK and not np.array_equal(latents, base)
