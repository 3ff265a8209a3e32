"""train.py's command line and run folder keep their promises: flags mean what they say, a run folder
is written only by train.py, --resume refuses what would corrupt a run and applies what it may,
a kill -9 at any moment is resumed with every step logged once, and every user error is one sentence.

The rules are tested in-process (hypothesis over folder states and over which flags change); each
reproduction of the issue also runs as the user runs it, `python train.py` in a subprocess, on the
tiny model for a few steps.
"""

import argparse
import dataclasses
import importlib.util
import io
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
from hypothesis import given
from hypothesis import strategies as st

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from minilora.data.encode import encode_example, max_line_bytes, prepare_data
from minilora.data.records import Example
from minilora.train import rundir
from minilora.train.checkpoint import latest_checkpoint
from minilora.train.config import DEMO_OVERRIDES, TrainConfig, build_parser, given_flags, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--eval-generate", "0", "--eval-every", "0", "--threads", "1"]
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]

_spec = importlib.util.spec_from_file_location("minilora_train_cli", os.path.join(ROOT, "train.py"))
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


def train(out, *args, timeout=300):
    """`python train.py --out OUT ...` as a user runs it (signals, exit code, messages)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def train_here(capsys, out, *args) -> tuple[int, str, str]:
    """train.py's main() in this process: for runs refused before training and for resumes (no
    interpreter start-up)."""
    code = train_cli.main(["--out", str(out), *FAST, *args])
    out_, err = capsys.readouterr()
    return code, out_, err


def one_sentence(p_or_err: str) -> str:
    assert "Traceback" not in p_or_err, p_or_err[-3000:]
    line = p_or_err.strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith("."), line
    return line


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tree(folder) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def temps(folder) -> list[str]:
    return [
        os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files if ".tmp" in n or ".old-" in n
    ]


# ------------------------------------------------------------------ 1. flags mean what they say
def _value_text(name, value):
    return os.path.relpath(value, ROOT) if name == "eval_data" and value else str(value)


@given(st.sets(st.sampled_from(sorted(DEMO_OVERRIDES))), st.data())
def test_demo_preset_yields_to_every_given_flag_and_abbreviations_are_errors(names, data):
    """A flag given in full wins over the tiny preset; an abbreviation of it is refused, never
    silently replaced by the preset (`--epoch 7` used to train 3 epochs)."""
    values = {
        "eval_data": os.path.join(ROOT, "examples", "demo", "train.jsonl"),
        "lr": 0.5,
        "epochs": 7,
        "warmup_steps": 3,
        "eval_every": 11,
        "lora_dropout": 0.2,
        "threads": 2,
        "log_every": 4,
        "save_every": 7,
    }
    argv = []
    for name in sorted(names):
        flag = "--" + name.replace("_", "-")
        if isinstance(DEMO_OVERRIDES[name], bool):
            argv.append(flag if not DEMO_OVERRIDES[name] else "--no-" + flag[2:])
        else:
            argv += [flag, str(values[name])]
    cfg = parse_args(argv)
    assert given_flags(argv) == names
    for name in DEMO_OVERRIDES:
        want = (
            (not DEMO_OVERRIDES[name])
            if name in names and isinstance(DEMO_OVERRIDES[name], bool)
            else (values.get(name) if name in names else DEMO_OVERRIDES[name])
        )
        assert getattr(cfg, name) == want, name
    name = data.draw(st.sampled_from(sorted(set(DEMO_OVERRIDES) - {"gradient_checkpointing"})))
    flag = "--" + name.replace("_", "-")
    cut = data.draw(st.integers(len(flag) - 4, len(flag) - 1).filter(lambda n: n > 2), label="prefix")
    with pytest.raises(SystemExit) as e:
        parse_args([flag[:cut], "1"])
    assert e.value.code == EXIT_USAGE


def test_help_shows_what_a_bare_run_uses():
    """For every flag, --help shows the value `python train.py` (the tiny demo) really uses."""
    helps = {a.dest: a for a in build_parser()._actions}
    bare = parse_args([])
    text = build_parser().format_help()
    for name in FIELDS:
        action = helps[name]
        if action.help == argparse.SUPPRESS:
            continue
        used = getattr(bare, name)
        if used != action.default:
            assert f"[tiny: {_value_text(name, used)}]" in action.help, name
    assert "exit codes" in text and f"{EXIT_INTERRUPTED} interrupted" in text


# ------------------------------------------------------------------------- 2. the run folder
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
        ckpt, old = rundir.check_out(str(out), resume)
        assert (ckpt is not None) == (state == "run_ckpt")
        assert (old is not None) == state.startswith("run")
    else:
        with pytest.raises(UsageError, match=re.escape(str(out))) as e:
            rundir.check_out(str(out), resume)
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


# ------------------------------------------------------------------------------- 3. --resume
def test_every_flag_has_a_resume_rule():
    """Each TrainConfig field is refused, changeable, or this invocation's own on --resume."""
    groups = [rundir.ADAPTER_FIELDS, rundir.STREAM_FIELDS, rundir.CHANGEABLE_FIELDS, rundir.NOT_INHERITED]
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
    bad = sorted(n for n in changed if n in rundir.ADAPTER_FIELDS + rundir.STREAM_FIELDS)
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


# ------------------------------------------------------------------------ 4. kill -9, resume
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


# ------------------------------------------------------------------ 5, 7. one sentence, exit 2
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
    ],
)
def test_user_errors_are_one_sentence(tmp_path, capsys, args, message):
    before = os.listdir(tmp_path)
    argv = ["--out", str(tmp_path / "x"), *args] if "--out" not in args else args
    code = train_cli.main(argv)
    assert code == EXIT_USAGE and message in one_sentence(capsys.readouterr().err)
    assert os.listdir(tmp_path) == before


# ------------------------------------------------------------------- 6. long lines, unread
@pytest.fixture(scope="module")
def tok():
    from minilora.models.loader import load_model

    return load_model("tiny", quantize=None, dtype=torch.float32)[1]


@given(st.text(max_size=60), st.text(max_size=60), st.sampled_from(["chat", "raw"]), st.booleans())
def test_long_line_limit_never_drops_an_example_that_fits(tok, prompt, completion, template, ascii_only):
    """max_line_bytes is sound: any line whose example encodes to n tokens is at most
    max_line_bytes(tok, n) bytes, however its text is escaped (control characters, non-ASCII)."""
    line = json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=ascii_only).encode()
    enc = encode_example(Example(prompt, completion, "prompt_completion"), tok, template, max_seq_len=10**6)
    assert len(line) <= max_line_bytes(tok, len(enc))


def test_a_huge_line_is_dropped_before_tokenizing(tmp_path, tok):
    """Reproduction 6: one long line used to be tokenized whole (a 50 MB line: 70 s, 8.2 GB)."""
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    rows[3] = {"prompt": "x " * 200_000, "completion": "y"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    encode = tok.encode
    tok.encode = lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    try:
        data = prepare_data(path, tok, template="raw", max_seq_len=64, val_fraction=0, dedup=False, skip_bad_lines=True)
    finally:
        del tok.encode
    assert max(seen) < 1000  # the long line was never tokenized
    assert data.summary["dropped_too_long"] == 1 and len(data.train) == 7
    assert data.summary["long_lines_dropped_at"] == "d.jsonl lines 4"


# ---------------------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch, tty):
    from minilora.cli import Progress

    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = Progress(20)
    for step in (5, 10, 20):
        bar.update(step, f"loss {step / 10:.4f} | lr 1.00e-03 | 9 tok/s | peak 3 MB")
    bar.close()
    text = err.getvalue()
    if tty:  # tqdm redraws one line with \r: the counter and the postfix
        assert "\r" in text and "20/20" in text and "loss 2.0000 | lr 1.00e-03 | 9 tok/s | peak 3 MB" in text
    else:  # one line per update, nothing in between
        assert text.splitlines() == [
            f"step {s}/20 loss {s / 10:.4f} | lr 1.00e-03 | 9 tok/s | peak 3 MB" for s in (5, 10, 20)
        ]
