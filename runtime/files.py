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
    """The file's sha256, remembered per (real path, inode, size, mtime, ctime) so that a service
    loading the same artifact again does not rehash gigabytes; a file rewritten in place changes its
    ctime (and usually its mtime), a replaced one its inode. (A same-size rewrite within one
    timestamp tick of the filesystem would go unnoticed: the trade-off of caching.)"""
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


# ---- artifact directories -------------------------------------------------------------------------
# An export writes `.NAME.tmp-PID-*` beside NAME and renames it into place. `.NAME.lock` (created
# exclusively, holding the writer's pid) makes a second export to the same NAME fail at once
# instead of silently overwriting the first; `.NAME.old-PID` holds the previous artifact during a
# --force swap, so a kill between the two renames leaves it recoverable.

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(path: Path) -> int | None:
    for part in path.name.split("-"):
        if part.isdigit():
            return int(part)
    return None


@contextmanager
def claimed_output(target: Path, log=lambda m: None):
    """Exclusive right to write `target` for the duration of the block: a lock file beside it.
    Also recovers a previous artifact left by a killed --force swap and removes temporary folders
    of killed exports (reporting both)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and _pid_alive(holder) and attempt == 0:
                raise InputError(f"another ditrt process (pid {holder}) is writing {target} right now "
                                 f"({lock} holds its pid); wait for it or choose another --out") from None
            log(f"note: removing the stale lock {lock} of a process that is gone")
            lock.unlink(missing_ok=True)
    else:
        raise InputError(f"cannot claim {target}: {lock} keeps reappearing")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _recover(target, log)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _recover(target: Path, log) -> None:
    """Leftovers of killed runs for `target`: put a swapped-out artifact back, remove temp folders."""
    import shutil
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not os.path.lexists(target):
            os.replace(old, target)
            log(f"note: recovered the previous artifact {target} from {old.name} (a --force export was killed "
                "mid-swap)")
        else:
            shutil.rmtree(old, ignore_errors=True)
            log(f"note: removed {old.name}, left by a killed --force export")
    for tmp in sorted(target.parent.glob(f".{target.name}.tmp-*")):
        pid = _pid_of(tmp)
        if pid != os.getpid() and not (pid and _pid_alive(pid)):
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"note: removed {tmp.name} ({size / 2**20:.1f} MiB), left by a killed export")


def swap_into_place(new: Path, target: Path, listed: set[str], log=lambda m: None) -> None:
    """Rename the finished directory `new` onto `target`. An existing artifact is moved aside first
    and removed only after the new one is in place; files in it that its manifest did not list
    (timing caches, the user's own files) move into the new artifact, and the log says so."""
    import shutil
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    for item in sorted(target.iterdir()):
        if item.name not in listed and not (new / item.name).exists():
            os.replace(item, new / item.name)
            log(f"kept {item.name} (not part of the old artifact's manifest)")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def listed_files(manifest_data: dict) -> set[str]:
    """Every file a manifest names (graphs, external data, plans) and the manifest itself."""
    names = {"manifest.json"}
    for network in (manifest_data.get("networks") or {}).values():
        for graph in (network.get("graphs") or {}).values() if isinstance(network, dict) else ():
            if isinstance(graph, dict):
                names.update(map(str, graph.get("files", [])), map(str, graph.get("sha256", {})))
    for graph in (manifest_data.get("graphs") or {}).values():  # schema 1
        if isinstance(graph, dict):
            names.update(map(str, graph.get("files", [])), map(str, graph.get("sha256", {})))
    for entry in manifest_data.get("engines") or []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            names.add(entry["file"])
    return names
