"""Preference pairs: reading, rendering and batching the data DPO and ORPO train on.

Shape letters: P pairs in a batch, T the batch's length (its longest answer sequence).

A pair is a prompt and two answers, the one preferred (chosen) and the other (rejected). One JSON object
per line, in either form (extra keys are ignored):
  string  {"prompt": str, "chosen": str, "rejected": str}
  chat    {"prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant", "content": str}],
           "rejected": [{"role": "assistant", "content": str}]}      (an answer may also be a plain string)
Each answer is rendered exactly as SFT renders a completion (encode.encode_example): the chat template
with the answer as the assistant turn, or raw concatenation; labels are -100 on the prompt, so a
sequence's labelled tokens are its answer (and EOS). Both sequences of a pair share the prompt tokens.

Batches (collate_pairs) put a pair's two answers in one forward, as TRL concatenates them: rows
0..P-1 hold the chosen answers and rows P..2P-1 the rejected ones, in the same pair order, all padded
to one length T. Pairs are never packed. The same batch also carries the pairs laid out one row per
pair (SharedPairs: the prompt once, then both answers, each attending to the prompt and to itself):
the same log-probabilities up to rounding for fewer tokens through the model (share_prompts).

Dedup, the split and the contamination check (dedup.py, holdout.py) treat a pair as they treat an
example: dedup compares the prompt with both answers, the contamination check compares prompts, and
the split stratifies by the chosen answer.

Bad input, one sentence naming file and line (or skipped and counted with --skip-bad-lines): a record
without 'chosen' or 'rejected', answers that are not strings (or one assistant message), identical
answers (the pair prefers nothing). A file of prompt/completion, alpaca, chat-messages or text records
is refused at its first line, naming the fields pairs need: it is SFT data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minilora.data.encode import EncodedExample, encode_example
from minilora.data.packing import IGNORE, Batch, collate, plan_batches
from minilora.data.records import ROLES, BadLine, DataError, Example, LoadReport, read_jsonl

_FIX = "fix the line or pass --skip-bad-lines to skip it"
NEEDED = "'prompt', 'chosen' and 'rejected'"


@dataclass
class Pair:
    """One preference record. prompt: a string, or the messages before the answer; chosen / rejected:
    the preferred and the other answer (strings); source: "file:line"."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    fmt: str  # "pairs" (string prompt) or "chat_pairs" (messages)
    source: str = ""

    @property
    def completion(self) -> str:
        """The chosen answer: what holdout.split stratifies by (and the text of a pair without a prompt)."""
        return self.chosen

    @property
    def answers(self) -> tuple[str, str]:
        """What dedup compares after the prompt: both answers (two pairs that differ only in the
        rejected answer are two different preferences, not duplicates)."""
        return self.chosen, self.rejected

    def example(self, answer: str) -> Example:
        """The SFT Example whose completion is `answer`: rendering a pair is rendering two examples."""
        return Example(
            self.prompt, answer, "chat" if isinstance(self.prompt, list) else "prompt_completion", self.source
        )


# ---------------------------------------------------------------------------------------- reading
def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadLine(f"field '{key}' must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadLine(f"'{key}' message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadLine(f"'{key}' message {i} has unknown role '{m['role']}' (expected one of {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(obj: dict, key: str) -> str:
    """An answer: a string, or a list holding one assistant message (TRL's conversational form)."""
    if key not in obj:
        raise BadLine(f"missing field '{key}' (a preference pair needs {NEEDED})")
    value = obj[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        m = value[0]
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            return m["content"]
    got = type(value).__name__ if not isinstance(value, list) else f"a list of {len(value)} item(s)"
    raise BadLine(f"field '{key}' must be a string or a list holding one assistant message, got {got}")


def parse_pair(obj: dict, source: str) -> Pair:
    """A Pair from one JSON object, or BadLine saying what is wrong with it."""
    chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
    if chosen == rejected:
        raise BadLine("'chosen' and 'rejected' are identical, so the pair prefers nothing")
    if "prompt" not in obj:
        raise BadLine(f"missing field 'prompt' (a preference pair needs {NEEDED})")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return Pair(prompt, chosen, rejected, "pairs", source)
    messages = _messages(prompt, "prompt")
    if messages and messages[-1]["role"] == "assistant":
        raise BadLine("the prompt's last message is from the assistant; the answers are the assistant's turn")
    return Pair(messages, chosen, rejected, "chat_pairs", source)


def load_pairs(
    path, objective: str = "dpo", skip_bad_lines: bool = False, max_line_bytes: int | None = None
) -> tuple[list[Pair], LoadReport]:
    """Read a JSONL file of preference pairs (see the module docstring); `objective` names the
    --objective in the message that refuses SFT data."""

    def parse(obj: dict, lineno: int, source: str) -> Pair:
        if "chosen" not in obj and "rejected" not in obj and {"completion", "messages", "output", "text"} & set(obj):
            raise DataError(
                f"--objective {objective} trains on preference pairs, but {source.rpartition(':')[0]} line {lineno} "
                f"has the fields {sorted(obj)[:6]}; give each line {NEEDED} (or train this file with --objective sft)."
            )
        try:
            return parse_pair(obj, source)
        except BadLine as e:
            raise BadLine(f"{e}; {_FIX}") from None

    pairs, report = read_jsonl(path, parse, skip_bad_lines, max_line_bytes)
    report.fmt = pairs[0].fmt
    return pairs, report


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedPair:
    """The two sequences of a pair, each prompt + answer + EOS with labels on the answer."""

    chosen: EncodedExample
    rejected: EncodedExample
    source: str = ""

    def __len__(self) -> int:
        """The longer sequence: the padded length the pair needs in a batch."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def labels(self) -> list[int]:
        """Both sequences' labels (what prepare_data counts as label tokens)."""
        return self.chosen.labels + self.rejected.labels

    @property
    def answers(self) -> tuple[EncodedExample, EncodedExample]:
        return self.chosen, self.rejected


def encode_pair(
    pair: Pair,
    tokenizer,
    template: str = "chat",
    train_on_all: bool = False,
    max_seq_len: int = 2048,
    truncation: str = "drop",
) -> EncodedPair | None:
    """Encode both answers as encode_example encodes a completion; None when either does not fit
    (truncation "drop"), or when "left" cannot fit an answer even with the prompt cut (each sequence
    is cut on its own, so the two may keep different amounts of a long prompt). The loss of a pair is
    on its answers only: train_on_all is refused."""
    if train_on_all:
        raise ValueError("Preference pairs put loss on the answers only; train them without --train-on-all.")
    seqs = [
        encode_example(pair.example(a), tokenizer, template, False, max_seq_len, truncation)
        for a in (pair.chosen, pair.rejected)
    ]
    if seqs[0] is None or seqs[1] is None:
        return None
    return EncodedPair(seqs[0], seqs[1], pair.source)


# ---------------------------------------------------------------------------------------- batching
PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # SharedPairs' segment ids


@dataclass
class SharedPairs:
    """P pairs, one row each: the two sequences' common prefix (the prompt) once, then the rest of the
    chosen sequence, then the rest of the rejected one, right-padded to T'.

        tokens     p_0 .. p_{c-1} | c_c .. c_{Lc-1} | r_c .. r_{Lr-1} | pad
        positions  0   .. c-1     | c   .. Lc-1     | c   .. Lr-1     | 0
        segments   PREFIX         | CHOSEN          | REJECTED        | PAD

    A token attends to the earlier tokens of its own segment and to the prefix (prefix_len = c): the
    rejected answer never sees the chosen one, and with the positions continuing from the prefix in both
    branches, every token computes what it computes in its own row of the PairBatch (up to rounding).
    A model forward over SharedPairs passes prefix_len (models/transformer.py's build_mask).

    The targets cannot be read off shifted labels (the first rejected token is predicted from the
    prefix's last position), so each labelled target names its predicting position: src (N,) its flat
    index into (P, T'), tgt (N,) the token, row (N,) the answer it belongs to, numbered as the PairBatch's
    rows (0..P-1 chosen, P..2P-1 rejected); n_rows = 2P. A target in the prefix (answers that begin
    alike) is listed once per answer."""

    input_ids: torch.Tensor  # (P, T') long
    attention_mask: torch.Tensor  # (P, T') long
    position_ids: torch.Tensor  # (P, T') long
    segment_ids: torch.Tensor  # (P, T') long
    prefix_len: torch.Tensor  # (P,) long
    src: torch.Tensor  # (N,) long
    tgt: torch.Tensor  # (N,) long
    row: torch.Tensor  # (N,) long
    n_rows: int

    def to(self, device) -> SharedPairs:
        names = [k for k in SharedPairs.__dataclass_fields__ if k != "n_rows"]
        return SharedPairs(**{k: getattr(self, k).to(device, non_blocking=True) for k in names}, n_rows=self.n_rows)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share, leaving each at least one token of its own."""
    n = min(len(a), len(b)) - 1
    for i in range(max(n, 0)):
        if a[i] != b[i]:
            return i
    return max(n, 0)


def share_prompts(picked: list[EncodedPair], pad_id: int) -> SharedPairs:
    """The SharedPairs of these pairs (in this order; see SharedPairs)."""
    P = len(picked)
    layouts = []
    for pair in picked:
        ch, rj = pair.chosen.input_ids, pair.rejected.input_ids
        c = common_prefix(ch, rj)
        ids = ch + rj[c:]
        pos = list(range(len(ch))) + list(range(c, len(rj)))
        seg = [PREFIX] * c + [CHOSEN] * (len(ch) - c) + [REJECTED] * (len(rj) - c)
        layouts.append((c, ids, pos, seg))
    T = max(len(ids) for _, ids, _, _ in layouts)
    input_ids = torch.full((P, T), pad_id, dtype=torch.long)
    attention = torch.zeros((P, T), dtype=torch.long)
    positions = torch.zeros((P, T), dtype=torch.long)
    segments = torch.full((P, T), PAD, dtype=torch.long)
    src, tgt, row = [], [], []  # per labelled target: predicting slot (flat), token, answer row
    for p, (pair, (c, ids, pos, seg)) in enumerate(zip(picked, layouts)):
        L, Lc = len(ids), len(pair.chosen.input_ids)
        input_ids[p, :L], attention[p, :L] = torch.tensor(ids), 1
        positions[p, :L], segments[p, :L] = torch.tensor(pos), torch.tensor(seg)
        for answer, seq, rejected in ((p, pair.chosen, False), (P + p, pair.rejected, True)):
            for t in range(1, len(seq.labels)):  # position t - 1 of the sequence predicts its token t
                if seq.labels[t] != IGNORE:
                    slot = Lc + (t - 1) - c if rejected and t - 1 >= c else t - 1  # its slot in the row
                    src.append(p * T + slot)
                    tgt.append(seq.labels[t])
                    row.append(answer)
    long = lambda x: torch.tensor(x, dtype=torch.long)
    prefix = long([c for c, _, _, _ in layouts])
    return SharedPairs(input_ids, attention, positions, segments, prefix, long(src), long(tgt), long(row), 2 * P)


@dataclass
class PairBatch(Batch):
    """A Batch of 2P rows: the P chosen sequences, then the P rejected ones (see the module docstring);
    pair_ids (P,): each pair's index in the encoded list it was drawn from (a stored reference's row);
    shared: the same pairs one row each (SharedPairs), what a pair objective runs unless told otherwise."""

    n_pairs: int = 0
    pair_ids: torch.Tensor | None = None
    shared: SharedPairs | None = None

    def to(self, device) -> PairBatch:
        b = super().to(device)
        ids = None if self.pair_ids is None else self.pair_ids.to(device)
        shared = None if self.shared is None else self.shared.to(device)
        fields = {k: getattr(b, k) for k in Batch.__dataclass_fields__}
        return PairBatch(**fields, n_pairs=self.n_pairs, pair_ids=ids, shared=shared)


def collate_pairs(rows: list[list[int]], encoded, pad_id: int) -> PairBatch:
    """The PairBatch of the pairs `rows` names (one pair index per row, as plan_batches plans them)."""
    picked = [encoded[i] for row in rows for i in row]
    seqs = [p.chosen for p in picked] + [p.rejected for p in picked]  # rows 0..P-1 chosen, P..2P-1 rejected
    b = collate([[k] for k in range(len(seqs))], seqs, pad_id)  # (2P, T)
    ids = torch.tensor([i for row in rows for i in row], dtype=torch.long)  # (P,)
    fields = {k: getattr(b, k) for k in Batch.__dataclass_fields__}
    return PairBatch(**fields, n_pairs=len(picked), pair_ids=ids, shared=share_prompts(picked, pad_id))


def shared_length(pair: EncodedPair) -> int:
    """The tokens of a pair's SharedPairs row: both sequences less their common prefix once."""
    ch, rj = pair.chosen.input_ids, pair.rejected.input_ids
    return len(ch) + len(rj) - common_prefix(ch, rj)


def pair_batches(
    encoded,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    pad_id: int,
    epoch: int = 0,
    start_step: int = 0,
    pack: bool = False,
    max_seq_len: int | None = None,
):
    """Yield the PairBatches of one epoch from batch `start_step` on: packing.batches for pairs
    (length-grouped, seeded, resumable; `batch_size` counts pairs)."""
    if pack:
        raise ValueError("Preference pairs are not packed; train them without --pack.")
    if not encoded:
        raise ValueError("No pairs to batch; check the data file and --max-seq-len.")
    plan = plan_batches([len(p) for p in encoded], batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    for rows in plan[start_step:]:
        yield collate_pairs(rows, encoded, pad_id)


def split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a per-row tensor (2P, ...) of a PairBatch."""
    return x.chunk(2, dim=0)
