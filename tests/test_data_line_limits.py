"""Long data lines: the byte limit that skips a line before tokenizing never drops an example that
would fit, and a huge line is dropped unread.
"""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.data.encode import encode_example, max_line_bytes
from minilora.data.prepare import prepare_data
from minilora.data.records import Example


@pytest.fixture(scope="module")
def tok():
    from minilora.models.loader import load_model

    return load_model("tiny", quantize=None, dtype=torch.float32)[1]


@given(st.text(max_size=60), st.text(max_size=60), st.sampled_from(["chat", "raw"]), st.booleans())
def test_long_line_limit_never_drops_an_example_that_fits(tok, prompt, completion, template, ascii_only):
    """max_line_bytes is sound: any line whose example encodes to n tokens is at most
    max_line_bytes(tok, n) bytes, however its text is escaped (control characters, non-ASCII)."""
    line = json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=ascii_only).encode()
    enc = encode_example(Example(prompt, completion, "prompt_completion"), tok, template, max_seq_len=10**6)
    assert len(line) <= max_line_bytes(tok, len(enc))


def test_a_huge_line_is_dropped_before_tokenizing(tmp_path, tok):
    """Reproduction 6: one long line used to be tokenized whole (a 50 MB line: 70 s, 8.2 GB)."""
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    rows[3] = {"prompt": "x " * 200_000, "completion": "y"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    encode = tok.encode
    tok.encode = lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    try:
        data = prepare_data(path, tok, template="raw", max_seq_len=64, val_fraction=0, dedup=False, skip_bad_lines=True)
    finally:
        del tok.encode
    assert max(seen) < 1000  # the long line was never tokenized
    assert data.summary["dropped_too_long"] == 1 and len(data.train) == 7
    assert data.summary["long_lines_dropped_at"] == "d.jsonl lines 4"
