"""Signed artifacts and run records (OpenSSF model-signing, an EC P-256 key pair made here by
openssl): `ditrt sign`, `ditrt verify --public-key`, `runtime.load(public_key=...)`, `--public-key`
on the commands that load an artifact, `build` and signatures, `generate --private-key` and a
rewritten shard on `--resume`. The attacks are the issue's: a swapped graph with its sha256 updated
in the manifest and manifest.sha256 regenerated passes `verify` without a key."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ditrt import runtime
from ditrt.cli import main
from ditrt.runtime.core.errors import InputError, StepError
from ditrt.runtime.artifact.signing import SignatureError, SigningUnavailable, sign_path, verify_path
from helpers import openssl_key_pair, swap_graph_and_its_digests

pytest.importorskip("model_signing", reason="signing needs model-signing: pip install 'ditrt[sign]'")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return openssl_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory, keys):
    return openssl_key_pair(tmp_path_factory.mktemp("other"), "other")


@pytest.fixture(scope="module")
def signed_master(tmp_path_factory, tiny_artifact, keys):
    art = tmp_path_factory.mktemp("signed") / "art"
    shutil.copytree(tiny_artifact, art)
    r = cli("sign", art, "--private-key", keys[0])
    assert r.exit_code == 0, r.output
    return art


@pytest.fixture
def signed(tmp_path, signed_master):
    art = tmp_path / "art"
    shutil.copytree(signed_master, art)
    return art


def test_the_signature_covers_every_file_and_verifies(signed, keys):
    statement = json.loads(__import__("base64").b64decode(json.loads((signed / "model.sig").read_text())
                                                          ["dsseEnvelope"]["payload"]))
    covered = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    on_disk = {p.name for p in signed.iterdir() if p.name != "model.sig"}
    assert set(covered) == on_disk and {"manifest.json", "manifest.sha256", "denoiser.fp32.onnx"} <= on_disk
    assert covered["manifest.json"] == hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    r = cli("verify", signed, "--public-key", keys[1])
    assert r.exit_code == 0, r.output
    assert "model.sig" in r.output and "FAIL" not in r.output


def test_a_swapped_graph_with_updated_digests_passes_the_digest_but_not_the_signature(signed, keys):
    swap_graph_and_its_digests(signed)
    assert cli("verify", signed).exit_code == 0  # what a digest beside the files cannot catch
    r = cli("verify", signed, "--public-key", keys[1])
    assert r.exit_code == 1
    failed = [line for line in r.output.splitlines() if "FAIL:" in line]
    assert {line.split()[0] for line in failed} == {"denoiser.fp16.onnx", "manifest.json", "manifest.sha256"}, r.output
    assert all("changed since signing" in line for line in failed)


@pytest.mark.parametrize("tamper, name, problem", [
    (lambda art: (art / "extra.bin").write_bytes(b"x"), "extra.bin", "added since signing"),
    (lambda art: (art / "manifest.sha256").unlink(), "manifest.sha256", "removed since signing"),
])
def test_an_added_or_removed_file_fails_naming_it(signed, keys, tamper, name, problem):
    tamper(signed)
    rows = [r for r in verify_path(signed, keys[1]) if r.problem]
    assert [(r.name, r.problem.split(" (")[0]) for r in rows] == [(name, problem)]
    r = cli("verify", signed, "--public-key", keys[1])
    assert r.exit_code == 1 and f"FAILED: " in r.output and name in r.output.splitlines()[-1]


def test_another_key_a_tampered_signature_or_none_fails(signed, keys, other_keys):
    r = cli("verify", signed, "--public-key", other_keys[1])
    assert r.exit_code == 1 and "does not verify" in r.output
    bundle = json.loads((signed / "model.sig").read_text())
    sig = bytearray(__import__("base64").b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = __import__("base64").b64encode(bytes(sig)).decode()
    (signed / "model.sig").write_text(json.dumps(bundle))
    r = cli("verify", signed, "--public-key", keys[1])
    assert r.exit_code == 1 and "model.sig" in r.output and "does not verify" in r.output
    (signed / "model.sig").unlink()
    r = cli("verify", signed, "--public-key", keys[1])
    assert r.exit_code == 1 and "missing" in r.output


def test_load_with_a_public_key_refuses_unsigned_and_tampered_artifacts(signed, keys, tiny_artifact):
    runtime.load(signed, backend="onnxruntime", public_key=keys[1])
    with pytest.raises(SignatureError, match="not signed"):
        runtime.load(tiny_artifact, backend="onnxruntime", public_key=keys[1])
    swap_graph_and_its_digests(signed)
    runtime.load(signed, backend="onnxruntime")  # the digests agree: without a key it loads
    with pytest.raises(SignatureError, match="denoiser.fp16.onnx: changed since signing"):
        runtime.load(signed, backend="onnxruntime", public_key=keys[1])


def test_sample_with_public_key(signed, keys, tmp_path):
    out = tmp_path / "x.npy"
    r = cli("sample", signed, "--labels", "1", "--steps", "2", "--no-progress", "--public-key", keys[1], "--out", out)
    assert r.exit_code == 0, r.output
    (signed / "notes.txt").write_text("added")
    r = cli("sample", signed, "--labels", "1", "--steps", "2", "--no-progress", "--public-key", keys[1], "--out", out)
    assert r.exit_code == 2 and "notes.txt: added since signing" in r.output


@pytest.mark.parametrize("command", [
    ["quality", "--num-images", "20"], ["parity", "--against", "no-such-golden.npz"], ["serve", "--port", "0"],
    ["generate", "--num-images", "1", "--out", "{tmp}/run"]])
def test_every_loading_command_refuses_an_unsigned_artifact(tiny_artifact, keys, tmp_path, command):
    command = [c.replace("{tmp}", str(tmp_path)) for c in command]
    r = cli(command[0], tiny_artifact, *command[1:], "--public-key", keys[1])
    assert r.exit_code == 2 and "not signed" in r.output, r.output


def test_signing_refuses_an_artifact_that_does_not_verify(tmp_path, tiny_artifact, keys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    (art / "denoiser.fp32.onnx").write_bytes(b"changed")
    r = cli("sign", art, "--private-key", keys[0])
    assert r.exit_code == 2 and "does not verify" in r.output and not (art / "model.sig").exists()
    r = cli("sign", tiny_artifact, "--private-key", keys[1])  # a public key is no private key
    assert r.exit_code == 2 and "--private-key" in r.output and not (tiny_artifact / "model.sig").exists()


def test_build_refuses_a_signed_artifact_without_a_key_or_with_another(signed, keys, other_keys):
    r = cli("build", signed)
    assert r.exit_code == 2 and "is signed" in r.output and "--private-key" in r.output
    r = cli("build", signed, "--private-key", other_keys[0])
    assert r.exit_code == 2 and "does not verify" in r.output
    swap_graph_and_its_digests(signed)  # the right key never re-signs a tampered artifact
    r = cli("build", signed, "--private-key", keys[0])
    assert r.exit_code == 2 and "changed since signing" in r.output


def test_a_rewritten_shard_is_refused_on_resume_with_the_public_key(tiny_artifact, keys, tmp_path):
    run = tmp_path / "run"
    common = ["generate", tiny_artifact, "--num-images", "2", "--shard-size", "1", "--batch", "1", "--steps", "2",
              "--no-progress", "--out", run]
    r = cli(*common, "--private-key", keys[0])
    assert r.exit_code == 0, r.output
    assert verify_path(run / "run.json", keys[1], run / "run.sig")[0].problem is None
    r = cli(*common, "--resume", "--public-key", keys[1])  # intact: nothing to compute
    assert r.exit_code == 2 and "not signed" in r.output  # the artifact itself is unsigned
    shard = run / json.loads((run / "run.json").read_text())["shards"]["1"]["file"]
    with np.load(shard) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[sorted(arrays)[0]] = np.zeros_like(arrays[sorted(arrays)[0]])
    np.savez(shard, **arrays)
    record = json.loads((run / "run.json").read_text())
    record["shards"]["1"]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(record))
    signed_art = tmp_path / "art"
    shutil.copytree(tiny_artifact, signed_art)
    assert cli("sign", signed_art, "--private-key", keys[0]).exit_code == 0
    common[1] = signed_art
    r = cli(*common, "--resume", "--public-key", keys[1])
    assert r.exit_code == 2 and "run record" in r.output and "changed since signing" in r.output, r.output
    r = cli(*common, "--resume")  # without the key, the rewritten digest is believed (as before)
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[-1])["shards_resumed"] == 2, r.output


def test_missing_model_signing_names_the_extra(monkeypatch, tmp_path, keys):
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(SigningUnavailable, match=r"ditrt\[sign\]"):
        sign_path(tmp_path, keys[0])
    assert issubclass(SigningUnavailable, StepError) and issubclass(SignatureError, InputError)


def test_a_fifo_as_public_key_is_refused_before_reading(signed, tmp_path):
    fifo = tmp_path / "key.fifo"
    __import__("os").mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        verify_path(signed, fifo)
