"""Ctrl-C outside train.py's loop (loading, held-out scoring, the final validation and adapter) and in
eval.py ends in one sentence and exit 3, not a KeyboardInterrupt traceback; what was written stays whole,
and `train.py --out RUN --resume` then runs the training to its end. (Inside the loop a SIGINT is a
request the step finishes first: tests/test_train.py.)"""

import json
import os
import signal
import time

import pytest
from cli_runs import one_sentence, train_here
from test_user_errors import eval_here

from minilora.cli import EXIT_INTERRUPTED, run_main


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_run_main_turns_ctrl_c_into_one_sentence(capsys, monkeypatch):
    assert run_main(lambda: ctrl_c(), interrupted="nothing was written") == EXIT_INTERRUPTED
    assert one_sentence(capsys.readouterr().err) == "error: interrupted; nothing was written."
    assert run_main(lambda: ctrl_c(), interrupted=lambda: "said late") == EXIT_INTERRUPTED
    assert one_sentence(capsys.readouterr().err) == "error: interrupted; said late."
    before = signal.getsignal(signal.SIGTERM)
    assert run_main(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5) or 0) == EXIT_INTERRUPTED
    assert one_sentence(capsys.readouterr().err).startswith("error: interrupted;")  # SIGTERM is Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setenv("MINILORA_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        run_main(lambda: ctrl_c())


@pytest.mark.parametrize("where", ["minilora.models.loader.load_model", "minilora.lora.adapter.save_adapter"])
def test_train_py_interrupted_before_or_after_the_loop_resumes(tmp_path, capsys, monkeypatch, where):
    """Before the first step (loading the model) the run folder holds config.json only; after the last
    (writing the adapter) it holds the last checkpoint. Either way one sentence naming the resume
    command, exit 3, and the resume finishes the run with its adapter and summary."""
    out = tmp_path / "run"
    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", ctrl_c)
    code, _, err = train_here(capsys, out, "--max-steps", "2", "--save-every", "1")
    assert code == EXIT_INTERRUPTED
    line = one_sentence(err)
    assert f"`python train.py --out {out} --resume` continues it" in line
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    monkeypatch.undo()
    code, _, err = train_here(capsys, out, "--resume")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_eval_py_interrupted_writes_no_report(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train_here(capsys, run, "--max-steps", "1")[0] == 0
    monkeypatch.setattr("minilora.models.loader.load_model", ctrl_c)
    code, err = eval_here(capsys, "--adapter", str(run), "--limit", "1", "--out", str(tmp_path / "report"))
    assert code == EXIT_INTERRUPTED
    assert one_sentence(err) == "error: interrupted; nothing was written; run the same command again."
    assert not (tmp_path / "report").exists() and not (run / "report.md").exists()
