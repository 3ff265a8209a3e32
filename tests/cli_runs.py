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


def write_tiny_llama(d, **config):
    """A tiny Llama checkpoint in folder d (transformers' save_pretrained, random weights) with the demo
    tokenizer: hidden 32, one layer, a 256-token context unless `config` says otherwise."""
    import shutil

    import transformers

    geometry = dict(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**geometry, **config})).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "examples", "tokenizer", f), os.path.join(d, f))
    return d


def tiny_run(run, config: dict, quantize=None, dtype=None, r: int = 4, b_scale: float = 0.5):
    """A train.py-shaped run folder on the `tiny` model without training: adapter/ of rank r with a
    seeded random non-zero B (b_scale), and `config` as its config.json."""
    import torch

    from minilora.lora.adapter import save_adapter
    from minilora.lora.surgery import apply_lora, lora_modules
    from minilora.models.loader import load_model

    model, _ = load_model("tiny", quantize=quantize, dtype=dtype or torch.float32)
    apply_lora(model, "all-linear", r=r, alpha=2 * r, dropout=0.0, seed=0, verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * b_scale)
    save_adapter(model, os.path.join(run, "adapter"), "tiny")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    return run
