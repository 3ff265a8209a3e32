"""minilora.data.encode: loading (every bad input has a checked message), rendering and loss masks.

Oracles: the labelled span of an encoded example must decode to the completion + EOS (raw), or
to exactly the text transformers' apply_chat_template adds for the assistant turn + EOS (chat);
the bundled tokenizer must give transformers' ids.
"""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import encode_example, prompt_ids
from minilora.data.holdout import ContaminationError
from minilora.data.prepare import prepare_data
from minilora.data.records import DataError, Example, load_records
from minilora.models.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")
DEMO = os.path.join(ROOT, "examples", "demo")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOK_DIR)


@pytest.fixture(scope="module")
def ref():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(TOK_DIR)


def write(tmp_path, name, lines, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(lines)
    else:
        path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


# ------------------------------------------------------------------------------------ formats
def test_formats_detected_per_file(tmp_path):
    pc = write(tmp_path, "pc.jsonl", [{"prompt": "p", "completion": "c", "id": 3}])
    al = write(
        tmp_path, "al.jsonl", [{"instruction": "i", "input": "x", "output": "o"}, {"instruction": "j", "output": "k"}]
    )
    ch = write(
        tmp_path,
        "ch.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ],
    )
    tx = write(tmp_path, "tx.jsonl", [{"text": "hello"}, "", "   "])
    (r,), rep = load_records(pc)
    assert (r.prompt, r.completion, r.fmt, rep.fmt) == ("p", "c", "prompt_completion", "prompt_completion")
    (a, b), rep = load_records(al)
    assert a.prompt == [{"role": "user", "content": "i\n\nx"}] and a.completion == "o" and rep.fmt == "alpaca"
    assert b.prompt == [{"role": "user", "content": "j"}]
    (c,), rep = load_records(ch)
    assert c.prompt[0] == {"role": "system", "content": "s"} and c.completion == "a" and rep.fmt == "chat"
    (t,), rep = load_records(tx)
    assert (t.prompt, t.completion, rep.fmt, rep.n_records) == ("", "hello", "text", 1)
    assert t.source.endswith("tx.jsonl:1")


BAD = [
    ("malformed", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a" "completion": "b"}'], 2, r"malformed JSON"),
    ("missing", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}], 2, r"missing field 'completion'"),
    (
        "nonstring",
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
        2,
        r"field 'completion' must be a string, got int",
    ),
    (
        "role",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
        1,
        r"message 1 has unknown role 'bot' \(expected one of system, user, assistant\)",
    ),
    (
        "msgtype",
        [{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}],
        1,
        r"message 0 field 'content' must be a string, got list",
    ),
    ("last", [{"messages": [{"role": "user", "content": "a"}]}], 1, r"the last message must be from the assistant"),
    (
        "mixed",
        [{"prompt": "a", "completion": "b"}, {"text": "t"}],
        2,
        r"this line is text but the file is prompt_completion \(detected from line 1\).*must not mix",
    ),
    ("notobj", [{"text": "a"}, "[1, 2]"], 2, r"expected a JSON object, got list"),
    ("unknown", [{"foo": "a"}], 1, r"none of the known fields"),
    ("alpaca", [{"instruction": "a", "input": 5, "output": "b"}], 1, r"field 'input' must be a string"),
]


@pytest.mark.parametrize("name,lines,bad_line,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_lines_raise_naming_file_and_line(tmp_path, name, lines, bad_line, pattern):
    path = write(tmp_path, f"{name}.jsonl", lines + [lines[0]] if bad_line > 1 else lines)
    with pytest.raises(DataError, match=rf"^{path}, line {bad_line}: {pattern}.*--skip-bad-lines") as e:
        load_records(path)
    assert e.value.args[0].endswith(".") and "\n" not in e.value.args[0]
    if bad_line > 1:  # the good lines survive, the bad one is counted
        records, rep = load_records(path, skip_bad_lines=True)
        assert rep.n_skipped == 1 and len(records) == len(lines) and f"line {bad_line}" in rep.skipped[0]
    else:
        with pytest.raises(DataError, match=r"has no usable lines \(1 bad lines skipped\)"):
            load_records(path, skip_bad_lines=True)


def test_non_utf8_empty_forced_and_missing(tmp_path):
    path = write(tmp_path, "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok2"}\n', mode="wb")
    with pytest.raises(DataError, match=rf"^{path}, line 2: bytes are not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_records(path)
    records, rep = load_records(path, skip_bad_lines=True)
    assert [r.completion for r in records] == ["ok", "ok2"] and rep.n_skipped == 1
    bom = write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"text": "x"}\n', mode="wb")
    assert load_records(bom)[0][0].completion == "x"
    for content in (b"", b"\n  \n"):
        empty = write(tmp_path, "empty.jsonl", content, mode="wb")
        with pytest.raises(DataError, match=rf"^{empty} is empty \(no JSON lines\)"):
            load_records(empty, skip_bad_lines=True)
    pc = write(tmp_path, "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"line 1: this line is prompt_completion, not chat as --format chat says"):
        load_records(pc, fmt="chat")
    with pytest.raises(ValueError, match="Unknown data format 'json'"):
        load_records(pc, fmt="json")
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------------------------ encoding
def labelled(enc):
    return [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]


def assert_labels_are_a_copy(enc):
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (-100, t) for t, lab in zip(enc.input_ids, enc.labels))


@settings(max_examples=40)
@given(prompt=st.text(max_size=40), completion=st.text(max_size=40))
def test_raw_labels_cover_exactly_completion_and_eos(tok, prompt, completion):
    enc = encode_example(Example(prompt, completion, "prompt_completion"), tok, template="raw", max_seq_len=10**6)
    assert_labels_are_a_copy(enc)
    k = enc.labels.index(next(lab for lab in enc.labels if lab != -100))
    assert all(lab != -100 for lab in enc.labels[k:])  # the labelled span is one suffix
    assert tok.decode(labelled(enc), skip_special_tokens=False) == completion + "<eos>"
    assert tok.decode(enc.input_ids[:k], skip_special_tokens=False) == "<bos>" + prompt
    assert prompt_ids(Example(prompt, completion, "prompt_completion"), tok, "raw") == enc.input_ids[:k]
    full = encode_example(
        Example(prompt, completion, "prompt_completion"), tok, "raw", train_on_all=True, max_seq_len=10**6
    )
    assert full.labels == full.input_ids == enc.input_ids


@st.composite
def conversations(draw):
    text = st.text(max_size=25)
    msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for i in range(2 * draw(st.integers(1, 3))):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(text)})
    return msgs


@settings(max_examples=30)
@given(msgs=conversations())
def test_chat_labels_are_the_assistant_turns_as_transformers_renders_them(tok, ref, msgs):
    ex = Example(msgs[:-1], msgs[-1]["content"], "chat")
    enc = encode_example(ex, tok, template="chat", max_seq_len=10**6)
    assert_labels_are_a_copy(enc)
    # The whole sequence is transformers' rendering of the conversation, then EOS.
    full = ref.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == full + "<eos>"
    # The labelled runs are, in order, what each assistant turn adds to the generation prompt.
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    expected = []
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            gen = ref.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=False)
            turn = ref.apply_chat_template(msgs[: k + 1], tokenize=False)
            assert turn.startswith(gen)
            expected.append(turn[len(gen) :])
            assert expected[-1] == m["content"].strip() + "<end_of_turn>\n"
    expected[-1] += "<eos>"
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == expected
    # The prompt the model is trained on is the one it is prompted with at inference.
    gen = ref.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert enc.input_ids[: len(gen)] == list(gen) and enc.labels[len(gen) - 1] == -100
    assert prompt_ids(ex, tok, "chat") == list(gen)  # what generation is prompted with


def test_text_format_and_template_errors(tok):
    enc = encode_example(Example("", "plain text", "text"), tok, template="chat")
    assert enc.labels == enc.input_ids and tok.decode(enc.input_ids, False) == "<bos>plain text<eos>"
    with pytest.raises(
        DataError,
        match=r"^f.jsonl:3: the chat template rejected this conversation \(Conversation "
        r"roles must alternate",
    ):
        encode_example(Example([{"role": "assistant", "content": "a"}], "b", "chat", "f.jsonl:3"), tok)
    with pytest.raises(ValueError, match="Unknown template 'jinja'"):
        encode_example(Example("a", "b", "prompt_completion"), tok, template="jinja")
    with pytest.raises(ValueError, match="Unknown truncation policy 'right'"):
        encode_example(Example("a", "b", "prompt_completion"), tok, truncation="right")


@settings(max_examples=25)
@given(prompt=st.text(min_size=1, max_size=60), completion=st.text(max_size=20), max_len=st.integers(1, 40))
def test_truncation_drops_or_cuts_the_prompt_from_the_left(tok, prompt, completion, max_len):
    ex = Example(prompt, completion, "prompt_completion")
    whole = encode_example(ex, tok, template="raw", max_seq_len=10**6)
    dropped = encode_example(ex, tok, template="raw", max_seq_len=max_len, truncation="drop")
    left = encode_example(ex, tok, template="raw", max_seq_len=max_len, truncation="left")
    if len(whole) <= max_len:
        assert dropped.input_ids == left.input_ids == whole.input_ids and not left.truncated
        return
    assert dropped is None
    n_completion = len(labelled(whole))
    if n_completion + 1 > max_len:  # BOS + completion + EOS cannot fit: never cut the completion
        assert left is None
        return
    assert left.truncated and len(left) == max_len
    assert left.input_ids[0] == tok.bos_id  # BOS kept
    assert left.input_ids[1:] == whole.input_ids[len(whole) - max_len + 1 :]  # the rest is the tail
    assert labelled(left) == labelled(whole)


# ------------------------------------------------------------------------------------ bundle
def test_prepare_data_on_the_demo_set(tok, tmp_path):
    bundle = prepare_data(
        os.path.join(DEMO, "train.jsonl"),
        tok,
        eval_path=os.path.join(DEMO, "test.jsonl"),
        max_seq_len=256,
        val_fraction=0.1,
        seed=0,
    )
    s = bundle.summary
    assert s["format"] == "chat" and s["records"] == 450 and s["exact_duplicates_removed"] == 0
    assert s["train_examples"] + s["val_examples"] == 450 - s["near_duplicates_removed"] - s["dropped_too_long"]
    assert s["val_examples"] == 45 and s["contaminated_prompts"] == 0
    assert s["train_label_tokens"] == sum(sum(x != -100 for x in e.labels) for e in bundle.train)
    assert len(bundle.train_examples) == len(bundle.train)
    # A planted duplicate, an overlong example and an eval prompt that leaked into training.
    with open(os.path.join(DEMO, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:40]
    with open(os.path.join(DEMO, "test.jsonl")) as f:
        leaked = json.loads(f.readline())
    long_row = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]}
    path = write(tmp_path, "train.jsonl", rows + [rows[3], long_row, leaked, "not json"])
    with pytest.raises(
        ContaminationError,
        match=r"^1 of 90 prompts in .*test.jsonl also appear in the training "
        r"data .*--allow-contamination",
    ):
        prepare_data(path, tok, eval_path=os.path.join(DEMO, "test.jsonl"), max_seq_len=256, skip_bad_lines=True)
    b = prepare_data(
        path,
        tok,
        eval_path=os.path.join(DEMO, "test.jsonl"),
        max_seq_len=256,
        skip_bad_lines=True,
        allow_contamination=True,
        val_fraction=0.0,
    )
    s = b.summary
    assert (s["exact_duplicates_removed"], s["dropped_too_long"], s["bad_lines_skipped"]) == (1, 1, 1)
    assert s["contaminated_prompts"] == 1 and s["train_examples"] == 41 and s["val_examples"] == 0
    b = prepare_data(path, tok, max_seq_len=256, skip_bad_lines=True, truncation="left", val_fraction=0.0)
    assert b.summary["truncated"] == 1 and b.summary["dropped_too_long"] == 0
    with pytest.raises(DataError, match=r"All training examples .* longer than --max-seq-len 8"):
        prepare_data(path, tok, max_seq_len=8, skip_bad_lines=True)


def test_bundled_tokenizer_matches_transformers(tok, ref):
    assert tok.vocab_size == len(ref) == 1024
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id) == (0, 1, 2)
    records, _ = load_records(os.path.join(DEMO, "test.jsonl"))
    for r in records[:20]:
        msgs = r.prompt + [{"role": "assistant", "content": r.completion}]
        assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False)
        assert tok.apply_chat_template(msgs, tokenize=True) == list(
            ref.apply_chat_template(msgs, tokenize=True, return_dict=False)
        )
        assert tok.encode(r.completion, True) == ref.encode(r.completion, add_special_tokens=True)


def test_templates_that_rewrite_history_or_disagree_with_their_prompt(tok):
    """Only the final turn is labelled when a template rewrites earlier turns; a template whose
    generation prompt is not a prefix of the answered conversation is rejected with the example named."""
    hides = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[hidden]{% else %}{{ m['content'] }}{% endif %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
    )
    t = Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_template=hides)
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    enc = encode_example(Example(msgs, "a2", "chat"), t)
    assert t.decode(labelled(enc), skip_special_tokens=False) == "a2<end_of_turn>\n<eos>"
    assert "[hidden]" in t.decode(enc.input_ids, skip_special_tokens=False)
    disagree = hides.replace("<start_of_turn>assistant\n{% endif %}", "<start_of_turn>model\n{% endif %}")
    t = Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_template=disagree)
    with pytest.raises(
        DataError,
        match=r"^d.jsonl:7: the chat template's prompt .* is not a prefix of the full "
        r"conversation.*--template raw",
    ):
        encode_example(Example(msgs, "a2", "chat", "d.jsonl:7"), t)


def test_prepare_data_needs_a_template_and_skips_rejected_conversations(tok, tmp_path):
    no_template = Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_template=None)
    path = write(tmp_path, "t.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(
        ValueError,
        match=r"no chat template, so --template chat cannot render prompts; pass "
        r"--template raw",
    ):
        prepare_data(path, no_template)
    assert prepare_data(path, no_template, template="raw", val_fraction=0).summary["train_examples"] == 1
    ok = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write(tmp_path, "c.jsonl", [ok, bad])
    with pytest.raises(DataError, match=r"c.jsonl:2: the chat template rejected this conversation"):
        prepare_data(path, tok, val_fraction=0)
    s = prepare_data(path, tok, val_fraction=0, skip_bad_lines=True).summary
    assert (s["train_examples"], s["bad_lines_skipped"]) == (1, 1)
