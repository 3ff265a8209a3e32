"""`prepare_data`: everything the trainer needs from the JSONL files, or one clear error.

Pipeline (each step is a function of its own module):

  load_records(path)        JSONL -> [Example]   (records.py: format detected per file; every bad
                                                  line raises DataError naming file and line, or is counted)
  dedup(examples)           exact + MinHash near-duplicates removed, before splitting (dedup.py)
  split(examples)           seeded train/val split, stratified when completions are short labels (holdout.py)
  assert_no_contamination   eval prompts must not appear in the training set (holdout.py)
  encode_example(ex, tok)   -> EncodedExample(input_ids, labels) (encode.py)
  batches(encoded, ...)     length-grouped padded or packed Batch tensors, resumable (packing.py)

Preference pairs (prepare_data(..., objective="dpo" or "orpo")) take the same path through pairs.py:
load_pairs, the same dedup / split / contamination check, encode_pair (each answer encoded as a
completion), pair_batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from minilora.data.dedup import dedup as _dedup  # the flag `dedup` shadows the function
from minilora.data.encode import EncodedExample, encode_example, max_line_bytes
from minilora.data.holdout import assert_no_contamination, split
from minilora.data.packing import IGNORE
from minilora.data.pairs import encode_pair, load_pairs
from minilora.data.records import DataError, Example, load_records


@dataclass
class DataBundle:
    train: list[EncodedExample]
    val: list[EncodedExample]
    summary: dict
    train_examples: list[Example] = field(default_factory=list)
    val_examples: list[Example] = field(default_factory=list)


def _encode_all(examples, tokenizer, counts, skip_bad_lines, encode=None, **kw) -> tuple[list, list]:
    out, kept = [], []
    for ex in examples:
        try:
            enc = (encode or encode_example)(ex, tokenizer, **kw)
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
    objective: str = "sft",
) -> DataBundle:
    """Load, dedup, split, check contamination and encode: everything the trainer needs, or one clear error.
    objective "dpo" / "orpo": the files hold preference pairs (data/pairs.py), and the bundle holds
    EncodedPairs; dedup, split and the contamination check run on them unchanged."""
    if objective == "sft":
        load, encode, noun = (lambda p, lim=None: load_records(p, fmt, skip_bad_lines, lim)), None, "examples"
    else:
        load, encode, noun = (lambda p, lim=None: load_pairs(p, objective, skip_bad_lines, lim)), encode_pair, "pairs"

    if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so --template chat cannot render prompts; pass --template raw."
        )
    # --truncation drop: lines too long to fit are dropped unread (left cuts long prompts, so keeps them)
    limit = max_line_bytes(tokenizer, max_seq_len) if truncation == "drop" else None
    examples, rep = load(train_path, limit)
    summary: dict = {
        "train_file": os.fspath(train_path),
        "format": rep.fmt,
        "records": rep.n_records,
        "bad_lines_skipped": rep.n_skipped,
    }
    long_lines = [(train_path, rep)]
    val_examples: list[Example] = []
    if val_path is not None:
        val_examples, vrep = load(val_path, limit)
        summary["bad_lines_skipped"] += vrep.n_skipped
        long_lines.append((val_path, vrep))
    if dedup:
        examples, drep = _dedup(examples, near_threshold=near_threshold, seed=seed)
        summary["exact_duplicates_removed"] = drep.exact_removed
        summary["near_duplicates_removed"] = drep.near_removed
    if val_path is None and val_fraction > 0:
        examples, val_examples = split(examples, val_fraction=val_fraction, seed=seed)
    checks = [("val", val_path, val_examples)] if val_path is not None else []
    if eval_path is not None:
        eval_examples, erep = load(eval_path)
        summary["bad_lines_skipped"] += erep.n_skipped
        checks.append(("eval", eval_path, eval_examples))
    summary["contaminated_prompts"] = 0
    for name, path, held_out in checks:
        overlaps = assert_no_contamination(examples, held_out, allow=allow_contamination, name=os.fspath(path))
        summary["contaminated_prompts"] += len(overlaps)

    counts = {
        "dropped_too_long": sum(r.n_too_long for _, r in long_lines),
        "truncated": 0,
        "bad_lines_skipped": summary.pop("bad_lines_skipped"),
    }
    if skip_bad_lines and counts["dropped_too_long"]:  # where they are (the first few lines of each file)
        summary["long_lines_dropped_at"] = "; ".join(
            f"{os.path.basename(os.fspath(p))} lines {','.join(map(str, r.too_long_lines))}"
            for p, r in long_lines
            if r.n_too_long
        )
    kw = dict(
        template=template, train_on_all=train_on_all, max_seq_len=max_seq_len, truncation=truncation, encode=encode
    )
    train, examples = _encode_all(examples, tokenizer, counts, skip_bad_lines, **kw)
    val, val_examples = _encode_all(val_examples, tokenizer, counts, skip_bad_lines, **kw)
    if not train:
        raise DataError(
            f"All training {noun} in {train_path} are longer than --max-seq-len {max_seq_len}; "
            "raise --max-seq-len or use --truncation left."
        )
    summary.update(counts)
    summary.update(
        {
            f"train_{noun}": len(train),
            f"val_{noun}": len(val),
            "train_tokens": sum(len(s) for e in train for s in getattr(e, "answers", (e,))),
            "train_label_tokens": sum(sum(t != IGNORE for t in e.labels) for e in train),
            "max_len": max(len(e) for e in train),
        }
    )
    return DataBundle(train, val, summary, examples, val_examples)
