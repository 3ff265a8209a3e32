"""minilora.eval.evaluate: perplexity against transformers' own loss, exact/structured match on hand-made
cases (malformed JSON included), few-shot prompts, final-completion label masks, shot selection."""

import math
import os

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import EncodedExample, encode_example
from minilora.data.packing import IGNORE
from minilora.data.records import Example
from minilora.eval.evaluate import (
    encode_for_eval,
    exact_match,
    few_shot_example,
    final_completion_only,
    parse_json,
    perplexity,
    score,
    select_shots,
    structured_match,
)
from minilora.models.loader import load_model
from minilora.models.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOK_DIR)


# ------------------------------------------------------------------------------- perplexity
def _hf_model(family: str, seed: int):
    torch.manual_seed(seed)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=8,
            final_logit_softcapping=5.0,
            initializer_range=0.2,
            attn_implementation="eager",
        )
        return transformers.Gemma3ForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_pairs(tmp_path_factory):
    """{family: (transformers model, our model loaded from its save_pretrained folder)}."""
    pairs = {}
    for family in ("gemma3", "llama"):
        hf = _hf_model(family, seed=3)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        ours, _ = load_model(str(path), quantize=None, dtype=torch.float32)
        pairs[family] = (hf, ours)
    return pairs


@st.composite
def encoded_sets(draw):
    n = draw(st.integers(1, 5))
    out = []
    for _ in range(n):
        T = draw(st.integers(2, 14))
        ids = draw(st.lists(st.integers(0, 96), min_size=T, max_size=T))
        start = draw(st.integers(1, T - 1))  # position 0 never carries a label (nothing predicts it)
        labels = [IGNORE] * start + ids[start:]
        holes = draw(st.lists(st.integers(start, T - 1), max_size=2))  # masked tokens inside the completion
        for h in holes:
            labels[h] = IGNORE
        out.append(EncodedExample(ids, labels))
    if all(all(t == IGNORE for t in e.labels[1:]) for e in out):
        out[0].labels[-1] = out[0].input_ids[-1]
    return out


@settings(max_examples=20)  # each example evaluates drawn data through two models
@given(family=st.sampled_from(["gemma3", "llama"]), encoded=encoded_sets(), batch_size=st.integers(1, 4))
def test_perplexity_is_exp_of_transformers_masked_mean_loss(model_pairs, family, encoded, batch_size):
    """One right-padded batch through transformers with labels (-100 on prompt, holes and padding):
    its loss is the mean CE over labelled tokens; ours batches by length, in any batch size."""
    hf, ours = model_pairs[family]
    T = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), T, dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], labels[i, : len(e)], mask[i, : len(e)] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    with torch.no_grad():
        ref = math.exp(hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    got = perplexity(ours, encoded, batch_size=batch_size, pad_id=0)
    assert got == pytest.approx(ref, rel=2e-5)


def test_perplexity_with_nothing_labelled_says_so(model_pairs):
    _, ours = model_pairs["llama"]
    with pytest.raises(ValueError, match="every label is masked"):
        perplexity(ours, [EncodedExample([1, 2, 3], [IGNORE, IGNORE, IGNORE])])


# ------------------------------------------------------------------------------- matching
@pytest.mark.parametrize(
    "pred, ref, exact, structured, parsed",
    [
        ('{"a": 1}', '{"a": 1}', True, True, True),
        ('  {"a": 1}\n', '{"a": 1}', True, True, True),  # whitespace around: still exact
        ('{ "a" : 1 }', '{"a": 1}', False, True, True),  # formatting differs, value equal
        ('{"b": [1, 2], "a": "x"}', '{"a": "x", "b": [1, 2]}', False, True, True),  # key order
        ('{"a": 1.0}', '{"a": 1}', False, True, True),  # the same JSON number
        ('{"a": true}', '{"a": 1}', False, False, True),  # a boolean is not a number
        ('{"b": [2, 1]}', '{"b": [1, 2]}', False, False, True),  # list order matters
        ('{"a": 1, "b": 2}', '{"a": 1}', False, False, True),  # extra key
        ('```json\n{"a": 1}\n```', '{"a": 1}', False, True, True),  # one Markdown fence is unwrapped
        ('```\n{"a": 1}```', '{"a": 1}', False, True, True),
        ('{"a": 1', '{"a": 1}', False, False, False),  # malformed: unclosed
        ("{'a': 1}", '{"a": 1}', False, False, False),  # malformed: single quotes
        ('{"a": 1} and more', '{"a": 1}', False, False, False),  # trailing text
        ('{"a": 1}{"a": 1}', '{"a": 1}', False, False, False),
        ("", '{"a": 1}', False, False, False),  # empty output
        ('```json\n{"a": 1}', '{"a": 1}', False, False, False),  # unterminated fence
        ("[" * 5000, "[]", False, False, False),  # deep nesting must not crash
        ("positive", "positive", True, False, False),  # plain text: exact only
        ('"positive"', "positive", False, False, True),  # reference not JSON: never structured
    ],
)
def test_exact_and_structured_match_hand_made(pred, ref, exact, structured, parsed):
    assert exact_match(pred, ref) is exact
    assert structured_match(pred, ref) == (structured, parsed)
    assert parse_json(pred)[0] is parsed


def test_score_counts_parse_failures_and_json_references():
    preds = ['{"t": "a"}', '{"t": "b"', "nope", '{"t":"d"}', "x"]
    refs = ['{"t": "a"}', '{"t": "b"}', '{"t": "c"}', '{"t": "d"}', "x"]
    s = score(preds, refs)
    assert s == {
        "n": 5,
        "exact_match": 2 / 5,
        "structured_match": 2 / 5,
        "json_parse_failures": 3,
        "json_references": 4,
    }
    with pytest.raises(ValueError, match="empty"):
        score([], [])
    with pytest.raises(ValueError, match="pair up"):
        score(["a"], ["a", "b"])


# ------------------------------------------------------------------------------- few-shot prompts
SYS = {"role": "system", "content": "Classify."}
SHOTS = [Example([SYS, {"role": "user", "content": "u1"}], "c1", "chat"), Example("p2", "c2", "prompt_completion")]
EX = Example([SYS, {"role": "user", "content": "q"}], "answer", "chat")


def test_few_shot_chat_keeps_one_system_message_first_and_shots_as_turns():
    got = few_shot_example(EX, SHOTS, "chat")
    assert got.prompt == [
        SYS,
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "c1"},
        {"role": "user", "content": "p2"},
        {"role": "assistant", "content": "c2"},
        {"role": "user", "content": "q"},
    ]
    assert got.completion == "answer" and EX.prompt == [SYS, {"role": "user", "content": "q"}]  # not mutated
    no_sys = few_shot_example(Example("q", "a", "prompt_completion"), SHOTS, "chat")
    assert no_sys.prompt[0] == {"role": "user", "content": "u1"}
    assert no_sys.prompt[-1] == {"role": "user", "content": "q"}


def test_few_shot_raw_concatenates():
    got = few_shot_example(Example("Q: 3?\nA: ", "3", "prompt_completion"), SHOTS, "raw")
    assert got.prompt == "system: Classify.\nuser: u1\nassistant: c1\n\np2c2\n\nQ: 3?\nA: "


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_only_the_final_completion_is_scored(tok, template):
    """A few-shot (or multi-turn) encoding labels exactly the tokens the plain example labels."""
    plain, _ = encode_for_eval([EX], tok, template, 2048)
    shot, _ = encode_for_eval([few_shot_example(EX, SHOTS, template)], tok, template, 2048)
    lab = lambda e: [t for t in e.labels if t != IGNORE]  # noqa: E731
    assert lab(shot[0]) == lab(plain[0]) == lab(encode_example(EX, tok, template))
    assert tok.decode(lab(shot[0]), skip_special_tokens=False).startswith("answer")
    assert len(shot[0]) > len(plain[0])


def test_final_completion_only_and_too_long(tok):
    assert final_completion_only([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8]) == [IGNORE] * 5 + [7, 8]
    assert final_completion_only([IGNORE, IGNORE]) == [IGNORE, IGNORE]
    long = Example("x " * 50, "y " * 30, "prompt_completion")
    enc, dropped = encode_for_eval([long, EX], tok, "raw", 20)  # completion alone > 20 tokens: left out
    assert dropped == 1 and len(enc) == 1


def test_select_shots_is_seeded_and_excludes_eval_prompts():
    train = [Example(f"p{i}", f"c{i}", "prompt_completion") for i in range(20)]
    evals = [Example(" P3 ", "x", "prompt_completion")]  # the same prompt after normalization
    a = select_shots(train, 5, seed=1, exclude=evals)
    assert a == select_shots(train, 5, seed=1, exclude=evals) and len(a) == 5
    assert all(s.prompt != "p3" for s in select_shots(train, 19, seed=2, exclude=evals))
    assert len(select_shots(train, 50, exclude=evals)) == 19


@given(st.floats(1.0, 1e30, allow_nan=False))
def test_perplexity_prints_to_four_significant_digits_or_better_and_reads_back(ppl):
    # Tables print perplexity to three decimals, and in scientific notation from 10^5 up (an untrained
    # base's passes 10^10, which three decimals would print as 11 digits). Either form parses back to
    # within its last printed digit.
    from minilora.eval.report import format_metric

    text = format_metric("perplexity", ppl)
    assert len(text) <= 10
    assert abs(float(text) - ppl) <= (5e-4 if ppl < 1e5 else 5e-4 * 10 ** math.floor(math.log10(ppl)))


def test_metric_formats_rates_and_missing_values():
    from minilora.eval.report import format_metric

    assert format_metric("exact_match", 0.125) == "12.5%"
    assert format_metric("perplexity", None) == "n/a" and format_metric("perplexity", math.inf) == "inf"
    assert format_metric("perplexity", 75785505595.446) == "7.579e+10"
