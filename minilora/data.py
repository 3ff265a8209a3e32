"""Training data: JSONL formats, prompt rendering, loss masking, truncation, and `prepare_data`.

Pipeline (each step is a function here or in dedup.py / packing.py, re-exported from this module):

  load_records(path)        JSONL -> [Example]   (format detected per file; every bad line raises
                                                  DataError naming file and line, or is counted)
  dedup(examples)           exact + MinHash near-duplicates removed, before splitting
  split(examples)           seeded train/val split, stratified when completions are short labels
  assert_no_contamination   eval prompts must not appear in the training set
  encode_example(ex, tok)   -> EncodedExample(input_ids, labels): labels = -100 on prompt tokens
  batches(encoded, ...)     length-grouped padded or packed Batch tensors, resumable

Formats, one JSON object per line:
  prompt_completion  {"prompt": str, "completion": str}
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]},
                     ending with an assistant message (the completion)
  text               {"text": str}                     (continued pretraining: every token labelled)

Shape letters: T sequence length (tokens of one example).

Labels are aligned with input_ids (labels[t] is input_ids[t] or -100), not shifted; the loss is
CE(logits[:, :-1], labels[:, 1:]) (see packing.token_loss_sum).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from minilora.dedup import (  # noqa: F401  (re-exported: train.py / eval.py import from here)
    ContaminationError,
    assert_no_contamination,
    contamination_check,
    dedup,
    normalize_text,
    prompt_text,
    split,
)
from minilora.packing import Batch, batches, num_batches, plan_batches, token_loss_sum  # noqa: F401

FORMATS = ("prompt_completion", "alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
IGNORE = -100
_FIX = "fix the line or pass --skip-bad-lines to skip it"


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
class EncodedExample:
    """input_ids (T,) and labels (T,) with -100 on tokens that carry no loss; EOS is the last token."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LoadReport:
    path: str
    fmt: str
    n_records: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the first 20 messages, for the log


# ---------------------------------------------------------------------------------------- loading
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
        raise _BadLine(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadLine(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


class _BadLine(Exception):
    pass


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
        raise _BadLine("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _BadLine(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise _BadLine(f"message {i} is missing field '{key}'")
            if not isinstance(m[key], str):
                raise _BadLine(f"message {i} field '{key}' must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise _BadLine(f"message {i} has unknown role '{m['role']}' (expected one of {', '.join(ROLES)})")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant":
        raise _BadLine("the last message must be from the assistant (it is the completion to learn)")
    return Example(clean[:-1], clean[-1]["content"], fmt, source)


def load_records(path, fmt: str = "auto", skip_bad_lines: bool = False) -> tuple[list[Example], LoadReport]:
    """Read a JSONL file into Examples. Every bad line raises DataError, or is counted and skipped."""
    path = os.fspath(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"Unknown data format '{fmt}'; use auto or one of {', '.join(FORMATS)}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path} does not exist; check the path.")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors write one)
        raw = raw[3:]
    report = LoadReport(path, fmt)
    records: list[Example] = []
    file_fmt, fmt_line = (fmt, None) if fmt != "auto" else (None, None)
    n_lines = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        n_lines += 1
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _BadLine(f"bytes are not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                               "re-save the file as UTF-8 or pass --skip-bad-lines to skip it") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _BadLine(f"malformed JSON ({e.msg} at column {e.colno}); {_FIX}") from None
            if not isinstance(obj, dict):
                raise _BadLine(f"expected a JSON object, got {type(obj).__name__}; {_FIX}")
            line_fmt = _line_format(obj)
            if line_fmt is None:
                raise _BadLine(
                    f"none of the known fields (prompt/completion, instruction/output, messages, text) found, "
                    f"keys are {sorted(obj)[:6]}; {_FIX}"
                )
            if file_fmt is None:
                file_fmt, fmt_line = line_fmt, lineno
            elif line_fmt != file_fmt:
                origin = f"detected from line {fmt_line}" if fmt_line else "forced with --format"
                raise _BadLine(
                    f"this line is {line_fmt} but the file is {file_fmt} ({origin}); a file must not mix "
                    "formats, so split it into one file per format or pass --skip-bad-lines to skip it"
                )
            try:
                records.append(_parse(obj, file_fmt, f"{path}:{lineno}"))
            except _BadLine as e:
                raise _BadLine(f"{e}; {_FIX}") from None
        except _BadLine as e:
            msg = f"{path}, line {lineno}: {e}."
            if not skip_bad_lines:
                raise DataError(msg) from None
            report.n_skipped += 1
            if len(report.skipped) < 20:
                report.skipped.append(msg)
    if n_lines == 0:
        raise DataError(f"{path} is empty (no JSON lines); point at a JSONL file with one example per line.")
    if not records:
        raise DataError(f"{path} has no usable lines ({report.n_skipped} bad lines skipped); fix the file.")
    report.fmt = file_fmt
    report.n_records = len(records)
    return records, report


# ---------------------------------------------------------------------------------------- encoding
def prompt_messages(ex: Example) -> list[dict]:
    """The messages before the completion (a string prompt becomes one user message)."""
    if isinstance(ex.prompt, str):
        return [{"role": "user", "content": ex.prompt}]
    return [dict(m) for m in ex.prompt]


def render_raw(prompt: str | list[dict]) -> str:
    """Raw concatenation: a string prompt as is; messages as "role: content" lines + "assistant: "."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def _renderer(tokenizer, source: str):
    """apply_chat_template whose template errors (e.g. roles that do not alternate) name the example."""
    import jinja2

    def render(messages, add_generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(
                f"{source}: the chat template rejected this conversation ({e}); fix the messages, "
                "use --template raw, or pass --skip-bad-lines to skip it."
            ) from None

    return render


def _chat_pieces(messages: list[dict], tokenizer, source: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) pieces.

    For each assistant turn k: the context piece ends where render(messages[:k],
    add_generation_prompt=True) ends, and the assistant piece is what render(messages[:k+1]) adds
    after that. This needs every render to be a prefix of the next (true for Gemma, Llama, ChatML
    templates); when it is not, only the last assistant turn is labelled, and when even that fails
    the example is rejected.
    """
    render = _renderer(tokenizer, source)
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        gen = render(messages[:k], True) if k else None
        full = render(messages[: k + 1], False)
        if gen is None:  # a conversation starting with the assistant: no context before it
            gen = ""
        if not (gen.startswith(done) and full.startswith(gen)):
            pieces = None
            break
        pieces.append((gen[len(done):], False))
        pieces.append((full[len(gen):], True))
        done = full
    if pieces is not None:  # messages end with the assistant, so `done` is the whole conversation
        return pieces
    # Fallback: the template rewrites earlier turns; label the final turn only.
    gen = render(messages[:-1], True) if len(messages) > 1 else ""
    full = render(messages, False)
    if not full.startswith(gen):
        raise DataError(
            f"{source}: the chat template's prompt (add_generation_prompt=True) is not a prefix of the full "
            "conversation, so the completion cannot be located; use --template raw for this tokenizer."
        )
    return [(gen, False), (full[len(gen):], True)]


def encode_example(
    ex: Example,
    tokenizer,
    template: str = "chat",
    train_on_all: bool = False,
    max_seq_len: int = 2048,
    truncation: str = "drop",
) -> EncodedExample | None:
    """Tokenize one example; labels are -100 except on completion tokens (or everywhere with train_on_all).

    template "chat": the tokenizer's chat template (the labelled span is each assistant turn as the
    template writes it, e.g. "answer<end_of_turn>\\n"); "raw": render_raw(prompt) + completion.
    Text records are always raw and fully labelled. EOS is appended and labelled, unless the
    template already ended the completion with EOS.

    Longer than max_seq_len: truncation "drop" returns None; "left" cuts prompt tokens from the
    left (keeping BOS), and returns None when the final completion + EOS alone does not fit.
    """
    if template not in ("chat", "raw"):
        raise ValueError(f"Unknown template '{template}'; use chat or raw.")
    if truncation not in ("drop", "left"):
        raise ValueError(f"Unknown truncation policy '{truncation}'; use drop or left.")
    if tokenizer.eos_id is None:
        raise ValueError("The tokenizer has no EOS token; set eos_token in tokenizer_config.json.")
    if ex.fmt == "text":
        pieces, first_special = [(ex.completion, True)], True
    elif template == "raw":
        pieces, first_special = [(render_raw(ex.prompt), False), (ex.completion, True)], True
    else:
        messages = prompt_messages(ex) + [{"role": "assistant", "content": ex.completion}]
        pieces, first_special = _chat_pieces(messages, tokenizer, ex.source), False  # templates write BOS

    ids: list[int] = []
    labelled: list[bool] = []
    completion_start = 0
    for i, (text, is_completion) in enumerate(pieces):
        piece_ids = tokenizer.encode(text, add_special_tokens=first_special and i == 0)
        if is_completion:
            completion_start = len(ids)
        ids += piece_ids
        labelled += [is_completion] * len(piece_ids)
    # The sequence ends with the completion: text a template writes after the last assistant turn
    # is dropped, and EOS appended unless the template already wrote it.
    end = max((j + 1 for j, flag in enumerate(labelled) if flag), default=len(ids))
    ids, labelled = ids[:end], labelled[:end]
    if not (end > completion_start and ids[-1] == tokenizer.eos_id):
        ids.append(tokenizer.eos_id)
        labelled.append(True)
    labels = [t if (flag or train_on_all) else IGNORE for t, flag in zip(ids, labelled)]

    truncated = False
    if len(ids) > max_seq_len:
        if truncation == "drop":
            return None
        keep_bos = tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id and completion_start > 0
        budget = max_seq_len - int(keep_bos)
        if len(ids) - completion_start > budget:
            return None  # the completion itself does not fit; never cut it
        head = ids[:1] if keep_bos else []
        head_labels = labels[:1] if keep_bos else []
        ids, labels = head + ids[-budget:], head_labels + labels[-budget:]
        truncated = True
    return EncodedExample(ids, labels, truncated, ex.source)


# ---------------------------------------------------------------------------------------- bundle
@dataclass
class DataBundle:
    train: list[EncodedExample]
    val: list[EncodedExample]
    summary: dict
    train_examples: list[Example] = field(default_factory=list)
    val_examples: list[Example] = field(default_factory=list)


def _encode_all(examples, tokenizer, counts, skip_bad_lines, **kw) -> tuple[list[EncodedExample], list[Example]]:
    out, kept = [], []
    for ex in examples:
        try:
            enc = encode_example(ex, tokenizer, **kw)
        except DataError:
            if not skip_bad_lines:
                raise
            counts["bad_lines_skipped"] += 1
            continue
        if enc is None:
            counts["dropped_too_long"] += 1
            continue
        counts["truncated"] += int(enc.truncated)
        out.append(enc)
        kept.append(ex)
    return out, kept


def prepare_data(
    train_path,
    tokenizer,
    *,
    val_path=None,
    eval_path=None,
    fmt: str = "auto",
    template: str = "chat",
    train_on_all: bool = False,
    max_seq_len: int = 1024,
    truncation: str = "drop",
    dedup: bool = True,
    near_threshold: float = 0.9,
    val_fraction: float = 0.1,
    seed: int = 0,
    allow_contamination: bool = False,
    skip_bad_lines: bool = False,
) -> DataBundle:
    """Load, dedup, split, check contamination and encode: everything the trainer needs, or one clear error."""
    from minilora.dedup import dedup as _dedup  # the flag `dedup` shadows the function

    if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so --template chat cannot render prompts; pass --template raw."
        )
    examples, rep = load_records(train_path, fmt, skip_bad_lines)
    summary: dict = {"train_file": os.fspath(train_path), "format": rep.fmt, "records": rep.n_records,
                     "bad_lines_skipped": rep.n_skipped}
    val_examples: list[Example] = []
    if val_path is not None:
        val_examples, vrep = load_records(val_path, fmt, skip_bad_lines)
        summary["bad_lines_skipped"] += vrep.n_skipped
    if dedup:
        examples, drep = _dedup(examples, near_threshold=near_threshold, seed=seed)
        summary["exact_duplicates_removed"] = drep.exact_removed
        summary["near_duplicates_removed"] = drep.near_removed
    if val_path is None and val_fraction > 0:
        examples, val_examples = split(examples, val_fraction=val_fraction, seed=seed)
    checks = [("val", val_path, val_examples)] if val_path is not None else []
    if eval_path is not None:
        eval_examples, erep = load_records(eval_path, fmt, skip_bad_lines)
        summary["bad_lines_skipped"] += erep.n_skipped
        checks.append(("eval", eval_path, eval_examples))
    summary["contaminated_prompts"] = 0
    for name, path, held_out in checks:
        overlaps = assert_no_contamination(examples, held_out, allow=allow_contamination, name=os.fspath(path))
        summary["contaminated_prompts"] += len(overlaps)

    counts = {"dropped_too_long": 0, "truncated": 0, "bad_lines_skipped": summary.pop("bad_lines_skipped")}
    kw = dict(template=template, train_on_all=train_on_all, max_seq_len=max_seq_len, truncation=truncation)
    train, examples = _encode_all(examples, tokenizer, counts, skip_bad_lines, **kw)
    val, val_examples = _encode_all(val_examples, tokenizer, counts, skip_bad_lines, **kw)
    if not train:
        raise DataError(
            f"All training examples in {train_path} are longer than --max-seq-len {max_seq_len}; "
            "raise --max-seq-len or use --truncation left."
        )
    summary.update(counts)
    summary.update({
        "train_examples": len(train), "val_examples": len(val),
        "train_tokens": sum(len(e) for e in train),
        "train_label_tokens": sum(sum(t != IGNORE for t in e.labels) for e in train),
        "max_len": max(len(e) for e in train),
    })
    return DataBundle(train, val, summary, examples, val_examples)
