"""Progress: a live tqdm bar on a terminal, one plain line per update in a log or a pipe."""

import io
import sys

import pytest


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch, tty):
    from minilora.cli import Progress

    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = Progress(20)
    for step in (5, 10, 20):
        bar.update(step, f"loss {step / 10:.4f} | lr 1.00e-03 | 9 tok/s | peak 3 MB")
    bar.close()
    text = err.getvalue()
    if tty:  # tqdm redraws one line with \r: the counter and the postfix
        assert "\r" in text and "20/20" in text and "loss 2.0000 | lr 1.00e-03 | 9 tok/s | peak 3 MB" in text
    else:  # one line per update, nothing in between
        assert text.splitlines() == [
            f"step {s}/20 loss {s / 10:.4f} | lr 1.00e-03 | 9 tok/s | peak 3 MB" for s in (5, 10, 20)
        ]
