"""Writes that are never seen half-done: temp file or folder beside the target, then a rename.

Adapters, checkpoints, exports, reports and run configs go through these helpers, so a crash or
kill -9 at any moment leaves either the old version or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable


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
