"""Packed rows against length-grouped padded batches on real prompt/completion lengths.

    python -m bench.packing                       # 135M-class Llama, the Alpaca seed tasks' lengths x 3
    python -m bench.packing --layers 2 --repeat 1 # a smoke run

Lengths: the 175 seed tasks of Stanford Alpaca (tatsu-lab/stanford_alpaca, seed_tasks.jsonl): the
word counts of instruction + input (the prompt) and of the output (the completion), below, turned
into tokens at 4/3 tokens per word (English text under a ~50k BPE vocabulary), plus 8 tokens of
chat template around the prompt and the EOS after the completion; prompts are cut from the left to
fit --max-seq-len. The token ids are random (the lengths are what batching sees); the completion is
labelled. Each example appears --repeat times.

Three modes, each in its own process (its own peak RSS), the same model, LoRA and optimizer
(load_model NF4 in --dtype, apply_lora all-linear r 16, PagedAdamW, chunked_lm_loss, clip, step;
no recompute, the planner's choice for this size), one epoch in train.py's batch order:

  padded          --batch-size examples per batch, length-grouped, right-padded (train.py's default)
  packed          --batch-size rows of --max-seq-len, best-fit decreasing (train.py --pack)
  packed, tokens  packed rows, as many rows per batch as the padded batches' mean real tokens fill
                  (the same tokens per optimizer step as padded)

Measured: real (non-padding) tokens per second over the epoch after --warmup batches, the share
of batch slots holding real tokens, tokens per step, the process's peak RSS (VmHWM). Packed rows
need a block-diagonal attention mask (each example attends within itself), so they cannot use
scaled-dot-product attention's causal fast path; padded rows can. Reports this CPU's bf16 units.
Writes bench/results/packing.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.train_step import GEOMETRIES, ROOT

# Stanford Alpaca seed tasks (175): words of instruction + input, and of the output.
PROMPT_WORDS = [
    21,
    15,
    19,
    15,
    44,
    22,
    8,
    15,
    8,
    14,
    12,
    8,
    5,
    34,
    32,
    17,
    22,
    5,
    122,
    29,
    12,
    7,
    20,
    10,
    27,
    6,
    67,
    6,
    36,
    44,
    10,
    28,
    12,
    10,
    18,
    17,
    12,
    39,
    9,
    174,
    16,
    19,
    37,
    30,
    23,
    39,
    15,
    20,
    12,
    17,
    39,
    49,
    10,
    41,
    9,
    12,
    8,
    9,
    9,
    14,
    9,
    63,
    1000,
    7,
    121,
    9,
    44,
    14,
    29,
    21,
    18,
    21,
    12,
    14,
    31,
    204,
    8,
    13,
    43,
    16,
    9,
    12,
    8,
    200,
    12,
    129,
    29,
    33,
    9,
    51,
    14,
    13,
    26,
    15,
    35,
    9,
    55,
    16,
    86,
    11,
    23,
    20,
    6,
    39,
    35,
    16,
    7,
    11,
    46,
    30,
    5,
    10,
    11,
    11,
    29,
    9,
    13,
    27,
    8,
    52,
    9,
    17,
    66,
    17,
    15,
    21,
    21,
    9,
    32,
    40,
    90,
    10,
    12,
    12,
    21,
    73,
    63,
    46,
    18,
    13,
    12,
    65,
    21,
    12,
    20,
    12,
    8,
    12,
    23,
    29,
    42,
    17,
    24,
    48,
    24,
    22,
    148,
    24,
    68,
    80,
    21,
    31,
    231,
    13,
    21,
    56,
    58,
    89,
    94,
    120,
    101,
    56,
    71,
    66,
    31,
]
COMPLETION_WORDS = [
    52,
    11,
    74,
    158,
    11,
    53,
    92,
    66,
    11,
    63,
    29,
    46,
    41,
    42,
    15,
    7,
    19,
    38,
    20,
    65,
    105,
    17,
    3,
    59,
    88,
    5,
    13,
    13,
    93,
    122,
    14,
    30,
    90,
    55,
    71,
    6,
    21,
    29,
    5,
    12,
    85,
    1,
    27,
    3,
    9,
    25,
    114,
    41,
    3,
    16,
    23,
    5,
    306,
    1,
    15,
    70,
    70,
    14,
    5,
    50,
    22,
    43,
    45,
    12,
    19,
    89,
    24,
    2,
    10,
    19,
    33,
    86,
    5,
    79,
    252,
    11,
    5,
    5,
    30,
    89,
    66,
    52,
    74,
    24,
    13,
    13,
    115,
    168,
    5,
    92,
    5,
    38,
    30,
    17,
    55,
    49,
    17,
    10,
    63,
    109,
    88,
    8,
    24,
    179,
    17,
    16,
    6,
    28,
    35,
    39,
    9,
    213,
    45,
    4,
    6,
    20,
    312,
    1,
    77,
    571,
    22,
    21,
    52,
    10,
    26,
    19,
    5,
    52,
    54,
    135,
    123,
    48,
    6,
    78,
    1,
    16,
    118,
    15,
    38,
    16,
    10,
    64,
    67,
    123,
    6,
    42,
    29,
    6,
    2,
    25,
    1,
    1,
    1,
    2,
    1,
    3,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    5,
    1,
    1,
    6,
    1,
    1,
]
TOKENS_PER_WORD, TEMPLATE_TOKENS = 4 / 3, 8
MODES = ("padded", "packed", "packed, tokens")


def example_lengths(max_seq_len: int, repeat: int) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) per example, prompts cut so that each fits max_seq_len."""
    out = []
    for pw, cw in zip(PROMPT_WORDS, COMPLETION_WORDS):
        c = min(max_seq_len - 2, round(cw * TOKENS_PER_WORD) + 1)  # + EOS
        p = min(max_seq_len - c, round(pw * TOKENS_PER_WORD) + TEMPLATE_TOKENS)
        out.append((p, c))
    return out * repeat


def encoded_examples(a, vocab: int) -> list:
    import torch

    from minilora.data.encode import EncodedExample
    from minilora.data.packing import IGNORE

    gen = torch.Generator().manual_seed(0)
    out = []
    for p, c in example_lengths(a.max_seq_len, a.repeat):
        ids = torch.randint(3, vocab, (p + c,), generator=gen).tolist()
        out.append(EncodedExample(ids, [IGNORE] * p + ids[p:]))
    return out


def worker(mode: str, ckpt: str, a) -> dict:
    """Runs in a fresh process: one epoch of one mode, timed step by step."""
    import torch

    from bench.common import status_kib
    from minilora.data.packing import batches, plan_batches
    from minilora.dtypes import auto_dtype, dtype_name
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.loader import load_model
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.train.loss import chunked_lm_loss

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    dtype = auto_dtype(dev) if a.dtype == "auto" else getattr(torch, a.dtype)
    encoded = encoded_examples(a, GEOMETRIES["llama-135m"]["vocab_size"])
    lengths = [len(e) for e in encoded]
    rows = a.batch_size
    if mode == "packed, tokens":  # rows of max_seq_len holding the padded batches' mean real tokens
        padded = plan_batches(lengths, a.batch_size, seed=0)
        mean_tokens = sum(lengths) / len(padded)
        rows = max(1, round(mean_tokens / a.max_seq_len))
    pack = mode != "padded"
    model, _ = load_model(ckpt, quantize="nf4", dtype=dtype, device=dev)
    apply_lora(model, targets="all-linear", r=16, alpha=32, dropout=0.0, seed=0, verbose=False)
    model.train()
    params = lora_parameters(model)
    opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0)
    times, tokens, slots = [], [], []
    for i, b in enumerate(batches(encoded, rows, pack=pack, max_seq_len=a.max_seq_len, seed=0, pad_id=0)):
        t0 = time.perf_counter()
        s, n = chunked_lm_loss(model, b)
        (s / max(1, n)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
            tokens.append(int(b.attention_mask.sum()))
            slots.append(b.attention_mask.numel())
    return {
        "mode": mode,
        "rows_per_batch": rows,
        "steps_timed": len(times),
        "dtype": dtype_name(dtype),
        "tokens_per_s": sum(tokens) / sum(times),
        "tokens_per_step": statistics.mean(tokens),
        "fill": sum(tokens) / sum(slots),
        "median_step_s": statistics.median(times),
        "peak_mb": status_kib("VmHWM") / 1024,
    }


def main() -> None:
    from bench.common import environment, write_json
    from minilora.dtypes import cpu_bf16_units

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8, help="train.py's default")
    ap.add_argument("--max-seq-len", type=int, default=512, help="train.py's default")
    ap.add_argument("--repeat", type=int, default=3, help="copies of the 175 seed-task lengths")
    ap.add_argument("--warmup", type=int, default=2, help="batches not timed")
    ap.add_argument("--layers", type=int, default=0, help="0: the geometry's 30")
    ap.add_argument("--dtype", default="auto", help="auto: train.py's --dtype auto for the CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0: torch's default")
    ap.add_argument("--out", default="packing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a)))
        return

    argv = [
        f"--{k}={v}"
        for k, v in (
            ("batch-size", a.batch_size),
            ("max-seq-len", a.max_seq_len),
            ("repeat", a.repeat),
            ("warmup", a.warmup),
            ("dtype", a.dtype),
            ("threads", a.threads),
        )
    ]
    with tempfile.TemporaryDirectory(prefix="minilora_packing_") as tmp:
        ckpt = os.path.join(tmp, "llama-135m")
        write = [sys.executable, "-m", "bench.train_step", "--write-ckpt", "--geometry", "llama-135m", "--ckpt", ckpt]
        if a.layers:
            write += ["--layers", str(a.layers)]
        subprocess.run(write, check=True, cwd=ROOT)
        rows = {}
        for mode in MODES:
            p = subprocess.run(
                [sys.executable, "-m", "bench.packing", "--worker", mode, "--ckpt", ckpt, *argv],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if p.returncode != 0:
                sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
            rows[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    base = rows["padded"]
    print(
        f"135M-class Llama{f' ({a.layers} layers)' if a.layers else ''}, {len(PROMPT_WORDS) * a.repeat} examples "
        f"(Alpaca seed-task lengths), {base['dtype']}, CPU bf16 units {cpu_bf16_units()}"
    )
    print(f"{'mode':<16}{'rows':>6}{'tok/step':>10}{'fill':>8}{'tok/s':>9}{'vs padded':>11}{'peak MB':>10}")
    for mode, r in rows.items():
        print(
            f"{mode:<16}{r['rows_per_batch']:>6}{r['tokens_per_step']:>10,.0f}{r['fill']:>8.1%}"
            f"{r['tokens_per_s']:>9,.0f}{r['tokens_per_s'] / base['tokens_per_s']:>10.2f}x{r['peak_mb']:>10,.0f}"
        )
    write_json(
        a.out,
        {
            "benchmark": "packing",
            "env": environment(),
            "args": vars(a),
            "cpu_bf16_units": cpu_bf16_units(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
