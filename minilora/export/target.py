"""Where an export may be written, and how it gets there whole or not at all.

Refused before any work, each in one sentence (check_target):
  - an empty --out;
  - an --out that is, holds or lies inside the --adapter run (or its adapter folder), or that is the
    current folder or one above it (resolved real paths: a link or `..` is no way round);
  - a GGUF (--format gguf / gguf-lora: one file) at a path not ending in .gguf, such as `ggdir/`, and a
    checkpoint folder (--format hf) at a path ending in .gguf;
  - an --out that exists, unless --overwrite, and then only an earlier export: a folder holding MARKER
    and nothing but the files MARKER lists (written last by every checkpoint folder an export writes),
    or a file that is a GGUF. Anything else there is the user's, and is never replaced.

The export is written into a new temporary folder beside --out (the same filesystem), read back and
checked there, and only then renamed to --out (`staged`). A failed check, an error or Ctrl-C removes
the temporary folder (and any parent folders made for it), which are ours, and leaves --out as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from minilora.export.errors import ExportError
from minilora.export.readback import ValidationError
from minilora.fileio import (
    file_above,
    holds_the_current_folder,
    swap_into_place,
    temp_dir_for,
    usual_permissions,
    within,
    write_json,
)

MARKER = ".minilora-export.json"  # {"written_by": ..., "files": [names]} in every checkpoint folder we write
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


# ------------------------------------------------------------------------------- the marker
def write_marker(folder: str) -> None:
    """Record the files of a finished checkpoint folder as this program's (call it last)."""
    files = sorted(n for n in os.listdir(folder) if n != MARKER)
    write_json(os.path.join(folder, MARKER), {"written_by": "minilora eval.py export", "files": files})


def foreign_files(folder: str) -> list[str]:
    """The names in `folder` an export did not write: all of them without a readable MARKER, else
    those MARKER does not list (an earlier export's folder gives [])."""
    names = sorted(set(os.listdir(folder)) - {MARKER})
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not ours in form
        return names
    if not isinstance(listed, list):
        return names
    return [n for n in names if n not in listed or not os.path.isfile(os.path.join(folder, n))]


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ------------------------------------------------------------------------------- checks
def check_export_folder(out: str, overwrite: bool) -> None:
    """Refuse a checkpoint folder `out` that may not be written: a file, a non-empty folder without
    overwrite, or (even with it) a folder holding anything an export did not write."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file; pass a folder path for the checkpoint.")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    foreign = foreign_files(out)
    if foreign and not os.path.isfile(os.path.join(out, MARKER)):  # a user's folder, or an unmarked export
        raise ExportError(
            f"--out {out} is not empty and has no {MARKER}, so it is not an export's folder (it holds "
            f"{_few(foreign)}); choose another folder, or delete it yourself if you mean to replace it."
        )
    if foreign:
        raise ExportError(
            f"--out {out} is not empty and holds {_few(foreign)}, which eval.py export did not write; choose "
            "another folder (--overwrite replaces only an earlier export's folder)."
        )
    if not overwrite:
        raise ExportError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it.")


def check_export_file(out: str, overwrite: bool) -> None:
    """Refuse a GGUF file `out` that may not be written: a folder, an existing file without overwrite,
    or (even with it) an existing file that is not a GGUF."""
    if os.path.isdir(out):
        raise ExportError(f"--out {out} is a folder; pass a file path such as model.gguf.")
    if not os.path.lexists(out):
        return
    if not _is_gguf(out):
        raise ExportError(
            f"--out {out} exists and is not a GGUF file, so it is never replaced (--overwrite replaces only "
            "an earlier export); choose another path."
        )
    if not overwrite:
        raise ExportError(f"--out {out} already exists; choose another path or pass --overwrite to replace it.")


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _check_place(out: str, run_dirs: tuple[str, ...], example: str) -> None:
    """Refuse an --out that would replace the --adapter run, the current folder, or sit inside a file."""
    for folder in run_dirs:
        inside, holds = within(out, folder), within(folder, out)
        if inside or holds:
            how = "is" if inside and holds else "lies inside" if inside else "holds"
            raise ExportError(
                f"--out {out} {how} the --adapter run folder {folder}, which an export never writes; "
                f"pass a path outside it, such as {example}."
            )
    if holds_the_current_folder(out):
        raise ExportError(f"--out {out} is the current folder or one above it; pass a new path, such as {example}.")
    blocker = file_above(os.path.realpath(out))
    if blocker is not None:
        raise ExportError(f"--out {out} lies inside the file {blocker}; pass a path in a folder.")


def check_target(out: str, fmt: str, overwrite: bool, run_dirs: tuple[str, ...]) -> str:
    """The absolute --out for an export in `fmt` (hf: a folder; gguf, gguf-lora: a file), or
    ExportError (one sentence) when it may not be written there (the module docstring). `run_dirs`:
    the --adapter run folder and adapter folder."""
    if not out.strip():
        raise ExportError("--out is empty; pass the folder (or, for a GGUF, the .gguf file) to write the export to.")
    _check_place(out, run_dirs, "merged" if fmt == "hf" else "model.gguf")
    gguf_name = out.lower().endswith(".gguf")
    if fmt == "hf" and gguf_name:
        raise ExportError(
            f"--out {out} names a .gguf file, but --format hf writes a checkpoint folder; pass --format gguf, "
            "or a folder path."
        )
    if fmt != "hf" and not gguf_name:
        folder = out.endswith(("/", os.sep)) or os.path.isdir(out)
        example = os.path.join(out, "model.gguf") if folder else out + ".gguf"
        raise ExportError(
            f"--out {out} does not end in .gguf, but --format {fmt} writes one file; pass its path, such as {example}."
        )
    out = os.path.abspath(out)
    (check_export_folder if fmt == "hf" else check_export_file)(out, overwrite)
    return out


# ------------------------------------------------------------------------------- staging
def _first_missing(path: str) -> str | None:
    """The topmost missing folder among path's parents (None when its parent exists)."""
    top, parent = None, os.path.dirname(path)
    while parent and not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    return top


def _remove_made(top: str | None, out: str) -> None:
    """Remove the empty parent folders of `out` up to `top`, which staging made."""
    folder = os.path.dirname(out)
    while top is not None and within(folder, top):
        try:
            os.rmdir(folder)
        except OSError:  # not empty any more: someone else wrote there
            return
        folder = os.path.dirname(folder)


@contextlib.contextmanager
def staged(out: str, folder: bool, overwrite: bool):
    """Yield where to write the export for the absolute path `out`: a new temporary folder beside it
    (folder=True: the checkpoint folder itself; else the file's path inside it, under out's name, so
    readers see that name). When the block ends, `out` is checked again (something may have appeared
    there meanwhile) and the export renamed to it; when the block raises, nothing reaches `out`, and a
    ValidationError is restated as an export that was not written."""
    made = _first_missing(out)
    tmp = temp_dir_for(out)
    path = tmp if folder else os.path.join(tmp, os.path.basename(out))
    done = False
    try:
        try:
            yield path
        except ValidationError as e:
            raise e.not_written(out) from None
        (check_export_folder if folder else check_export_file)(out, overwrite)
        if folder:
            usual_permissions(tmp)
            swap_into_place(tmp, out)
        else:
            os.replace(path, out)  # atomic; an earlier export at `out` (checked above) is replaced
        done = True
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        if not done:
            _remove_made(made, out)
