"""--template auto (the default) renders with the chat template when the tokenizer has one and raw
otherwise, says which, and records the choice: config.json's resolved template is what eval.py and a
resume use, and a resume treats `auto` that resolves to X as X.

End to end on a tiny Llama checkpoint folder built here (random weights, the bundled tokenizer with
and without its chat template): train.py for two steps, a resume, eval.py on the run."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minilora.cli import UsageError
from minilora.data.encode import resolve_template, run_template
from minilora.models.tokenizer import Tokenizer
from minilora.train import rundir
from minilora.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")
DEMO = os.path.join(ROOT, "examples", "demo")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"minilora_{name}_cli_t", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_template(tok: Tokenizer) -> Tokenizer:
    return Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_template=None)


def test_auto_is_chat_with_a_chat_template_and_raw_without():
    tok = Tokenizer.from_dir(TOK_DIR)
    assert tok.chat_template is not None
    assert resolve_template("auto", tok) == "chat"
    assert resolve_template("auto", without_template(tok)) == "raw"
    for given in ("chat", "raw"):  # given names stay as they are
        assert resolve_template(given, tok) == resolve_template(given, without_template(tok)) == given


def test_a_runs_template_is_the_resolved_one():
    assert run_template({"template": "auto", "resolved": {"template": "raw"}}) == "raw"
    assert run_template({"template": "chat", "resolved": {"dtype": "float32"}}) == "chat"  # before auto existed
    assert run_template({}) == "chat"


@pytest.mark.parametrize("recorded", [{"template": "auto", "resolved": "raw"}, {"template": "raw", "resolved": None}])
def test_resume_treats_auto_resolved_to_raw_as_raw(recorded):
    """The run resolved auto to raw (or was given raw, in a config.json from before auto): on resume
    `auto` (resolving to raw for this tokenizer) and `raw` change nothing; `chat` is refused; not given,
    the run's resolved template is kept."""
    resolved = {"template": recorded["resolved"]} if recorded["resolved"] else None
    old = json.loads(rundir.config_json(TrainConfig(template=recorded["template"]), "float32", resolved=resolved))
    dtype = lambda name: "float32"  # noqa: E731
    tpl = lambda name: "raw" if name == "auto" else name  # noqa: E731  (this tokenizer has no template)
    for given in ("auto", "raw"):
        cfg = TrainConfig(template=given)
        assert rundir.merge_resume(cfg, {"template"}, old, dtype, step=1, resolve_template=tpl) == {}
    with pytest.raises(UsageError, match="--template chat \\(the run has raw\\)"):
        rundir.merge_resume(TrainConfig(template="chat"), {"template"}, old, dtype, step=1, resolve_template=tpl)
    cfg = TrainConfig()
    rundir.merge_resume(cfg, set(), old, dtype, step=1, resolve_template=tpl)
    assert cfg.template == "raw"


@pytest.fixture(scope="module", params=["with a chat template", "without a chat template"])
def model_dir(request, tmp_path_factory):
    """A Llama checkpoint folder: random weights, the bundled tokenizer (its chat template removed
    for the second case), as a hub repo would hold them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    tok = Tokenizer.from_dir(TOK_DIR)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    )
    hf.save_pretrained(d)
    shutil.copyfile(os.path.join(TOK_DIR, "tokenizer.json"), d / "tokenizer.json")
    with open(os.path.join(TOK_DIR, "tokenizer_config.json")) as f:
        config = json.load(f)
    if request.param.startswith("without"):
        del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d, "chat" if request.param.startswith("with a") else "raw"


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    folder, want = model_dir
    out = tmp_path_factory.mktemp("run") / "r"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(folder), "--out", str(out)]
    cmd += ["--data", os.path.join(DEMO, "train.jsonl"), "--eval-data", os.path.join(DEMO, "test.jsonl")]
    cmd += ["--max-steps", "2", "--eval-generate", "2", "--eval-every", "0", "--threads", "1", "--batch-size", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, want, p.stdout


def test_train_prints_and_records_what_auto_chose(run_dir):
    out, want, stdout = run_dir
    why = "has a chat template" if want == "chat" else "has no chat template"
    assert f"template: {want} (--template auto: the tokenizer {why})" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["template"] == "auto" and config["resolved"]["template"] == want


def test_eval_scores_with_the_template_the_run_resolved(run_dir, capsys):
    out, want, _ = run_dir
    argv = ["--adapter", str(out), "--limit", "2", "--shots", "1", "--max-new-tokens", "2", "--out", str(out / "ev")]
    assert load_script("eval").main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "ev" / "eval.json").read_text())
    assert report["template"] == want
    if want == "chat":  # the recorded choice is what counts, not what auto would choose again
        config = json.loads((out / "config.json").read_text())
        config["resolved"]["template"] = "raw"
        (out / "config.json").write_text(json.dumps(config))
        assert load_script("eval").main(argv) == 0, capsys.readouterr().err
        assert json.loads((out / "ev" / "eval.json").read_text())["template"] == "raw"
        config["resolved"]["template"] = "chat"
        (out / "config.json").write_text(json.dumps(config))


def test_resume_of_an_auto_run(run_dir, capsys):
    """--template auto, or the template it resolved to, continues the run; the other one is refused."""
    out, want, _ = run_dir
    train = load_script("train")
    other = "raw" if want == "chat" else "chat"
    fast = ["--out", str(out), "--resume"]
    assert train.main([*fast, "--template", other, "--max-steps", "3"]) == 2
    assert f"--template {other} (the run has {want})" in capsys.readouterr().err
    for given, steps in (("auto", "3"), (want, "4")):
        assert train.main([*fast, "--template", given, "--max-steps", steps]) == 0, capsys.readouterr().err
        config = json.loads((out / "config.json").read_text())
        assert config["resolved"]["template"] == want and config["resumes"][-1]["changed"] == {
            "max_steps": [int(steps) - 1, int(steps)]
        }
