"""A run folder is written only by train.py: a new or empty folder, or a run it wrote before (with
--resume); anything else is refused with one sentence naming --out, and nothing in it changes.
"""

import json
import os
import re
import shutil

import pytest
from cli_runs import one_sentence, train_here, tree, write_tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from test_user_errors import DEMO_TRAIN, eval_here

from minilora.cli import EXIT_USAGE, UsageError
from minilora.train import rundir
from minilora.train.config import TrainConfig

FOLDER_STATES = ["missing", "empty", "file", "foreign", "model_folder", "run_no_ckpt", "run_ckpt"]


def make_folder(path, state):
    if state == "missing":
        return
    if state == "file":
        path.write_text("notes")
        return
    path.mkdir()
    if state == "foreign":
        (path / "adapter").mkdir()
        (path / "adapter" / "README.md").write_text("mine")
    if state == "model_folder":  # a config.json that train.py did not write
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    if state in ("run_no_ckpt", "run_ckpt"):
        (path / "config.json").write_text(TrainConfig(out=str(path)).to_json())
    if state == "run_ckpt":
        ck = path / "checkpoints" / "step_0000004"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text(json.dumps({"step": 4}))
        (path / "checkpoints" / "latest").write_text("step_0000004")


@given(st.sampled_from(FOLDER_STATES), st.booleans())
def test_run_folder_contract(tmp_path_factory, state, resume):
    """train.py writes into a new or empty folder or one of its own runs; a run with checkpoints only
    with --resume; anything else is refused with one sentence naming --out, and nothing changes."""
    out = tmp_path_factory.mktemp("c") / "out"
    make_folder(out, state)
    before = tree(out) if out.is_dir() else None
    allowed = state in ("missing", "empty", "run_no_ckpt") or (state == "run_ckpt" and resume)
    if allowed:
        ckpt, old = rundir.check_run_folder(str(out), resume)
        assert (ckpt is not None) == (state == "run_ckpt")
        assert (old is not None) == state.startswith("run")
    else:
        with pytest.raises(UsageError, match=re.escape(str(out))) as e:
            rundir.check_run_folder(str(out), resume)
        assert str(e.value).endswith(".") and "\n" not in str(e.value)
    assert (tree(out) if out.is_dir() else None) == before


def test_out_at_a_foreign_folder_touches_nothing(tmp_path, capsys):
    """Reproduction 2: config.json, metrics.jsonl and adapter/ of a folder train.py did not write
    used to be overwritten (adapter/README.md gone), exit 0."""
    out = tmp_path / "mine"
    make_folder(out, "foreign")
    (out / "metrics.jsonl").write_text("my notes\n")
    before = tree(out)
    code, _, err = train_here(capsys, out, "--max-steps", "2")
    assert code == EXIT_USAGE and "--out" in one_sentence(err)
    assert tree(out) == before and sorted(os.listdir(out)) == ["adapter", "metrics.jsonl"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_a_run_started_with_relative_paths_is_found_from_any_folder(tmp_path, capsys, monkeypatch, llama_dir):
    """config.json recorded --model, --data and --eval-data as typed, so eval.py and --resume run from
    another folder read them relative to that folder (or asked the hub for 'models/llama'). They are
    recorded absolute; a resume that spells them relative again, from the first folder, is the same run."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(DEMO_TRAIN, work / "data" / "train.jsonl")
    shutil.copy(DEMO_TRAIN.replace("train.jsonl", "test.jsonl"), work / "data" / "test.jsonl")
    shutil.copytree(llama_dir, work / "models" / "llama")
    rel = ["--model", "models/llama", "--data", "data/train.jsonl", "--eval-data", "data/test.jsonl"]
    monkeypatch.chdir(work)
    code, _, err = train_here(capsys, "run", *rel, "--max-steps", "2", "--save-every", "1", "--eval-generate", "2")
    assert code == 0, err
    recorded = json.loads((work / "run" / "config.json").read_text())
    assert (recorded["model"], recorded["data"]) == (str(work / "models" / "llama"), str(work / "data" / "train.jsonl"))
    code, _, err = train_here(capsys, "run", *rel, "--max-steps", "3", "--resume")  # the same files, spelled relative
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, err = eval_here(capsys, "--adapter", str(work / "run"), "--limit", "1", "--shots", "1")
    assert code == 0, err
    code, _, err = train_here(capsys, work / "run", "--max-steps", "4", "--resume")
    assert code == 0, err
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == 4
