"""train.py end to end on the tiny model: learning, resume, signals, kill -9, NaN, PEFT, DDP.

Each run is a real `python train.py` subprocess (so signals, exit codes and messages are the
user's); runs are short (a few dozen steps of the tiny model on one thread).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilora.cli import EXIT_INTERRUPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--eval-generate", "0", "--eval-every", "0", "--threads", "1", "--log-every", "1"]


def train(out, *args, check=True, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["val_loss"] for line in f if "val_loss" in line]


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loss_falls_and_heldout_metric_improves(tmp_path, device):
    """The offline demo's promise: validation loss falls, held-out exact match rises (on CUDA: bf16
    compute, the Triton kernels, paged optimizer on the device, generation through the fused matmul)."""
    out = tmp_path / "demo"
    p = train(out, "--max-steps", "60", "--eval-generate", "24", "--eval-every", "30", "--device", device)
    with open(out / "summary.json") as f:
        s = json.load(f)
    vals = [v for _, v in s["val_loss"]]
    assert vals[-1] < 0.2 * vals[0], vals
    assert s["heldout_after"]["exact_match"] > s["heldout_before"]["exact_match"]
    assert "held-out exact match" in p.stdout
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["max_steps"] == 60


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    base = ["--max-steps", "16", "--lora-dropout", "0.1", "--save-every", "0"]
    train(tmp_path / "full", *base)
    p = train(tmp_path / "cut", *base, "--debug-interrupt-at-step", "7", check=False)
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    assert "Interrupted at step 7" in p.stdout and "--resume" in p.stdout
    assert max(losses(tmp_path / "cut")) == 7
    train(tmp_path / "cut", *base, "--resume")
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == sorted(full) == list(range(1, 17))
    for step in full:  # dropout on: the RNG state is part of the checkpoint
        assert cut[step] == full[step], (step, cut[step], full[step])


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    train(tmp_path / "r", "--max-steps", "2")
    p = train(tmp_path / "r", "--max-steps", "2", check=False)
    assert p.returncode == 2
    assert "already holds checkpoints" in p.stderr and "--resume" in p.stderr
    assert "Traceback" not in p.stderr


def test_sigint_checkpoints_and_exits_interrupted(tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, "--max-steps", "5000"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]  # `train.py && eval.py` stops here
    assert "Interrupted at step" in stdout and "--resume" in stdout
    from minilora.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(str(out))
    assert ckpt is not None
    state = json.loads(open(os.path.join(ckpt, "state.json")).read())
    assert state["step"] == max(losses(out))


def _fresh_model_and_optimizer():
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.loader import load_model
    from minilora.optim.paged_adamw import PagedAdamW

    model, _ = load_model("tiny", quantize="nf4", dtype=torch.float32)
    apply_lora(model, targets="all-linear", r=16, alpha=32, dropout=0.0, verbose=False)
    opt = PagedAdamW(lora_parameters(model), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    from minilora.train.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "k9"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--out",
        str(out),
        *FAST,
        "--max-steps",
        "40",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and latest_checkpoint(str(out)) is None:
        time.sleep(0.05)
        assert proc.poll() is None
    time.sleep(random.Random(0).uniform(0.05, 0.5))  # land somewhere in the write loop
    proc.kill()
    proc.wait()
    ckpt = latest_checkpoint(str(out))
    assert ckpt is not None
    model, opt, sched = _fresh_model_and_optimizer()
    state = load_checkpoint(ckpt, model, opt, sched)
    assert state["step"] >= 1
    p = train(out, "--max-steps", "40", "--save-every", "1", "--resume")
    assert "resumed from" in p.stdout
    assert max(losses(out)) == 40


def test_injected_nan_stops_cleanly_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    p = train(out, "--max-steps", "20", "--save-every", "3", "--debug-nan-at-step", "8", check=False)
    assert p.returncode == 1
    assert "loss became nan at step 8" in p.stderr and "step_0000006" in p.stderr
    assert "Traceback" not in p.stderr
    from minilora.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(str(out)).endswith("step_0000006")
    assert not (out / "adapter").exists()  # no final adapter from a broken run


def test_adapter_loads_in_peft_with_same_logits(tmp_path):
    """The adapter train.py writes, on the transformers model with the same base weights."""
    import peft
    import transformers

    from minilora.export.merge import to_hf_config
    from minilora.lora.adapter import load_adapter
    from minilora.models.loader import load_model

    out = tmp_path / "peft"
    train(out, "--max-steps", "8", "--quantize", "none")
    model, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    cfg = transformers.Gemma3TextConfig(
        **{
            k: v
            for k, v in to_hf_config(model.config, tok, torch.float32).items()
            if k not in ("architectures", "model_type", "torch_dtype", "dtype")
        }
    )
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf = peft.PeftModel.from_pretrained(hf, str(out / "adapter")).eval()
    load_adapter(model, str(out / "adapter"))
    ids = torch.randint(3, tok.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(ids), hf(ids).logits
    base = load_model("tiny", quantize=None, dtype=torch.float32)[0](ids)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter really changes the model
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo) gives the losses of 1 process with the same global batch."""
    common = ["--max-steps", "6", "--batch-size", "4", "--save-every", "0"]
    train(tmp_path / "one", *common, "--grad-accum", "2")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "train.py"),
        "--out",
        str(tmp_path / "two"),
        *FAST,
        *common,
        "--grad-accum",
        "1",
    ]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5), (s, one[s], two[s])


def test_bad_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "c"}\n')
    p = train(tmp_path / "r", "--data", str(bad), "--eval-data", "none", check=False)
    assert p.returncode == 2
    assert "bad.jsonl" in p.stderr and "line 2" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_help_explains_every_flag():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--model", "--data", "--lora-r", "--optimizer-bits", "--grad-accum", "--resume", "--pack"):
        assert flag in p.stdout
    assert "debug" not in p.stdout


def test_logged_tokens_per_second_leave_out_validation_time(tmp_path, monkeypatch):
    """tokens_per_s in metrics.jsonl is training throughput: a step logged right after a validation
    (made 2 s slower here) reads like its neighbours, not like the validation's seconds (before, the
    step after each eval showed a small fraction of the others' rate)."""
    import importlib.util

    from minilora.train.run import Run

    real = Run.validate
    monkeypatch.setattr(Run, "validate", lambda self: time.sleep(2.0) or real(self))
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "run"
    args = ["--out", str(out), "--max-steps", "5", "--eval-every", "2", "--log-every", "1", "--save-every", "0"]
    assert train.main(args + ["--eval-generate", "0"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = {r["step"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    assert rate[3] > rate[4] / 4 and rate[5] > rate[4] / 4, rate  # steps 3 and 5 follow validations
