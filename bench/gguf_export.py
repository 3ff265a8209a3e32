"""File size and agreement per export type on a small random model: GGUF f16/bf16/q8_0/q4_0 beside
the Hugging Face bf16 and bitsandbytes NF4 checkpoints.

    python -m bench.gguf_export [--family llama|gemma3] [--hidden 512] [--layers 8] [--prompts 16]

Builds a random transformers checkpoint (the bundled byte-level tokenizer, vocab 1024) and a random
LoRA adapter, exports it in every format through eval.py's code path (validation off), and reads
each export back with transformers (GGUF: transformers' GGUF loader). Against the merged model in
float32 (transformers reading the float32 export) it reports, over random prompts: the max logit
error relative to the largest logit, top-1 agreement of teacher-forced next tokens, and greedy
agreement (free-running continuations compared position by position). A random model's logits are
nearly flat, so its agreement is a lower bound for a trained model's. Writes
bench/results/gguf_export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(os.path.dirname(HERE), "examples", "tokenizer")


def build_run(tmp: str, family: str, hidden: int, layers: int, seed: int = 0) -> str:
    import transformers

    from minilora.models.config import every_nth_full

    torch.manual_seed(seed)
    common = dict(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            layer_types=every_nth_full(layers, 6),
            **common,
        )
        hf = transformers.Gemma3ForCausalLM(cfg)
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=False, **common))
    return run_from_model(tmp, hf, seed)


def run_from_model(tmp: str, hf, seed: int = 0, b_std: float = 0.02) -> str:
    """A run folder in `tmp` for the transformers model `hf`: the model saved with the bundled
    tokenizer as the base, and a LoRA adapter (r 16 on every linear, B ~ N(0, b_std)) trained on it
    (b_std 0: an adapter that merges to the base exactly)."""
    from minilora.lora.adapter import save_adapter
    from minilora.lora.surgery import apply_lora, lora_modules
    from minilora.models.loader import load_model

    base = os.path.join(tmp, "base")
    hf.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, f), os.path.join(base, f))
    model, _ = load_model(base, quantize=None, dtype=torch.float32)
    apply_lora(model, "all-linear", r=16, alpha=32, dropout=0.0, seed=seed, verbose=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, b_std) if b_std else m.lora_B.weight.zero_()
    run = os.path.join(tmp, "run")
    save_adapter(model, os.path.join(run, "adapter"), base)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"model": base, "quantize": "none", "dtype": "float32"}, f)
    return run


def teacher_forced_top1(ref: list, got: list) -> float:
    same = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for (a, _), (b, _) in zip(ref, got))
    return same / sum(a.shape[0] for a, _ in ref)


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.getsize(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["llama", "gemma3"], default="llama")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gguf_export.json)")
    args = p.parse_args(argv)

    from bench.common import environment, write_json
    from minilora.export import readback as V
    from minilora.export.merge import export_adapter

    quiet = lambda m: None  # noqa: E731
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1024) for _ in range(32)] for _ in range(args.prompts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(tmp, args.family, args.hidden, args.layers)
        ref_dir = os.path.join(tmp, "f32")
        export_adapter(run, ref_dir, dtype="float32", validate=False, log=quiet)
        hf_cfg, f32 = json.load(open(os.path.join(ref_dir, "config.json"))), size_of(ref_dir)
        ref = V.outputs(V.reload("hf", ref_dir, hf_cfg), prompts)
        variants = [
            ("hf bf16", "hf", dict(dtype="bfloat16")),
            ("hf nf4", "nf4", dict(dtype="bfloat16", quantize_4bit=True)),
        ]
        variants += [(f"gguf {t}", "gguf", dict(fmt="gguf", gguf_type=t)) for t in ("f16", "bf16", "q8_0", "q4_0")]
        for label, kind, kw in variants:
            path = os.path.join(tmp, label.replace(" ", "_") + (".gguf" if kind == "gguf" else ""))
            export_adapter(run, path, validate=False, log=quiet, **kw)
            got = V.outputs(V.reload(kind, path, hf_cfg), prompts)
            stats = V.compare(ref, got)
            rows.append(
                {
                    "export": label,
                    "bytes": size_of(path),
                    "rel_logit_err": stats["rel_logit_err"],
                    "top1_agree": teacher_forced_top1(ref, got),
                    "greedy_agree": stats["greedy_agree"],
                }
            )
    print(f"{args.family}, hidden {args.hidden}, {args.layers} layers, vocab 1024, {args.prompts} prompts x 32 tokens")
    print(f"{'export':10}{'MiB':>9}{'vs f32':>8}{'logit rel err':>15}{'top-1':>8}{'greedy':>8}")
    for r in rows:
        print(
            f"{r['export']:10}{r['bytes'] / 2**20:9.2f}{r['bytes'] / f32:8.2f}{r['rel_logit_err']:15.2e}"
            f"{r['top1_agree']:8.1%}{r['greedy_agree']:8.1%}"
        )
    payload = {"args": vars(args), "env": environment(), "float32_bytes": f32, "rows": rows}
    path = write_json("gguf_export", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
