"""File helpers, one per job: sha256 of a file, bounded reads of regular files (JSON included),
atomic writes, paths confined to an artifact, and outputs that never name an input."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

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
    with open_regular(path, "file to hash") as f:
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


# ---- bounded reads ------------------------------------------------------------------------------
MAX_JSON_BYTES = 16 << 20  # a manifest, a run record or a config is KBs to a few MB
MAX_JSON_DEPTH = 800  # levels of arrays and objects: the C++ reader's kMaxDepth (pyjson.hpp); Python's parser would recurse


def open_regular(path: str | Path, what: str, error=InputError, max_bytes: int | None = None):
    """A binary handle on `path` once it is known to be a regular file (of at most `max_bytes`):
    opened non-blocking and checked with fstat, so a FIFO (whose open would wait for a writer), a
    device (/dev/zero never ends) or a socket is refused before any read, without a race between
    the check and the open."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"unreadable {what} {path}: {e.strerror or e}") from None
    info = os.fstat(fd)
    problem = ("not a regular file (a FIFO, a device, a socket or a directory)" if not stat.S_ISREG(info.st_mode)
               else f"{info.st_size} bytes, above the {max_bytes} a {what} can have"
               if max_bytes is not None and info.st_size > max_bytes else None)
    if problem:
        os.close(fd)
        raise error(f"unreadable {what} {path}: {problem}")
    return os.fdopen(fd, "rb")


def check_regular(path: str | Path, what: str, error=InputError) -> Path:
    """`path`, once it is a regular file (see open_regular): for readers that open it themselves
    (numpy, torch)."""
    open_regular(path, what, error).close()
    return Path(path)


_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings not counted),
    found without recursion."""
    import numpy as np
    codes = np.frombuffer(_JSON_STRINGS.sub(b'""', data), dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max(initial=0))


def loads_json(data: bytes | str, what: str, error=InputError, max_depth: int = MAX_JSON_DEPTH):
    """json.loads with its depth bounded first: deep nesting is a clear error, never a RecursionError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"unreadable {what}: arrays and objects nest {depth} deep, above the {max_depth} allowed")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, UTF-8, or a > 4300-digit integer
        raise error(f"unreadable {what}: not valid JSON ({e})") from None


def read_json(path: str | Path, what: str, error=InputError, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """A JSON file, bounded: a regular file (refused before any read otherwise), at most `max_bytes`,
    nested at most `max_depth` deep, UTF-8, valid JSON; `error` names `what` and the path."""
    with open_regular(path, what, error, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"unreadable {what} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:  # grew since the fstat
        raise error(f"unreadable {what} {path}: above the {max_bytes} bytes a {what} can have")
    return loads_json(data, f"{what} {path}", error, max_depth)


# ---- outputs never name inputs ----------------------------------------------------------------------

@dataclass(frozen=True)
class Input:
    """A file a command reads (or a folder whose every path is one), which none of its outputs
    may replace."""
    what: str  # how the message names it: "the artifact's manifest", "--labels"
    path: Path
    folder: bool = False  # every path inside the folder counts as the input too


def _identity(path: str | Path) -> tuple[str, tuple | None]:
    """(the real path, symbolic links resolved; (device, inode) when it exists): two names of one
    file, hard links included, have one identity."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return real, None
    return real, (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else None


MAX_ARTIFACT_FILES = 10_000  # an artifact folder holds tens of files


def artifact_inputs(directory: str | Path, listed: Iterable[str] = (), every_file: bool = True) -> list[Input]:
    """The files of an artifact no output may replace: the manifest, its digest, every file its
    manifest lists (`listed`, present or not) and, with `every_file`, every file in its folder
    (signatures and timing caches included: a signature covers the whole folder; `ditrt build`,
    the artifact's own writer, updates its timing cache)."""
    directory = Path(directory)
    names = {"manifest.json", "manifest.sha256", *listed}
    inputs = [Input(f"the artifact's {name}", directory / name) for name in sorted(names)]
    for root, _, files in os.walk(directory) if every_file else ():
        for name in files:
            path = Path(root) / name
            if path.relative_to(directory).as_posix() not in names:
                inputs.append(Input(f"the artifact's file {path.relative_to(directory)}", path))
            if len(inputs) > MAX_ARTIFACT_FILES:
                return inputs
    return inputs


def check_output_folder(flag: str, folder: str | Path, inputs: Iterable[Input]) -> None:
    """Refuse an output folder (one a command creates or replaces whole) that is, or holds, one of
    `inputs`: an export to the folder of its own checkpoint or VAE."""
    real = os.path.realpath(folder)
    for item in inputs:
        if item.path is None:
            continue
        item_real = os.path.realpath(item.path)
        if item_real == real or item_real.startswith(real.rstrip(os.sep) + os.sep):
            raise InputError(f"{flag} {folder} {'is' if item_real == real else 'holds'} {item.what} ({item.path}): the "
                             "output folder is replaced whole, and an output never replaces an input; choose another "
                             f"{flag}")


def check_outputs(outputs: Iterable[tuple[str, str | Path | None]], inputs: Iterable[Input]) -> None:
    """Refuse (InputError) an output path that resolves, through symbolic links or as a hard link,
    to one of the command's inputs, or two outputs that name one file: checked before any work, so
    an input is never overwritten and nothing is half-done."""
    known = []
    for item in inputs:
        if item.path is not None:
            known.append((item, *_identity(item.path)))
    seen: dict[tuple, str] = {}
    for flag, path in outputs:
        if path is None:
            continue
        real, inode = _identity(path)
        for item, item_real, item_inode in known:
            inside = item.folder and real.startswith(item_real.rstrip(os.sep) + os.sep)
            if real == item_real or (inode is not None and inode == item_inode) or inside:
                where = f"inside {item.what} ({item.path})" if inside and real != item_real else \
                    f"{item.what} ({item.path})"
                raise InputError(f"{flag} {path} is {where}: an output never replaces an input of the command; "
                                 "choose another path")
        for key in {real, inode} - {None}:
            if key in seen:
                raise InputError(f"{flag} {path} and {seen[key]} name the same file; give each output its own path")
            seen[key] = f"{flag} {path}"


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
    if not 0 < pid < 1 << 22:  # above Linux's pid_max limit (4194304): no process has it (os.kill would overflow)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(path: Path) -> int | None:
    for part in path.name.split("-"):
        if part.isascii() and part.isdigit() and len(part) <= 20:
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
            with open_regular(lock, "lock file", max_bytes=64) as f:
                text = f.read(64).decode("ascii").strip()
            holder = int(text) if text.isdigit() and len(text) <= 20 else 0  # junk or a 40-digit pid: stale
        except (OSError, ValueError, InputError):
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
