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
    key = file_key(path)
    if key not in _HASHES:
        _HASHES[key] = hash_file(key[0], chunk)
    return _HASHES[key]


def hash_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """The sha256 of the file's bytes, read now (sha256_file is the cached one to call)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def machine_id() -> str:
    """This machine, as far as file identities go: the kernel's boot id (Linux), else the host name.
    File keys (inode, times) mean something only on the machine that took them."""
    try:
        return "boot:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import socket
        return "host:" + socket.gethostname()


def verified_hashes(paths) -> dict:
    """The sha256 of each file (sha256_file: hashed now or remembered), with its identity and this
    machine's: what a process hands to its workers so that they need not hash the files again
    (trust_verified_hashes)."""
    return {"machine": machine_id(), "files": [[*file_key(p), sha256_file(p)] for p in paths]}


def trust_verified_hashes(verified: dict | None) -> int:
    """Remember the digests another process of this machine verified (verified_hashes), keyed by
    their files' identities: a file changed since then has another key and is hashed again; on
    another machine (a Ray worker on another node reads its own copy) nothing is trusted. Returns
    how many were taken."""
    if not verified or verified.get("machine") != machine_id():
        return 0
    for *key, digest in verified["files"]:
        _HASHES[tuple(key)] = digest
    return len(verified["files"])


def file_key(path: str | Path) -> tuple:
    """(real path, inode, size, mtime, ctime): what caches of a file's contents are keyed by."""
    real = os.path.realpath(path)
    info = os.stat(real)
    return real, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a quota, an I/O error: nothing was written
            reason = e.strerror or f"{e} (a short write: a full disk or a file size limit)"
            raise InputError(f"cannot write {path}: {reason}; no partial file was left") from None
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
    try:
        root, real = directory.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise ArtifactError(f"manifest field {field} ({name!r}) cannot be resolved: {e}") from None
    if not real.is_relative_to(root):  # a symbolic link leading out
        raise ArtifactError(f"manifest field {field} ({name!r}) resolves outside the artifact "
                            f"({real}): files must live inside it")
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


def resolve_out_dir(out_dir, what: str = "--out") -> Path:
    """The directory an export may create or replace for `out_dir`, checked before any work: not the
    root, the current directory or one that holds it ('', '.', '..', '/': an export renames its
    directory into place), and a symbolic link resolved to the directory it names (the link itself
    is never rewritten); a dangling link, a link loop or a link to a non-directory is refused."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InputError(f"{what} must name the artifact directory to write, got {out_dir!r}")
    path = Path(out_dir)  # '' is '.'
    if path.is_symlink():
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # dangling, or a loop (RuntimeError before Python 3.13)
            raise InputError(f"{what} {path} is a symbolic link that leads nowhere ({e}); give the real directory") \
                from None
        if not real.is_dir():
            raise InputError(f"{what} {path} is a symbolic link to {real}, which is not a directory")
        path = real
    try:
        absolute = path.resolve()
    except (OSError, RuntimeError) as e:
        raise InputError(f"{what} {path} cannot be resolved: {e}") from None
    if Path.cwd().resolve().is_relative_to(absolute):  # '/' holds every directory
        raise InputError(f"{what} {str(out_dir)!r} is {absolute}, the root, the current directory or one above it: an "
                         f"export renames its directory into place, so give the artifact's own folder (e.g. {what} "
                         "engines/NAME)")
    return path


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived inside `signals_raise()`. A BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way (torch's, ONNX Runtime's) swallows it: the cleanup
    paths (`finally`, `except BaseException`) run and the caller reports it."""

    def __init__(self, signum: int):
        import signal
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _Signals:
    """What `signals_raise` yields: `held()` defers the signals over a step that must not stop
    halfway (the two renames of a swap)."""

    def __init__(self):
        self.raised, self.holding, self.pending = False, False, None

    def handler(self, signum, frame):
        if self.raised:  # the cleanup of the first signal is running: let it finish
            return
        if self.holding:
            self.pending = signum
            return
        self.raised = True
        raise Terminated(signum)

    @contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None and not self.raised:
            self.raised = True
            raise Terminated(self.pending)


@contextmanager
def signals_raise():
    """SIGTERM and SIGINT raise `Terminated` for the duration of the block (what systemd, Kubernetes
    and Ctrl-C send), so an interrupted export runs the same cleanup as a failed one. The first
    signal raises; later ones are ignored while that cleanup runs. Outside the main thread (where
    Python cannot install handlers) the block runs unchanged."""
    import signal
    import threading
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {s: signal.signal(s, signals.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield signals
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def claimed_output(target: Path, log=lambda m: None):
    """Exclusive right to write `target` for the duration of the block: a lock file beside it.
    Also recovers a previous artifact left by a killed --force swap and removes temporary folders
    of killed exports (reporting both)."""
    lock = target.with_name(f".{target.name}.lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {target}: {e.strerror or e}") from None
    for _ in range(2):  # a stale lock removed, then one more try
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pass
        except OSError as e:  # a read-only filesystem, no permission
            raise InputError(f"cannot write {target}: {e.strerror or e} (creating its lock file {lock})") from None
        try:
            regular = stat.S_ISREG(os.lstat(lock).st_mode)
        except FileNotFoundError:  # released meanwhile: claim it again
            continue
        if not regular:  # a folder or link of someone's: never removed
            raise InputError(f"cannot claim {target}: {lock} is in the way and is not ditrt's lock file (a "
                             "directory, a link or a device); move it away")
        try:
            holder = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            holder = 0
        if holder and _pid_alive(holder):
            raise InputError(f"another ditrt process (pid {holder}) is writing {target} right now "
                             f"({lock} holds its pid); wait for it or choose another --out")
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


def _is_real_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _recover(target: Path, log) -> None:
    """Leftovers of killed runs for `target`: put a swapped-out artifact back, remove temp folders.
    Only real directories are touched (ditrt makes no links): a link of these names is left alone."""
    import shutil
    leftovers = sorted(target.parent.glob(f".{target.name}.old-*")) + sorted(target.parent.glob(f".{target.name}.tmp-*"))
    for path in leftovers:
        if not _is_real_dir(path):
            log(f"note: left {path.name} alone: not a folder of a killed export (a link or a file)")
            continue
        if ".old-" in path.name:
            if not os.path.lexists(target):
                os.replace(path, target)
                log(f"note: recovered the previous artifact {target} from {path.name} (a --force export was killed "
                    "mid-swap)")
                continue
            why = "left by a killed --force export"
        else:
            pid = _pid_of(path)
            if pid == os.getpid() or (pid and _pid_alive(pid)):
                continue
            why = "left by a killed export"
        size = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            log(f"note: could not remove {path.name} ({why}); remove it by hand")
        else:
            log(f"note: removed {path.name} ({size / 2**20:.1f} MiB), {why}")


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
    names = {"manifest.json", "manifest.sha256"}
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
