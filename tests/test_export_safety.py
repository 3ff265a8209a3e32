"""`eval.py export` never loses what a user wrote or a run produced, and says so in one sentence.

- --out may not be empty, the --adapter run, inside or above it, or the current folder (or above it);
  --overwrite replaces only an earlier export (a folder holding .minilora-export.json and nothing but
  the files it lists, or a GGUF file); each refusal is exit 2, one sentence, nothing touched;
- an export that fails its read-back, or is interrupted (Ctrl-C: exit 3), leaves --out as it was and
  no temporary folder behind: it is written and checked beside --out and renamed only after that;
- the demo-shaped run (tiny Gemma 3, NF4 base quantized from bf16) exports and reads back exactly;
- a GGUF is a file path ending in .gguf; a user's Modelfile beside it is kept and the FROM line this
  export needs is printed instead; a flag that would do nothing (--gguf-type with --format hf) is refused.
"""

import json
import os
import re
import shutil
import signal

import pytest
import torch
from cli_runs import one_sentence, temps, tiny_run, tree
from test_gguf import make_run
from test_user_errors import eval_here

from minilora.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from minilora.export import merge as E
from minilora.export import readback as V
from minilora.export.target import MARKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo")
FAST = ["--no-validate"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run shaped like `python train.py`'s demo: the tiny Gemma-3-shaped model, its NF4 base
    quantized from bf16 and computing in bf16, a LoRA adapter with a random non-zero B, the demo data."""
    run = tmp_path_factory.mktemp("demo") / "run"
    cfg = {
        "model": "tiny",
        "quantize": "nf4",
        "dtype": "auto",
        "resolved_dtype": "bfloat16",
        "template": "chat",
        "data": os.path.join(DEMO, "train.jsonl"),
        "eval_data": os.path.join(DEMO, "test.jsonl"),
    }
    return tiny_run(run, cfg, quantize="nf4", dtype=torch.bfloat16, r=16, b_scale=0.05)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A Llama run that maps to GGUF (the tiny preset's layer pattern does not)."""
    return make_run(tmp_path_factory.mktemp("llama"), "llama-t5")[1]


def _export(capsys, *argv) -> tuple[int, str]:
    return eval_here(capsys, "export", *argv)


# ------------------------------------------------------------------------------- where --out may be
@pytest.mark.parametrize(
    "out, said",
    [
        ("", "--out is empty"),
        (".", "holds the --adapter run folder"),
        ("..", "holds the --adapter run folder"),
        ("myrun", "is the --adapter run folder"),
        ("myrun/", "is the --adapter run folder"),
        ("myrun/adapter", "lies inside the --adapter run folder"),
        ("link", "is the --adapter run folder"),
        ("sub", "is the current folder or one above it"),
    ],
)
def test_out_that_is_the_run_or_the_current_folder_is_refused(demo_run, tmp_path, capsys, monkeypatch, out, said):
    """`--out "" --overwrite` replaced the current folder (the user's thesis.txt and the run in it),
    `--out RUN --overwrite` the whole run, `--out RUN/adapter --overwrite` the trained adapter."""
    shutil.copytree(demo_run, tmp_path / "myrun")
    (tmp_path / "thesis.txt").write_text("three years of work")
    (tmp_path / "link").symlink_to("myrun")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub" if out == "sub" else tmp_path)
    out = "." if out == "sub" else out
    adapter = "../myrun" if os.getcwd().endswith("sub") else "myrun"
    before = tree(tmp_path)
    code, err = _export(capsys, "--adapter", adapter, "--out", out, "--overwrite", *FAST)
    assert code == EXIT_USAGE and said in one_sentence(err)
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["link", "myrun", "sub", "thesis.txt"]


def test_overwrite_replaces_only_an_earlier_export(demo_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--overwrite", *FAST)
    line = one_sentence(err)
    assert code == EXIT_USAGE and f"has no {MARKER}, so it is not an export's folder (it holds notes.txt)" in line
    assert os.listdir(out) == ["notes.txt"]

    (out / "notes.txt").unlink()  # an empty folder may be written
    assert _export(capsys, "--adapter", str(demo_run), "--out", str(out), *FAST)[0] == 0
    listed = json.loads((out / MARKER).read_text())["files"]
    assert sorted(listed + [MARKER]) == sorted(os.listdir(out)) and "model.safetensors" in listed
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out), *FAST)
    assert code == EXIT_USAGE and "is not empty; choose another folder or pass --overwrite" in one_sentence(err)
    assert _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--overwrite", *FAST)[0] == 0

    (out / "README.md").write_text("my model card")  # added to an export: the folder is the user's now
    before = tree(out)
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--overwrite", *FAST)
    assert code == EXIT_USAGE and "holds README.md, which eval.py export did not write" in one_sentence(err)
    assert tree(out) == before and not temps(tmp_path)


def test_overwrite_replaces_only_a_gguf_file(llama_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_text("not a model")
    code, err = _export(capsys, "--adapter", llama_run, "--out", str(out), "--format", "gguf", "--overwrite", *FAST)
    assert code == EXIT_USAGE and "is not a GGUF file" in one_sentence(err) and out.read_text() == "not a model"


# ------------------------------------------------------------------------------- whole or not at all
def test_an_export_that_fails_validation_leaves_out_as_it_was(demo_run, tmp_path, capsys, monkeypatch):
    """The failed folder stayed at --out looking complete, and a rerun then said "is not empty"."""
    out = tmp_path / "new" / "deeper" / "merged"
    monkeypatch.setattr(V, "TOLERANCE", -1.0)  # every read-back now fails its check
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--gate-examples", "0")
    line = one_sentence(err)
    assert code == EXIT_FAILED and f"the export to {out} does not reproduce the merged model" in line
    assert "nothing was written there" in line and not (tmp_path / "new").exists()  # the folders made for it too

    earlier = tmp_path / "earlier"
    assert _export(capsys, "--adapter", str(demo_run), "--out", str(earlier), *FAST)[0] == 0
    before = tree(earlier)
    code, err = _export(
        capsys, "--adapter", str(demo_run), "--out", str(earlier), "--overwrite", "--gate-examples", "0"
    )
    assert code == EXIT_FAILED and tree(earlier) == before and sorted(os.listdir(tmp_path)) == ["earlier"]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_while_validating_leaves_nothing_and_a_rerun_works(demo_run, tmp_path, capsys, monkeypatch, how):
    """SIGTERM (a `timeout`, a scheduler) killed the process outright and left the temporary folder."""

    def ctrl_c(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    out = tmp_path / "merged"
    monkeypatch.setattr(V, "outputs", ctrl_c)  # "validating ... on 4 prompts"
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out))
    assert code == EXIT_INTERRUPTED and one_sentence(err).startswith("error: interrupted; nothing was written")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--gate-examples", "0")[0] == 0


def test_a_gguf_that_fails_validation_is_not_written(llama_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.gguf"
    monkeypatch.setattr(V, "TOLERANCE", -1.0)
    code, err = _export(capsys, "--adapter", llama_run, "--out", str(out), "--format", "gguf", "--gate-examples", "0")
    assert code == EXIT_FAILED and "nothing was written there" in one_sentence(err)
    assert os.listdir(tmp_path) == []  # no .gguf, no Modelfile, no temporary folder


# ------------------------------------------------------------------------------- the demo's 4-bit export
@pytest.mark.parametrize("argv", [["--quantize-4bit"], ["--quantize-4bit", "--dtype", "float32"], []])
def test_the_demo_runs_export_reads_back_exactly(demo_run, tmp_path, capsys, argv):
    """The README's `eval.py export --adapter runs/demo --out merged --quantize-4bit` failed with
    "logits max rel err 1.11e-03 (tolerance 1e-03)": the reference carried the bf16-rounded RoPE
    frequencies of the tiny model built in bf16, which config.json cannot say (Transformer._apply).
    Against what the file says, the read-back holds the same weights: float32 reordering noise only."""
    out = tmp_path / "merged"
    code, err = _export(capsys, "--adapter", str(demo_run), "--out", str(out), "--gate-examples", "0", *argv)
    assert code == 0, err
    rel = float(re.search(r"logits max rel err ([\d.e+-]+)", err).group(1))
    assert rel <= 1e-5, err


# ------------------------------------------------------------------------------- GGUF paths and flags
def test_a_gguf_out_is_a_file_path_ending_in_gguf(llama_run, tmp_path, capsys):
    """`--out ggdir/` wrote a FILE named ggdir and ggdir.Modelfile."""
    ggdir = str(tmp_path / "ggdir") + "/"
    code, err = _export(capsys, "--adapter", llama_run, "--out", ggdir, "--format", "gguf", *FAST)
    assert code == EXIT_USAGE and f"such as {ggdir}model.gguf" in one_sentence(err)
    code, err = _export(capsys, "--adapter", llama_run, "--out", str(tmp_path / "m.gguf"), *FAST)
    assert code == EXIT_USAGE and "--format hf writes a checkpoint folder" in one_sentence(err)
    assert os.listdir(tmp_path) == []


def test_a_users_modelfile_is_kept_and_the_from_line_printed(llama_run, tmp_path, capsys):
    """mine2.Modelfile said `FROM ./x.gguf`; the export kept it but printed `ollama create mine2 -f` it."""
    mf = tmp_path / "mine2.Modelfile"
    mf.write_text("FROM ./x.gguf\n")
    out = tmp_path / "mine2.gguf"
    code, err = _export(capsys, "--adapter", llama_run, "--out", str(out), "--format", "gguf", *FAST)
    assert code == 0 and mf.read_text() == "FROM ./x.gguf\n"
    assert f"kept {mf}, which this export did not write (it says `FROM ./x.gguf`)" in err
    assert f"with `FROM {out}` and run `ollama create mine2 -f` on it" in err and "Ollama: ollama create" not in err

    mf.unlink()  # ours is written, and rewritten by the next export of the same file
    for _ in range(2):
        code, err = _export(capsys, "--adapter", llama_run, "--out", str(out), "--format", "gguf", "--overwrite", *FAST)
        assert code == 0 and mf.read_text() == f"FROM {out}\n" and f"ollama create mine2 -f {mf}" in err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--gguf-type", "q8_0"], "--gguf-type sets the tensors of --format gguf, not of --format hf"),
        (["--format", "gguf-lora", "--gguf-type", "q8_0"], "not of --format gguf-lora"),
        (["--format", "gguf", "--dtype", "float32"], "--dtype sets the weights of --format hf"),
    ],
)
def test_a_flag_that_would_do_nothing_is_refused(llama_run, tmp_path, capsys, monkeypatch, argv, said):
    monkeypatch.chdir(tmp_path)
    code, err = _export(capsys, "--adapter", llama_run, "--out", "merged", *argv)
    assert code == EXIT_USAGE and said in one_sentence(err) and os.listdir(tmp_path) == []


def test_merge_base_with_a_gguf_lora_is_refused(llama_run, tmp_path, capsys):
    out = str(tmp_path / "a.gguf")
    code, err = _export(
        capsys, "--adapter", llama_run, "--out", out, "--format", "gguf-lora", "--merge-base", "original"
    )
    assert code == EXIT_USAGE and "writes the adapter alone" in one_sentence(err) and os.listdir(tmp_path) == []


def test_export_adapter_returns_the_absolute_out(demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert E.export_adapter(str(demo_run), "m", validate=False, log=lambda m: None) == str(tmp_path / "m")
