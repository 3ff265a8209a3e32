"""The held-out split and the train/eval contamination check.

`split` draws a seeded validation set (stratified by label when completions look like class
labels); `contamination_check` finds eval prompts that also appear in the training data, compared
after `dedup.normalize_text` (NFKC, casefold, whitespace folded) by hash, so a prompt that differs
only in case or spacing still counts as the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilora.data.dedup import normalize_text, prompt_text, text_hash


class ContaminationError(ValueError):
    """Eval prompts also appear in the training data."""


# ---------------------------------------------------------------------------------------- split
def _is_short_label_set(completions: list[str]) -> bool:
    """Stratify when completions look like class labels: short, and on average >= 4 per class."""
    distinct = set(completions)
    return 2 <= len(distinct) <= len(completions) // 4 and all(len(c) <= 100 for c in distinct)


def split(examples, val_fraction: float = 0.1, seed: int = 0, stratify: str | bool = "auto"):
    """Seeded, deterministic, disjoint train/val split; each keeps the input order.

    The validation size is round(n * val_fraction), at least 1 and at most n - 1 when
    val_fraction > 0. Stratified (stratify=True, or "auto" when completions are short labels):
    each class gives its share, rounded by largest remainder so the total stays exact.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. --val-fraction 0.1.")
    n = len(examples)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    if n_val == 0:
        return list(examples), []
    rng = np.random.default_rng(seed)
    labels = [normalize_text(ex.completion) for ex in examples]
    if stratify == "auto":
        stratify = _is_short_label_set(labels)
    if stratify:
        classes: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            classes.setdefault(lab, []).append(i)
        names = sorted(classes)
        exact = np.array([n_val * len(classes[k]) / n for k in names])
        quota = np.floor(exact).astype(int)
        order = sorted(range(len(names)), key=lambda j: (-(exact[j] - quota[j]), j))
        for j in order[: n_val - int(quota.sum())]:
            quota[j] += 1
        val_idx = set()
        for j, name in enumerate(names):
            members = np.array(classes[name])
            val_idx.update(int(i) for i in rng.permutation(members)[: quota[j]])
    else:
        val_idx = {int(i) for i in rng.permutation(n)[:n_val]}
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------- contamination
@dataclass
class Overlap:
    eval_index: int
    train_index: int
    eval_source: str
    train_source: str
    prompt: str


def _prompt_key(ex) -> bytes:
    # Text records have no prompt: their whole text is what must not leak.
    p = prompt_text(ex)
    return text_hash(normalize_text(p if p.strip() else ex.completion))


def contamination_check(train, eval_examples) -> list[Overlap]:
    """Eval examples whose normalized prompt (hashed) also appears in the training set."""
    index: dict[bytes, int] = {}
    for i, ex in enumerate(train):
        index.setdefault(_prompt_key(ex), i)
    out = []
    for k, ex in enumerate(eval_examples):
        j = index.get(_prompt_key(ex))
        if j is not None:
            out.append(Overlap(k, j, ex.source, train[j].source, prompt_text(ex)[:80]))
    return out


def assert_no_contamination(train, eval_examples, allow: bool = False, name: str = "the eval set") -> list[Overlap]:
    """Raise ContaminationError when eval prompts appear in training (unless allow); return the overlaps."""
    overlaps = contamination_check(train, eval_examples)
    if overlaps and not allow:
        first = overlaps[0]
        raise ContaminationError(
            f"{len(overlaps)} of {len(eval_examples)} prompts in {name} also appear in the training data "
            f"(first: {first.eval_source or '#' + str(first.eval_index)} = "
            f"{first.train_source or '#' + str(first.train_index)}); remove them from one side or pass "
            "--allow-contamination to train anyway."
        )
    return overlaps
