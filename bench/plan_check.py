"""The planner's predicted peak against the peak a real train.py run reaches.

    python -m bench.plan_check --geometry gemma-3-1b --device cuda    # target: within 10%
    python -m bench.plan_check --geometry small --device cpu          # a quick CPU check

Writes a random-weight checkpoint of the geometry (bench.train_step's writer) with the bundled
tokenizer beside it, runs `train.py` on the demo data for a few steps with the planner's own
settings, and compares what the run saved in config.json ("resolved": predicted_peak_bytes) with
the largest peak memory it logged in metrics.jsonl (torch.cuda.max_memory_allocated on CUDA, the
process's peak RSS on the CPU). Writes bench/results/plan_check_<geometry>_<device>.json.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="small", choices=sorted(GEOMETRIES))
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="minilora_plan_check_") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, a.geometry)
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            subprocess.run(
                [sys.executable, "-m", "bench.train_step", "--write-ckpt", "--geometry", a.geometry, "--ckpt", ckpt],
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
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"train.py failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        with open(os.path.join(out, "config.json")) as f:
            resolved = json.load(f)["resolved"]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            peaks = [r["peak_mem_mb"] for r in map(json.loads, f) if "peak_mem_mb" in r]
    predicted, measured = resolved["predicted_peak_bytes"] / 2**20, max(peaks)
    ratio = predicted / measured
    print(
        f"{a.geometry} on {a.device}: dtype {resolved['dtype']}, recompute {resolved['gradient_checkpointing']}; "
        f"predicted peak {predicted:,.0f} MiB, measured {measured:,.0f} MiB: {ratio:.2f}x "
        f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)"
    )
    write_json(
        f"plan_check_{a.geometry}_{a.device}",
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
            "environment": environment(),
        },
    )


if __name__ == "__main__":
    main()
