"""The planner's predictions against what a real train.py run reaches: the peak memory, and the step time.

    python -m bench.plan_check --geometry gemma-3-1b --device cuda    # target: within 10% (memory)
    python -m bench.plan_check --geometry small --device cpu          # a quick CPU check
    python -m bench.plan_check --geometry llama-135m --device cpu --threads 2   # SmolLM2-135M's shape

Writes a random-weight checkpoint of the geometry (bench.train_step's writer) with the bundled
tokenizer beside it, runs `train.py` on the demo data for a few steps with the planner's own
settings, and compares what the run saved in config.json ("resolved": predicted_peak_bytes) with
the largest peak memory it logged in metrics.jsonl (torch.cuda.max_memory_allocated on CUDA, the
process's peak RSS on the CPU). Step time: the prediction the run recorded in config.json (the probe of
minilora/train/steptime.py, at the longest micro-batch) and the one its summary.json scales to the
micro-batches it ran, against the mean step it measured (steps after the first); beside them the
estimate the plan printed before the probe existed (FLOPs per step / one square GEMM's FLOP/s in
this process, at the same thread count). Prints the CPU model, its bf16 units and the thread count.
Writes bench/results/plan_check_<geometry>_<device>.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from bench.common import environment, write_json
from bench.train_step import GEOMETRIES, ROOT


def cpu_facts() -> dict:
    """The CPU's model name, the bf16 flags /proc/cpuinfo lists, and torch's view of its bf16 units."""
    from minilora.dtypes import cpu_bf16_units

    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model": name, "flags": [f for f in wanted if f in flags], "torch_bf16_units": cpu_bf16_units()}


def gemm_rate_estimate(ckpt: str, resolved: dict, device: str, threads: int) -> float | None:
    """Seconds per micro-batch as the plan estimated them before the probe: FLOPs per step (the
    planner's count) / the FLOP/s of an (512, 1024) @ (1024, 1024) matmul repeated for a second."""
    import time

    import torch

    from minilora.dtypes import DTYPES
    from minilora.models.loader import load_config
    from minilora.train.memory_plan import flops_per_token

    probe = resolved.get("step_probe")
    if not probe:
        return None
    if threads > 0:
        torch.set_num_threads(threads)
    cfg, _ = load_config(ckpt)
    N = probe["rows"] * probe["length"]
    flops = N * flops_per_token(
        cfg,
        probe["length"],
        16,
        recompute_blocks=resolved["recompute_blocks"],
        label_fraction=probe["labels"] / N,
        selective_blocks=resolved["selective_blocks"],
    )
    dev, dtype = torch.device(device), DTYPES[resolved["dtype"]]
    a, b = torch.randn(512, 1024, device=dev).to(dtype), torch.randn(1024, 1024, device=dev).to(dtype)
    (a @ b).sum().item()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        c = a @ b
        n += 1
    float(c[0, 0])  # waits for the device
    return flops / (2.0 * 512 * 1024 * 1024 * n / (time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="small", choices=sorted(GEOMETRIES))
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for the run (0: torch's default)")
    ap.add_argument("--layers", type=int, default=0, help="override the geometry's layer count (0 = keep)")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    ap.add_argument("--out", default=None, help="results name under bench/results/")
    a = ap.parse_args()

    load_before = os.getloadavg()  # a shared machine: how busy it was around the run
    with tempfile.TemporaryDirectory(prefix="minilora_plan_check_") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, a.geometry)
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            subprocess.run(
                [sys.executable, "-m", "bench.train_step", "--write-ckpt", "--geometry", a.geometry, "--ckpt", ckpt]
                + ["--layers", str(a.layers)],
                check=True,
                cwd=ROOT,
            )
        for name in ("tokenizer.json", "tokenizer_config.json"):  # ids fit any of the geometries' vocabularies
            shutil.copy(os.path.join(ROOT, "examples", "tokenizer", name), ckpt)
        out = os.path.join(tmp, "run")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--model",
            ckpt,
            "--out",
            out,
            "--device",
            a.device,
            "--max-steps",
            str(a.steps),
            "--batch-size",
            str(a.batch_size),
            "--max-seq-len",
            str(a.max_seq_len),
            "--log-every",
            "1",
            "--eval-every",
            "0",
            "--eval-generate",
            "0",
            "--save-every",
            "0",
            "--threads",
            str(a.threads),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"train.py failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        with open(os.path.join(out, "config.json")) as f:
            resolved = json.load(f)["resolved"]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            peaks = [r["peak_mem_mb"] for r in map(json.loads, f) if "peak_mem_mb" in r]
        with open(os.path.join(out, "summary.json")) as f:
            timed = json.load(f)["step_time"]
        load_after = os.getloadavg()
        old = gemm_rate_estimate(ckpt, resolved, a.device, a.threads)
    predicted, measured = resolved["predicted_peak_bytes"] / 2**20, max(peaks)
    ratio = predicted / measured
    cpu = cpu_facts()
    print(f"CPU {cpu['model']}, flags {' '.join(cpu['flags'])}, torch bf16 units {cpu['torch_bf16_units']}")
    print(f"threads {a.threads}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after the run")
    print(
        f"{a.geometry} on {a.device}: dtype {resolved['dtype']}, recompute {resolved['gradient_checkpointing']}; "
        f"predicted peak {predicted:,.0f} MiB, measured {measured:,.0f} MiB: {ratio:.2f}x "
        f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)"
    )
    probe = resolved.get("step_probe")
    if probe is None:
        print(
            f"step time: unmeasured ({resolved.get('step_unmeasured')}); "
            f"measured {timed['measured_step_seconds']:.3f} s"
        )
    else:
        m, pr = timed["measured_step_seconds"], timed["predicted_step_seconds"]
        print(
            f"step time at the longest micro-batch ({probe['rows']} x {probe['length']}): probe "
            f"{resolved['predicted_step_seconds']:.3f} s, old GEMM-rate estimate {old:.3f} s\n"
            f"step time over the run's own micro-batches (mean of {timed['steps_timed']} steps): predicted {pr:.3f} s, "
            f"measured {m:.3f} s: measured / predicted {m / pr:.2f} "
            f"({'within' if abs(m / pr - 1) <= 0.25 else 'NOT within'} 25%); probe took {probe['probe_seconds']:.1f} s"
        )
    write_json(
        a.out or f"plan_check_{a.geometry}_{a.device}",
        {
            "geometry": a.geometry,
            "device": a.device,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "max_seq_len": a.max_seq_len,
            "resolved": resolved,
            "predicted_mib": predicted,
            "measured_peak_mib": measured,
            "ratio": ratio,
            "threads": a.threads,
            "load_average_before_after": [load_before[0], load_after[0]],
            "layers": a.layers or GEOMETRIES[a.geometry]["num_hidden_layers"],
            "cpu": cpu,
            "step_time": timed,
            "gemm_rate_estimate_s": old,
            "environment": environment(),
        },
    )


if __name__ == "__main__":
    main()
