"""Preference pairs (minilora.data.pairs): both record forms, rendering exactly as SFT renders a
completion (an SFT record of the same conversation is the oracle), dedup / contamination / split on
pairs, the batch layout (chosen rows then rejected rows, as TRL concatenates), resumable batching,
and every bad record named by file and line in one sentence.
"""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import EncodedExample, encode_example
from minilora.data.holdout import ContaminationError
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs, encode_pair, load_pairs, pair_batches
from minilora.data.prepare import prepare_data
from minilora.data.records import DataError, load_records
from minilora.models.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = {"role": "system", "content": "Answer briefly."}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(os.path.join(ROOT, "examples", "tokenizer"))


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return str(path)


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("template", ["chat", "raw"])
def test_each_answer_renders_as_the_sft_record_of_the_same_conversation(tmp_path, tok, template):
    user = {"role": "user", "content": "Where is my parcel?"}
    chat = pair([SYSTEM, user], [{"role": "assistant", "content": "On its way."}], "I do not know.")
    string = pair("Where is my parcel?", "On its way.", [{"role": "assistant", "content": "I do not know."}])
    (p_chat, p_str), rep = load_pairs(write(tmp_path, "p.jsonl", [chat, string]))
    assert rep.fmt == "chat_pairs" and p_str.fmt == "pairs"
    sft_chat = load_records(
        write(
            tmp_path,
            "c.jsonl",
            [
                {"messages": [SYSTEM, user, {"role": "assistant", "content": a}]}
                for a in ("On its way.", "I do not know.")
            ],
        )
    )[0]
    sft_str = load_records(
        write(
            tmp_path,
            "s.jsonl",
            [{"prompt": "Where is my parcel?", "completion": a} for a in ("On its way.", "I do not know.")],
        )
    )[0]
    for p, sft in ((p_chat, sft_chat), (p_str, sft_str)):
        enc = encode_pair(p, tok, template, max_seq_len=512)
        for got, ex in zip((enc.chosen, enc.rejected), sft):
            want = encode_example(ex, tok, template, max_seq_len=512)
            assert (got.input_ids, got.labels) == (want.input_ids, want.labels)
        assert enc.chosen.labels != enc.rejected.labels
        n_prompt = next(i for i, y in enumerate(enc.chosen.labels) if y != IGNORE)
        assert enc.chosen.input_ids[:n_prompt] == enc.rejected.input_ids[:n_prompt]  # one shared prompt


def test_a_pair_that_does_not_fit_is_dropped_with_drop_and_cut_with_left(tmp_path, tok):
    long_prompt = " ".join(["parcel"] * 60)
    (p,), _ = load_pairs(write(tmp_path, "p.jsonl", [pair(long_prompt, "yes", "no")]))
    assert encode_pair(p, tok, "raw", max_seq_len=20) is None
    cut = encode_pair(p, tok, "raw", max_seq_len=20, truncation="left")
    assert len(cut.chosen) <= 20 and len(cut.rejected) <= 20 and cut.truncated


# ------------------------------------------------------------------------------------ dedup, split, contamination
def test_dedup_contamination_and_split_work_on_pairs(tmp_path, tok):
    rows = [pair(f"Ticket {i}: the parcel number {i * 7} is late", "shipping", "billing") for i in range(30)]
    rows.append(pair("TICKET 3:  the parcel number 21 is late", "Shipping", "billing"))  # case/space duplicate of row 3
    rows.append(pair("Ticket 3: the parcel number 21 is late", "shipping", "account"))  # another rejected: kept
    train = write(tmp_path, "train.jsonl", rows)
    data = prepare_data(train, tok, template="raw", val_fraction=0.2, seed=1, objective="dpo")
    s = data.summary
    assert s["exact_duplicates_removed"] == 1 and s["train_pairs"] + s["val_pairs"] == 31
    assert isinstance(data.train[0], EncodedPair) and s["val_pairs"] == round(31 * 0.2)
    assert not {p.source for p in data.train_examples} & {p.source for p in data.val_examples}
    again = prepare_data(train, tok, template="raw", val_fraction=0.2, seed=1, objective="dpo")
    assert [p.source for p in again.val_examples] == [p.source for p in data.val_examples]  # seeded
    leak = write(tmp_path, "eval.jsonl", [pair("ticket 5: the parcel NUMBER 35 is late", "x", "y")])
    with pytest.raises(ContaminationError, match="1 of 1 prompts in .*eval.jsonl also appear"):
        prepare_data(train, tok, template="raw", eval_path=leak, objective="dpo")


# ------------------------------------------------------------------------------------ batches
@settings(max_examples=15)
@given(lengths=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=12), bs=st.integers(1, 4))
def test_batches_hold_chosen_rows_then_rejected_rows_and_resume(lengths, bs):
    def enc(k, n, tag):  # pair k: token k after BOS, then n answer tokens `tag`
        return EncodedExample([1, k] + [tag] * n, [IGNORE, IGNORE] + [tag] * n)

    pairs = [EncodedPair(enc(k, c, 7), enc(k, r, 9)) for k, (c, r) in enumerate(lengths, start=10)]
    epoch = list(pair_batches(pairs, bs, seed=3, pad_id=0))
    seen = []
    for b in epoch:
        P = b.n_pairs
        assert b.input_ids.shape[0] == 2 * P
        assert (b.input_ids[:P, 1] == b.input_ids[P:, 1]).all()  # row i and P + i: the same pair
        assert (b.labels[:P][b.labels[:P] != IGNORE] == 7).all() and (b.labels[P:][b.labels[P:] != IGNORE] == 9).all()
        assert b.n_label_tokens == sum(c + r for c, r in (lengths[int(k) - 10] for k in b.input_ids[:P, 1]))
        seen += b.input_ids[:P, 1].tolist()
    assert sorted(seen) == list(range(10, 10 + len(lengths)))  # every pair once per epoch
    for start in range(len(epoch)):
        tail = list(pair_batches(pairs, bs, seed=3, pad_id=0, start_step=start))
        assert all((a.input_ids == b.input_ids).all() for a, b in zip(tail, epoch[start:]))


def test_collate_pads_both_halves_to_one_length():
    p = EncodedPair(
        EncodedExample([1, 5, 6], [IGNORE, IGNORE, 6]), EncodedExample([1, 5, 7, 8, 2], [IGNORE, IGNORE, 7, 8, 2])
    )
    b = collate_pairs([[0]], [p], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 0, 0], [1, 5, 7, 8, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and b.n_pairs == 1 and b.n_label_tokens == 4


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "p", "rejected": "r"},
            "missing field 'chosen' (a preference pair needs 'prompt', 'chosen' and 'rejected')",
        ),
        ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
        ({"chosen": "c", "rejected": "r"}, "missing field 'prompt'"),
        (pair("p", "same", "same"), "'chosen' and 'rejected' are identical, so the pair prefers nothing"),
        (pair("p", 3, "r"), "field 'chosen' must be a string or a list holding one assistant message, got int"),
        (
            pair("p", "c", {"content": "r"}),
            "field 'rejected' must be a string or a list holding one assistant message, got dict",
        ),
        (
            pair("p", [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "r"),
            "got a list of 2 item(s)",
        ),
        (pair("p", [{"role": "user", "content": "a"}], "r"), "field 'chosen' must be a string or a list"),
        (pair([{"role": "robot", "content": "x"}], "c", "r"), "'prompt' message 0 has unknown role 'robot'"),
        (pair(7, "c", "r"), "field 'prompt' must be a string or a list of messages, got int"),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path, "p.jsonl", [pair("ok", "a", "b"), row])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    text = str(e.value)
    assert text.startswith(f"{path}, line 2: ") and message in text and text.count(". ") == 0
    pairs, rep = load_pairs(path, skip_bad_lines=True)
    assert len(pairs) == 1 and rep.n_skipped == 1


@pytest.mark.parametrize(
    "row, fields",
    [
        ({"prompt": "p", "completion": "c"}, "['completion', 'prompt']"),
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "['messages']"),
        ({"text": "t"}, "['text']"),
    ],
)
def test_sft_data_given_to_dpo_names_the_fields_pairs_need(tmp_path, row, fields):
    path = write(tmp_path, "sft.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_pairs(path, "orpo", skip_bad_lines=True)  # not a bad line to skip: the wrong file
    assert str(e.value) == (
        f"--objective orpo trains on preference pairs, but {path} line 1 has the fields {fields}; give each line "
        "'prompt', 'chosen' and 'rejected' (or train this file with --objective sft)."
    )


def test_pairs_given_to_sft_point_at_dpo(tmp_path):
    path = write(tmp_path, "pairs.jsonl", [pair("p", "c", "r")])
    with pytest.raises(DataError, match=r"line 1 is a preference pair .* --objective dpo or --objective orpo"):
        load_records(path, skip_bad_lines=True)
