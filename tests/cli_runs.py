"""How the CLI tests run train.py: as a user runs it (a subprocess) or in this process (main()), and
what they check of it (one sentence on a refusal, the run folder's files, metrics.jsonl)."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--eval-generate", "0", "--eval-every", "0", "--threads", "1"]

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
