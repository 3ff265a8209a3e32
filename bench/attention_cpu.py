"""Training attention on the CPU by shape: PyTorch's 16-bit flash kernel beside its float32 kernel.

    python -m bench.attention_cpu [--threads 2] [--repeat 7] [--tokens 1024]

One forward + backward of causal GQA attention per shape, bf16 q, k, v (B, H, T, hd), B = tokens / T
rows so that every shape does the work of the same number of tokens (per token it grows with T):
  bf16      F.scaled_dot_product_attention on the bf16 tensors (its CPU flash kernel)
  float32   models/ops.attention's float32 path: the same kernel on float32 copies, output and
            gradients rounded back to bf16 (_Float32FlashFn)
timed round-robin (bench.common.interleaved_medians). `chosen` is what models/ops.attention_in_float32
picks; ratio = bf16 time / float32 time (> 1: float32 is faster). Writes
bench/results/attention_cpu.json with the CPU model, its flags and the thread count.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import cpu_info, environment, interleaved_medians, write_json
from minilora.models import ops

# (H, Hkv, hd): SmolLM2-135M's heads, a Llama-3-style head_dim 128, Gemma 3 1B's
HEADS = [(9, 3, 64), (8, 2, 128), (4, 1, 256)]
LENGTHS = [64, 128, 192, 256, 384, 512, 768, 1024]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=1024, help="B * T of every shape")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; flags {' '.join(cpu['flags'])}; {cpu['threads']} threads")
    rows = []
    print(f"{'H/Hkv':>6} {'hd':>4} {'T':>5} {'B':>3} {'bf16 ms':>9} {'float32 ms':>11} {'ratio':>6}  chosen")
    for H, Hkv, hd in HEADS:
        for T in LENGTHS:
            B = max(1, a.tokens // T)
            gen = torch.Generator().manual_seed(0)
            q, k, v, g = (torch.randn(B, h, T, hd, generator=gen).bfloat16() for h in (H, Hkv, Hkv, H))
            q, k, v = (x.requires_grad_() for x in (q, k, v))

            def bf16():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)

            def float32():
                ops._Float32FlashFn.apply(q, k, v, None, hd**-0.5).backward(g)

            t = interleaved_medians({"bf16": bf16, "float32": float32}, repeat=a.repeat)
            chosen = "float32" if ops.attention_in_float32("cpu", torch.bfloat16, T, hd) else "bf16"
            row = dict(H=H, Hkv=Hkv, hd=hd, T=T, B=B, bf16_ms=1e3 * t["bf16"], float32_ms=1e3 * t["float32"])
            row["ratio"], row["chosen"] = t["bf16"] / t["float32"], chosen
            rows.append(row)
            print(
                f"{H:>3}/{Hkv:<2} {hd:>4} {T:>5} {B:>3} {row['bf16_ms']:>9.1f} {row['float32_ms']:>11.1f} "
                f"{row['ratio']:>6.2f}  {chosen}"
            )
    wrong = [r for r in rows if (r["ratio"] > 1) != (r["chosen"] == "float32")]
    print(f"shapes where the choice is not the faster kernel: {len(wrong)} of {len(rows)}")
    path = write_json("attention_cpu", {"env": environment(), "cpu": cpu, "tokens": a.tokens, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
