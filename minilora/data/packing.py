"""Batching: length-grouped dynamic padding, or packing several examples per row; resumable.

Shape letters: B rows in a batch, T the batch's length (its longest row), V vocabulary.

A Batch holds, all (B, T):
  input_ids       token ids, right-padded with pad_id
  labels          aligned with input_ids (not shifted): the token where it carries loss, else -100.
                  The first position of every example is -100, so the shifted loss
                      L = sum_t CE(logits[:, t], labels[:, t + 1])
                  never asks the last token of one packed example to predict the next one.
  attention_mask  1 on real tokens, 0 on padding
  position_ids    0, 1, ... restarting at each example (padding: 0)
  segment_ids     packed: 1, 2, ... per example in the row, 0 on padding; unpacked: 1 / 0
and n_label_tokens = (labels != -100).sum(): exactly the number of terms in L (minilora/train/loss.py), so the trainer
can normalize by tokens across gradient accumulation (sum losses, divide by the total count).

The plan for an epoch (which examples go in which row of which batch) is a pure function of the
example lengths, the arguments, `seed` and `epoch`; `start_step` skips its first batches, so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # the label of a position without loss, project-wide (torch's ignore_index default)
_CHUNK = 64  # length grouping sorts within windows of _CHUNK * batch_size examples


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE = no loss
    attention_mask: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long
    segment_ids: torch.Tensor  # (B, T) long
    n_label_tokens: int

    def to(self, device) -> Batch:
        move = {
            k: getattr(self, k).to(device, non_blocking=True)
            for k in ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")
        }
        return Batch(**move, n_label_tokens=self.n_label_tokens)


def _fill_rows(order: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: pack examples (by index) into rows of at most `capacity` tokens, each
    example, longest first, into the row it leaves with the least free space (a new row if none fits)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]):  # stable: ties keep the shuffled order
        fits = [r for r, space in enumerate(free) if lengths[i] <= space]
        if fits:
            r = min(fits, key=lambda r: free[r])  # the tightest fit; ties: the earliest row
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    pack: bool = False,
    max_seq_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = True,
) -> list[list[list[int]]]:
    """Which examples form each row of each batch: plan[step][row] = [example indices].

    Rows (one example each, or several packed into max_seq_len) are grouped into batches of
    batch_size rows, the last one possibly smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(lengths)
    if pack:
        if max_seq_len is None:
            raise ValueError("Packing needs max_seq_len (the row length).")
        too_long = [i for i in range(n) if lengths[i] > max_seq_len]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"Example {i} has {lengths[i]} tokens, more than max_seq_len {max_seq_len}; "
                "encode with the same max_seq_len you pack with."
            )
    rng = np.random.default_rng([seed, epoch])
    order = [int(i) for i in rng.permutation(n)] if shuffle else list(range(n))
    window = _CHUNK * batch_size
    if pack:
        rows = []
        for s in range(0, n, window):
            rows += _fill_rows(order[s : s + window], lengths, max_seq_len)
        if shuffle:
            rows = [rows[int(j)] for j in rng.permutation(len(rows))]
    else:
        if group_by_length:  # longest first within each window, so batches hold similar lengths
            order = [i for s in range(0, n, window) for i in sorted(order[s : s + window], key=lambda i: -lengths[i])]
        rows = [[i] for i in order]
    plan = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    if shuffle and not pack and group_by_length:
        plan = [plan[int(j)] for j in rng.permutation(len(plan))]  # batches of similar lengths, random order
    return plan


def collate(rows: list[list[int]], encoded: Sequence, pad_id: int) -> Batch:
    """Build the Batch tensors for rows of example indices (see the module docstring)."""
    T = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for seg, i in enumerate(row, start=1):
            ex = encoded[i]
            L = len(ex.input_ids)
            input_ids[b, t : t + L] = torch.tensor(ex.input_ids, dtype=torch.long)
            lab = torch.tensor(ex.labels, dtype=torch.long)
            lab[0] = IGNORE  # nothing predicts an example's first token (see the module docstring)
            labels[b, t : t + L] = lab
            attention[b, t : t + L] = 1
            positions[b, t : t + L] = torch.arange(L)
            segments[b, t : t + L] = seg
            t += L
    n_label = int((labels != IGNORE).sum())
    return Batch(input_ids, labels, attention, positions, segments, n_label)


def num_batches(encoded: Sequence, batch_size: int, **kw) -> int:
    """Batches per epoch for these arguments (same keywords as `batches`, minus pad_id/start_step);
    `encoded` holds EncodedExamples or EncodedPairs (data/pairs.py): each has a length."""
    kw.pop("pad_id", None)
    kw.pop("start_step", None)
    return len(plan_batches([len(e) for e in encoded], batch_size, **kw))


def batches(
    encoded: Sequence,
    batch_size: int,
    *,
    pack: bool = False,
    max_seq_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    pad_id: int,
    epoch: int = 0,
    start_step: int = 0,
    group_by_length: bool = True,
) -> Iterator[Batch]:
    """Yield the Batches of one epoch, starting at batch `start_step` (for resuming)."""
    if not encoded:
        raise ValueError("No examples to batch; check the data file and --max-seq-len.")
    plan = plan_batches(
        [len(e.input_ids) for e in encoded],
        batch_size,
        pack=pack,
        max_seq_len=max_seq_len,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        group_by_length=group_by_length,
    )
    for rows in plan[start_step:]:
        yield collate(rows, encoded, pad_id)
