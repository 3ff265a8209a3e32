"""Forward tokens/s on the CPU: minilora's Transformer beside transformers, same weights.

    python -m bench.forward_cpu [--ckpt /tmp/minilora_gemma3_1b] [--tokens 128] [--batch 1]
                                [--dtype bfloat16|float32] [--repeat 5]

Uses the Gemma-3-1B-shaped random checkpoint that bench/load.py writes (written here too if
missing). Both models are loaded dense in --dtype from the same folder; transformers runs with
attn_implementation="sdpa" (its default), minilora with its SDPA path. One forward of (batch,
tokens) under torch.inference_mode; after the first (checked) forward of each, the two are timed
alternately --repeat times and the medians reported. Also checks the two
logits agree (relative error printed). Writes bench/results/forward_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/minilora_gemma3_1b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from bench.load import write_checkpoint
    from minilora.models.loader import load_model

    if not os.path.isfile(os.path.join(args.ckpt, "model.safetensors")):
        write_checkpoint(args.ckpt)
    from bench.common import environment, median_time, write_json

    dtype = getattr(torch, args.dtype)
    ours, _ = load_model(args.ckpt, quantize=None, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(
        0, ours.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    n = args.batch * args.tokens
    with torch.inference_mode():
        a, b = ours(ids).float(), hf(ids).logits.float()
        rel = ((a - b).abs().max() / b.abs().max()).item()
        # Interleaved (ours, theirs, ours, ...) so load from other processes hits both alike.
        times = {"minilora": [], "transformers": []}
        for _ in range(args.repeat):
            times["minilora"].append(median_time(lambda: ours(ids), repeat=1, warmup=0))
            times["transformers"].append(median_time(lambda: hf(ids).logits, repeat=1, warmup=0))
        t_ours, t_hf = statistics.median(times["minilora"]), statistics.median(times["transformers"])
    rows = {"minilora": n / t_ours, "transformers": n / t_hf}
    print(
        f"\nforward, Gemma 3 1B geometry, {args.dtype}, batch {args.batch} x {args.tokens} tokens, "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeat}"
    )
    print(f"{'':14}{'tokens/s':>10}{'ms/forward':>12}{'best ms':>10}")
    for name, tps in rows.items():
        print(f"{name:14}{tps:10.1f}{1000 * n / tps:12.0f}{1000 * min(times[name]):10.0f}")
    print(
        f"ratio minilora/transformers: {rows['minilora'] / rows['transformers']:.2f}x (> 1: minilora faster); "
        f"logits relative difference {rel:.2e}"
    )
    path = write_json(
        "forward_cpu",
        {
            "geometry": "gemma-3-1b",
            "dtype": args.dtype,
            "batch": args.batch,
            "tokens": args.tokens,
            "repeat": args.repeat,
            "tokens_per_s": rows,
            "seconds": times,
            "logits_rel_diff": rel,
            "environment": environment(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
