"""Benchmark: the mixed-adapter LoRA term on one GPU, Triton shrink/expand against PyTorch's gather + bmm.

    python -m bench.lora_bgmv [--adapters 8] [--rank 16] [--out PATH]

For one projection (K in_features, M out_features) and a batch whose rows use different adapters (every
adapter zero-padded to rank R, minilora/lora/mixed_term.py), side by side in one run:
    torch     mixed_gathered's PyTorch path: A_pad[idx] and B_pad[idx] gathered per row, two bmm, scale
    triton    kernels/lora_bgmv.py: the segments found (a wait for the device), then lora_shrink_triton
              and lora_expand_triton: what the first layer of a forward pays (mixed_term.token_segments)
    layer     the two kernels with the segments already found: what every later layer pays
    shrink / expand   each kernel alone, segments precomputed
Cases: decoding (B rows of 1 token, each row its own adapter: segments of one token) and prefill (B rows
of T tokens: B segments). The stacks are built once outside the timing (both paths use the same ones).
Reported: median microseconds (triton.testing.do_bench) and torch / triton; the largest difference
between the two results relative to max |y|, as a sanity check (tests/test_lora_bgmv.py is the test).
Writes bench/results/lora_bgmv.json. Needs CUDA: without it, says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import environment, write_json

# (name, B rows, T tokens per row, K, M): Gemma 3 1B's q_proj / down_proj widths and Llama 8B's.
CASES = [
    ("decode 8", 8, 1, 1152, 1024),
    ("decode 64", 64, 1, 4096, 4096),
    ("decode 256", 256, 1, 4096, 14336),
    ("prefill 4x512", 4, 512, 1152, 6912),
    ("prefill 8x1024", 8, 1024, 4096, 4096),
]


def torch_path(x, A, B, s, rows):
    """mixed_gathered's PyTorch products (minilora/lora/mixed_term.py), without rebuilding the stacks."""
    idx = torch.where(rows < 0, A.shape[0] - 1, rows)  # -1 -> the all-zero last slot
    xb = x.float()  # (B, T, K)
    h = torch.bmm(xb, A[idx].transpose(1, 2))  # (B, T, R)
    return torch.bmm(h, B[idx].transpose(1, 2)) * s[idx][:, None, None]  # (B, T, M)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/lora_bgmv.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench.lora_bgmv: torch sees no CUDA device; run it on a GPU machine.")
        return 2
    from triton.testing import do_bench

    from minilora.kernels import lora_bgmv as K_

    bench = lambda fn: 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731 - microseconds
    L, R, dev = args.adapters, args.rank, "cuda"
    rows_out = []
    print(f"{torch.cuda.get_device_name()}, {L} adapters of rank {R}, x bf16, LoRA math float32")
    head = (
        f"{'torch us':>10}{'triton us':>11}{'x':>7}{'layer us':>10}{'x':>7}{'shrink':>9}{'expand':>9}{'rel diff':>10}"
    )
    print(f"{'case':<16}{'K':>6}{'M':>7}{head}")
    for name, b, t, k, m in CASES:
        gen = torch.Generator(device=dev).manual_seed(0)
        A = torch.randn(L + 1, R, k, device=dev, generator=gen) * 0.02  # (L + 1, R, K), last slot: the base
        B = torch.randn(L + 1, m, R, device=dev, generator=gen) * 0.02  # (L + 1, M, R)
        s = torch.rand(L + 1, device=dev, generator=gen)
        A[L], B[L], s[L] = 0, 0, 0
        x = torch.randn(b, t, k, device=dev, generator=gen).bfloat16()  # (B, T, K)
        rows = torch.arange(b, device=dev) % (L + 1) - 1  # every row its neighbours' different adapter, some -1
        tok = rows.repeat_interleave(t)  # (B T,)
        xt = x.reshape(-1, k)  # (B T, K)

        def triton_path(segs=None):
            segs = segs or K_.segments(tok)
            h = K_.lora_shrink_triton(xt, A, tok, segs=segs)
            return K_.lora_expand_triton(torch.zeros(b * t, m, device=dev), h, B, s, tok, segs=segs)

        segs = K_.segments(tok)
        h = K_.lora_shrink_triton(xt, A, tok, segs=segs)
        y0 = torch.zeros(b * t, m, device=dev)
        ref, got = torch_path(x, A, B, s, rows).reshape(-1, m), triton_path()
        rel = float((ref - got).abs().max() / ref.abs().max().clamp(min=1e-30))
        row = {
            "case": name,
            "B": b,
            "T": t,
            "K": k,
            "M": m,
            "torch_us": bench(lambda: torch_path(x, A, B, s, rows)),
            "triton_us": bench(triton_path),
            "layer_us": bench(lambda: triton_path(segs)),
            "shrink_us": bench(lambda: K_.lora_shrink_triton(xt, A, tok, segs=segs)),
            "expand_us": bench(lambda: K_.lora_expand_triton(y0, h, B, s, tok, segs=segs)),
            "rel_diff": rel,
        }
        rows_out.append(row)
        print(
            f"{name:<16}{k:>6}{m:>7}{row['torch_us']:>10.1f}{row['triton_us']:>11.1f}"
            f"{row['torch_us'] / row['triton_us']:>7.2f}"
            f"{row['layer_us']:>10.1f}{row['torch_us'] / row['layer_us']:>7.2f}"
            f"{row['shrink_us']:>9.1f}{row['expand_us']:>9.1f}{rel:>10.1e}"
        )
    payload = {"env": environment(), "adapters": L, "rank": R, "rows": rows_out}
    print(f"wrote {write_json('lora_bgmv', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
