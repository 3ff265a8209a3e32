"""eval.py with several --adapter runs: the mixed-batch report gives every adapter (and the base and the
few-shot base) the scores eval.py gives it alone; runs of different bases, quantizations or dtypes, and
a run given twice, are refused in one sentence before anything is written.

Tolerance for the loss. A one-adapter run computes each adapter's LoRA term with F.linear on its own
batches; the mixed run computes it with the gathered bmm (minilora/lora/multi.py) on batches that mix
adapters and pad differently. Both are float32 (the runs here train with --dtype float32): as in
tests/test_multi_adapter.py, the logits of two summation orders differ by at most
P * 2 (K + R + 3) u of the largest logit |z|max, with P = 4 layers x 7 projections + lm_head = 29
projections, K <= 128 (the tiny model's widest input), R = 16 (--lora-r), u = 2^-24. A token's CE,
logsumexp(z) - z_y, moves by at most twice the largest logit change, and the mean over N labelled
tokens summed in two orders adds at most 2 N u of the mean. So

    |loss_mixed - loss_alone| <= 2 * LOGITS_RTOL * |z|max + 2 N u * loss.

Greedy generations, exact match and structured match are compared exactly.
"""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from cli_runs import train

from minilora.data.records import load_records
from minilora.eval.evaluate import encode_for_eval
from minilora.eval.mixed import run_names
from minilora.lora.adapter import load_adapter
from minilora.models.loader import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = os.path.join(ROOT, "examples", "demo", "test.jsonl")
U = 2.0**-24
LOGITS_RTOL = 29 * 2 * (128 + 16 + 3) * U  # module docstring
ARGS = ["--limit", "6", "--max-new-tokens", "12", "--shots", "2", "--generations", "2", "--batch-size", "5"]

_spec = importlib.util.spec_from_file_location("minilora_eval_cli_multi", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two demo runs that differ (seed and length of training), float32 on an NF4 base."""
    d = tmp_path_factory.mktemp("runs")
    for name, steps, seed in (("alpha", "20", "1"), ("beta", "8", "2")):
        p = train(d / name, "--max-steps", steps, "--seed", seed, "--dtype", "float32")
        assert p.returncode == 0, p.stderr[-3000:]
    return d


def call(argv, capsys):
    code = eval_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def max_logit(run_dir) -> float:
    """|z|max of the base + this run's adapter over the examples scored here (the tolerance's scale)."""
    model, tok = load_model("tiny", quantize="nf4", dtype=torch.float32)
    load_adapter(model, str(run_dir / "adapter"))
    examples = load_records(TEST)[0][:6]
    enc, _ = encode_for_eval(examples, tok, "chat", 2048)
    with torch.no_grad():
        return max(float(model(torch.tensor([e.input_ids])).abs().max()) for e in enc)


def test_mixed_report_equals_each_adapter_alone(runs, capsys, tmp_path):
    argv = ["--adapter", str(runs / "alpha"), "--adapter", str(runs / "beta"), "--data", TEST, *ARGS]
    code, out, err = call(argv + ["--out", str(tmp_path / "both")], capsys)
    assert code == 0, err
    both = json.load(open(tmp_path / "both" / "eval.json"))
    assert list(both["metrics"]) == ["base", "few_shot", "alpha", "beta"]
    md = (tmp_path / "both" / "report.md").read_text()
    assert "# Evaluation of 2 adapters on `tiny`" in md and "## Exact match" in md and "| alpha |" in md
    assert "## Generations (first 2)" in md and "alpha:" in md and "beta:" in md
    losses = set()
    for name in ("alpha", "beta"):
        code, _, err = call(
            ["--adapter", str(runs / name), "--data", TEST, *ARGS, "--out", str(tmp_path / name)], capsys
        )
        assert code == 0, err
        alone = json.load(open(tmp_path / name / "eval.json"))
        zmax = max_logit(runs / name)
        for mine, theirs in (("base", "base"), ("few_shot", "few_shot"), (name, "fine_tuned")):
            a, b = both["metrics"][mine], alone["metrics"][theirs]
            for k in ("exact_match", "structured_match", "json_parse_failures", "json_references", "label_tokens"):
                assert a[k] == b[k], (name, mine, k)
            assert [e[mine] for e in both["examples"]] == [e[theirs] for e in alone["examples"]]
            tol = 2 * LOGITS_RTOL * zmax + 2 * b["label_tokens"] * U * b["loss"]
            assert abs(a["loss"] - b["loss"]) <= tol, (name, mine, a["loss"], b["loss"], tol)
        losses.add(round(both["metrics"][name]["loss"], 3))
        # the tolerance is tight enough to tell the adapters (and the base) apart
        assert abs(both["metrics"][name]["loss"] - both["metrics"]["base"]["loss"]) > 10 * tol
    assert len(losses) == 2
    a, b = (both["metrics"][n]["loss"] for n in ("alpha", "beta"))
    assert abs(a - b) > 4 * tol


def edited(runs, tmp_path, name, **changes):
    """A copy of run `beta` under tmp_path/name with its config.json changed."""
    d = tmp_path / name
    shutil.copytree(runs / "beta", d, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    cfg = json.load(open(d / "config.json"))
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def refused(argv, capsys, tmp_path) -> str:
    out = tmp_path / "out"
    code, _, err = call(argv + ["--data", TEST, "--limit", "1", "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith(".") and not out.exists()  # nothing written
    return line


def test_runs_of_different_bases_are_refused(runs, capsys, tmp_path):
    alpha = str(runs / "alpha")
    other = edited(runs, tmp_path, "other", model="gemma-3-1b")
    line = refused(["--adapter", alpha, "--adapter", str(other)], capsys, tmp_path)
    assert "was trained with base model 'tiny' but" in line and "'gemma-3-1b'" in line and "different bases" in line
    line = refused(["--adapter", alpha, "--adapter", str(other), "--model", "tiny"], capsys, tmp_path)
    assert "different bases" in line  # --model does not make two bases one
    dense = edited(runs, tmp_path, "dense", quantize="none")
    line = refused(["--adapter", alpha, "--adapter", str(dense)], capsys, tmp_path)
    assert "--quantize 'nf4' but" in line and "changes the base" in line and "pass --quantize" in line
    bf16 = edited(runs, tmp_path, "bf16", resolved_dtype="bfloat16")
    line = refused(["--adapter", alpha, "--adapter", str(bf16)], capsys, tmp_path)
    assert "dtype 'float32' but" in line and "pass --dtype" in line


def test_one_name_per_adapter(runs, capsys, tmp_path):
    line = refused(["--adapter", str(runs / "alpha"), "--adapter", str(runs / "alpha" / "adapter")], capsys, tmp_path)
    assert line.endswith("alpha/adapter are the same run; pass it once.")
    # two runs with one folder name, or a reserved one, are named with their parent folder too
    assert run_names(["x/alpha", "y/alpha", "z/beta"]) == ["x-alpha", "y-alpha", "beta"]
    assert run_names(["runs/base", "runs/my run.2"]) == ["runs-base", "my-run-2"]
    with pytest.raises(ValueError, match="both get the adapter name 'x-alpha'; copy one"):
        run_names(["x/alpha", "y/x-alpha", "y/alpha"])
