"""Reading training data: JSONL records in four formats, each bad line reported by file and line.

Formats, one JSON object per line, detected per file (the first good line decides) or forced:
  prompt_completion  {"prompt": str, "completion": str}
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]},
                     ending with an assistant message (the completion)
  text               {"text": str}                     (continued pretraining: every token labelled)
Extra keys (ids, metadata) are ignored; blank lines are not records.

Bad input (malformed or too deeply nested JSON, a missing or non-string field, an unknown role, a file that mixes
formats, non-UTF-8 bytes) raises DataError with one sentence naming the file and line, or with
skip_bad_lines is skipped and counted in the LoadReport; an empty file always raises.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from minilora.fileio import json_error_text

FORMATS = ("prompt_completion", "alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
_SKIP = " or pass --skip-bad-lines to skip it"
_FIX = "fix the line" + _SKIP


def without_skip_hint(message: str) -> str:
    """A data error message for a program that has no --skip-bad-lines (eval.py)."""
    return message.replace("," + _SKIP, "").replace(_SKIP, "")


class DataError(ValueError):
    """A data file the user supplied cannot be used; the message names the file and line."""


@dataclass
class Example:
    """One normalized record.

    prompt: a string (prompt_completion, text: ""), or a list of {"role", "content"} messages (chat,
    alpaca as one user message) that come before the completion. completion: the target text (the
    last assistant message for chat). fmt: the source format. source: "file:line".
    """

    prompt: str | list[dict]
    completion: str
    fmt: str
    source: str = ""


@dataclass
class LoadReport:
    path: str
    fmt: str
    n_records: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the first 20 messages, for the log
    n_too_long: int = 0  # lines over max_line_bytes, dropped unread
    too_long_lines: list[int] = field(default_factory=list)  # the first 5 of their line numbers


def _line_format(obj: dict) -> str | None:
    """The format a JSON object claims by its keys (the first identifying key wins)."""
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _string(obj: dict, key: str, *, optional: bool = False) -> str:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return ""
        raise BadLine(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise BadLine(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


class BadLine(Exception):
    """One line cannot be used; read_jsonl adds the file and line and raises DataError (or skips it)."""


def _parse(obj: dict, fmt: str, source: str) -> Example:
    if fmt == "prompt_completion":
        return Example(_string(obj, "prompt"), _string(obj, "completion"), fmt, source)
    if fmt == "alpaca":
        instruction, extra = _string(obj, "instruction"), _string(obj, "input", optional=True)
        output = _string(obj, "output")
        user = instruction + ("\n\n" + extra if extra else "")
        return Example([{"role": "user", "content": user}], output, fmt, source)
    if fmt == "text":
        return Example("", _string(obj, "text"), fmt, source)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadLine('field \'messages\' must be a non-empty list of {"role", "content"} objects')
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadLine(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise BadLine(f"message {i} is missing field '{key}'")
            if not isinstance(m[key], str):
                raise BadLine(f"message {i} field '{key}' must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise BadLine(f"message {i} has unknown role '{m['role']}' (expected one of {', '.join(ROLES)})")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise BadLine("the last message must be from the assistant (it is the completion to learn)")
    return Example(clean[:-1], clean[-1]["content"], fmt, source)


def load_records(
    path, fmt: str = "auto", skip_bad_lines: bool = False, max_line_bytes: int | None = None
) -> tuple[list[Example], LoadReport]:
    """Read a JSONL file into Examples. Every bad line raises DataError, or is counted and skipped.
    Lines longer than max_line_bytes are dropped before they are decoded or parsed (counted in the
    report): a line that cannot fit the sequence length costs nothing to tokenize."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"Unknown data format '{fmt}'; use auto or one of {', '.join(FORMATS)}.")
    file_fmt, fmt_line = (fmt, None) if fmt != "auto" else (None, None)

    def parse(obj: dict, lineno: int, source: str) -> Example:
        nonlocal file_fmt, fmt_line
        if "chosen" in obj and not {"completion", "messages", "output", "text"} & set(obj):
            raise DataError(
                f"{source.rpartition(':')[0]}, line {lineno} is a preference pair (prompt/chosen/rejected), which "
                "trains with --objective dpo or --objective orpo; pass one of them, or give prompt/completion data."
            )
        line_fmt = _line_format(obj)
        if line_fmt is None:
            raise BadLine(
                f"none of the known fields (prompt/completion, instruction/output, messages, text) found, "
                f"keys are {sorted(obj)[:6]}; {_FIX}"
            )
        if file_fmt is None:
            file_fmt, fmt_line = line_fmt, lineno
        elif line_fmt != file_fmt and fmt_line is None:  # the format was forced, not read from the file
            raise BadLine(
                f"this line is {line_fmt}, not {file_fmt} as --format {file_fmt} says; pass --format auto "
                f"(or {line_fmt})" + _SKIP
            )
        elif line_fmt != file_fmt:
            raise BadLine(
                f"this line is {line_fmt} but the file is {file_fmt} (detected from line {fmt_line}); a file must "
                "not mix formats, so split it into one file per format" + _SKIP
            )
        try:
            return _parse(obj, file_fmt, source)
        except BadLine as e:
            raise BadLine(f"{e}; {_FIX}") from None

    records, report = read_jsonl(path, parse, skip_bad_lines, max_line_bytes)
    report.fmt = file_fmt
    return records, report


def read_jsonl(path, parse, skip_bad_lines: bool = False, max_line_bytes: int | None = None) -> tuple[list, LoadReport]:
    """The records `parse(obj, lineno, "file:line")` makes of each JSON object line of `path` (pairs.py
    reads preference pairs through it too). A line that is not a JSON object, or that `parse` refuses
    with BadLine, raises DataError naming file and line, or with skip_bad_lines is counted and skipped;
    lines over max_line_bytes are dropped unread (counted); an empty file always raises."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"Data file {path} is a folder; pass the path of a JSONL file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path} does not exist; check the path.")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors write one)
        raw = raw[3:]
    report = LoadReport(path, "")
    records: list = []
    n_lines = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        n_lines += 1
        if max_line_bytes is not None and len(line) > max_line_bytes:
            report.n_too_long += 1
            if len(report.too_long_lines) < 5:
                report.too_long_lines.append(lineno)
            continue
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadLine(
                    f"bytes are not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "re-save the file as UTF-8" + _SKIP
                ) from None
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: '[' * 20000
                raise BadLine(f"malformed JSON ({json_error_text(e, line=False)}); {_FIX}") from None
            if not isinstance(obj, dict):
                raise BadLine(f"expected a JSON object, got {type(obj).__name__}; {_FIX}")
            records.append(parse(obj, lineno, f"{path}:{lineno}"))
        except BadLine as e:
            msg = f"{path}, line {lineno}: {e}."
            if not skip_bad_lines:
                raise DataError(msg) from None
            report.n_skipped += 1
            if len(report.skipped) < 20:
                report.skipped.append(msg)
    if n_lines == 0:
        raise DataError(f"{path} is empty (no JSON lines); point at a JSONL file with one example per line.")
    if not records:
        long = f", {report.n_too_long} longer than {max_line_bytes} bytes dropped" if report.n_too_long else ""
        raise DataError(f"{path} has no usable lines ({report.n_skipped} bad lines skipped{long}); fix the file.")
    report.n_records = len(records)
    return records, report
