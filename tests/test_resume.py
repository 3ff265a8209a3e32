"""--resume refuses what would corrupt a run (flags that define the adapter or the data order) and
applies what it may (learning rate, cadences, the dtype it resolved), and a kill -9 at any moment is
resumed with every step logged once. The rules are tested in-process, hypothesis drawing which
flags change; the end-to-end runs use the tiny model for a few steps.
"""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_runs import FAST, ROOT, metrics, one_sentence, temps, train, train_here, tree
from hypothesis import given
from hypothesis import strategies as st

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from minilora.train import rundir
from minilora.train.checkpoint import latest_checkpoint
from minilora.train.config import TrainConfig

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_every_flag_has_a_resume_rule():
    """Each TrainConfig field is refused, changeable, or this invocation's own on --resume."""
    groups = [
        rundir.ADAPTER_FIELDS,
        rundir.OBJECTIVE_FIELDS,
        rundir.STREAM_FIELDS,
        rundir.CHANGEABLE_FIELDS,
        rundir.NOT_INHERITED,
    ]
    named = [n for g in groups for n in g]
    assert sorted(named) == sorted(FIELDS) and len(set(named)) == len(named)


def _changed_value(name, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + (1 if isinstance(value, int) else 0.25)
    if name == "dtype":
        return "bfloat16"
    return (value or "x") + "_other"


@given(
    st.sets(st.sampled_from([n for n in FIELDS if n not in rundir.NOT_INHERITED])),
    st.sets(st.sampled_from([n for n in FIELDS if n not in rundir.NOT_INHERITED])),
)
def test_resume_refuses_adapter_and_stream_changes_and_applies_the_rest(changed, repeated):
    """Over which flags are given (changed, or repeated with the run's value): a change to a field
    that defines the adapter or the data order is refused naming each such flag; other changes are
    applied and recorded; flags not given take the run's recorded values."""
    run = TrainConfig(model="gemma-3-1b", lr=1e-4, lora_r=8, batch_size=4, dtype="auto")
    old = json.loads(rundir.config_json(run, "float32"))
    cfg = TrainConfig(resume=True)  # this invocation: defaults, plus the given flags
    for name in repeated:
        setattr(cfg, name, old[name])
    for name in changed:
        setattr(cfg, name, _changed_value(name, old[name]))
    resolve = lambda name: "float32" if name == "auto" else name  # noqa: E731  (auto -> float32 here)
    bad = sorted(n for n in changed if n in rundir.ADAPTER_FIELDS + rundir.OBJECTIVE_FIELDS + rundir.STREAM_FIELDS)
    if bad:
        with pytest.raises(UsageError) as e:
            rundir.merge_resume(cfg, changed | repeated, old, resolve, step=5)
        assert re.findall(r"(--[a-z-]+) \S+ \(the run has", str(e.value)) == [
            rundir.flag(n) for n in sorted(bad, key=FIELDS.index)
        ]
        return
    applied = rundir.merge_resume(cfg, changed | repeated, old, resolve, step=5)
    assert set(applied) == changed
    for name in FIELDS:
        if name in rundir.NOT_INHERITED:
            continue
        want = _changed_value(name, old[name]) if name in changed else old[name]
        if name == "dtype" and name not in repeated:
            want = "float32"  # not given: the dtype the run resolved, so `auto` cannot drift
        assert getattr(cfg, name) == want, name
    assert cfg.resumes[-1] == {"step": 5, "changed": {n: [old[n], getattr(cfg, n)] for n in changed}}


@given(st.integers(0, 12), st.sampled_from([1e-3, 0.5]), st.sampled_from([0.0, 0.1]))
def test_resume_applies_lr_and_weight_decay_to_the_restored_optimizer(step, lr, wd):
    """The checkpoint restores the lr and weight decay the run started with; the flags of the resume
    replace them, evaluated at the restored step; unchanged flags give the restored values exactly."""
    from minilora.train.checkpoint import apply_hyperparameters
    from minilora.train.schedule import cosine_with_warmup

    def fresh(base_lr):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=base_lr, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(3, 12, 0.1))

    opt, sched = fresh(2e-4)
    for _ in range(step):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    restored, restored_sched = fresh(2e-4)
    restored.load_state_dict(saved_opt)
    restored_sched.load_state_dict(saved_sched)
    apply_hyperparameters(restored, restored_sched, 2e-4, 0.0)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # unchanged flags: bitwise
    apply_hyperparameters(restored, restored_sched, lr, wd)
    f = cosine_with_warmup(3, 12, 0.1)
    group = restored.param_groups[0]
    assert group["lr"] == pytest.approx(lr * f(step)) and group["weight_decay"] == wd
    restored.step()
    restored_sched.step()
    assert restored_sched.get_last_lr()[0] == pytest.approx(lr * f(step + 1))


def test_dtype_auto_resolving_to_the_recorded_dtype_is_unchanged():
    old = json.loads(rundir.config_json(TrainConfig(dtype="float32"), "float32"))
    for given_dtype, ok in (("auto", True), ("float32", True), ("bfloat16", False)):
        cfg = TrainConfig(dtype=given_dtype)
        resolve = lambda name: "float32" if name == "auto" else name  # noqa: E731
        if ok:
            assert rundir.merge_resume(cfg, {"dtype"}, old, resolve, step=1) == {}
        else:
            with pytest.raises(UsageError, match="--dtype bfloat16 \\(the run has float32\\)"):
                rundir.merge_resume(cfg, {"dtype"}, old, resolve, step=1)


def test_a_field_the_run_never_recorded_keeps_what_the_run_ran_with():
    """A run folder written before config.json recorded share_prompt ran TRL's layout; a plain
    --resume keeps it (so the resumed steps are the uninterrupted run's, bit for bit)."""
    old = json.loads(rundir.config_json(TrainConfig(objective="dpo"), "float32"))
    del old["share_prompt"]
    cfg = TrainConfig(objective="dpo", resume=True)
    assert cfg.share_prompt  # today's default
    rundir.merge_resume(cfg, set(), old, lambda name: name, step=1)
    assert cfg.share_prompt is False
    recorded = json.loads(rundir.config_json(TrainConfig(objective="dpo"), "float32"))
    cfg = TrainConfig(objective="dpo", resume=True)
    rundir.merge_resume(cfg, set(), recorded, lambda name: name, step=1)
    assert cfg.share_prompt is True  # a run that recorded it keeps its own value


@given(
    old_accum=st.integers(1, 4),
    old_world=st.integers(1, 4),
    world=st.integers(1, 4),
    given_accum=st.none() | st.integers(1, 8),
)
def test_grad_accum_follows_the_number_of_processes(old_accum, old_world, world, given_accum):
    """A step takes grad_accum x processes micro-batches from the data stream (the checkpoint's
    position counts them): a resume on another number of processes keeps that product, taking the
    matching --grad-accum when none is given, and refuses a --grad-accum that breaks it. A number of
    processes that cannot share the product is refused naming no --grad-accum (whether given or not)
    and stating a launch whose number of processes divides it."""
    old = json.loads(rundir.config_json(TrainConfig(grad_accum=old_accum), "float32", world=old_world))
    cfg = TrainConfig(grad_accum=given_accum or 1, out="R")
    given = {"grad_accum"} if given_accum else set()
    resolve = lambda name: "float32"  # noqa: E731
    micro = old_accum * old_world
    want = given_accum or micro // world
    if micro % world:
        with pytest.raises(UsageError) as e:
            rundir.merge_resume(cfg, given, old, resolve, step=1, world=world)
        msg = str(e.value)
        assert "--grad-accum" not in msg and f"which {world} processes cannot share" in msg, msg
        ranks = int(m.group(1)) if (m := re.search(r"--nproc_per_node (\d+) train\.py", msg)) else 1
        assert ranks < world and micro % ranks == 0, msg
        launch = f"torchrun --nproc_per_node {ranks} train.py" if ranks > 1 else "python train.py"
        assert msg.endswith(f"`{launch} --out R --resume`."), msg
        return
    if want * world != micro:
        with pytest.raises(UsageError, match=f"--grad-accum {want} \\(the run has {old_accum} on {old_world}"):
            rundir.merge_resume(cfg, given, old, resolve, step=1, world=world)
        return
    changed = rundir.merge_resume(cfg, given, old, resolve, step=1, world=world)
    assert cfg.grad_accum * world == micro
    assert changed == ({"grad_accum": [old_accum, cfg.grad_accum]} if cfg.grad_accum != old_accum else {})


def test_resume_end_to_end(tmp_path, capsys):
    """Reproduction 3 (and 8): an interrupted run exits 3 and prints a one-line LoRA report; a resume
    with --lora-alpha or --lora-r is refused naming the flag and writes nothing; --lr is applied."""
    out = tmp_path / "r"
    p = train(out, "--max-steps", "8", "--save-every", "0", "--log-every", "2", "--debug-interrupt-at-step", "4")
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    lora_line = next(line for line in p.stdout.splitlines() if line.startswith("LoRA"))
    assert len(lora_line) < 200 and "'modules'" not in p.stdout
    progress = [line for line in p.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/8", "4/8"]  # not a terminal: every --log-every
    before = tree(out)
    refusals = [
        (["--lora-alpha", "128"], "--lora-alpha 128.0 (the run has 32.0)"),
        (["--lora-r", "8", "--seed", "3"], "--lora-r 8 (the run has 16), --seed 3 (the run has 0)"),
    ]
    for flags, named in refusals:
        code, _, err = train_here(capsys, out, "--resume", *flags)
        assert code == EXIT_USAGE and named in one_sentence(err)
        assert tree(out) == before  # nothing written, config.json included
    code, _, err = train_here(capsys, out, "--resume", "--lr", "0.5", "--max-steps", "10")
    assert code == 0, err[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 0.5 and cfg["max_steps"] == 10
    assert cfg["resumes"] == [{"step": 4, "changed": {"lr": [3e-3, 0.5], "max_steps": [8, 10]}}]
    lrs = {r["step"]: r["lr"] for r in metrics(out) if "lr" in r}
    assert sorted(lrs) == [2, 4, 6, 8, 10]
    from minilora.train.schedule import cosine_with_warmup

    before, after = (cosine_with_warmup(cfg["warmup_steps"], n, cfg["min_lr_ratio"]) for n in (8, 10))
    assert lrs[2] == pytest.approx(3e-3 * before(2))  # before the resume: the run's schedule
    assert [lrs[s] for s in (6, 8, 10)] == pytest.approx([0.5 * after(s) for s in (6, 8, 10)])  # after: the new one


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_then_resume_logs_each_step_once(tmp_path, capsys, seed):
    """Reproduction 4: after kill -9 and --resume, metrics.jsonl held the steps logged after the last
    checkpoint twice, and a half-written checkpoint folder stayed forever."""
    out = tmp_path / "k"
    args = ["--max-steps", "24", "--save-every", "3", "--log-every", "1", "--eval-every", "5"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(str(out)) is None:
        time.sleep(0.02)
        assert proc.poll() is None
    time.sleep(random.Random(seed).uniform(0.0, 0.4))  # somewhere in steps, logs, validations, saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = [out / "checkpoints" / ".step_0000099.tmp-ab_12", out / ".adapter.tmp-x9", out / ".config.json.k2.tmp"]
    for path in stale:  # as a kill inside save_checkpoint / save_adapter / write_file_atomic leaves them
        path.mkdir() if "adapter" in path.name or "step" in path.name else path.write_text("half")
    code, _, err = train_here(capsys, out, *args, "--resume")
    assert code == 0, err[-3000:]
    rows = metrics(out)
    keys = [(r["step"], "loss" in r) for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert sorted(s for s, is_train in keys if is_train) == list(range(1, 25))
    assert temps(out) == []
