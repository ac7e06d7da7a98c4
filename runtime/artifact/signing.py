"""Signed artifacts and run records: OpenSSF model-signing (a Sigstore bundle: a DSSE envelope,
ECDSA over an in-toto statement that lists every file's sha256), with an elliptic-curve key pair.

A digest beside the files (the manifest's sha256, `manifest.sha256`) catches accidents; whoever can
write the folder can rewrite a file and its digest together. A signature cannot be rewritten
without the private key. `sign_path` signs a folder (every file in it, except the signature) or one
file (a run record); `verify_path` checks the signature and every file it covers, and names each
changed, added or removed file. model_signing is imported lazily: the rest of the runtime works
without it (pip install 'ditrt[sign]')."""
from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ArtifactError, InputError, StepError
from ..core.files import atomic_output, sha256_file

SIGNATURE_NAME = "model.sig"  # inside the artifact folder, as model_signing's CLI names it
SIGN_EXTRA = "pip install 'ditrt[sign]' (model-signing and pyopenssl)"
MAX_KEY_BYTES = 1 << 16
MAX_SIGNATURE_BYTES = 1 << 24


class SigningUnavailable(StepError):
    """model-signing (or pyopenssl, which its 1.1.1 needs to import) is not installed."""


class SignatureError(ArtifactError):
    """A signature is missing, does not verify, or a file it covers changed (exit 2 at load)."""


@dataclass(frozen=True)
class SignedFile:
    """One row of a verification: a file the signature covers (or the signature itself)."""
    name: str
    what: str
    problem: str | None


def _model_signing():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:  # pyopenssl missing also ends here (model-signing 1.1.1 imports it)
        raise SigningUnavailable(f"signing and signature checks need model-signing: {SIGN_EXTRA} ({e})") from None
    return hashing, signing, verifying


def _key_file(path, what: str) -> Path:
    """A key path: a regular file of bounded size (a FIFO or a device is refused before reading)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InputError(f"{what} must be the path of a PEM key file, got {path!r}")
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} {path} is not a regular file (a directory, FIFO or device): give a PEM key file")
    if info.st_size > MAX_KEY_BYTES:
        raise InputError(f"{what} {path} is {info.st_size} bytes: not a PEM key (at most {MAX_KEY_BYTES})")
    return path


def _hashing_config(hashing, signature: Path, model_path: Path):
    ignored = [signature.name] if model_path.is_dir() and signature.parent.resolve() == model_path.resolve() else []
    return hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)  # every other file


def default_signature(model_path: Path) -> Path:
    """model.sig inside a folder; NAME.sig beside a single file (run.json -> run.sig)."""
    model_path = Path(model_path)
    return model_path / SIGNATURE_NAME if model_path.is_dir() else model_path.with_suffix(".sig")


def sign_path(model_path, private_key, signature=None, password: str | None = None) -> Path:
    """Sign a folder (every file in it but the signature) or one file with an EC private key (PEM;
    P-256, P-384 or P-521). The signature is written atomically; returns its path."""
    hashing, signing, _ = _model_signing()
    model_path = Path(model_path)
    if not model_path.exists():
        raise InputError(f"cannot sign {model_path}: it does not exist")
    key = _key_file(private_key, "--private-key")
    signature = Path(signature) if signature is not None else default_signature(model_path)
    with tempfile.TemporaryDirectory(prefix="ditrt-sign-") as tmp:
        scratch = Path(tmp) / "signature"
        try:
            config = signing.Config().use_elliptic_key_signer(private_key=key, password=password)
        except (ValueError, TypeError) as e:  # not a PEM EC key, an unsupported curve, a wrong password
            raise InputError(f"--private-key {key}: cannot use it to sign ({e}); give an EC private key in PEM "
                             "(openssl ecparam -name prime256v1 -genkey -noout -out key.pem)") from None
        try:
            config.set_hashing_config(_hashing_config(hashing, signature, model_path)).sign(model_path, scratch)
        except ValueError as e:  # a symbolic link inside the folder, an unreadable file
            raise InputError(f"cannot sign {model_path}: {e}") from None
        data = scratch.read_bytes()
    with atomic_output(signature) as f:
        f.write(data)
    return signature


def _statement(signature: Path) -> dict:
    """The in-toto statement of a bundle (trusted only after model_signing verified the envelope)."""
    bundle = json.loads(signature.read_bytes())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def _actual_files(model_path: Path, ignored: list[str]) -> dict[str, Path]:
    if model_path.is_file():
        return {".": model_path}
    found = {}
    for root, dirs, names in os.walk(model_path):
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(model_path).as_posix()
            if not any(relative == p or relative.startswith(p.rstrip("/") + "/") for p in ignored):
                found[relative] = path
    return found


def _file_rows(model_path: Path, signature: Path) -> list[SignedFile]:
    """Each file against the signed statement: changed, added (unsigned) or removed."""
    statement = _statement(signature)
    predicate = statement["predicate"]
    signed = {r["name"]: r["digest"] for r in predicate["resources"]}
    actual = _actual_files(model_path, list(predicate["serialization"].get("ignore_paths", [])))
    rows = []
    for name in sorted(set(signed) | set(actual)):
        shown = model_path.name if name == "." else name
        if name not in actual:
            rows.append(SignedFile(shown, "signed file", "removed since signing (the signature covers it)"))
        elif name not in signed:
            rows.append(SignedFile(shown, "signed file", "added since signing (the signature does not cover it)"))
        else:
            same = sha256_file(actual[name]) == signed[name]
            rows.append(SignedFile(shown, "signed file", None if same else "changed since signing (sha256 differs "
                                                                           "from the signed one)"))
    return rows


def verify_path(model_path, public_key, signature=None) -> list[SignedFile]:
    """The signature's row (missing, unreadable, made with another key, tampered) and, when it
    verifies, one row per file it covers and per file added since. Empty problems: all good."""
    _, _, verifying = _model_signing()
    model_path = Path(model_path)
    key = _key_file(public_key, "--public-key")
    signature = Path(signature) if signature is not None else default_signature(model_path)
    shown = signature.name

    def failed(problem: str) -> list[SignedFile]:
        return [SignedFile(shown, "signature", problem)]

    if not os.path.lexists(signature):
        return failed(f"missing: {model_path} is not signed (ditrt sign ... --private-key KEY.pem)")
    info = os.stat(signature) if signature.exists() else None
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SIGNATURE_BYTES:
        return failed("not a regular file of at most 16 MiB (a link out, a FIFO, a device)")
    hashing, _, _ = _model_signing()
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key)
    except (ValueError, TypeError) as e:
        raise InputError(f"--public-key {key}: not an EC public key in PEM ({e})") from None
    try:
        config.set_hashing_config(_hashing_config(hashing, signature, model_path)).verify(model_path, signature)
    except ValueError as e:
        if not str(e).startswith("Signature mismatch"):  # the envelope itself: another key, a bad bundle
            return failed(f"does not verify with {key}: {e}")
        rows = _file_rows(model_path, signature)  # the envelope verified: its statement is trusted
        if all(r.problem is None for r in rows):
            rows.append(SignedFile(shown, "signature", f"files do not match: {e}"))
        return [SignedFile(shown, "signature", None), *rows]
    except Exception as e:  # cryptography's InvalidSignature, a garbled bundle (JSON, base64, protobuf)
        return failed(f"does not verify with {key}: {type(e).__name__} {e}".rstrip())
    names = sorted(r["name"] for r in _statement(signature)["predicate"]["resources"])
    return [SignedFile(shown, "signature", None),
            *(SignedFile(model_path.name if n == "." else n, "signed file", None) for n in names)]


def require_signature(model_path, public_key, signature=None, what: str = "artifact") -> None:
    """Refuse (SignatureError naming each file) unless the signature verifies and covers every file."""
    problems = [f"{r.name}: {r.problem}" for r in verify_path(model_path, public_key, signature) if r.problem]
    if problems:
        raise SignatureError(f"the {what} {model_path} is refused: its signature does not verify with "
                             f"{public_key}: " + "; ".join(problems))


def public_key_of(private_key) -> bytes:
    """The PEM public key of a private key (a build re-signing checks the old signature with it)."""
    _model_signing()
    from cryptography.hazmat.primitives import serialization
    key = _key_file(private_key, "--private-key")
    try:
        loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise InputError(f"--private-key {key}: not a PEM private key ({e})") from None
    return loaded.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_artifact(artifact, private_key) -> tuple[Path, int]:
    """`ditrt sign`: the artifact must verify first (its manifest digest, every file the manifest
    names), so a changed file is never signed; then model.sig over every file. Returns the
    signature and the number of files it covers."""
    from .manifest import load_manifest
    manifest = load_manifest(artifact)
    failed = [f"{name}: {problem}" for name, _, problem in manifest.verify_all() if problem]
    if failed:
        raise ArtifactError(f"refusing to sign {artifact}: it does not verify (ditrt verify): " + "; ".join(failed))
    signature = sign_path(manifest.directory, private_key)
    return signature, len(_statement(signature)["predicate"]["resources"])


def _derived_public_key(private_key, tmp: str) -> Path:
    path = Path(tmp) / "public.pem"
    path.write_bytes(public_key_of(private_key))
    return path


def check_before_build(artifact, private_key) -> None:
    """A build adds plans and rewrites manifest.json, so a signed artifact (model.sig) would no
    longer verify: without a key it is refused before any work; with one, the old signature must
    verify with the key's public key first (a re-sign never blesses files changed since)."""
    signature = Path(artifact) / SIGNATURE_NAME
    if private_key is None:
        if os.path.lexists(signature):
            raise InputError(f"{artifact} is signed ({SIGNATURE_NAME}): a build adds plans and rewrites manifest.json, "
                             "which the signature would no longer cover; give --private-key KEY.pem to re-sign after "
                             f"the build, or remove {signature} to build unsigned")
        return
    with tempfile.TemporaryDirectory(prefix="ditrt-key-") as tmp:
        public = _derived_public_key(private_key, tmp)
        if os.path.lexists(signature):
            require_signature(artifact, public)


def sign_after_build(artifact, private_key) -> Path:
    """Sign the built artifact again (the manifest now records its plans)."""
    return sign_path(artifact, private_key)
