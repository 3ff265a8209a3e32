"""train.py with an objective: SFT through the objective loop equals the train.py before objectives
existed bit for bit; `python train.py --objective dpo` (and orpo) with no other flags trains on the
bundled pairs and the held-out preference accuracy rises; per-step rewards, margin and accuracy and
held-out preference accuracy are logged; a DPO run resumed after SIGINT equals the uninterrupted one
bit for bit; two DDP processes equal one; bad input and flags are one sentence with nothing written.
"""

import json
import os
import subprocess
import sys

import pytest
from cli_runs import FAST, ROOT, metrics, one_sentence, train, train_here

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE
from minilora.train.config import DEMO_PAIRS_TEST, DEMO_PAIRS_TRAIN, parse_args

PRE_OBJECTIVES = "12aff7c"  # the last commit whose train.py computed the SFT loss itself (with every flag since)
# library functions that moved module since then: that train.py imports them from today's home
MOVED_IMPORTS = {
    "from minilora.data.encode import prepare_data, resolve_template": (
        "from minilora.data.encode import resolve_template\n    from minilora.data.prepare import prepare_data"
    ),
    "from minilora.train.planner import longest_batch, peak_memory_bytes, plan_run": (
        "from minilora.train.planner import longest_batch, plan_run\n"
        "    from minilora.train.process_memory import peak_memory_bytes"
    ),
    "from minilora.lora.layers import apply_lora, check_targets, lora_parameters": (
        "from minilora.lora.surgery import apply_lora, check_targets, lora_parameters"
    ),
}
TIMING = ("tokens_per_s", "peak_mem_mb")  # the only logged values that may differ between two runs
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "margin", "accuracy")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_sft_equals_the_train_py_before_objectives_bit_for_bit(tmp_path):
    """The same flags through the pre-objective train.py (from git history, on this library) and through
    today's: every logged loss and validation loss equal bit for bit, and the adapters byte for byte
    (dropout and gradient accumulation on, so the RNG stream and the token normalization are exercised)."""
    old = subprocess.run(["git", "show", f"{PRE_OBJECTIVES}:train.py"], capture_output=True, text=True, cwd=ROOT)
    if old.returncode != 0:
        pytest.skip(f"this checkout's history lacks {PRE_OBJECTIVES} (a shallow clone)")
    (tmp_path / "old").mkdir()
    old_train = old.stdout
    for was, is_now in MOVED_IMPORTS.items():
        assert was in old_train, was
        old_train = old_train.replace(was, is_now)
    (tmp_path / "old" / "train.py").write_text(old_train)
    args = ["--max-steps", "8", "--lora-dropout", "0.1", "--grad-accum", "2", "--eval-every", "4", "--log-every", "1"]
    for name, script in (("before", tmp_path / "old" / "train.py"), ("now", os.path.join(ROOT, "train.py"))):
        cmd = [sys.executable, str(script), "--out", str(tmp_path / name), *FAST, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
    before, now = metrics(tmp_path / "before"), metrics(tmp_path / "now")
    assert [r["step"] for r in now if "loss" in r] == list(range(1, 9)) and any("val_loss" in r for r in now)
    assert without_timing(now) == without_timing(before)
    adapter = os.path.join("adapter", "adapter_model.safetensors")
    assert (tmp_path / "now" / adapter).read_bytes() == (tmp_path / "before" / adapter).read_bytes()


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_bare_demo_trains_on_the_bundled_pairs_and_preference_accuracy_rises(tmp_path, objective):
    out = tmp_path / objective
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--objective", objective, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    before, after = s["heldout_before"], s["heldout_after"]
    assert after["n"] == 90 and after["pref_accuracy"] >= 0.95 and after["pref_accuracy"] > before["pref_accuracy"]
    assert after["margin"] > before["margin"]
    if objective == "dpo":
        assert before["margin"] == 0.0  # the adapter starts at zero: the policy is the reference
    assert "held-out preference accuracy:" in p.stdout and "held-out mean margin:" in p.stdout
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert steps and all(set(PAIR_METRICS) <= set(r) for r in steps)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in steps)
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, steps[-1]["step"]]
    assert all({"val_pref_accuracy", "val_margin"} <= set(r) for r in vals)
    config = json.loads((out / "config.json").read_text())
    assert (config["objective"], config["data"], config["eval_data"]) == (objective, DEMO_PAIRS_TRAIN, DEMO_PAIRS_TEST)


def test_dpo_resume_equals_uninterrupted_bitwise(tmp_path):
    base = ["--objective", "dpo", "--max-steps", "8", "--lora-dropout", "0.1", "--save-every", "0", "--log-every", "1"]
    base += ["--batch-size", "4", "--label-smoothing", "0.1"]
    assert train(tmp_path / "full", *base).returncode == 0
    p = train(tmp_path / "cut", *base, "--debug-interrupt-at-step", "3")
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    assert train(tmp_path / "cut", "--resume").returncode == 0  # the run's own flags, from config.json
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut if "loss" in r] == list(range(1, 9))
    assert without_timing(cut) == without_timing(full)  # loss, rewards, margin, accuracy, validation
    adapter = os.path.join("adapter", "adapter_model.safetensors")
    assert (tmp_path / "cut" / adapter).read_bytes() == (tmp_path / "full" / adapter).read_bytes()


@pytest.mark.parametrize("split", [[], ["--pair-split"]])  # split: a reentrant checkpoint inside DDP
def test_dpo_two_ddp_processes_equal_one_process(tmp_path, split):
    common = ["--objective", "dpo", "--max-steps", "4", "--batch-size", "2", "--save-every", "0", "--log-every", "1"]
    common += split
    assert train(tmp_path / "one", *common, "--grad-accum", "2").returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "two"), *FAST, *common, "--grad-accum", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = (
        [r for r in metrics(tmp_path / "one") if "loss" in r],
        [r for r in metrics(tmp_path / "two") if "loss" in r],
    )
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for k in ("loss", *PAIR_METRICS):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])


def test_plan_counts_both_answers_and_writes_nothing(tmp_path, capsys):
    code, out, _ = train_here(capsys, tmp_path / "r", "--objective", "dpo", "--plan")
    assert code == 0 and "plan for" in out and not (tmp_path / "r").exists()
    from minilora.data.encode import EncodedExample
    from minilora.data.pairs import EncodedPair
    from minilora.train.planner import longest_batch

    pair = EncodedPair(EncodedExample([1] * 5, [1] * 5), EncodedExample([1] * 9, [1] * 9))
    kw = dict(batch_size=3, pack=False, max_seq_len=64, shuffle=True, seed=0, pad_id=0)
    assert longest_batch([pair] * 7, kw) == (6, 9)  # 3 pairs: 6 rows of the longer answer's length
    # one row per pair: 5 + 9 tokens less their common prefix of 4 (each answer keeps a token of its own)
    assert longest_batch([pair] * 7, kw, share_prompt=True) == (3, 10)


def test_demo_pairs_yield_to_given_flags():
    cfg = parse_args(["--objective", "orpo"])
    assert (cfg.data, cfg.eval_data, cfg.epochs, cfg.eval_generate) == (DEMO_PAIRS_TRAIN, DEMO_PAIRS_TEST, 1, 90)
    assert cfg.out == os.path.join("runs", "demo-orpo")  # not the SFT demo's runs/demo
    argv = ["--objective", "dpo", "--data", "mine.jsonl", "--epochs", "4", "--eval-data", "none", "--out", "r"]
    cfg = parse_args(argv)
    assert (cfg.data, cfg.eval_data, cfg.epochs, cfg.out) == (os.path.abspath("mine.jsonl"), None, 4, "r")
    assert parse_args([]).data.endswith("train.jsonl")  # the SFT demo is unchanged


# ------------------------------------------------------------------------------------ bad input
def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective", "dpo", "--data", os.path.join(ROOT, "examples", "demo", "train.jsonl")], "has the fields"),
        (["--objective", "dpo", "--beta", "0"], "--beta must be positive"),
        (["--objective", "dpo", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
        (
            ["--objective", "orpo", "--beta", "0.2"],
            "--beta applies to --objective dpo; drop it or pass --objective dpo.",
        ),
        (["--orpo-lambda", "0.3"], "--orpo-lambda applies to --objective orpo"),
        (["--objective", "dpo", "--pack"], "--pack does not apply to preference pairs (--objective dpo); drop it."),
        (["--objective", "orpo", "--train-on-all"], "--train-on-all does not apply to preference pairs"),
        (["--objective", "dpo", "--dpo-loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to"),
        (["--objective", "dpo", "--format", "chat"], "--format chat names an SFT format"),
        (["--no-share-prompt"], "--share-prompt applies to --objective dpo or orpo"),
        (["--objective", "dpo", "--pair-split", "--share-prompt"], "drop --share-prompt or --pair-split."),
    ],
)
def test_bad_flags_and_data_are_one_sentence_and_write_nothing(tmp_path, capsys, args, message):
    code, _, err = train_here(capsys, tmp_path / "r", *args)
    assert code == EXIT_USAGE and message in one_sentence(err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2: 'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "chosen": "c"}, "line 2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "line 2: field 'chosen' must be a string"),
    ],
)
def test_bad_pairs_stop_before_the_first_write(tmp_path, capsys, row, message):
    data = write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    code, _, err = train_here(capsys, tmp_path / "r", "--objective", "dpo", "--data", data, "--eval-data", "none")
    assert code == EXIT_USAGE and message in one_sentence(err)
    assert not (tmp_path / "r").exists()


def test_resume_refuses_another_objective_or_beta(tmp_path, capsys):
    assert train(tmp_path / "r", "--objective", "dpo", "--max-steps", "2", "--save-every", "1").returncode == 0
    for args, named in (
        (["--beta", "0.3"], "--beta 0.3 (the run has 0.1)"),
        (["--objective", "orpo"], "--objective orpo"),
    ):
        code, _, err = train_here(capsys, tmp_path / "r", "--resume", *args)
        assert code == EXIT_USAGE and named in one_sentence(err)


@pytest.mark.parametrize("split", [[], ["--pair-split"]])  # split: a reentrant checkpoint inside FSDP
def test_dpo_under_fsdp_equals_one_process(tmp_path, split):
    """Two FSDP ranks (the NF4 base, LoRA and the vocabulary-parallel head sharded; each rank's rows'
    log-probabilities from token_cross_entropy) give one process's DPO losses, rewards and validation."""
    common = ["--objective", "dpo", "--max-steps", "3", "--batch-size", "2", "--save-every", "0", "--log-every", "1"]
    common += split
    common += ["--dtype", "float32"]  # --dtype auto picks bf16 on some CPUs: compare in float32
    assert train(tmp_path / "one", *common, "--grad-accum", "2").returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "two"), *FAST, *common, "--parallel", "fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) == 5  # val 0, steps 1-3, val 3
    for a, b in zip(one, two):
        for k in set(a) - set(TIMING) - {"step", "lr"}:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])
