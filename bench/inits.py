"""LoRA initialisations and LoRA+: validation loss after N steps, and what each init costs.

    python -m bench.inits                                 # both parts, CPU
    python -m bench.inits --steps 60 --skip-cost          # only the training runs
    python -m bench.inits --geometry llama-135m --skip-train

1. Training (the `tiny` model, the bundled demo data, QLoRA: --quantize nf4, r 16, alpha 32): one
   `python train.py` per variant, --max-steps N at the demo's learning rate; reported: validation loss
   at step 0, N/4 and N, and the run's wall time. The tiny model has random weights, so this
   shows that every init trains and what it does to the starting loss, not which init suits a
   pretrained model (there is none offline here).
2. Cost (a random-weight checkpoint of --geometry, bf16, LoRA on all linears, r 16): one fresh
   process per init loads the model as train.py does (NF4 straight from the file; dense first for the
   inits that read W, then quantized) and applies LoRA, --rounds times in turn; EVA then runs forward
   passes over 16 batches of 4 x 128 random tokens, stopping there if its directions have not converged
   (random tokens through random weights converge slowly; real data sooner); reported (medians):
   seconds to load and to init, the process's peak RSS and that peak above the default init's (glibc
   told to unmap freed buffers of 64 KiB and more, so that RSS follows live memory).
Prints both tables and writes bench/results/inits.json (environment included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import environment, status_kib, write_json
from bench.train_step import ROOT

VARIANTS = {  # name: train.py flags
    "default": ["--init", "default"],
    "gaussian": ["--init", "gaussian"],
    "pissa": ["--init", "pissa"],
    "pissa_niter_4": ["--init", "pissa_niter_4"],
    "olora": ["--init", "olora"],
    "loftq": ["--init", "loftq"],
    "loftq, 3 iters": ["--init", "loftq", "--loftq-iters", "3"],
    "default + LoRA+ 16": ["--init", "default", "--lora-plus-ratio", "16"],
    "pissa + LoRA+ 16": ["--init", "pissa", "--lora-plus-ratio", "16"],
    "eva": ["--init", "eva"],
    "eva, rho 2": ["--init", "eva", "--eva-rho", "2"],
}
COST_INITS = ("default", "gaussian", "pissa", "pissa_niter_4", "olora", "loftq", "eva")
EVA_BATCHES, EVA_ROWS, EVA_TOKENS = 16, 4, 128  # the cost part's EVA data: random tokens, every one labelled


def train_run(name: str, flags: list[str], steps: int, out: str, threads: int) -> dict:
    every = str(max(1, steps // 4))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", out, "--max-steps", str(steps)]
    cmd += ["--eval-generate", "0", "--eval-every", every, "--save-every", "0", "--threads", str(threads), *flags]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{name}: train.py failed\n{p.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val = {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
    return {
        "val_loss_start": val[0],
        "val_loss_quarter": val[max(1, steps // 4)],
        "val_loss_end": val[steps],
        "seconds": time.perf_counter() - t0,
    }


def cost_worker(init: str, ckpt: str, threads: int) -> dict:
    """In a fresh process: load as train.py does, apply LoRA with `init`; times and peak RSS."""
    import torch

    from minilora.lora import inits
    from minilora.lora.surgery import apply_lora
    from minilora.models.loader import load_model, quantize_linears

    torch.set_num_threads(threads)
    dense_first = inits.reads_weights(init)
    t0 = time.perf_counter()
    model, _ = load_model(ckpt, quantize=None if dense_first else "nf4", dtype=torch.bfloat16)
    t1 = time.perf_counter()
    apply_lora(model, r=16, alpha=32, dropout=0.0, init=init, seed=0, verbose=False)
    if dense_first:
        quantize_linears(model, compute_dtype=torch.bfloat16)
    fits = {}
    if init == "eva":  # forward passes over training batches until the directions converge
        from minilora.data.packing import Batch
        from minilora.lora import eva

        g = torch.Generator().manual_seed(0)
        shape = (EVA_ROWS, EVA_TOKENS)
        ones, pos = torch.ones(shape, dtype=torch.long), torch.arange(EVA_TOKENS).expand(shape)
        batches = []
        for _ in range(EVA_BATCHES):
            ids = torch.randint(3, model.config.vocab_size, shape, generator=g)
            batches.append(Batch(ids, ids, ones, pos, torch.zeros(shape, dtype=torch.long), ids.numel()))
        said = []
        try:  # random tokens through random weights converge slowly: the cost of EVA_BATCHES forwards
            eva.initialise(model, batches, r=16, rho=1.0, say=said.append, max_batches=EVA_BATCHES)
            batches_run = int(said[-1].split(":")[0].split()[-1]) - 1  # "eva: batch i: ..." at the check after
        except eva.EvaError:
            batches_run = EVA_BATCHES
        fits["eva_converged"] = batches_run < EVA_BATCHES
        fits["eva_forwards"] = 1 + batches_run  # one more finds the layers with equal inputs
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "init_s": t2 - t1, "peak_rss_mib": status_kib("VmHWM") / 1024, **fits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per variant")
    ap.add_argument("--geometry", default="llama-135m", help="bench/train_step.py geometry for the cost part")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="cost part: each init this many times, in turn")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help="checkpoint folder for the cost part (written there if missing)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(cost_worker(a.worker, a.ckpt, a.threads)))
        return
    result = {"environment": environment(), "steps": a.steps, "geometry": a.geometry, "rounds": a.rounds}
    result.update(train={}, cost={})
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_train:
            for i, (name, flags) in enumerate(VARIANTS.items()):
                result["train"][name] = r = train_run(name, flags, a.steps, os.path.join(tmp, f"run{i}"), a.threads)
                print(
                    f"{name:<20} val loss {r['val_loss_start']:.3f} -> {r['val_loss_end']:.3f} ({r['seconds']:.0f} s)"
                )
        if not a.skip_cost:
            ckpt = a.ckpt or os.path.join(tmp, a.geometry)
            if not os.path.isfile(os.path.join(ckpt, "config.json")):
                write = [sys.executable, "-m", "bench.train_step", "--write-ckpt", "--geometry", a.geometry]
                subprocess.run([*write, "--ckpt", ckpt], check=True, cwd=ROOT)
            runs = {init: [] for init in COST_INITS}
            for _ in range(a.rounds):  # in turn, so that load on a shared machine hits every init alike
                for init in COST_INITS:
                    cmd = [sys.executable, "-m", "bench.inits", "--worker", init, "--ckpt", ckpt]
                    env = {
                        **os.environ,
                        "MALLOC_MMAP_THRESHOLD_": "65536",
                    }  # RSS follows live memory (freed = unmapped)
                    p = subprocess.run(
                        [*cmd, "--threads", str(a.threads)], capture_output=True, text=True, cwd=ROOT, env=env
                    )
                    if p.returncode:
                        raise RuntimeError(f"cost worker {init} failed\n{p.stderr[-2000:]}")
                    runs[init].append(json.loads(p.stdout.strip().splitlines()[-1]))
            for init, rs in runs.items():
                result["cost"][init] = {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
    report(result)
    print(write_json("inits", result))


def report(result: dict) -> None:
    if result["train"]:
        n = result["steps"]
        print(f"\ntiny model, demo data, QLoRA r 16, {n} steps")
        print(f"| init | val loss, step 0 | step {max(1, n // 4)} | step {n} | run (s) |\n|---|---|---|---|---|")
        for name, r in result["train"].items():
            losses = " | ".join(f"{r[k]:.3f}" for k in ("val_loss_start", "val_loss_quarter", "val_loss_end"))
            print(f"| {name} | {losses} | {r['seconds']:.0f} |")
    if result["cost"]:
        base = result["cost"].get("default", {}).get("peak_rss_mib", 0.0)
        print(f"\n{result['geometry']} (random weights, bf16), LoRA all-linear r 16, medians of {result['rounds']}")
        print("| init | load (s) | init (s) | peak RSS (MiB) | above default (MiB) |\n|---|---|---|---|---|")
        for name, r in result["cost"].items():
            extra = r["peak_rss_mib"] - base
            print(f"| {name} | {r['load_s']:.1f} | {r['init_s']:.1f} | {r['peak_rss_mib']:,.0f} | {extra:+,.0f} |")


if __name__ == "__main__":
    main()
