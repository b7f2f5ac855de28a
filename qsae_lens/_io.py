"""The one definition of writing files safely, locking an output folder and hashing inputs.

Every module that writes results goes through here, so there is one behaviour to trust:

- **atomic writes**: the bytes go to a temporary file in the same folder, are flushed and fsynced,
  then renamed over the target (``os.replace`` is atomic on POSIX within one filesystem). A reader,
  or a run resumed after ``kill -9`` or a full disk, sees the old file or the new one, never half.
- **atomic folders**: :func:`atomic_dir` builds a folder under a temporary sibling name and renames
  it into place whole, so a folder that exists is a finished folder.
- **a lock** on an output folder (:class:`FolderLock`): a lock file holding pid and host; a second
  run refuses with a clear message; a lock left by a dead process on this host is taken over.
- **content hashes** (:func:`file_sha256`, :func:`folder_sha256`, :func:`json_sha256`): the
  identities that reuse decisions are keyed by.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
"""Every temporary name made here ends with this (and starts with a dot): easy to find and remove."""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_plain_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` (strict JSON) and tuples as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): to_plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as strict JSON (NaN/inf become null) to ``path`` atomically."""
    text = json.dumps(to_plain_json(data), indent=indent, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; on success rename it to ``target`` whole.

    ``with atomic_dir(out / "cell") as tmp: save_into(tmp)``. On an exception the temporary folder
    is removed and ``target`` is untouched. With ``replace=True`` an existing ``target`` is
    replaced (moved aside, then deleted after the rename), else an existing one is an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists; pass replace=True to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old{TMP_SUFFIX}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files/folders left in ``folder`` (not recursive) by an interrupted write.

    Call it only while holding the folder's :class:`FolderLock`: another live writer's temp files
    would otherwise be removed from under it.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------
# hashes


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of one file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: str | os.PathLike[str], names: list[str] | None = None) -> str:
    """SHA-256 over the (relative name, content hash) of the files in ``folder`` (or just ``names``)."""
    folder = Path(folder)
    files = sorted(folder.rglob("*")) if names is None else [folder / n for n in sorted(names)]
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and not f.name.endswith(TMP_SUFFIX):
            h.update(str(f.relative_to(folder)).encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def json_sha256(data: Any) -> str:
    """SHA-256 of the canonical JSON of ``data`` (sorted keys): the identity of a settings dict."""
    text = json.dumps(to_plain_json(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# lock


class FolderLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on an output folder: ``<folder>/.qsae.lock`` holding pid and host.

    ``with FolderLock(out): ...``. Created with ``O_CREAT | O_EXCL`` (atomic); a second process
    gets :class:`FolderLockedError` naming the holder. A lock whose pid no longer runs on this
    host is stale and taken over; a lock from another host is never taken over (its pid means
    nothing here): the message says to delete it once that run is known to be dead.
    """

    NAME = ".qsae.lock"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant by its creator, or garbage: look again
                    time.sleep(0.2)
                    holder = self._holder() or {}
                dead = (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                        and not _pid_alive(holder["pid"]))
                if dead or not holder:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                raise FolderLockedError(
                    f"{self.folder} is in use by another qsae run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}). Wait for it to finish, or use another output folder; if "
                    f"that run is dead, delete {self.path}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise FolderLockedError(f"Could not take the lock {self.path}: it keeps changing hands.")

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
