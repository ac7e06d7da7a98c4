"""File helpers, one per job: sha256 of a file, atomic writes, paths confined to an artifact."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import ArtifactError, InputError


_HASHES: dict[tuple, str] = {}  # (real path, inode, size, mtime, ctime) -> sha256


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """The file's sha256, remembered per (path, size, mtime) so that a service loading the same
    artifact again does not rehash gigabytes; a rewritten file gets a new size or mtime."""
    real = os.path.realpath(path)
    info = os.stat(real)
    key = (real, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@contextmanager
def atomic_output(path: str | Path, suffix: str = "", durable: bool = False):
    """A binary file handle on a temporary name beside `path`, renamed onto it when the block ends
    without error (removed otherwise): readers never see a half-written file. `durable` fsyncs
    before the rename (large artifacts such as TensorRT plans). An existing `path` that is not a
    regular file (a directory, a device, a FIFO, a symbolic link) is refused, never replaced."""
    path = Path(path)
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise InputError(f"{path} exists and is not a regular file; refusing to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # f.name is the temporary path (checks can read it before the rename)
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_output(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())


def artifact_path(directory: Path, name, field: str) -> Path:
    """`directory / name` for a file named by the manifest: relative, inside the artifact, and not
    a symbolic link that leads out of it (ArtifactError naming the field otherwise)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ArtifactError(f"manifest field {field} must be a file name inside the artifact, got {name!r}")
    parts = PurePosixPath(name)
    if parts.is_absolute() or ".." in parts.parts:
        raise ArtifactError(f"manifest field {field} ({name!r}) points outside the artifact: files must be "
                            "relative paths inside it")
    path = directory / name
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):  # a symbolic link leading out
        raise ArtifactError(f"manifest field {field} ({name!r}) resolves outside the artifact "
                            f"({path.resolve()}): files must live inside it")
    return path
