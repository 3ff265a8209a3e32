"""eval.py end to end on a tiny run built here: report.md + eval.json whose numbers equal the metrics
computed directly on the base and on the base + adapter, the gates' exit codes, and one clear
sentence (exit 2, no traceback) for every bad input."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from cli_runs import tiny_run, write_tiny_llama

from minilora.data.records import load_records
from minilora.eval.evaluate import encode_for_eval, generate_completions, perplexity, score
from minilora.lora.adapter import load_adapter
from minilora.models.loader import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo")
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")

_spec = importlib.util.spec_from_file_location("minilora_eval_cli", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A train.py-shaped run on the `tiny` model: adapter/ with a random non-zero B, config.json."""
    d = tmp_path_factory.mktemp("run")
    with open(os.path.join(DEMO, "test.jsonl")) as f:
        (d / "test.jsonl").write_text("".join(f.readlines()[:5]))
    cfg = {
        "model": "tiny",
        "quantize": "none",
        "dtype": "float32",
        "template": "chat",
        "format": "auto",
        "data": os.path.join(DEMO, "train.jsonl"),
        "eval_data": str(d / "test.jsonl"),
        "max_seq_len": 512,
    }
    return tiny_run(d, cfg)


def call(argv, capsys):
    code = eval_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_numbers_equal_direct_metrics(run, capsys):
    argv = ["--adapter", str(run), "--shots", "2", "--max-new-tokens", "5", "--generations", "2"]
    code, out, err = call(argv, capsys)
    assert code == 0, err
    assert "example 30/30 fine-tuned scored" in err  # progress: 5 examples x 3 variants x 2 passes
    res = json.load(open(run / "eval.json"))
    assert set(res["metrics"]) == {"base", "few_shot", "fine_tuned"} and res["n"] == 5 and res["shots_used"] == 2
    examples, _ = load_records(run / "test.jsonl")
    refs = [e.completion for e in examples]
    model, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    enc, _ = encode_for_eval(examples, tok, "chat", 2048)
    for variant in ("base", "fine_tuned"):
        if variant == "fine_tuned":
            load_adapter(model, str(run / "adapter"))
        m = res["metrics"][variant]
        assert m["perplexity"] == pytest.approx(perplexity(model, enc, pad_id=tok.pad_id), rel=1e-6)
        preds = generate_completions(model, tok, examples, "chat", max_new_tokens=5)
        assert [r[variant] for r in res["examples"]] == preds
        assert {k: m[k] for k in score(preds, refs)} == score(preds, refs)
    assert res["metrics"]["base"]["perplexity"] != res["metrics"]["fine_tuned"]["perplexity"]  # adapter applied
    md = (run / "report.md").read_text()
    assert "| metric | base | base, 2-shot | fine-tuned |" in md and "## Generations (first 2)" in md
    assert "report:" in out and not any(p.startswith(".") for p in os.listdir(run))  # no temp files left


def test_progress_in_a_log_is_one_line_per_scored_variant(run, capsys):
    """stderr captured (not a terminal, as in a log file): one progress line per variant, not one per
    batch (the demo's 90 test examples printed 34 lines of `example N/540`)."""
    argv = ["--adapter", str(run), "--shots", "1", "--max-new-tokens", "2", "--batch-size", "1", "--generations", "0"]
    code, _, err = call(argv, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("example ")]
    assert lines == [f"example {10 * k}/30 {v} scored" for k, v in ((1, "base"), (2, "few-shot"), (3, "fine-tuned"))]


def test_gates_exit_1_with_one_sentence(run, capsys, tmp_path):
    base = ["--adapter", str(run), "--shots", "0", "--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path)]
    code, _, err = call(base + ["--min-exact-match", "0.9", "--max-perplexity", "1.5"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: fine-tuned exact match 0.0% is below --min-exact-match 0.9; ")
    assert "is above --max-perplexity 1.5" in last and "Traceback" not in err
    gates = json.load(open(tmp_path / "eval.json"))["gates"]
    assert [(g["metric"], g["passed"]) for g in gates] == [("exact_match", False), ("perplexity", False)]
    code, _, err = call(base + ["--min-exact-match", "0", "--max-perplexity", "1e12"], capsys)
    assert code == 0, err
    assert "**pass** --max-perplexity 1e+12" in (tmp_path / "report.md").read_text()


def last_error(err: str) -> str:
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith(".")
    return line


def test_missing_adapter_folder(capsys, tmp_path):
    code, _, err = call(["--adapter", str(tmp_path / "nope"), "--data", os.path.join(DEMO, "test.jsonl")], capsys)
    assert code == 2 and "nope does not exist; pass the run directory train.py wrote" in last_error(err)
    code, _, err = call(["--adapter", str(tmp_path)], capsys)
    assert code == 2 and "holds no adapter (no adapter_config.json" in last_error(err)
    code, _, err = call(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in last_error(err) and not (tmp_path / "o").exists()


def test_no_arguments_without_a_demo_run_says_to_train_first(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call([], capsys)
    assert code == 2 and "run `python train.py` first" in last_error(err)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A Llama checkpoint with the bundled tokenizer but another geometry than `tiny`."""
    d = tmp_path_factory.mktemp("llama")
    return str(
        write_tiny_llama(
            d,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
    )


def test_adapter_for_another_base(run, other_base, capsys, tmp_path):
    code, _, err = call(["--adapter", str(run), "--model", other_base, "--limit", "1"], capsys)
    msg = last_error(err)
    assert code == 2 and "was trained on 'tiny' and does not fit" in msg and "pass the --model it was trained on" in msg
    code, _, err = call(["export", "--adapter", str(run), "--model", other_base, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not fit" in last_error(err) and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "is empty (no JSON lines)"),
        ("\n\n", "is empty (no JSON lines)"),
        (json.dumps({"text": "just text"}) + "\n", "holds text records with no prompts"),
        ('{"prompt": "a", "completion": \n', "line 1: malformed JSON"),
    ],
)
def test_bad_test_files(run, capsys, tmp_path, content, expected):
    (tmp_path / "t.jsonl").write_text(content)
    code, _, err = call(["--adapter", str(run), "--data", str(tmp_path / "t.jsonl")], capsys)
    assert code == 2 and expected in last_error(err)


def test_bad_flags_and_unmeasurable_gate(run, capsys, tmp_path):
    code, _, err = call(["--adapter", str(run), "--shots", "-1"], capsys)
    assert code == 2 and "--shots cannot be negative" in last_error(err)
    code, _, err = call(["--adapter", str(run), "--min-exact-match", "80"], capsys)
    assert code == 2 and "--min-exact-match is a fraction" in last_error(err)
    code, _, err = call(["--adapter", str(run), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl does not exist" in last_error(err)
    code, _, err = call(["--adapter", str(run), "--train-data", str(tmp_path / "nt.jsonl")], capsys)
    assert code == 2 and "--train-data" in last_error(err)
    plain = jsonl(tmp_path / "plain.jsonl", [{"prompt": "2+2=", "completion": "four"}])
    code, _, err = call(
        [
            "--adapter",
            str(run),
            "--data",
            plain,
            "--shots",
            "0",
            "--max-new-tokens",
            "1",
            "--out",
            str(tmp_path / "report"),
            "--min-structured-match",
            "0.5",
        ],
        capsys,
    )
    assert code == 2 and "is JSON, so structured match cannot be measured" in last_error(err)


def test_export_refuses_a_non_empty_out(run, capsys, tmp_path):
    (tmp_path / "x.txt").write_text("keep")
    code, _, err = call(["export", "--adapter", str(run), "--out", str(tmp_path)], capsys)
    assert code == 2 and "is not empty and has no .minilora-export.json" in last_error(err)
    assert os.listdir(tmp_path) == ["x.txt"]


def test_cli_errors_name_what_eval_py_has(run, capsys, tmp_path):
    """A folder as --data is "a folder", not "does not exist"; data errors do not suggest
    --skip-bad-lines (a train.py flag); a bad --device is a sentence; flags are never abbreviated."""
    code, _, err = call(["--adapter", str(run), "--data", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a folder; pass the path of a JSONL file." in last_error(err)
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "c"}])
    code, _, err = call(["--adapter", str(run), "--data", bad], capsys)
    line = last_error(err)
    assert code == 2 and "line 2: field 'prompt' must be a string" in line and "skip-bad-lines" not in line
    code, _, err = call(["--adapter", str(run), "--device", "gpu"], capsys)
    assert code == 2 and "--device gpu is not a device" in last_error(err)
    with pytest.raises(SystemExit) as e:
        call(["--adapter", str(run), "--shot", "1"], capsys)
    assert e.value.code == 2 and "unrecognized arguments: --shot" in capsys.readouterr().err


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_report_goes_only_where_no_file_of_the_user_is(run, capsys, tmp_path):
    """--out replaced a user's own report.md and eval.json, and without --out a plain PEFT adapter folder
    took report.md and eval.json beside its weights. Each is refused before any model loads, untouched;
    a folder holding an earlier report of eval.py's is written again."""
    args = ["--adapter", str(run), "--shots", "0", "--limit", "1", "--max-new-tokens", "1"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    (mine / "eval.json").write_text('{"mine": true}')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    plain = tmp_path / "plain"
    shutil.copytree(run / "adapter", plain)
    for out, said in (
        (mine, "already holds files eval.py did not write (eval.json, report.md)"),
        (tmp_path / "notes", "already holds files eval.py did not write (todo.txt)"),
        (tmp_path / "afile", "is a file"),
    ):
        before = files(out) if out.is_dir() else out.read_bytes()
        code, _, err = call([*args, "--out", str(out)], capsys)
        assert code == 2 and said in last_error(err) and "loading" not in err
        assert (files(out) if out.is_dir() else out.read_bytes()) == before
    before = files(plain)
    code, _, err = call(["--adapter", str(plain), *args[2:], "--data", str(run / "test.jsonl")], capsys)
    assert code == 2 and "pass --out with a new or empty folder" in last_error(err) and files(plain) == before
    again = tmp_path / "again"
    for _ in range(2):  # new, then holding eval.py's own report
        code, _, err = call([*args, "--out", str(again)], capsys)
        assert code == 0, err
    assert sorted(os.listdir(again)) == ["eval.json", "report.md"]


def test_fewer_shots_than_asked_are_said(run, capsys, tmp_path):
    """--shots 5 from a 2-example training file used 2 without a word, and a file of text records none."""
    args = ["--adapter", str(run), "--limit", "1", "--max-new-tokens", "1", "--shots", "5"]
    with open(os.path.join(DEMO, "train.jsonl")) as f:
        (tmp_path / "two.jsonl").write_text("".join(f.readlines()[:2]))
    code, _, err = call([*args, "--train-data", str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and "note: --shots 5, but" in err and "has 2 usable examples; using them." in err
    text = jsonl(tmp_path / "text.jsonl", [{"text": "a"}, {"text": "b"}])
    code, _, err = call([*args, "--train-data", text, "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert "has no prompted records that are not test prompts" in (tmp_path / "b" / "report.md").read_text()
