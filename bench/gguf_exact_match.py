"""What each GGUF type costs a fine-tune: bits per weight, file size, export time and the exact-match
drop of the export's task gate, on a model trained with train.py and exported with eval.py, as a user
runs them.

    python -m bench.gguf_exact_match [--base q4_0-grid|plain] [--geometry 4-layer|llama-135m] [--items 64]

The task: complete "item NN is" with one of eight words (NN = 00..items-1, the word drawn at random),
a lookup the LoRA adapter must memorize. train.py trains on all pairs (--eval-data the same file,
so the gate scores the pairs the adapter learned, not held-out ones); then, for each type,

    python eval.py export --adapter RUN --out T.gguf --format gguf --gguf-type T --gate-examples ITEMS \
        --max-quality-drop 100

and the gate's log line "task gate (gguf T) ...: merged -> export exact match A% -> B%" gives the drop
A - B (greedy completions of the merged model in minilora vs the export in transformers' GGUF loader).

The model: a random Llama (weights drawn with std 0.1, tied embeddings, vocab 1024: the bundled
tokenizer), one of GEOMETRIES:
  4-layer      (default) hidden 256, MLP 768, 4 heads / 2 kv: 3.41M parameters, every row a multiple
               of 256, so the K-quant types write K-quant blocks, not their 32-value fallbacks.
  llama-135m   bench/train_step.py's 135M-class Llama (SmolLM2-135M's shape: 30 layers, hidden 576,
               MLP 1536, 9 heads / 3 kv) with the bundled 1024-token vocabulary in place of its 49152:
               the body of a 135M model (106.8M parameters, of which the embedding is 0.59M, against
               28.3M at the full vocabulary). Rows of 576 are not multiples of 256, so llama.cpp's
               K-quant recipes (which minilora's follow) fall back to 32-value blocks (Q5_0 / Q5_1 /
               Q8_0) for every tensor but ffn_down (rows of 1536): what users of SmolLM2 get.
--base q4_0-grid puts the block linears on Q4_0's grid first (tests/test_export_gate.py's toy: a base
already stored at 4 bits, the fine-tune living in deltas of the order of Q4_0's step); --base plain
leaves the random weights as they are.
Training: LoRA r 8 / alpha 16 on all linears, batch 16, float32 (--dtype bfloat16 exists but was not
needed: the 135M geometry's 30 epochs, 120 steps, took 3.5-5.5 min on 2 shared cores).
Bits per weight: 8 x the bytes of all tensors over their element count (the file's tokenizer and
metadata left out: at this size they would dominate); file bytes: the whole file. Logit error: the
export's own validation line "vs the unquantized merged model: logits max rel err" (max |logit
difference| over the largest merged logit, on the prompts that line's "validating" line names). Export seconds:
from launching `eval.py export` to its "validating" log line (interpreter start, load, float32 merge,
write; the readback and the gate come after and are not counted).
Writes bench/results/gguf_exact_match_<base>.json (4-layer) or _<base>_<geometry>.json.
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

from bench.train_step import GEOMETRIES as TRAIN_STEP_GEOMETRIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
GATE_LINE = re.compile(r"task gate \(gguf (\w+)\).*exact match ([\d.]+)% -> ([\d.]+)%")
VS_MERGED_LINE = re.compile(
    r"vs the unquantized merged model: logits max rel err ([\d.e+-]+), greedy tokens agreeing ([\d.]+)%"
)
PROMPTS_LINE = re.compile(r"^validating \S+ on (.*)$")
# LlamaConfig keyword arguments (vocabulary and the rest set in build_base), training defaults
# (--epochs / --lr override them), and whether train.py scores the pairs itself before and after
# training (--eval-generate: up to 64 new tokens a pair, minutes at 135M, where the gate scores the
# merged model anyway).
_LLAMA_135M = {k: v for k, v in TRAIN_STEP_GEOMETRIES["llama-135m"].items() if k not in ("family", "vocab_size")}
GEOMETRIES = {
    "4-layer": dict(
        config=dict(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),
        epochs=60,
        lr=3e-3,
        train_scores=True,
    ),
    "llama-135m": dict(config=_LLAMA_135M, epochs=30, lr=3e-3, train_scores=False),
}


def build_base(path: str, geometry: str, on_q4_0_grid: bool, seed: int = 0) -> int:
    """Save the random base (see the module docstring) with the bundled tokenizer; returns its parameter count."""
    import gguf
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        **GEOMETRIES[geometry]["config"],
        vocab_size=1024,
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


def run_export(args: list[str]) -> tuple[int, str, float | None]:
    """Run `python eval.py export ARGS`; returns (exit status, its output, seconds from launch to the
    "validating" log line, None when the line never came): the log is read line by line as it is written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0, export_s, lines = time.perf_counter(), None, []
    with subprocess.Popen(
        [sys.executable, "eval.py", "export", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        for line in proc.stdout:
            if export_s is None and line.startswith("validating "):
                export_s = time.perf_counter() - t0
            lines.append(line)
    return proc.returncode, "".join(lines), export_s


def tensor_facts(path: str) -> tuple[float, dict]:
    """(8 x tensor bytes / tensor elements, {GGML type name: tensor count}) of a GGUF file."""
    from collections import Counter

    from gguf import GGUFReader

    ts = GGUFReader(path).tensors
    bits = 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)
    return bits, dict(Counter(t.tensor_type.name for t in ts).most_common())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=["q4_0-grid", "plain"], default="q4_0-grid")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="4-layer")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--epochs", type=int, default=None, help="default: the geometry's (see GEOMETRIES)")
    p.add_argument("--lr", type=float, default=None, help="default: the geometry's (see GEOMETRIES)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="train.py's compute dtype")
    p.add_argument(
        "--out", default=None, help="JSON path (default bench/results/gguf_exact_match_<base>[_<geometry>].json)"
    )
    args = p.parse_args(argv)
    g = GEOMETRIES[args.geometry]
    args.epochs = g["epochs"] if args.epochs is None else args.epochs
    args.lr = g["lr"] if args.lr is None else args.lr

    from bench.common import cpu_info, environment, write_json

    cpu = cpu_info()
    threads = f"train.py --threads 2, eval.py export with torch's default threads ({cpu['threads']})"
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}); {threads}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, data, run = (os.path.join(tmp, x) for x in ("base", "items.jsonl", "run"))
        n_params = build_base(base, args.geometry, args.base == "q4_0-grid")
        write_task(data, args.items)
        train = ["train.py", "--model", base, "--data", data, "--val-data", data, "--eval-data", data]
        train += ["--allow-contamination", "--no-dedup", "--template", "raw", "--quantize", "none"]
        train += ["--dtype", args.dtype, "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0"]
        train += ["--lr", str(args.lr), "--warmup-steps", "5", "--batch-size", "16", "--epochs", str(args.epochs)]
        train += [
            "--eval-generate",
            str(args.items if g["train_scores"] else 0),
            "--save-every",
            "100000",
            "--threads",
            "2",
            "--out",
            run,
        ]
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
            cmd = ["--adapter", run, "--out", out, "--format", "gguf", "--gguf-type", gguf_type]
            rc, log, export_s = run_export(cmd + ["--gate-examples", str(args.items), "--max-quality-drop", "100"])
            hit = [GATE_LINE.search(line) for line in log.splitlines()]
            hit = [h for h in hit if h]
            if rc or not hit:
                print(log[-3000:], file=sys.stderr)
                return 1
            merged, export = float(hit[-1].group(2)), float(hit[-1].group(3))
            vs = [m for m in map(VS_MERGED_LINE.search, log.splitlines()) if m]
            on = [m for m in map(PROMPTS_LINE.search, log.splitlines()) if m]
            bits, types = tensor_facts(out)
            rows.append(
                {
                    "gguf_type": gguf_type,
                    "bits_per_weight": bits,
                    "file_bytes": os.path.getsize(out),
                    "export_s": export_s,
                    "tensor_types": types,
                    "rel_logit_err": float(vs[-1].group(1)) if vs else None,
                    "greedy_agree": float(vs[-1].group(2)) / 100 if vs else None,
                    "validation_prompts": on[-1].group(1) if on else None,
                    "merged_exact_match": merged,
                    "export_exact_match": export,
                    "drop_points": round(merged - export, 1),  # the gate prints one decimal
                }
            )
            os.remove(out)
            print(f"  {gguf_type}: {merged:.1f}% -> {export:.1f}%, export {export_s:.1f} s, {types}", flush=True)

    print(
        f"\n{args.geometry}, base {args.base}, {n_params / 1e6:.2f}M parameters, {args.items} trained pairs, "
        "gate exact match"
    )
    print(f"logit error: the export's validation against the merged model, on {rows[-1]['validation_prompts']}")
    print(f"{'type':8}{'bits/w':>8}{'MiB':>8}{'export s':>10}{'logit err':>11}{'merged':>9}{'export':>9}{'drop':>7}")
    for r in rows:
        err = f"{r['rel_logit_err']:11.2e}" if r["rel_logit_err"] is not None else f"{'-':>11}"
        print(
            f"{r['gguf_type']:8}{r['bits_per_weight']:8.2f}{r['file_bytes'] / 2**20:8.1f}{r['export_s']:10.1f}{err}"
            f"{r['merged_exact_match']:8.1f}%{r['export_exact_match']:8.1f}%{r['drop_points']:7.1f}"
        )
    payload = {"args": vars(args), "env": {**environment(), "cpu": cpu["model"], "flags": cpu["flags"]}}
    payload.update(geometry=g["config"], parameters=n_params, train_s=train_s, train_summary=summary, rows=rows)
    name = f"gguf_exact_match_{args.base}" + ("" if args.geometry == "4-layer" else f"_{args.geometry}")
    path = write_json(name, payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
