"""Writes that are never seen half-done: temp file or folder beside the target, then a rename;
the lock that gives a folder to one process at a time; and the check that a safetensors file is whole.

Adapters, checkpoints, exports, reports and run configs go through these helpers, so a crash or
kill -9 at any moment leaves either the old version or the new one.

A run folder belongs to one process at a time: FOLDER/.lock, held with flock(LOCK_EX) by the process
writing the folder (train.py; eval.py while it writes report.md there), holds that process's pid. The
OS drops the lock when the process ends, however it ends, so a kill -9 never leaves a stale lock;
the file itself stays (deleting it would let two processes lock two different files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

LOCK_NAME = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(folder: str) -> None:
    """mkdtemp makes a 0700 folder (and mkstemp-based writers 0600 files); give the folder and the
    files directly in it the modes a plain mkdir and open would (umask applied), so that another
    user (a serving process) can read what was written."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)


def temp_dir_for(target: str) -> str:
    """A new empty folder beside `target` (same filesystem, so the final rename is atomic)."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")


def swap_into_place(tmp: str, out: str) -> None:
    """Rename the finished temp folder to `out`; an existing `out` is moved aside first, deleted last."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.old-")
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the previous version back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_error_text(e: Exception, line: bool = True) -> str:
    """Why a JSON text did not parse, in words: "Unterminated string starting at line 1 column 12".
    Some of json's messages end in "at" themselves ("Unterminated string starting at", "Invalid control
    character at"): the position follows them without a second "at". A RecursionError is nesting
    deeper than Python's parser goes ('[' * 20000)."""
    if isinstance(e, RecursionError):
        return "arrays or objects nested too deeply to parse"
    if not isinstance(e, json.JSONDecodeError):
        return str(e)
    where = f"line {e.lineno} column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"


def write_json(path: str, obj, fsync: bool = False) -> None:
    """Write `obj` as indented JSON plus a newline, in place (for files inside a temp folder that is
    renamed into place as a whole); fsync=True puts it on disk before that rename."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_file_atomic(path: str, write: Callable[[str], None], fsync: bool = False) -> None:
    """Call write(tmp) with a temp path in the same folder as `path`, then os.replace(tmp, path):
    readers see the old file or the whole new one, never half of it. With fsync=True the data is on
    disk before the rename (for pointers a crash must not leave empty)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the file is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str, fsync: bool = False) -> None:
    """Write `text` to `path` through write_file_atomic: never half-written."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_file_atomic(path, write, fsync)


# ------------------------------------------------------------------------------- where a write may go
def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, both as real paths (a link or `..` is no way round)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def holds_the_current_folder(path: str) -> bool:
    """Whether replacing `path` would replace the current folder: it is the current folder or one above it."""
    return within(os.getcwd(), path)


def file_above(path: str) -> str | None:
    """The file among `path`'s parents, if one is (notes.txt/run can never be created), else None."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if parent and not os.path.isdir(parent) else None


# ------------------------------------------------------------------------------- folder lock
class FolderBusy(ValueError):
    """Another process holds the folder's lock; `pid` is the one it wrote there (None if unreadable)."""

    def __init__(self, folder: str, pid: int | None):
        self.folder, self.pid = folder, pid
        who = f"pid {pid}" if pid is not None else "a process whose pid could not be read"
        super().__init__(f"{folder} is in use by another process ({who}); wait for it to end or choose another folder.")


class FolderLock:
    """The exclusive lock on a folder, held until release() (or until this object or the process dies)."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


def _holder(fd: int) -> int | None:
    """The pid written in a lock file (the holder writes it right after locking: wait briefly for it)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def lock_folder(folder: str, create: bool) -> FolderLock | None:
    """Take `folder`'s lock for this process and write its pid there, or raise FolderBusy naming the
    holder's pid. create=True makes the folder and its lock file when missing (the caller is about to
    write there); create=False takes the lock only where a lock file exists (a folder train.py ran in)
    and returns None elsewhere, creating nothing."""
    import fcntl

    path = os.path.join(folder, LOCK_NAME)
    if create:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    else:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise FolderBusy(folder, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return FolderLock(fd, path)


def check_unlocked(folder: str) -> None:
    """Raise FolderBusy when another process holds `folder`'s lock; writes nothing."""
    import fcntl

    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except OSError:  # no lock file (or an unreadable one, which whoever writes there finds out)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts only with a writer's
    except BlockingIOError:
        raise FolderBusy(folder, _holder(fd)) from None
    finally:
        os.close(fd)  # also drops the shared lock


# ------------------------------------------------------------------------------- safetensors
def safetensors_problem(path: str) -> str | None:
    """Why the safetensors file at `path` cannot be read (empty, a garbled header, fewer bytes than
    its header describes), or None when it is whole. Reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError or ValueError)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return text.removeprefix("Error while deserializing header: ")
    return None
