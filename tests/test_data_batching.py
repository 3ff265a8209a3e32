"""minilora.data.packing: padded / packed batches, label bookkeeping, resumability, and isolation.

References: each example run alone. A position-and-token "model" (logits depend only on a token
and its position) checks the label/position bookkeeping over hypothesis-drawn batches; the
project's own tiny Transformer checks that padding and packing (segment_ids) leave every
example's logits and loss exactly as when it runs alone.
"""

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import EncodedExample, encode_example
from minilora.data.packing import IGNORE, batches, num_batches, plan_batches
from minilora.data.records import load_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def token_loss_sum(logits, labels):
    """Reference: sum_t CE(logits[:, t], labels[:, t+1]) from full (B, T, V) logits, in float64."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].double().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


V = 50


@st.composite
def encoded_sets(draw):
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        L = draw(st.integers(1, 24))
        # A distinct first token per example, so a test can tell which example a segment holds.
        ids = [3 + i] + draw(st.lists(st.integers(3, V - 1), min_size=L - 1, max_size=L - 1))
        k = draw(st.integers(0, L))  # prompt length: labels on ids[k:]
        out.append(EncodedExample(ids, [-100] * k + ids[k:]))
    return out


def expected_label_count(ex):
    return sum(lab != -100 for lab in ex.labels[1:])  # the first token is never predicted


@settings(max_examples=40)
@given(
    data=encoded_sets(),
    batch_size=st.integers(1, 6),
    pack=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2),
    epoch=st.integers(0, 2),
)
def test_batches_cover_every_example_once_and_resume(data, batch_size, pack, shuffle, seed, epoch):
    kw = dict(pack=pack, max_seq_len=32, shuffle=shuffle, seed=seed, epoch=epoch)
    out = list(batches(data, batch_size, pad_id=0, **kw))
    assert len(out) == num_batches(data, batch_size, **kw)
    seen = []
    for b in out:
        B, T = b.input_ids.shape
        assert B <= batch_size
        if pack:
            assert T <= 32
        for field in ("labels", "attention_mask", "position_ids", "segment_ids"):
            assert getattr(b, field).shape == (B, T)
        assert (b.attention_mask == (b.segment_ids > 0).long()).all()
        assert b.n_label_tokens == int((b.labels != -100).sum())
        assert (b.labels[:, 0] == -100).all()
        for r in range(B):
            segs = b.segment_ids[r]
            n_real = int((segs > 0).sum())
            assert (segs[n_real:] == 0).all() and (b.input_ids[r, n_real:] == 0).all()  # right padding
            assert (b.labels[r, n_real:] == -100).all()
            for s in segs[:n_real].unique().tolist():
                pos = (segs == s).nonzero().flatten()
                ids = b.input_ids[r, pos].tolist()
                match = [i for i, e in enumerate(data) if e.input_ids == ids and i not in seen]
                assert match, "a segment is not one whole example"
                e = data[match[0]]
                seen.append(match[0])
                assert b.position_ids[r, pos].tolist() == list(range(len(ids)))
                assert b.labels[r, pos].tolist() == [-100] + e.labels[1:]
            if not pack:
                assert segs[:n_real].unique().tolist() == [1]
    assert sorted(seen) == list(range(len(data)))
    assert sum(b.n_label_tokens for b in out) == sum(expected_label_count(e) for e in data)
    # Deterministic, and start_step resumes exactly where the epoch left off.
    for k in (0, len(out) // 2, len(out)):
        resumed = list(batches(data, batch_size, pad_id=0, start_step=k, **kw))
        assert len(resumed) == len(out) - k
        for x, y in zip(resumed, out[k:]):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.segment_ids, y.segment_ids)


@settings(max_examples=30)
@given(data=encoded_sets(), pack=st.booleans(), seed=st.integers(0, 5))
def test_padding_and_packing_never_change_a_sequence_loss(data, pack, seed):
    """logits[b, t] = E[token] + P[position]: a batch's loss is the sum of the examples' losses alone."""
    g = torch.Generator().manual_seed(seed)
    E, P = torch.randn(V, V, generator=g, dtype=torch.float64), torch.randn(64, V, generator=g, dtype=torch.float64)

    def model(ids, pos):
        return E[ids] + P[pos]  # (B, T, V)

    alone = sum(
        token_loss_sum(
            model(torch.tensor([e.input_ids]), torch.arange(len(e.input_ids))[None]), torch.tensor([e.labels])
        ).item()
        for e in data
    )
    total = sum(
        token_loss_sum(model(b.input_ids, b.position_ids), b.labels).item()
        for b in batches(data, 4, pack=pack, max_seq_len=32, seed=seed, pad_id=int(seed % 3))
    )
    assert total == pytest.approx(alone, rel=1e-12, abs=1e-9)


def test_epochs_reshuffle_and_plan_errors():
    lengths = list(range(1, 41))
    a = plan_batches(lengths, 4, seed=0, epoch=0)
    assert a == plan_batches(lengths, 4, seed=0, epoch=0)
    assert a != plan_batches(lengths, 4, seed=0, epoch=1) and a != plan_batches(lengths, 4, seed=1, epoch=0)
    # Length grouping: unshuffled batches hold neighbours in length.
    for batch in plan_batches(lengths, 4, shuffle=False):
        ls = [lengths[row[0]] for row in batch]
        assert max(ls) - min(ls) <= 3
    with pytest.raises(ValueError, match="Example 32 has 33 tokens, more than max_seq_len 32"):
        plan_batches(lengths, 4, pack=True, max_seq_len=32)
    with pytest.raises(ValueError, match="Packing needs max_seq_len"):
        plan_batches(lengths, 4, pack=True)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        plan_batches(lengths, 0)
    with pytest.raises(ValueError, match="No examples to batch"):
        next(batches([], 2, pad_id=0))


# ------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def tiny_and_data():
    from minilora.models import transformer
    from minilora.models.config import ModelConfig
    from minilora.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(os.path.join(ROOT, "examples", "tokenizer"))
    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = transformer.Transformer(cfg).float().eval()
    records, _ = load_records(os.path.join(ROOT, "examples", "demo", "test.jsonl"))
    data = [encode_example(r, tok, max_seq_len=512) for r in records[:5]]
    # One example longer than the sliding window (64), so packed sliding layers are exercised.
    data.append(EncodedExample(data[0].input_ids + data[1].input_ids[1:], data[0].labels + data[1].labels[1:]))
    assert max(len(e) for e in data) > cfg.sliding_window
    return model, data, cfg


@pytest.mark.parametrize("pack", [False, True])
def test_tiny_transformer_padded_or_packed_equals_each_example_alone(tiny_and_data, pack):
    model, data, cfg = tiny_and_data
    with torch.no_grad():
        alone = [model(torch.tensor([e.input_ids]))[0] for e in data]  # (T_i, V) each
        alone_loss = sum(token_loss_sum(a[None], torch.tensor([e.labels])) for a, e in zip(alone, data))
        total, rows_seen = 0.0, 0
        for b in batches(data, 3, pack=pack, max_seq_len=256, seed=1, pad_id=0):
            logits = model(
                b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask, segment_ids=b.segment_ids
            )  # (B, T, V)
            total += token_loss_sum(logits, b.labels)
            for r in range(b.input_ids.shape[0]):
                segs = b.segment_ids[r]
                if pack and (segs.max() > 1):
                    rows_seen += 1
                for s in segs[segs > 0].unique().tolist():
                    pos = (segs == s).nonzero().flatten()
                    ids = b.input_ids[r, pos].tolist()
                    i = next(i for i, e in enumerate(data) if e.input_ids == ids)
                    torch.testing.assert_close(logits[r, pos], alone[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, alone_loss, rtol=1e-5, atol=1e-4)
    if pack:
        assert rows_seen > 0  # at least one row really held several examples


def _best_fit_decreasing(lengths, capacity):
    """Reference: longest first, each into the open row whose remaining space after it is smallest."""
    rows = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        options = [(capacity - sum(lengths[j] for j in row) - lengths[i], k) for k, row in enumerate(rows)]
        options = [o for o in options if o[0] >= 0]
        if options:
            rows[min(options)[1]].append(i)
        else:
            rows.append([i])
    return rows


@given(lengths=st.lists(st.integers(1, 32), min_size=1, max_size=40), capacity=st.integers(32, 64))
def test_packing_rows_are_best_fit_decreasing(lengths, capacity):
    from minilora.data.packing import _fill_rows

    rows = _fill_rows(list(range(len(lengths))), lengths, capacity)
    assert rows == _best_fit_decreasing(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
