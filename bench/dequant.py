"""Benchmark: NF4 dequantization and the fused NF4 matmul against bitsandbytes, on one GPU.

    python -m bench.dequant                  # all shapes, bf16 output, blocksize 64, double quant
    python -m bench.dequant --no-matmul      # dequantization table only

Part 1, dequantization of a W (M, K) weight, side by side in one run:
    minilora   kernels/nf4_dequant.py (one Triton launch)
    bnb        bitsandbytes.functional.dequantize_4bit (CUDA kernel + a separate absmax pass)
    torch      minilora.quant.nf4.dequantize_nf4_reference, eager
    compiled   the same math as pure tensor ops under torch.compile
    copy       a device-to-device copy of the output size: the achievable bandwidth
Bytes moved by a dequantization = NF4 storage read + output written; by the copy = 2 x output.
Reported: median microseconds (triton.testing.do_bench, which also flushes L2 between runs),
GB/s, % of the copy's GB/s, and bnb time / minilora time.

Part 2, y = x W^T with N = 1..16 tokens, the target's range, and 32, 64 to find where dequantize +
cuBLAS overtakes (kernels/nf4_matmul.py FUSED_MAX_TOKENS; static instruction counts put the
crossover near 64-128), and dx = g W, the input gradient:
    fused      kernels/nf4_matmul.py (never materializes W)
    bnb+cuBLAS F.linear(x, dequantize_4bit(W))
    ours+cuBLAS F.linear(x, dequantize_nf4_triton(W)): the path dispatch takes when the fused kernel
               does not run, so the column that decides FUSED_MAX_TOKENS
    bnb gemv   bitsandbytes.matmul_4bit (its inference kernel for one token)

Inputs rotate over enough copies of the quantized weight (>= 4 x a 50 MB L2) that no call finds
its input in cache. Results go to bench/results/dequant.json with the device and date.

Without CUDA the GPU tables cannot be measured: the script says so and only times the PyTorch
reference against bitsandbytes' CPU dequantize on one small shape (bench/results/dequant_cpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import write_json
from minilora.quant.nf4 import NF4Tensor, dequantize_nf4_reference

SHAPES = [
    (1152, 1024),
    (1152, 6912),
    (6912, 1152),  # Gemma 3 1B: o_proj-ish, MLP up/gate, down
    (4096, 4096),
    (4096, 14336),  # Llama 3 8B: attention, MLP
    (8192, 8192),
]
TOKENS = [1, 2, 4, 8, 16, 32, 64]
ROTATE_BYTES = 200 * 2**20  # 4 x the H100's 50 MB L2


def torch_dequant(packed, absmax_codes, absmax2, offset, nf4, dyn, n: int, blocksize: int, dtype):
    """The reference's math (double quant, n % blocksize == 0) as pure tensor ops for torch.compile."""
    absmax = dyn[absmax_codes.long()] * absmax2.repeat_interleave(256)[: absmax_codes.numel()] + offset  # (nb,)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()  # (n,)
    return (nf4[codes].view(-1, blocksize) * absmax[:, None]).view(-1).to(dtype)  # (n,)


def clone_nf4(q: NF4Tensor) -> NF4Tensor:
    """An independent copy of q's buffers (a fresh rotation slot)."""
    return NF4Tensor(
        q.packed.clone(), q.absmax.clone(), q.shape, q.dtype, q.blocksize, q.absmax2.clone(), q.offset.clone()
    )


class Rotation:
    """Copies of the inputs, handed out in turn so consecutive calls touch different memory."""

    def __init__(self, make, bytes_each: int):
        self.items = [make() for _ in range(max(2, min(64, -(-ROTATE_BYTES // max(1, bytes_each)))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench(fn, rot: Rotation) -> float:
    """Median microseconds of fn(*rot.next())."""
    from triton.testing import do_bench

    return 1e3 * do_bench(lambda: fn(*rot.next()), warmup=25, rep=200, return_mode="median")


def gpu_dequant(args, bnbF) -> list[dict]:
    from minilora.kernels.nf4_dequant import dequantize_nf4_triton
    from minilora.quant.maps import dynamic_map, nf4_code

    dtype = torch.bfloat16
    nf4, dyn = nf4_code("cuda"), dynamic_map(True).to("cuda")
    compiled = torch.compile(torch_dequant)
    rows = []
    print(f"\nNF4 dequantization -> {dtype}, blocksize {args.blocksize}, double quant  (median us)")
    head = (
        f"{'shape':>12} {'minilora':>9} {'bnb':>9} {'torch':>9} {'compiled':>9} {'copy':>8} "
        f"{'GB/s':>7} {'%copy':>6} {'bnb/ours':>8} {'best block (us)':>16}"
    )
    print(head)
    for m, k in args.shapes:
        w = torch.randn(m, k, device="cuda", dtype=dtype) * 0.02
        packed, state = bnbF.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4", compress_statistics=True)
        q = NF4Tensor.from_bnb(packed, state)
        assert torch.equal(dequantize_nf4_triton(q, dtype), bnbF.dequantize_4bit(packed, state)), (
            f"{m}x{k}: minilora and bitsandbytes disagree; not timing a wrong kernel"
        )
        in_bytes, out_bytes = q.nbytes(), m * k * 2

        def clone_q():
            q2 = clone_nf4(q)
            return (q2, *q2.to_bnb())

        rot = Rotation(clone_q, in_bytes + out_bytes)
        t = {
            "minilora": bench(lambda q_, p_, s_: dequantize_nf4_triton(q_, dtype), rot),
            "bnb": bench(lambda q_, p_, s_: bnbF.dequantize_4bit(p_, s_), rot),
            "torch": bench(lambda q_, p_, s_: dequantize_nf4_reference(q_, dtype), rot),
        }
        for bsz in args.dq_blocks:  # program size sweep: the launcher's default is DEFAULT_BLOCK_SIZE
            t[f"minilora_b{bsz}"] = bench(lambda q_, p_, s_: dequantize_nf4_triton(q_, dtype, block_size=bsz), rot)
        if m * k % args.blocksize == 0:
            t["compiled"] = bench(
                lambda q_, p_, s_: compiled(
                    q_.packed, q_.absmax, q_.absmax2, q_.offset, nf4, dyn, m * k, args.blocksize, dtype
                ),
                rot,
            )
        src = Rotation(lambda: (torch.randn(out_bytes // 2, device="cuda").to(dtype),), 2 * out_bytes)
        dst = torch.empty(out_bytes // 2, device="cuda", dtype=dtype)
        t["copy"] = bench(lambda s_: dst.copy_(s_), src)
        copy_gbs = 2 * out_bytes / t["copy"] / 1e3
        gbs = (in_bytes + out_bytes) / t["minilora"] / 1e3
        best = min(args.dq_blocks, key=lambda b: t[f"minilora_b{b}"])
        row = {
            "shape": [m, k],
            "us": t,
            "best_block_size": best,
            "in_bytes": in_bytes,
            "out_bytes": out_bytes,
            "gb_s": gbs,
            "copy_gb_s": copy_gbs,
            "pct_of_copy": 100 * gbs / copy_gbs,
            "bnb_over_ours": t["bnb"] / t["minilora"],
        }
        rows.append(row)
        print(
            f"{m:>5}x{k:<6} {t['minilora']:9.1f} {t['bnb']:9.1f} {t['torch']:9.1f} "
            f"{t.get('compiled', float('nan')):9.1f} {t['copy']:8.1f} {gbs:7.0f} {row['pct_of_copy']:5.1f}% "
            f"{row['bnb_over_ours']:7.2f}x {best:>8} ({t[f'minilora_b{best}']:.1f})"
        )
    return rows


def gpu_matmul(args, bnb, bnbF) -> list[dict]:
    from minilora.kernels.nf4_dequant import dequantize_nf4_triton
    from minilora.kernels.nf4_matmul import _pick_config, nf4_matmul_t_triton, nf4_matmul_triton

    dtype = torch.bfloat16
    rows = []
    print("\nNF4 matmul, bf16, N tokens (median us): fused vs bitsandbytes dequantize + cuBLAS")
    print(
        f"{'shape':>12} {'N':>3} {'fused':>8} {'bnb+cuBLAS':>10} {'bnb gemv':>9} {'speedup':>8} {'ours+cuBLAS':>11} "
        f"{'fused dx':>9} {'bnb dx':>8} {'speedup':>8} {'s2 s3 / dx s2 s3':>24}"
    )
    for m, k in args.shapes:
        w = torch.randn(m, k, device="cuda", dtype=dtype) * 0.02
        packed, state = bnbF.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4", compress_statistics=True)
        q = NF4Tensor.from_bnb(packed, state)
        for n in args.tokens:

            def make():
                q2 = clone_nf4(q)
                return (
                    q2,
                    *q2.to_bnb(),
                    torch.randn(n, k, device="cuda", dtype=dtype),
                    torch.randn(n, m, device="cuda", dtype=dtype),
                )

            rot = Rotation(make, q.nbytes() + (n * (k + m) * 2))
            q0, p0, s0, x0, g0 = rot.items[0]
            ref = F.linear(x0, bnbF.dequantize_4bit(p0, s0))
            err = (nf4_matmul_triton(x0, q0).float() - ref.float()).abs().max().item()
            t = {
                "fused": bench(lambda q_, p_, s_, x_, g_: nf4_matmul_triton(x_, q_), rot),
                "bnb_cublas": bench(lambda q_, p_, s_, x_, g_: F.linear(x_, bnbF.dequantize_4bit(p_, s_)), rot),
                "bnb_matmul_4bit": bench(lambda q_, p_, s_, x_, g_: bnb.matmul_4bit(x_, p_.t(), quant_state=s_), rot),
                # what kernels/dispatch.py runs instead of the fused kernel: our dequantization, then cuBLAS
                "ours_cublas": bench(lambda q_, p_, s_, x_, g_: F.linear(x_, dequantize_nf4_triton(q_, dtype)), rot),
                "fused_t": bench(lambda q_, p_, s_, x_, g_: nf4_matmul_t_triton(g_, q_), rot),
                "bnb_cublas_t": bench(lambda q_, p_, s_, x_, g_: g_ @ bnbF.dequantize_4bit(p_, s_), rot),
            }
            for st in (2, 3):  # software pipelining depth; the launcher uses 1 (see _pick_config)
                cf = (*_pick_config(n, m, k, False, args.blocksize, dtype)[:5], st)
                ct = (*_pick_config(n, k, m, True, args.blocksize, dtype)[:5], st)
                t[f"fused_s{st}"] = bench(lambda q_, p_, s_, x_, g_: nf4_matmul_triton(x_, q_, config=cf), rot)
                t[f"fused_t_s{st}"] = bench(lambda q_, p_, s_, x_, g_: nf4_matmul_t_triton(g_, q_, config=ct), rot)
            row = {
                "shape": [m, k],
                "tokens": n,
                "us": t,
                "max_abs_err_vs_bnb": err,
                "speedup": t["bnb_cublas"] / t["fused"],
                "speedup_t": t["bnb_cublas_t"] / t["fused_t"],
            }
            rows.append(row)
            print(
                f"{m:>5}x{k:<6} {n:>3} {t['fused']:8.1f} {t['bnb_cublas']:10.1f} {t['bnb_matmul_4bit']:9.1f} "
                f"{row['speedup']:7.2f}x {t['ours_cublas']:11.1f} {t['fused_t']:9.1f} {t['bnb_cublas_t']:8.1f} "
                f"{row['speedup_t']:7.2f}x "
                f"{t['fused_s2']:6.1f} {t['fused_s3']:6.1f} / {t['fused_t_s2']:6.1f} {t['fused_t_s3']:6.1f}"
            )
    return rows


def cpu_comparison(args, bnbF) -> dict:
    """Reference vs bitsandbytes' CPU dequantize on one small shape: correctness and time."""
    from minilora.quant.nf4 import quantize_nf4

    m, k = 1152, 1024
    w = torch.randn(m, k) * 0.02
    q = quantize_nf4(w, blocksize=args.blocksize, double_quant=True)
    packed, state = q.to_bnb()
    ours, theirs = dequantize_nf4_reference(q), bnbF.dequantize_4bit(packed, state)
    same = torch.equal(ours, theirs)

    def median_us(fn, reps=30):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(ts)

    t_ref = median_us(lambda: dequantize_nf4_reference(q))
    t_bnb = median_us(lambda: bnbF.dequantize_4bit(packed, state))
    print(f"\nCPU only ({torch.get_num_threads()} threads), {m}x{k} float32, blocksize {args.blocksize}, double quant")
    print(f"{'method':>28} {'median us':>10}")
    print(f"{'minilora reference (torch)':>28} {t_ref:10.0f}")
    print(f"{'bitsandbytes dequantize_4bit':>28} {t_bnb:10.0f}")
    print(f"bit-identical: {same}; bnb / reference time: {t_bnb / t_ref:.2f}x")
    return {
        "shape": [m, k],
        "us": {"reference": t_ref, "bnb": t_bnb},
        "bit_identical": same,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--shapes", type=str, default=None, help="e.g. 1152x1024,4096x4096 (default: the six above)")
    ap.add_argument("--tokens", type=str, default=",".join(map(str, TOKENS)))
    ap.add_argument("--no-matmul", action="store_true", help="skip the fused matmul table")
    ap.add_argument(
        "--dq-blocks",
        type=str,
        default="512,1024,2048,4096",
        help="dequantization program sizes (packed bytes) to time besides the default",
    )
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dequant.json")
    )
    args = ap.parse_args(argv)
    try:
        args.shapes = (
            SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        )
        args.tokens = [int(v) for v in args.tokens.split(",")]
        args.dq_blocks = [int(v) for v in args.dq_blocks.split(",")]
        assert all(len(s) == 2 for s in args.shapes)
    except (ValueError, AssertionError):
        print("bench/dequant.py: --shapes must look like 1152x1024,4096x4096 and --tokens like 1,2,4.", file=sys.stderr)
        return 2
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except ImportError:
        print(
            "bench/dequant.py: bitsandbytes is the competitor and is not installed; pip install bitsandbytes.",
            file=sys.stderr,
        )
        return 2
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "bnb": bnb.__version__,
        "blocksize": args.blocksize,
    }
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "No CUDA device here: the GPU tables (Triton kernel vs bitsandbytes vs torch vs copy, fused "
            "matmul) need one and were NOT measured. Running only a CPU check of the reference."
        )
        out = os.path.join(os.path.dirname(args.out), "dequant_cpu.json")
        write_json("dequant_cpu", {**meta, "device": "cpu", "cpu": cpu_comparison(args, bnbF)}, out)
        print(f"wrote {out}")
        return 0
    import triton

    meta.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bnb']}")
    payload = {**meta, "dequant": gpu_dequant(args, bnbF)}
    if not args.no_matmul:
        payload["matmul"] = gpu_matmul(args, bnb, bnbF)
    write_json("dequant", payload, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
