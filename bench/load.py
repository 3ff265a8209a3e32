"""Load a Gemma-3-1B-shaped checkpoint with NF4 quantize-on-load: minilora beside
transformers + bitsandbytes (load_in_4bit, nf4, double quant, bf16 compute), on the CPU.

    python -m bench.load [--ckpt /tmp/minilora_gemma3_1b] [--repeat 1]

Writes (once, then reuses) a single-file model.safetensors with Gemma 3 1B's exact geometry
(config of google/gemma-3-1b-pt) and random bf16 weights, ~2 GB. Each load runs in a fresh
subprocess; the child reports wall time of the load call, its RSS after imports (baseline) and
its peak RSS (VmHWM; see peak_rss_mb for why not ru_maxrss, which is reported too). Target: load peak RSS,
i.e. peak minus the import
baseline, under (loaded model bytes + largest bf16 tensor) * 1.25, below transformers +
bitsandbytes, and load time no slower. Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# google/gemma-3-1b-pt config.json (transformers 4.x dialect, as on the hub).
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_bias": False,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
}


def rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS (MB) of this process's own address space: VmHWM from /proc/self/status.

    getrusage's ru_maxrss survives fork + execve on Linux (a child starts with its parent's peak),
    so it over-reports when the parent was ever large; VmHWM belongs to the new address space.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def write_checkpoint(folder: str, config: dict = GEMMA3_1B, seed: int = 0) -> None:
    """Random bf16 weights in transformers' names (N(0, 0.02) matrices, N(0, 0.1) norms)."""
    import torch
    from safetensors.torch import save_file

    D, F, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, Hkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(config["vocab_size"], D), "model.norm.weight": rand(D, std=0.1)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": rand(H * hd, D),
            p + "self_attn.k_proj.weight": rand(Hkv * hd, D),
            p + "self_attn.v_proj.weight": rand(Hkv * hd, D),
            p + "self_attn.o_proj.weight": rand(D, H * hd),
            p + "self_attn.q_norm.weight": rand(hd, std=0.1),
            p + "self_attn.k_norm.weight": rand(hd, std=0.1),
            p + "mlp.gate_proj.weight": rand(F, D),
            p + "mlp.up_proj.weight": rand(F, D),
            p + "mlp.down_proj.weight": rand(D, F),
        }
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            t[p + n + ".weight"] = rand(D, std=0.1)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(t, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def child(which: str, ckpt: str) -> None:
    """Runs in a fresh process: import, load, report JSON on stdout."""
    import torch

    if which == "minilora":
        from minilora.models.loader import load_model

        base = rss_mb()
        t0 = time.perf_counter()
        model, _ = load_model(ckpt, quantize="nf4", dtype=torch.bfloat16, device="cpu")
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        base = rss_mb()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu"
        )
    seconds = time.perf_counter() - t0
    seen, nbytes = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:  # tied lm_head counted once
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "base_rss_mb": base,
                "peak_rss_mb": peak_rss_mb(),
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "model_mb": nbytes / 2**20,
            }
        )
    )


def run_child(which: str, ckpt: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", "--child", which, "--ckpt", ckpt],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(HERE),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{which} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/minilora_gemma3_1b", help="checkpoint folder (written if missing)")
    ap.add_argument("--repeat", type=int, default=1, help="loads per library (medians reported)")
    ap.add_argument("--child", choices=["minilora", "transformers", "write"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "write":
        return write_checkpoint(args.ckpt)
    if args.child:
        return child(args.child, args.ckpt)

    if not os.path.isfile(os.path.join(args.ckpt, "model.safetensors")):
        print(f"writing a Gemma 3 1B-shaped random checkpoint to {args.ckpt} ...", flush=True)
        # In a subprocess, so this process (the children's parent) stays small.
        subprocess.run([sys.executable, "-m", "bench.load", "--child", "write", "--ckpt", args.ckpt], check=True)
    largest = (
        GEMMA3_1B["vocab_size"] * GEMMA3_1B["hidden_size"] * 2 / 2**20
    )  # bf16 embed_tokens, the largest tensor (MB)
    rows = {}
    for which in ("minilora", "transformers"):
        runs = [run_child(which, args.ckpt) for _ in range(args.repeat)]
        rows[which] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows[which]["load_rss_mb"] = rows[which]["peak_rss_mb"] - rows[which]["base_rss_mb"]
    ours, hf = rows["minilora"], rows["transformers"]
    target = (ours["model_mb"] + largest) * 1.25
    print(f"\nGemma 3 1B geometry, random bf16 weights, NF4 + double quant, CPU, median of {args.repeat}")
    print(f"{'':14}{'load s':>9}{'peak RSS MB':>13}{'import MB':>11}{'load RSS MB':>13}{'model MB':>10}")
    for name, r in rows.items():
        print(
            f"{name:14}{r['seconds']:9.1f}{r['peak_rss_mb']:13.0f}{r['base_rss_mb']:11.0f}"
            f"{r['load_rss_mb']:13.0f}{r['model_mb']:10.0f}"
        )
    print(
        f"ratio transformers/minilora: time {hf['seconds'] / ours['seconds']:.2f}x, "
        f"load RSS {hf['load_rss_mb'] / ours['load_rss_mb']:.2f}x, "
        f"peak RSS {hf['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x"
    )
    ok = ours["load_rss_mb"] < target
    print(
        f"target: load RSS {ours['load_rss_mb']:.0f} MB < (model {ours['model_mb']:.0f} + largest bf16 tensor "
        f"{largest:.0f}) * 1.25 = {target:.0f} MB: {'met' if ok else 'NOT met'}"
    )
    from bench.common import environment, write_json

    path = write_json(
        "load",
        {
            "geometry": "gemma-3-1b",
            "repeat": args.repeat,
            "results": rows,
            "largest_bf16_tensor_mb": largest,
            "target_load_rss_mb": target,
            "target_met": ok,
            "environment": environment(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
