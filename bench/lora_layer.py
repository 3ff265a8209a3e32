"""Forward + backward of one LoRA layer on an NF4 base: minilora's LoRALinear(NF4Linear) beside PEFT's
QLoRA layer (peft.tuners.lora.bnb.Linear4bit, what get_peft_model gives a model transformers loaded
in 4 bit) on a bitsandbytes Linear4bit (nf4, double quant) holding the same bytes, in the same run.

Cases: base (in x out) 1152x6912 (Gemma 3 1B's gate/up projection) and 4096x4096, r = 16 and 64
(alpha = 2r, dropout 0), 512 and 2048 tokens, bf16 activations, x requiring grad (a layer inside the
network: dL/dx, dL/dA, dL/dB are all computed).

Each (implementation, case, measurement) runs in its own subprocess so that one's allocations cannot
hide in the other's numbers, and the two implementations alternate (--rounds), so a slow spell of
a shared machine falls on both.
  time    median over --repeats steps after one warm-up step, glibc's allocator as users run it;
          the reported figure is the median of the per-round medians.
  memory  CPU: peak RSS of one step minus RSS just before it (VmHWM, reset through
          /proc/self/clear_refs), in a separate worker where glibc is told to mmap every buffer over
          64 KiB, so freed memory leaves RSS at once and the peak is the step's real high-water
          mark (that setting also makes every large buffer page-fault afresh, which is why time is
          not measured there). CUDA: torch.cuda.max_memory_allocated minus allocated before, in the
          timing workers themselves (the largest over rounds): no separate worker is needed there.

    python -m bench.lora_layer [--repeats 3] [--rounds 3] [--quick] [--device cpu|cuda]
writes bench/results/lora_layer.json (lora_layer_cuda.json on CUDA) and prints a table
(speedup = their time / ours and memory ratio = their peak / ours; > 1 favours minilora).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(1152, 6912), (4096, 4096)]  # (in_features K, out_features M)
RANKS = [16, 64]
TOKENS = [512, 2048]
IMPLS = ["minilora", "peft+bnb"]


def build(impl: str, k: int, m: int, r: int, device: str):
    import torch

    from minilora.lora.layers import LoRALinear
    from minilora.quant.linear import NF4Linear

    torch.manual_seed(0)
    w = torch.randn(m, k, dtype=torch.bfloat16, device=device) / k**0.5
    nl = NF4Linear.from_weight(w, None, blocksize=64, double_quant=True)
    del w
    if impl == "minilora":
        layer = LoRALinear(nl, r, 2 * r, dropout=0.0)
        params = [layer.lora_A.weight, layer.lora_B.weight]
    else:
        from collections import OrderedDict

        import torch.nn as nn
        from peft import LoraConfig, get_peft_model

        lin = nl.to_bnb(compute_dtype=torch.bfloat16)

        model = nn.Sequential(OrderedDict(lin=lin))  # one module, named `lin`: PEFT's target
        model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: PEFT then uses its QLoRA layer
        layer = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["lin"]))
        inner = layer.base_model.model.lin
        assert type(inner).__module__ == "peft.tuners.lora.bnb", type(inner)
        params = [inner.lora_A["default"].weight, inner.lora_B["default"].weight]
    with torch.no_grad():
        for p in params:  # the same adapter weights for both
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device) * 0.01)
    return layer.train(), params


def worker(impl: str, k: int, m: int, r: int, n: int, repeats: int, device: str) -> dict:
    import torch

    from bench.common import status_kib

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    layer, params = build(impl, k, m, r, device)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(n, k, generator=gen) * 0.5).to(torch.bfloat16).to(device).requires_grad_(True)
    g = torch.randn(n, m, generator=gen).to(torch.bfloat16).to(device)
    cuda = device == "cuda"

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(g)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (first-call allocations, lazy kernels)
    x.grad = None
    for p in params:
        p.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        base = status_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    return {"median_s": statistics.median(times), "times_s": times, "peak_delta_bytes": peak - base}


def run_case(impl, k, m, r, n, repeats, device, measure_memory: bool) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if measure_memory and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows live memory (see the module docstring)
    cmd = [
        sys.executable,
        "-m",
        "bench.lora_layer",
        "--worker",
        impl,
        str(k),
        str(m),
        str(r),
        str(n),
        "--repeats",
        str(1 if measure_memory else repeats),
        "--device",
        device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE), check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{impl} {k}x{m} r={r} n={n} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def measure(k, m, r, n, a) -> dict:
    """Per implementation: the per-round median step times, their median, and the step's peak memory."""
    res = {impl: {"round_medians_s": []} for impl in IMPLS}
    for i in range(a.rounds):
        order = IMPLS if i % 2 == 0 else IMPLS[::-1]  # alternate who goes first
        runs = {impl: run_case(impl, k, m, r, n, a.repeats, a.device, False) for impl in order}
        for impl in IMPLS:
            res[impl]["round_medians_s"].append(runs[impl]["median_s"])
        if a.device == "cuda":  # the timing worker's own peak: CUDA's allocator counts it exactly
            for impl in IMPLS:
                res[impl]["peak_delta_bytes"] = max(
                    res[impl].get("peak_delta_bytes", 0), runs[impl]["peak_delta_bytes"]
                )
    for impl in IMPLS:
        res[impl]["median_s"] = statistics.median(res[impl]["round_medians_s"])
        if a.device != "cuda":
            res[impl]["peak_delta_bytes"] = run_case(impl, k, m, r, n, 1, a.device, True)["peak_delta_bytes"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing workers per implementation")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one shape, r=16, 512 tokens")
    ap.add_argument("--out", default=None, help="results file (default bench/results/lora_layer[_cuda].json)")
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "K", "M", "R", "N"))
    a = ap.parse_args()
    if a.worker:
        impl, k, m, r, n = a.worker[0], *map(int, a.worker[1:])
        print(json.dumps(worker(impl, k, m, r, n, a.repeats, a.device)))
        return
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available; run without --device for the CPU benchmark.")
    shapes, ranks, tokens = (SHAPES[:1], RANKS[:1], TOKENS[:1]) if a.quick else (SHAPES, RANKS, TOKENS)
    rows = []
    hdr = (
        f"{'base KxM':>11} {'r':>3} {'tokens':>6} | {'minilora ms':>11} {'peft+bnb ms':>11} {'speedup':>7} | "
        f"{'minilora MiB':>12} {'peft+bnb MiB':>12} {'mem ratio':>9}"
    )
    print(f"device={a.device} dtype=bf16 repeats={a.repeats} rounds={a.rounds}\n{hdr}\n{'-' * len(hdr)}", flush=True)
    for k, m in shapes:
        for r in ranks:
            for n in tokens:
                res = measure(k, m, r, n, a)
                ours, theirs = res["minilora"], res["peft+bnb"]
                row = {
                    "in": k,
                    "out": m,
                    "r": r,
                    "tokens": n,
                    "device": a.device,
                    "results": res,
                    "speedup": theirs["median_s"] / ours["median_s"],
                    "mem_ratio": theirs["peak_delta_bytes"] / max(1, ours["peak_delta_bytes"]),
                }
                rows.append(row)
                print(
                    f"{k:>5}x{m:<5} {r:>3} {n:>6} | {ours['median_s'] * 1e3:>11.1f} {theirs['median_s'] * 1e3:>11.1f} "
                    f"{row['speedup']:>6.2f}x | {ours['peak_delta_bytes'] / 2**20:>12.1f} "
                    f"{theirs['peak_delta_bytes'] / 2**20:>12.1f} {row['mem_ratio']:>8.2f}x",
                    flush=True,
                )
    from bench.common import environment, write_json

    payload = {
        "benchmark": "lora_layer",
        "environment": environment(),
        "repeats": a.repeats,
        "rounds": a.rounds,
        "time": "median of per-round medians (default allocator)",
        "memory": "peak RSS delta of the step with MALLOC_MMAP_THRESHOLD_=65536 (CPU) / "
        "max_memory_allocated delta (CUDA)",
        "rows": rows,
    }
    print(f"wrote {write_json('lora_layer' + ('_cuda' if a.device == 'cuda' else ''), payload, a.out)}")


if __name__ == "__main__":
    main()
