"""eval.py on a preference run (train.py --objective dpo): held-out preference accuracy and mean margin of
the base (DPO's reference: margin 0) and of the fine-tuned model, equal to what train.py measured on the
same pairs, and report.md with greedy generations beside the chosen and rejected answers."""

import importlib.util
import json
import os

import pytest
from cli_runs import ROOT, one_sentence, train

from minilora.cli import EXIT_USAGE

_spec = importlib.util.spec_from_file_location("minilora_eval_cli_pref", os.path.join(ROOT, "eval.py"))
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dpo"
    p = train(out, "--objective", "dpo", "--max-steps", "8", "--eval-generate", "30", "--dtype", "float32")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_preference_report_matches_training_and_shows_generations(dpo_run, capsys):
    assert (
        eval_cli.main(["--adapter", str(dpo_run), "--limit", "30", "--generations", "2", "--max-new-tokens", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "pref. accuracy" in out and "fine-tuned" in out
    report = json.loads((dpo_run / "eval.json").read_text())
    summary = json.loads((dpo_run / "summary.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert base["margin"] == 0.0 and base["n"] == tuned["n"] == 30  # the base is DPO's own reference
    for ours, trained in ((base, summary["heldout_before"]), (tuned, summary["heldout_after"])):
        assert ours["pref_accuracy"] == trained["pref_accuracy"]  # the same 30 pairs, the same scoring
        assert ours["margin"] == pytest.approx(trained["margin"], rel=1e-5, abs=1e-6)
    assert tuned["pref_accuracy"] > base["pref_accuracy"]
    md = (dpo_run / "report.md").read_text()
    assert md.count("Chosen:") == md.count("Rejected:") == 2 and "fine-tuned:" in md and "base:" in md
    assert len(report["generations"]) == 2 and {"chosen", "rejected", "base", "fine_tuned"} <= set(
        report["generations"][0]
    )


def test_generation_gates_are_refused_on_a_preference_run(dpo_run, capsys):
    code = eval_cli.main(["--adapter", str(dpo_run), "--min-exact-match", "0.5"])
    assert code == EXIT_USAGE
    assert "--min-exact-match scores generations of an SFT run" in one_sentence(capsys.readouterr().err)
