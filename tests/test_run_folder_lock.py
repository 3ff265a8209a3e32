"""A run folder belongs to one process at a time: train.py holds an OS lock (flock on RUN/.lock, which
holds its pid) from its first write to its exit. A second train.py on the folder, or eval.py writing
report.md into it, is refused in one sentence naming the holder's pid, exit 2, nothing written; the
first run's files stay intact; and a holder killed with SIGKILL leaves no stale lock.

The holders are real other processes: a second train.py while the first trains, or a small Python
process that takes the lock through minilora.fileio and sleeps.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_runs import FAST, ROOT, metrics, one_sentence, train, train_here, tree

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE, UsageError

HOLD = """
import sys, time
from minilora.fileio import lock_folder
lock = lock_folder(sys.argv[1], create=True)
print("locked", flush=True)
time.sleep(600)
"""


def hold(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock (until killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stdout.readline()
    if line.strip() != "locked":
        p.kill()
        pytest.fail(f"the holder did not take the lock: {line!r}, exit {p.wait()}")
    return p


def kill_9(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_train_on_a_folder_another_process_holds_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        before = tree(out)
        code, _, err = train_here(capsys, out, "--max-steps", "2")
        line = one_sentence(err)
        assert code == EXIT_USAGE and f"pid {holder.pid}" in line and f"--out {out}" in line, line
        assert tree(out) == before  # nothing written: no config.json, no metrics
    finally:
        kill_9(holder)
    code, _, err = train_here(capsys, out, "--max-steps", "2")  # the OS dropped the dead holder's lock
    assert code == 0, err[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_two_train_runs_on_one_out_the_second_is_refused_and_the_first_is_intact(tmp_path):
    """Reproduction: two train.py on one --out both exited 0, the second truncating the first's
    metrics.jsonl and replacing its config.json."""
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST]
    first = subprocess.Popen(
        [*cmd, "--max-steps", "100000", "--save-every", "0", "--log-every", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.05)
        second = train(out, "--max-steps", "2")
        line = one_sentence(second.stderr)
        assert second.returncode == EXIT_USAGE and f"pid {first.pid}" in line, second.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGINT)  # the first run checkpoints and exits 3
        first.wait(timeout=120)
    assert first.returncode == EXIT_INTERRUPTED, first.stderr.read()[-3000:]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 100000  # the first run's config
    steps = [r["step"] for r in metrics(out) if "loss" in r]  # every line whole JSON, each step once
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3


def test_eval_report_into_a_run_being_trained_is_refused(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilora_eval_cli_lock", os.path.join(ROOT, "eval.py"))
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    out = tmp_path / "run"
    code, _, err = train_here(capsys, out, "--max-steps", "2")
    assert code == 0, err[-3000:]
    argv = ["--adapter", str(out), "--limit", "2", "--shots", "0", "--max-new-tokens", "2", "--device", "cpu"]
    holder = hold(out)  # e.g. `train.py --out RUN --resume` running
    try:
        before = tree(out)
        code = eval_cli.main(argv)
        err = capsys.readouterr().err
        line = one_sentence(err)
        assert code == EXIT_USAGE and f"pid {holder.pid}" in line and "report.md" in line, err[-3000:]
        assert "loading" not in err  # refused before the model was loaded, not after the evaluation
        assert tree(out) == before
    finally:
        kill_9(holder)
    assert eval_cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    assert (out / "report.md").is_file()


def test_the_lock_in_one_process(tmp_path):
    """lock_folder: the holder's pid in the file; a second taker refused naming it; create=False on a
    folder without a lock file creates nothing; claim re-checks the folder under the lock."""
    from minilora.fileio import LOCK_NAME, FolderBusy, lock_folder
    from minilora.train import rundir
    from minilora.train.config import TrainConfig

    plain = tmp_path / "plain"
    plain.mkdir()
    assert lock_folder(str(plain), create=False) is None and os.listdir(plain) == []
    run = tmp_path / "run"
    seen = rundir.check_run_folder(str(run), resume=False)
    lock = rundir.claim(str(run), False, seen)
    assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(FolderBusy) as e:
        lock_folder(str(run), create=True)
    assert e.value.pid == os.getpid()
    with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
        rundir.check_run_folder(str(run), resume=False)
    lock.release()
    assert rundir.check_run_folder(str(run), resume=False) == (None, None)  # the lock file alone: an empty folder
    # another run wrote the folder between check_run_folder and the first write: refused under the lock
    (run / "config.json").write_text(TrainConfig(out=str(run)).to_json())
    with pytest.raises(UsageError, match="changed while this run was starting"):
        rundir.claim(str(run), False, seen)
    lock_folder(str(run), create=False).release()  # and the refusal released it
