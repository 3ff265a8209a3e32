"""Per-rank memory and step time of FSDP (2 ranks, gloo/NCCL) beside one process, same global batch.

    python -m bench.fsdp_memory                                   # CPU smoke: the "small" geometry
    python -m bench.fsdp_memory --geometry gemma-3-1b --batch 4 --seq 256 --steps 3

The same random-weight bf16 checkpoint (bench/train_step.py's write_checkpoint, transformers'
save_pretrained), the same global batch of B rows x T random tokens, LoRA all-linear r, PagedAdamW
and train.py's loss (chunked_lm_loss / label tokens, clip, step) in:

  1 process   load_model(dir, "nf4") + apply_lora: the whole NF4 base, B rows per step.
  2 ranks     torchrun --nproc_per_node 2, minilora.parallel.distributed.load_sharded: each rank reads and
              quantizes block by block and keeps its FSDP shard, and reads only its V/2 rows of the
              embedding/head; B/2 rows per rank per step.

Measured in each process: peak RSS over its whole life (VmHWM: imports, load, training), the peak
while loading, the NF4 bytes it holds (its shards), the embedding and head bytes it holds (its
vocabulary rows under FSDP, minilora/parallel/vocab_parallel.py), and the median step time after --warmup steps.
Printed: per-rank peak / one process's peak (target: at most 0.6x) and the step-time ratio
(FSDP's overhead: all-gathers and reduce-scatters each step; on a 2-core CPU the two ranks also
share the cores). CPU float32; on CUDA bf16 and torch.cuda.max_memory_allocated as the peak.
Writes bench/results/fsdp_memory_<geometry>_<device>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(a) -> None:
    """One process (or one rank): load, train --warmup + --steps steps, write <out>/rank<r>.json."""
    import torch

    from bench.common import status_kib
    from bench.train_step import GEOMETRIES
    from minilora.data.packing import Batch
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.loader import load_model
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.parallel import distributed as D
    from minilora.parallel.vocab_parallel import resident_bytes
    from minilora.train.loss import chunked_lm_loss

    torch.set_num_threads(a.threads)
    rank, world, dev = D.init_distributed()
    device = dev or torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lora = dict(targets="all-linear", r=a.rank, alpha=2 * a.rank, dropout=0.0, seed=0, verbose=False)
    t0 = time.perf_counter()
    if world > 1:
        model, _, _ = D.load_sharded(a.ckpt, dtype, device, world, lora)
    else:
        model, _ = load_model(a.ckpt, quantize="nf4", dtype=dtype, device=str(device))
        apply_lora(model, **lora)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
    model.set_gradient_checkpointing(a.gradient_checkpointing)
    model.train()
    opt = PagedAdamW(lora_parameters(model), lr=2e-4, weight_decay=0.0)
    B, T = a.batch, a.seq
    vocab = GEOMETRIES[a.geometry]["vocab_size"]
    ids = torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(1))  # (B, T) global batch
    ids = ids[rank::world].to(device)  # (B / W, T): this rank's rows of the global batch
    labels = ids.clone()
    labels[:, 0] = -100
    ones = torch.ones_like(ids)
    pos = torch.arange(T, device=device).expand(ids.shape[0], T)  # (B / W, T)
    batch = Batch(ids, labels, ones, pos, ones, n_label_tokens=ids.shape[0] * (T - 1))
    n_total = B * (T - 1)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t1 = time.perf_counter()
        s, _ = chunked_lm_loss(model, batch, chunk=256)
        (s * world / n_total).backward()  # FSDP averages gradients over the W ranks
        torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_sum(float(s.detach()), world) / n_total)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
    out = {
        "rank": rank,
        "world": world,
        "peak_mb": peak / 2**20,
        "load_peak_mb": load_peak / 2**20,
        "load_s": load_s,
        "nf4_mb": D.nf4_resident_bytes(model) / 2**20,
        "embed_mb": resident_bytes(model) / 2**20,
        "median_s": statistics.median(times),
        "losses": losses,
    }
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def launch(a, argv: list[str], nproc: int, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    run = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = [*run, "-m", "bench.fsdp_memory", *argv, "--worker", "--ckpt", a.ckpt, "--out-dir", out]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if p.returncode:
        raise RuntimeError(f"{nproc}-process worker failed:\n{p.stderr[-3000:]}")
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "rank*.json")))]


def main(argv=None) -> None:
    from bench.common import environment, write_json
    from bench.train_step import GEOMETRIES, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="small", choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, default=4, help="global batch rows B (each rank gets B/2)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ckpt", help="reuse this checkpoint folder instead of writing a temporary one")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.batch % 2:
        ap.error("--batch must be even (the 2 ranks split it)")
    passed = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--ckpt"]
    with tempfile.TemporaryDirectory(prefix="fsdp_memory.") as tmp:
        if not a.ckpt:
            a.ckpt = os.path.join(tmp, "ckpt")
        if not os.path.isfile(os.path.join(a.ckpt, "config.json")):  # written there once, then reused
            write_checkpoint(a.ckpt, a.geometry)
        argv_w = [x for x in passed if x != a.ckpt]
        one = launch(a, argv_w, 1, os.path.join(tmp, "one"))[0]
        two = launch(a, argv_w, 2, os.path.join(tmp, "two"))
    device = "cuda" if "cuda" in environment()["device"].lower() or _has_cuda() else "cpu"
    print(f"geometry {a.geometry}, global batch {a.batch} x {a.seq}, r={a.rank}, {device}")
    print(
        f"{'':12}{'peak MB':>10}{'load peak MB':>14}{'NF4 MB':>10}{'emb+head MB':>13}{'step s':>9}{'peak ratio':>12}"
        f"{'step ratio':>12}"
    )

    def row(name, r):
        return (
            f"{name:12}{r['peak_mb']:10.0f}{r['load_peak_mb']:14.0f}{r['nf4_mb']:10.1f}{r['embed_mb']:13.1f}"
            f"{r['median_s']:9.3f}"
        )

    print(row("1 process", one))
    for r in two:
        ratios = f"{r['peak_mb'] / one['peak_mb']:12.2f}{r['median_s'] / one['median_s']:12.2f}"
        print(row(f"rank {r['rank']} of 2", r) + ratios)
    worst = max(r["peak_mb"] for r in two) / one["peak_mb"]
    print(
        f"per-rank peak / one process: {worst:.2f}x (target <= 0.6x); losses 1 process {one['losses']}, "
        f"2 ranks {two[0]['losses']}"
    )
    path = write_json(
        f"fsdp_memory_{a.geometry}_{device}",
        {"env": environment(), "args": vars(a), "one": one, "two": two, "peak_ratio": worst},
    )
    print(f"wrote {path}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
