"""Every error a user (or the machine) can cause ends in one sentence naming the input and what to do,
exit 2, with nothing written, and nothing already written lost: bad data lines, damaged adapters,
checkpoints and run configs, a read-only --out or one under a file, a full disk while checkpointing,
flags that used to fail only after config.json was written, and a truncated GGUF LoRA on validation
(a failed validation: exit 1). Each case reproduces the traceback or the misleading message it had.
"""

import errno
import importlib.util
import json
import os
import shutil

import pytest
import torch
from cli_runs import ROOT, one_sentence, temps, train, train_cli, train_here, tree, write_tiny_llama

from minilora.cli import EXIT_FAILED, EXIT_USAGE
from minilora.train.checkpoint import latest_checkpoint

_spec = importlib.util.spec_from_file_location("minilora_eval_cli_errors", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)

DEMO_TRAIN = os.path.join(ROOT, "examples", "demo", "train.jsonl")


def eval_here(capsys, *argv) -> tuple[int, str]:
    code = eval_cli.main(list(argv))
    return code, capsys.readouterr().err


def first_lines(n: int) -> str:
    with open(DEMO_TRAIN) as f:
        return "".join(f.readlines()[:n])


# ------------------------------------------------------------------------------ flags
@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "gpu"], "--device gpu is not a device; pass auto, cpu, cuda or cuda:N."),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch"),
        ),
        (["--out", os.path.join(ROOT, "pyproject.toml")], "is a file, not a folder"),
        (["--data", os.path.join(ROOT, "examples")], "--data " + os.path.join(ROOT, "examples") + " is a folder"),
        (["--lora-r", "0"], "--lora-r must be at least 1"),
        (["--data", "/nonexistent.jsonl"], "--data /nonexistent.jsonl does not exist"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--optimizer-budget", "lots"], "--optimizer-budget"),
    ],
)
def test_bad_flags_are_one_sentence_and_write_nothing(tmp_path, capsys, args, message):
    before = os.listdir(tmp_path)
    argv = ["--out", str(tmp_path / "x"), *args] if "--out" not in args else args
    code = train_cli.main(argv)
    assert code == EXIT_USAGE and message in one_sentence(capsys.readouterr().err)
    assert os.listdir(tmp_path) == before


# ------------------------------------------------------------------------------ data lines
@pytest.mark.parametrize("skip", [False, True])
def test_deeply_nested_json_line_is_a_bad_line(tmp_path, capsys, skip):
    """'[' * 20000 raised RecursionError (a traceback), with --skip-bad-lines too."""
    from minilora.data.records import load_records

    path = tmp_path / "deep.jsonl"
    path.write_text(first_lines(20) + "[" * 20000 + "\n" + first_lines(40)[-200:].split("\n", 1)[1])
    if skip:
        records, report = load_records(path, skip_bad_lines=True)
        assert (
            report.n_skipped == 1
            and "line 21: malformed JSON (arrays or objects nested too deeply" in (report.skipped[0])
        )
        return
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--data", str(path), "--max-steps", "2")
    line = one_sentence(err)
    assert code == EXIT_USAGE and f"{path}, line 21: malformed JSON" in line and "--skip-bad-lines" in line
    assert not out.exists()


def test_json_errors_that_end_in_at_are_not_doubled(tmp_path):
    """json says "Unterminated string starting at"; the message said "starting at at column"."""
    from minilora.data.records import DataError, load_records
    from minilora.lora.adapter import AdapterError
    from minilora.lora.adapter_files import read_adapter_config

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b}\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "Unterminated string starting at column 31" in str(e.value) and "at at" not in str(e.value)
    (tmp_path / "adapter_config.json").write_text('{"r": "8}')
    with pytest.raises(AdapterError) as e:
        read_adapter_config(str(tmp_path))
    assert "starting at line 1 column 7" in str(e.value) and "at at" not in str(e.value)


# ---------------------------------------------------------------------- a finished run, damaged
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished train.py run (checkpoints at steps 2 and 4, adapter/), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    p = train(out, "--max-steps", "4", "--save-every", "2", "--log-every", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def damage(path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "garbled": bytes(range(256)) * 4}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "garbled"])
def test_damaged_adapter_weights_in_eval_and_export(run_copy, tmp_path, capsys, how):
    """A SafetensorError traceback, in eval.py and in eval.py export, after loading the model."""
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    damage(weights, how)
    before = tree(run_copy)
    code, err = eval_here(capsys, "--adapter", str(run_copy), "--limit", "2", "--device", "cpu")
    line = one_sentence(err)
    assert code == EXIT_USAGE and str(weights) in line and "loading" not in err
    out = tmp_path / "merged"
    code, err = eval_here(capsys, "export", "--adapter", str(run_copy), "--out", str(out))
    assert code == EXIT_USAGE and str(weights) in one_sentence(err)
    assert tree(run_copy) == before and not out.exists()


def test_adapter_config_rank_that_disagrees_with_the_weights_is_refused_before_loading(run_copy, capsys):
    """r in adapter_config.json that is not the tensors' rank (PEFT refuses such an adapter, see
    test_adapter.py) was loaded silently, with the scale alpha / (the tensors' rank)."""
    cfg_path = run_copy / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))
    code, err = eval_here(capsys, "--adapter", str(run_copy), "--limit", "2", "--device", "cpu")
    line = one_sentence(err)
    assert code == EXIT_USAGE and f"rank {cfg['r'] * 2} but its lora_A / lora_B have rank {cfg['r']}" in line
    assert "loading" not in err  # from the safetensors header, before the model is loaded


@pytest.mark.parametrize(
    "file, how",
    [
        ("optimizer.safetensors", "truncated"),
        ("rng.safetensors", "empty"),
        ("adapter/adapter_model.safetensors", "garbled"),
        ("state.json", "truncated"),
    ],
)
def test_damaged_checkpoint_on_resume_names_the_file(run_copy, capsys, file, how):
    """A truncated optimizer.safetensors was a SafetensorError traceback after config.json had been
    rewritten; a damaged state.json, json's "Expecting value ..." naming no file."""
    newest = latest_checkpoint(str(run_copy))
    assert newest.endswith("step_0000004")
    damage(run_copy / "checkpoints" / "step_0000004" / file, how)
    before = tree(run_copy)
    code, _, err = train_here(capsys, run_copy, "--resume", "--max-steps", "6")
    line = one_sentence(err)
    assert code == EXIT_USAGE and os.path.join(newest, file) in line
    assert "step_0000002" in line  # the way back: the previous checkpoint
    assert tree(run_copy) == before


def test_damaged_run_config_is_named_not_called_foreign(run_copy, capsys):
    """A garbled config.json was reported as "files that train.py did not write" (and in eval.py as
    json's bare "Expecting ..." message)."""
    cfg = run_copy / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    before = tree(run_copy)
    code, _, err = train_here(capsys, run_copy, "--resume", "--max-steps", "6")
    line = one_sentence(err)
    assert code == EXIT_USAGE and f"{cfg} is damaged" in line and "did not write" not in line
    code, err = eval_here(capsys, "--adapter", str(run_copy), "--limit", "2")
    assert code == EXIT_USAGE and f"{cfg} is damaged" in one_sentence(err)
    assert tree(run_copy) == before


# ---------------------------------------------------------------------------- where --out is
def test_out_under_a_file(tmp_path, capsys):
    """--out notes.txt/run: "[Errno 20] Not a directory: '...'", which names no flag."""
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = train_here(capsys, tmp_path / "notes.txt" / "run", "--max-steps", "2")
    line = one_sentence(err)
    assert code == EXIT_USAGE and "--out" in line and f"{tmp_path / 'notes.txt'}, which is a file" in line
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def read_only(monkeypatch, folder) -> None:
    """Make `folder` refuse new entries: chmod, and (root ignores modes) EACCES from os.open / os.mkdir."""
    folder.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir
    inside = lambda path: os.path.abspath(path).startswith(str(folder) + os.sep)  # noqa: E731

    def refuse(real):
        def call(path, *a, **k):
            if inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real(path, *a, **k)

        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))


def test_read_only_out(tmp_path, capsys, monkeypatch):
    """A PermissionError traceback from the first write (config.json)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    try:
        code, _, err = train_here(capsys, ro / "run", "--max-steps", "2")
    finally:
        ro.chmod(0o755)
    line = one_sentence(err)
    assert code == EXIT_USAGE and f"--out {ro / 'run'} cannot be written" in line
    assert os.listdir(ro) == []


@pytest.mark.parametrize("where", ["state.json", "safetensors"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch, where):
    """ENOSPC while checkpoint 4 is written: an OSError traceback, and its temp folder stayed. Now one
    sentence; checkpoint 2 intact and still `latest`; no temp left; --resume continues from it."""
    import safetensors.torch

    import minilora.fileio
    from minilora.train.checkpoint import check_checkpoint

    def full(real):
        def call(*a, **k):
            path = str(a[1] if where == "safetensors" else a[0])
            if "step_0000004" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real(*a, **k)

        return call

    if where == "state.json":
        monkeypatch.setattr(minilora.fileio, "write_json", full(minilora.fileio.write_json))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full(safetensors.torch.save_file))
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--max-steps", "6", "--save-every", "2")
    monkeypatch.undo()
    line = one_sentence(err)
    assert code == EXIT_USAGE and "No space left on device" in line and "step_0000004" in line
    assert "step_0000002 is intact" in line and "--resume" in line
    assert temps(out) == [] and latest_checkpoint(str(out)).endswith("step_0000002")
    assert check_checkpoint(latest_checkpoint(str(out)))["step"] == 2
    code, _, err = train_here(capsys, out, "--resume", "--max-steps", "6", "--save-every", "2")
    assert code == 0, err[-3000:]  # also: the failed run's lock went with it


# --------------------------------------------------- refused before config.json, not after it
@pytest.mark.parametrize(
    "args, flag",
    [
        (["--lora-targets", "foo_proj"], "--lora-targets"),
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--log-every", "0"], "--log-every"),  # was a ZeroDivisionError after config.json
        (["--seed", "-1"], "--seed"),  # was numpy's "expected non-negative integer"
        # accepted silently (exit 0): a rising schedule, a zero scale, clipping off, every checkpoint kept
        (["--min-lr-ratio", "-1"], "--min-lr-ratio"),
        (["--lora-alpha", "0"], "--lora-alpha"),
        (["--lora-alpha", "-16"], "--lora-alpha"),
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--eval-every", "-5"], "--eval-every"),
        (["--out", ""], "--out is empty"),  # was "--out  cannot be written (No such file or directory)"
        # accepted silently: early stopping that can never fire
        (["--early-stopping", "2", "--eval-every", "0"], "--early-stopping 2 counts validations"),
        (["--early-stopping", "2", "--eval-every", "5", "--val-fraction", "0"], "there is no validation set"),
    ],
)
def test_refused_flags_write_nothing(tmp_path, capsys, args, flag):
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--max-steps", "2", *args)
    assert code == EXIT_USAGE and flag in one_sentence(err)
    assert not out.exists()


# ------------------------------------------------------------------------- GGUF LoRA read back
def test_truncated_gguf_lora_fails_validation_in_one_sentence(tmp_path, capsys, monkeypatch):
    """A GGUF LoRA cut short before its read-back gave numpy's "mmap length is greater than file
    size" (exit 2); it is a failed validation: one sentence, exit 1."""
    from test_gguf import make_run

    import minilora.export.gguf as G

    _, run = make_run(tmp_path, "llama-t5")
    real = G.write_gguf

    def write_then_truncate(out, *a, **k):
        path = real(out, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
        return path

    monkeypatch.setattr(G, "write_gguf", write_then_truncate)
    out = tmp_path / "lora.gguf"
    code, err = eval_here(capsys, "export", "--adapter", run, "--out", str(out), "--format", "gguf-lora")
    line = one_sentence(err)
    assert code == EXIT_FAILED and f"{out} could not be read back" in line and "do not serve it" in line


# ------------------------------------------------------------------ the model and eval data, checked first
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def model_copy(llama_dir, tmp_path, how: str):
    d = tmp_path / "model"
    shutil.copytree(llama_dir, d)
    weights = d / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return d


@pytest.mark.parametrize("how, said", [("no weights", "has no *.safetensors"), ("truncated", "truncated or corrupt")])
def test_model_without_whole_weights_is_refused_before_the_run_folder(llama_dir, tmp_path, capsys, how, said):
    """The loader's sentence came after the run folder (its lock and config.json) was written."""
    model = model_copy(llama_dir, tmp_path, how)
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--model", str(model), "--data", DEMO_TRAIN, "--max-steps", "1")
    assert code == EXIT_USAGE and said in one_sentence(err)
    assert not out.exists()


@pytest.mark.parametrize("name", ["./nope", "../nope/model", "~/nope-model"])
def test_a_missing_relative_model_path_is_named_as_a_path(tmp_path, capsys, name):
    """'./nope' matched the hub's repo id pattern: "downloading './nope' from the Hugging Face hub failed"."""
    code, _, err = train_here(capsys, tmp_path / "run", "--model", name, "--max-steps", "1")
    assert code == EXIT_USAGE and f"{name} does not exist; pass the folder" in one_sentence(err)
    assert "hub" not in err and not (tmp_path / "run").exists()


def test_max_seq_len_beyond_the_model_context(llama_dir, tmp_path, capsys):
    """--max-seq-len 300 on a 256-token model trained rows past its positions without a word. Given, it is
    refused; the default (512) is lowered to the context with a note."""
    out = tmp_path / "run"
    args = ["--model", str(llama_dir), "--data", DEMO_TRAIN, "--max-steps", "1"]
    code, _, err = train_here(capsys, out, *args, "--max-seq-len", "300")
    line = one_sentence(err)
    assert code == EXIT_USAGE and "--max-seq-len 300 is longer than" in line and "pass --max-seq-len 256" in line
    assert not out.exists()
    code, said, err = train_here(capsys, out, *args)
    assert code == 0, err
    assert "using 256" in said and json.loads((out / "config.json").read_text())["max_seq_len"] == 256


def test_text_records_as_eval_data_are_refused(tmp_path, capsys):
    """A held-out file of text records scored 0% -> 0% exact match (nothing to prompt with), and eval.py
    then refused the run's own --eval-data."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--max-steps", "1", "--eval-generate", "4", "--eval-data", str(text))
    assert code == EXIT_USAGE and "holds text records with no prompts" in one_sentence(err)
    assert not out.exists()


def test_a_forced_format_that_the_file_is_not_says_so(tmp_path):
    """--format alpaca on a chat file said "a file must not mix formats": it does not; the flag is wrong."""
    from minilora.data.records import DataError, load_records

    with pytest.raises(DataError) as e:
        load_records(os.path.join(ROOT, "examples", "demo", "test.jsonl"), fmt="alpaca")
    said = str(e.value)
    assert "not alpaca as --format alpaca says; pass --format auto (or chat)" in said and "mix formats" not in said


def test_resume_past_a_lowered_max_steps_says_it_trains_nothing(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    code, said, err = train_here(capsys, out, "--resume", "--max-steps", "2")
    assert code == 0, err
    assert "the run ends at step 2, which it has reached; it finishes without training" in said
