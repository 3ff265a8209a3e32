"""Optimizer step time on a Gemma 3 1B LoRA parameter set: PagedAdamW beside torch and bitsandbytes.

LoRA r=16 on all linear layers of Gemma 3 1B (26 layers, D=1152, 4 q heads x hd 256, 1 kv head,
intermediate 6912): q 1152->1024, k/v 1152->256, o 1024->1152, gate/up 1152->6912, down 6912->1152.
A is (r, in), B is (out, r): 364 tensors, 13.5M parameters, 108 MB of float32 Adam state.

Every optimizer gets its own copy of the parameters and shares one fixed set of gradients; the
step times are measured round-robin (one step of each optimizer per round) so that load drift on
a shared machine hits all of them alike; we report the median over rounds after warm-up.

CPU rows: torch.optim.AdamW (foreach, the reference for the 1.1x target; and foreach=False),
minilora PagedAdamW (32-bit, everything resident; 32-bit with a budget of half the state, where
the CPU "device" pool is simulated so the row shows paging bookkeeping + copy cost; 8-bit), and
bitsandbytes' PagedAdamW / PagedAdamW8bit (which on the CPU fall back to unpaged updates).
With CUDA the same rows run on the GPU, plus fused torch AdamW and an oversubscribed case: a
ballast allocation leaves room for only half the state, PagedAdamW runs with device_budget="auto",
bitsandbytes' paged optimizers rely on unified-memory paging.

    python -m bench.adamw [--rounds 15] [--warmup 3] [--threads 1] [--device all|cpu|cuda] [--out PATH]

--device cuda (bench/gpu_suite.sh) leaves out the CPU rows, which take minutes on a GPU machine's
CPU; its table goes to bench/results/adamw_cuda.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import environment, write_json
from minilora.optim.paged_adamw import PagedAdamW

LAYERS, D, Q_OUT, KV_OUT, FF = 26, 1152, 4 * 256, 1 * 256, 6912
LINEARS = [(D, Q_OUT), (D, KV_OUT), (D, KV_OUT), (Q_OUT, D), (D, FF), (D, FF), (FF, D)]  # (in, out)


def lora_shapes(r: int = 16) -> list[tuple[int, int]]:
    """Shapes of all LoRA A (r, in) and B (out, r) matrices."""
    return [s for _ in range(LAYERS) for fin, fout in LINEARS for s in ((r, fin), (fout, r))]


def make_params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).mul_(0.02).to(device).requires_grad_() for s in shapes]


def build(device: torch.device, state_bytes: int) -> dict:
    """name -> factory(params) of every optimizer that runs here."""
    hp = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rows = {
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, foreach=True, **hp),
        "torch AdamW (foreach=False)": lambda p: torch.optim.AdamW(p, foreach=False, **hp),
        "minilora PagedAdamW 32-bit": lambda p: PagedAdamW(p, **hp),
        "minilora PagedAdamW 32-bit, budget 1/2 state": lambda p: PagedAdamW(p, device_budget=state_bytes // 2, **hp),
        "minilora PagedAdamW 8-bit": lambda p: PagedAdamW(p, state_bits=8, **hp),
    }
    if device.type == "cuda":
        rows["torch AdamW (fused)"] = lambda p: torch.optim.AdamW(p, fused=True, **hp)
    try:
        import bitsandbytes as bnb

        rows["bitsandbytes PagedAdamW (32-bit)"] = lambda p: bnb.optim.PagedAdamW(p, **hp)
        rows["bitsandbytes PagedAdamW8bit"] = lambda p: bnb.optim.PagedAdamW8bit(p, **hp)
    except Exception as e:  # noqa: BLE001 - report and go on without the oracle
        print(f"bitsandbytes unavailable: {e}", file=sys.stderr)
    return rows


def run_round_robin(opts: dict, rounds: int, warmup: int, sync) -> dict:
    """Median seconds per step of each optimizer, steps interleaved across optimizers."""
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_device(device: torch.device, rounds: int, warmup: int, oversubscribed: bool = False) -> list[dict]:
    shapes = lora_shapes()
    n = sum(a * b for a, b in shapes)
    state_bytes = 8 * n
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    factories = build(device, state_bytes)
    ballast = None
    if oversubscribed:  # leave room for only half the Adam state; budget "auto" for us
        factories = {k: v for k, v in factories.items() if "PagedAdamW" in k and "budget" not in k}
        factories["minilora PagedAdamW 32-bit"] = lambda p: PagedAdamW(p, lr=1e-4, device_budget="auto")
    opts, stats = {}, {}
    for name, make in factories.items():
        params = make_params(shapes, device)
        for p, g in zip(params, grads):
            p.grad = g  # shared, never modified by a step
        try:
            opts[name] = make(params)
        except Exception as e:  # noqa: BLE001
            print(f"skipping {name}: {e}", file=sys.stderr)
    if oversubscribed:
        free, _ = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, free - state_bytes // 2 - (1 << 30)), dtype=torch.uint8, device=device)
    try:
        medians = run_round_robin(opts, rounds, warmup, sync)
    finally:
        del ballast
    for name, opt in opts.items():
        if isinstance(opt, PagedAdamW):
            stats[name] = opt.paging_stats()
    ref = medians.get("torch AdamW (foreach)")
    case = "oversubscribed" if oversubscribed else "fits"
    return [
        dict(
            device=device.type,
            case="budget 1/2" if "budget" in name else case,
            optimizer=name,
            median_ms=1e3 * t,
            ratio_vs_torch_foreach=(t / ref if ref else None),
            paging=stats.get(name),
        )
        for name, t in medians.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the CPU rows (default 1: on a small shared machine "
        "extra threads stall; every optimizer runs with the same setting)",
    )
    ap.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="all: the CPU rows, then CUDA's if present"
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/adamw.json, adamw_cuda.json with --device cuda)"
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench.adamw: --device cuda, but torch sees no CUDA device; run it on a GPU machine or pass --device cpu."
        )
    torch.set_num_threads(args.threads)
    shapes = lora_shapes()
    n = sum(a * b for a, b in shapes)
    print(
        f"Gemma 3 1B LoRA r=16, all linear: {len(shapes)} tensors, {n / 1e6:.2f}M params, "
        f"{8 * n / 2**20:.0f} MiB float32 Adam state"
    )
    rows = bench_device(torch.device("cpu"), args.rounds, args.warmup) if args.device != "cuda" else []
    if args.device != "cpu" and torch.cuda.is_available():
        rows += bench_device(torch.device("cuda"), args.rounds, args.warmup)
        rows += bench_device(torch.device("cuda"), args.rounds, args.warmup, oversubscribed=True)
    print(f"\n{'device':6} {'case':14} {'optimizer':46} {'median ms':>10} {'x torch foreach':>16}")
    for r in rows:
        ratio = f"{r['ratio_vs_torch_foreach']:.2f}x" if r["ratio_vs_torch_foreach"] else "-"
        print(f"{r['device']:6} {r['case']:14} {r['optimizer']:46} {r['median_ms']:10.2f} {ratio:>16}")
    path = write_json(
        "adamw_cuda" if args.device == "cuda" else "adamw",
        dict(env=environment(), params=n, tensors=len(shapes), rounds=args.rounds, warmup=args.warmup, rows=rows),
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
