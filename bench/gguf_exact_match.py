"""What each GGUF type costs a fine-tune: bits per weight and the exact-match drop of the export's task
gate, on a small model trained with train.py and exported with eval.py, as a user runs them.

    python -m bench.gguf_exact_match [--base q4_0-grid|plain] [--items 64]

The task: complete "item NN is" with one of eight words (NN = 00..items-1, the word drawn at random),
a lookup the LoRA adapter must memorize. train.py trains on all pairs (--eval-data the same file,
so the gate scores the pairs the adapter learned, not held-out ones); then, for each type,

    python eval.py export --adapter RUN --out T.gguf --format gguf --gguf-type T --gate-examples ITEMS \
        --max-quality-drop 100

and the gate's log line "task gate (gguf T) ...: merged -> export exact match A% -> B%" gives the drop
A - B (greedy completions of the merged model in minilora vs the export in transformers' GGUF loader).

The model: a random 4-layer Llama whose every row is a multiple of 256 (hidden 256, MLP 768, 4 heads
/ 2 kv, vocab 1024, the bundled tokenizer, tied embeddings), so the K-quant types write K-quant
blocks, not their 32-value fallbacks. --base q4_0-grid puts the block linears on Q4_0's grid first
(tests/test_export_gate.py's toy at this size: a base already stored at 4 bits, the fine-tune living
in deltas of the order of Q4_0's step); --base plain leaves the random weights as they are.
Bits per weight: 8 x the bytes of all tensors over their element count (the file's tokenizer and
metadata left out: at this size they would dominate).
Writes bench/results/gguf_exact_match_<base>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
GATE_LINE = re.compile(r"task gate \(gguf (\w+)\).*exact match ([\d.]+)% -> ([\d.]+)%")


def build_base(path: str, on_q4_0_grid: bool, seed: int = 0) -> int:
    """Save the random base (see the module docstring) with the bundled tokenizer; returns its parameter count."""
    import gguf
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    q4 = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if on_q4_0_grid and p.dim() == 2 and "layers" in name:  # w -> dequantize(quantize_q4_0(w))
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q4), q4)))
    hf.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "examples", "tokenizer", f), os.path.join(path, f))
    return sum(p.numel() for p in hf.parameters())


def write_task(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"item {i:02d} is", "completion": " " + rng.choice(WORDS)}) + "\n")


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)


def tensor_bits(path: str) -> float:
    """8 x tensor bytes / tensor elements of a GGUF file."""
    from gguf import GGUFReader

    ts = GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=["q4_0-grid", "plain"], default="q4_0-grid")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gguf_exact_match_<base>.json)")
    args = p.parse_args(argv)

    from bench.common import environment, write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, data, run = (os.path.join(tmp, x) for x in ("base", "items.jsonl", "run"))
        n_params = build_base(base, args.base == "q4_0-grid")
        write_task(data, args.items)
        train = ["train.py", "--model", base, "--data", data, "--val-data", data, "--eval-data", data]
        train += ["--allow-contamination", "--no-dedup", "--template", "raw", "--quantize", "none"]
        train += ["--dtype", "float32", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0"]
        train += ["--lr", "3e-3", "--warmup-steps", "5", "--batch-size", "16", "--epochs", str(args.epochs)]
        train += ["--eval-generate", str(args.items), "--save-every", "100000", "--threads", "2", "--out", run]
        t0 = time.perf_counter()
        tr = run_cli(train)
        train_s = time.perf_counter() - t0
        if tr.returncode:
            print(tr.stderr[-3000:], file=sys.stderr)
            return 1
        summary = json.load(open(os.path.join(run, "summary.json")))
        print(f"trained in {train_s:.0f} s", flush=True)
        for gguf_type in TYPES:
            out = os.path.join(tmp, f"{gguf_type}.gguf")
            cmd = ["eval.py", "export", "--adapter", run, "--out", out, "--format", "gguf", "--gguf-type", gguf_type]
            ex = run_cli(cmd + ["--gate-examples", str(args.items), "--max-quality-drop", "100"])
            hit = [GATE_LINE.search(line) for line in (ex.stdout + ex.stderr).splitlines()]
            hit = [h for h in hit if h]
            if ex.returncode or not hit:
                print(ex.stderr[-3000:], file=sys.stderr)
                return 1
            merged, export = float(hit[-1].group(2)), float(hit[-1].group(3))
            rows.append(
                {
                    "gguf_type": gguf_type,
                    "bits_per_weight": tensor_bits(out),
                    "file_bytes": os.path.getsize(out),
                    "merged_exact_match": merged,
                    "export_exact_match": export,
                    "drop_points": round(merged - export, 1),  # the gate prints one decimal
                }
            )
            print(f"  {gguf_type}: {merged:.1f}% -> {export:.1f}%", flush=True)

    print(f"\nbase {args.base}, {n_params / 1e6:.2f}M parameters, {args.items} trained pairs, gate exact match")
    print(f"{'type':8}{'bits/w':>8}{'merged':>9}{'export':>9}{'drop':>7}")
    for r in rows:
        print(
            f"{r['gguf_type']:8}{r['bits_per_weight']:8.2f}{r['merged_exact_match']:8.1f}%"
            f"{r['export_exact_match']:8.1f}%{r['drop_points']:7.1f}"
        )
    payload = {"args": vars(args), "env": environment(), "parameters": n_params, "train_s": train_s}
    payload.update(train_summary=summary, rows=rows)
    path = write_json(f"gguf_exact_match_{args.base}", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
