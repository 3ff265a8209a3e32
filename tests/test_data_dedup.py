"""minilora.data.dedup: dedup, split and contamination check, against brute-force references.

The reference Jaccard here is computed from Python sets of 5-character substrings, independent
of the module's hashing and MinHash.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.dedup import dedup, example_text, normalize_text
from minilora.data.holdout import ContaminationError, assert_no_contamination, contamination_check, split
from minilora.data.records import Example


def ref_jaccard(a: str, b: str, k: int = 5) -> float:
    sa = {a[i : i + k] for i in range(max(len(a) - k + 1, 1))}
    sb = {b[i : i + k] for i in range(max(len(b) - k + 1, 1))}
    return len(sa & sb) / len(sa | sb)


def ex(prompt, completion="c", i=0):
    return Example(prompt, completion, "prompt_completion", f"f:{i}")


@st.composite
def corpora(draw):
    """Distinct base texts, plus planted exact copies (case/space changed) and 1-character edits."""
    alphabet = st.characters(codec="utf-8", exclude_categories=("Cs",))
    short, long = st.text(alphabet, max_size=40), st.text(alphabet, min_size=150, max_size=400)
    bases = draw(st.lists(st.one_of(short, long), min_size=1, max_size=12))
    items = [ex(b, i=i) for i, b in enumerate(bases)]
    for j in range(draw(st.integers(1, 6))):
        src = draw(st.sampled_from(bases))
        kind = draw(st.sampled_from(["exact", "edit"]))
        if kind == "exact":
            text = "  " + src.upper().replace(" ", "   ") + " "
        else:
            pos = draw(st.integers(0, max(len(src) - 1, 0)))
            text = src[:pos] + draw(st.sampled_from("xyz#")) + src[pos + 1 :]
        items.insert(draw(st.integers(0, len(items))), ex(text, i=100 + j))
    return items


@settings(max_examples=30)
@given(items=corpora(), threshold=st.sampled_from([0.7, 0.9, 1.0]))
def test_dedup_only_removes_true_duplicates_and_is_idempotent(items, threshold):
    kept, report = dedup(items, near_threshold=threshold)
    assert report.n_in == len(items) and report.n_kept == len(kept)
    assert report.exact_removed + report.near_removed == len(items) - len(kept)
    kept_ids = {id(k) for k in kept}
    assert [k for k in items if id(k) in kept_ids] == kept  # order preserved, a sub-list
    kept_texts = [example_text(k) for k in kept]
    for item in items:
        if id(item) in kept_ids:
            continue
        t = example_text(item)
        # Never removed without a kept partner that really is within the threshold.
        assert any(t == k or ref_jaccard(t, k) >= threshold for k in kept_texts), t
    again, report2 = dedup(kept, near_threshold=threshold)
    assert again == kept and report2.exact_removed == report2.near_removed == 0
    # Recall: no two kept texts are clearly within the threshold (planted edits of long texts are).
    for i, a in enumerate(kept_texts):
        for b in kept_texts[:i]:
            assert a != b
            assert ref_jaccard(a, b) < min(threshold + 0.04, 1.0) or threshold == 1.0, (a, b)


def test_dedup_normalizes_and_reports():
    items = [
        ex("Hello   World", "Yes", 1),
        ex("hello world", "yes", 2),
        ex("ｈｅｌｌｏ world", "YES", 3),
        ex("a completely different prompt here", "no", 4),
    ]
    kept, rep = dedup(items)
    assert [k.source for k in kept] == ["f:1", "f:4"] and rep.exact_removed == 2
    assert rep.pairs[0] == ("f:2", "f:1", 1.0)
    assert normalize_text("  A\u00a0 B\tC\n") == "a b c"
    assert dedup(items, near_threshold=None)[1].near_removed == 0
    with pytest.raises(ValueError, match=r"near_threshold must be in \(0, 1\], got 1.5"):
        dedup(items, near_threshold=1.5)


@settings(max_examples=25)
@given(
    labels=st.lists(
        st.sampled_from(["pos", "neg", "neutral", "a long free-form answer " * 6]), min_size=2, max_size=80
    ),
    frac=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    seed=st.integers(0, 3),
    stratify=st.sampled_from(["auto", True, False]),
)
def test_split_deterministic_disjoint_and_stratified(labels, frac, seed, stratify):
    items = [ex(f"prompt {i}", lab, i) for i, lab in enumerate(labels)]
    train, val = split(items, val_fraction=frac, seed=seed, stratify=stratify)
    again = split(items, val_fraction=frac, seed=seed, stratify=stratify)
    assert (train, val) == again
    assert {id(x) for x in train}.isdisjoint({id(x) for x in val})
    assert sorted(id(x) for x in train + val) == sorted(id(x) for x in items)
    assert [x for x in items if any(x is t for t in train)] == train  # input order kept
    n = len(items)
    n_val = 0 if frac == 0 else min(max(round(n * frac), 1), n - 1)
    assert len(val) == n_val
    if stratify is True:
        for lab in set(labels):
            share = n_val * labels.count(lab) / n
            assert abs(sum(v.completion == lab for v in val) - share) < 1 + 1e-9


def test_split_seed_changes_the_split_and_rejects_bad_fraction():
    items = [ex(f"p{i}", "abc"[i % 3], i) for i in range(60)]
    a, b = split(items, 0.2, seed=0)[1], split(items, 0.2, seed=1)[1]
    assert a != b
    assert sorted(v.completion for v in a) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # auto-stratified: exact shares
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split(items, 1.0)


@settings(max_examples=25)
@given(
    prompts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=20, unique_by=normalize_text),
    data=st.data(),
)
def test_contamination_catches_a_planted_overlap(prompts, data):
    prompts = [p for p in prompts if normalize_text(p)]
    if len(prompts) < 2:
        return
    train = [ex(p, "x", i) for i, p in enumerate(prompts[:-1])]
    held = [ex(prompts[-1], "y", 0)]
    assert contamination_check(train, held) == []
    assert assert_no_contamination(train, held) == []
    j = data.draw(st.integers(0, len(train) - 1))
    planted = ex("  " + prompts[j].upper() + "\n", "different answer", 1)
    held.append(planted)
    (hit,) = contamination_check(train, held)
    assert (hit.eval_index, hit.train_index) == (1, j) or normalize_text(prompts[hit.train_index]) == normalize_text(
        prompts[j]
    )
    with pytest.raises(
        ContaminationError,
        match=r"^1 of 2 prompts in test.jsonl also appear in the training data "
        r"\(first: f:1 = f:\d+\); .*--allow-contamination",
    ):
        assert_no_contamination(train, held, name="test.jsonl")
    assert len(assert_no_contamination(train, held, allow=True)) == 1


def test_contamination_compares_chat_prompts_and_texts():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    train = [Example(msgs, "4", "chat"), Example("", "some document", "text")]
    held = [
        Example([dict(m) for m in msgs], "four", "chat"),
        Example("", "Some  Document", "text"),
        Example([msgs[1]], "4", "chat"),
    ]
    hits = contamination_check(train, held)
    assert [(h.eval_index, h.train_index) for h in hits] == [(0, 0), (1, 1)]
