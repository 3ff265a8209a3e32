"""The planner's settings on a real-length task: minilora beside transformers + PEFT + bitsandbytes.

    python -m bench.plan_step                         # 135M-class Llama, rows of 130-170 tokens, batch 4
    python -m bench.plan_step --layers 2 --steps 1 --warmup 1      # a smoke run

A random-weight 135M-class Llama (vocab 49152, D 576, 30 layers, 9/3 heads, FFN 1536) through
bench/train_step.py's two workers (each in its own process: its own peak RSS), rows of random length
in [130, 170] right-padded, the second half of each row labelled (a prompt/completion task).

  equal settings    float32 and bf16 compute, recompute on and off, the same on both sides (minilora's
                    default LoRA path, fused); and bf16 without recompute with minilora's other LoRA
                    paths (--lora-compute float32: PEFT's numbers; compute: the products in bf16),
                    and with every block keeping its dequantized weights (--weight-reuse on), recompute
                    on and off
  defaults          minilora as train.py runs it (--dtype auto, --gradient-checkpointing auto and
                    --weight-reuse auto: the planner's choice for this batch and this machine's free
                    memory: off, selective or full recompute on some blocks, weights kept in some) beside the usual
                    QLoRA recipe (prepare_model_for_kbit_training, gradient checkpointing on, float32
                    compute: transformers' CPU default)

Ratios: speedup = their step time / ours (> 1 favours minilora), memory = our peak RSS / theirs
(< 1 favours minilora). Utilisation = the model's FLOPs per step (planner.flops_per_token, no
recompute counted) / step time / the bf16 GEMM rate its worker measured around its steps. Also
reported: this CPU's native bf16 units (avx512_bf16, amx) as torch sees them. Never evaluates a
bitsandbytes model before timing it (see train_step.py). With --rounds N each case runs N workers a
side, alternating, and every figure is the median over them (one round moves 5-12% on a shared VM).
Writes bench/results/plan_step.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from bench.train_step import GEOMETRIES, IMPLS, ROOT, run_worker


def minilora_defaults(a) -> tuple[str, tuple[int, int, int] | None, int]:
    """(dtype, (full, selective, weight reuse) block counts, loss chunk rows) that train.py would choose
    here for this geometry and batch (None: nothing fits; train.py would refuse): planner.plan_run on
    train.py's defaults with this benchmark's LoRA (r 16, no dropout)."""
    import torch

    from minilora.dtypes import auto_dtype, dtype_name
    from minilora.models.config import ModelConfig
    from minilora.train.config import TrainConfig
    from minilora.train.planner import plan_run

    g = dict(GEOMETRIES["llama-135m"], num_hidden_layers=a.layers or GEOMETRIES["llama-135m"]["num_hidden_layers"])
    g.pop("family")
    L = g["num_hidden_layers"]
    cfg = ModelConfig(
        family="llama",
        name="llama-135m",
        rms_norm_eps=1e-5,
        hidden_act="silu",
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_local_theta=10000.0,
        layer_types=["full_attention"] * L,
        sliding_window=None,
        **g,
    )
    cpu = torch.device("cpu")
    dtype = auto_dtype(cpu)
    plan, error = plan_run(
        TrainConfig(lora_r=16, lora_dropout=0.0), cfg, cpu, dtype, (a.batch, int(a.lengths.split(":")[1]))
    )
    chosen = None if error else (plan.recompute_blocks, plan.selective_blocks, plan.reuse_blocks)
    return dtype_name(dtype), chosen, plan.loss_chunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=0, help="override the 30 layers (0 = keep; smoke runs use 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", default="130:170", metavar="LO:HI", help="row lengths in tokens")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (see train_step.py)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    ap.add_argument("--out", default="plan_step", help="results name under bench/results/")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text")
    ap.add_argument("--rounds", type=int, default=1, help="workers per side and case, alternating (medians)")
    a = ap.parse_args()
    import subprocess

    import torch

    from bench.common import environment, write_json
    from minilora.dtypes import cpu_bf16_units

    hi = a.lengths.split(":")[1]
    base = [
        "--geometry",
        "llama-135m",
        "--device",
        "cpu",
        "--batch",
        str(a.batch),
        "--seq",
        hi,
        "--lengths",
        a.lengths,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--threads",
        str(a.threads),
        "--layers",
        str(a.layers),
        "--loss-chunk",
        "256",
        "--no-tf32",
    ]
    ckpt_flag = lambda on: "--gradient-checkpointing" if on else "--no-gradient-checkpointing"
    dtype, chosen, chunk = minilora_defaults(a)
    L = a.layers or GEOMETRIES["llama-135m"]["num_hidden_layers"]
    full, sel, reuse = chosen or (L, 0, 0)  # refused: full recompute, as plan_run
    recompute = (
        ["--no-gradient-checkpointing"]
        if full + sel == 0
        else ["--gradient-checkpointing", "--recompute", f"{full}:{sel}"]
    )
    cases = [
        (f"{dt}, recompute {'on' if rc else 'off'}", {impl: [*base, "--dtype", dt, ckpt_flag(rc)] for impl in IMPLS})
        for dt in ("float32", "bfloat16")
        for rc in (True, False)
    ]
    for mode in ("float32", "compute"):  # minilora's other LoRA paths (its side only)
        cases.append(
            (
                f"bfloat16, recompute off, minilora --lora-compute {mode}",
                {
                    "minilora": [*base, "--dtype", "bfloat16", ckpt_flag(False), "--lora-compute", mode],
                    "peft+bnb": [*base, "--dtype", "bfloat16", ckpt_flag(False)],
                },
            )
        )
    for rc in (True, False):  # the dequantized weights kept, held from step to step (minilora's side only)
        cases.append(
            (
                f"bfloat16, recompute {'on' if rc else 'off'}, minilora weights kept",
                {
                    "minilora": [*base, "--dtype", "bfloat16", ckpt_flag(rc), "--reuse-blocks", str(L)],
                    "peft+bnb": [*base, "--dtype", "bfloat16", ckpt_flag(rc)],
                },
            )
        )
    cases.append(
        (
            f"defaults: minilora {dtype} recompute {full} full + {sel} selective, weights kept in {reuse} blocks, "
            f"loss chunk {chunk} vs QLoRA recipe",
            {
                "minilora": [
                    *base,
                    "--dtype",
                    dtype,
                    *recompute,
                    "--reuse-blocks",
                    str(reuse),
                    "--loss-chunk",
                    str(chunk),
                ],
                "peft+bnb": [*base, "--dtype", "float32", ckpt_flag(True), "--prepare-kbit"],
            },
        )
    )
    cases = [(name, argv) for name, argv in cases if a.only in name]
    from bench.common import cpu_info
    from bench.train_step import add_utilisation, median_rows

    cpu = dict(cpu_info(), threads=a.threads)
    print(f"CPU {cpu['model']}; flags {' '.join(cpu['flags'])}; {cpu['threads']} threads", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="minilora_plan_step_") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, "llama-135m")
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.train_step",
                    "--write-ckpt",
                    "--geometry",
                    "llama-135m",
                    "--layers",
                    str(a.layers),
                    "--ckpt",
                    ckpt,
                ],
                check=True,
                cwd=ROOT,
            )
        for name, argv in cases:
            runs = {impl: [] for impl in IMPLS}
            for _ in range(a.rounds):  # alternating, so a burst of load from elsewhere hits both sides
                for impl in IMPLS:
                    runs[impl].append(run_worker(impl, ckpt, argv[impl]))
            rows = median_rows(runs)
            add_utilisation(rows)  # against the bf16 GEMM rate each worker measured around its steps
            ours, theirs = rows["minilora"], rows["peft+bnb"]
            r = {
                "case": name,
                "speedup": theirs["median_s"] / ours["median_s"],
                "memory_ratio": ours["peak_mb"] / theirs["peak_mb"],
                "results": rows,
            }
            results.append(r)
            print(
                f"{name:58} minilora {ours['tokens_per_s']:7.0f} tok/s {ours['peak_mb']:6.0f} MB | peft+bnb "
                f"{theirs['tokens_per_s']:7.0f} tok/s {theirs['peak_mb']:6.0f} MB | {r['speedup']:.2f}x tok/s, "
                f"{r['memory_ratio']:.2f}x peak RSS | utilisation {100 * ours['utilisation']:.1f}% vs "
                f"{100 * theirs['utilisation']:.1f}% (bf16 GEMM {ours['gemm_bf16_gflops']:.0f} / "
                f"{theirs['gemm_bf16_gflops']:.0f} GFLOP/s)",
                flush=True,
            )
    units = cpu_bf16_units()
    print(
        f"CPU bf16 units (torch): {', '.join(f'{k} {v}' for k, v in units.items())}; "
        f"torch.get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}"
    )
    path = write_json(
        a.out,
        {
            "benchmark": "plan_step",
            "geometry": "llama-135m",
            "layers": a.layers or 30,
            "batch": a.batch,
            "lengths": a.lengths,
            "steps": a.steps,
            "warmup": a.warmup,
            "threads": a.threads,
            "rounds": a.rounds,
            "cpu_bf16_units": units,
            "cpu": cpu,
            "cases": results,
            "environment": environment(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
