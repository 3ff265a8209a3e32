"""minilora's training step with recompute off, selective and full: time, memory, and the planner's figures.

    python -m bench.recompute                                   # CPU: the small Gemma-3-shaped model
    python -m bench.recompute --geometry llama-135m --layers 4 --seq 128 --steps 2 --warmup 1   # a smoke run
    python -m bench.recompute --geometry gemma-3-1b --device cuda --seq 1024

One QLoRA step (bench/train_step.py's minilora worker: NF4 base, LoRA all-linear r 16, PagedAdamW),
each setting in its own subprocess, alternating over --rounds:
  off         every block keeps its activations, but rebuilds its normed inputs and act(gate) * up in
              backward (lean saves: models/ops.rebuilt_in_backward), as train.py runs it
  kept        off without lean saves: those tensors kept too (no planner figure: the plan counts lean)
  selective   every block keeps its input and its matmul / SDPA outputs, reruns the elementwise ops
              in backward (models/recompute.py)
  full        every block keeps only its input and reruns its forward in backward
Reported per setting: median step time, the step's peak (CPU: peak RSS above the RSS before the
first step, with glibc told to unmap freed buffers over --mmap-threshold so that RSS follows live
memory; CUDA: max_memory_allocated above the allocation before), and the planner's predicted
activations kept and FLOPs per token. Writes bench/results/recompute_<geometry>_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench.train_step import GEOMETRIES, ROOT, run_worker

MODES = {"off": (0, 0), "kept": (0, 0), "selective": (0, 1), "full": (1, 0)}  # (full, selective) as fractions of L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="small", choices=sorted(GEOMETRIES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=0, help="override the geometry's layer count (0 = keep)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (see train_step.py)")
    ap.add_argument(
        "--mmap-threshold", type=int, default=65536, help="MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's)"
    )
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    a = ap.parse_args()
    import torch

    from bench.common import environment, write_json
    from minilora.models.loader import read_config
    from minilora.train.memory_plan import plan_memory

    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.device == "cuda" else "float32")
    base = [
        "--geometry",
        a.geometry,
        "--device",
        a.device,
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--threads",
        str(a.threads),
        "--layers",
        str(a.layers),
        "--dtype",
        dtype,
        "--no-tf32",
    ]
    argv = {
        "off": [*base, "--no-gradient-checkpointing"],
        "kept": [*base, "--no-gradient-checkpointing", "--no-lean-saves"],
        "selective": [*base, "--gradient-checkpointing", "--recompute", "selective"],
        "full": [*base, "--gradient-checkpointing", "--recompute", "full"],
    }
    runs = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="minilora_recompute_") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, a.geometry)
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.train_step",
                    "--write-ckpt",
                    "--geometry",
                    a.geometry,
                    "--layers",
                    str(a.layers),
                    "--ckpt",
                    ckpt,
                ],
                check=True,
                cwd=ROOT,
            )
        cfg = read_config(ckpt, a.geometry)
        for _ in range(a.rounds):
            for mode in MODES:
                runs[mode].append(
                    run_worker("minilora", ckpt, argv[mode], a.mmap_threshold if a.device == "cpu" else 0)
                )
    L = cfg.num_hidden_layers
    rows = {}
    for mode, (full, sel) in MODES.items():
        plan = plan_memory(
            cfg,
            batch_size=a.batch,
            seq_len=a.seq,
            dtype=getattr(torch, dtype),
            lora_r=16,
            lora_dropout=0.0,
            recompute_blocks=full * L,
            selective_blocks=sel * L,
            device_type=a.device,
        )
        kept = next(b for name, b, _ in plan.components if name.startswith("activations"))
        rows[mode] = {
            "median_s": statistics.median(r["median_s"] for r in runs[mode]),
            "step_peak_mb": statistics.median(r["step_peak_mb"] for r in runs[mode]),
            "predicted_activations_mb": None if mode == "kept" else kept / 2**20,
            "flops_per_token": plan.flops_per_token,
            "runs": runs[mode],
        }
    off = rows["off"]
    print(
        f"{a.geometry} (L {L}), B {a.batch} x T {a.seq}, {dtype} on {a.device}, median of {a.steps} steps, "
        f"{a.rounds} round(s)"
    )
    hdr = (
        f"{'recompute':<11}{'step s':>8}{'x off':>7}{'step peak MB':>14}{'x off':>7}"
        f"{'plan: kept MB':>15}{'GFLOP/tok':>11}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for mode, r in rows.items():
        print(
            f"{mode:<11}{r['median_s']:8.3f}{r['median_s'] / off['median_s']:7.2f}{r['step_peak_mb']:14.0f}"
            f"{r['step_peak_mb'] / off['step_peak_mb']:7.2f}"
            f"{'-' if r['predicted_activations_mb'] is None else format(r['predicted_activations_mb'], '.1f'):>15}"
            f"{r['flops_per_token'] / 1e9:11.3f}"
        )
    name = f"recompute_{a.geometry}_{a.device}"
    path = write_json(
        name,
        {
            "benchmark": "recompute",
            "geometry": a.geometry,
            "layers": L,
            "batch": a.batch,
            "seq": a.seq,
            "dtype": dtype,
            "device": a.device,
            "steps": a.steps,
            "rounds": a.rounds,
            "mmap_threshold": a.mmap_threshold,
            "results": rows,
            "environment": environment(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
