"""What autograd keeps per token in one transformer block, by module, beside the planner's formula.

    python -m bench.saved_activations      # smollm2-135m (the plan_step geometry), gemma-3-1b, qwen3-0.6b
    python -m bench.saved_activations --models smollm2-135m --batch 4 --seq 170

One block of each preset's geometry (random weights, NF4 base, LoRA r 16 on every linear, dropout
0: train.py's defaults) runs forward on (B, T) random hidden states under
torch.autograd.graph.saved_tensors_hooks, in float32 and bf16, plain causal attention (no mask).
Every distinct storage saved for backward that is not a parameter, buffer or the rope tables is
counted once, charged to the innermost module running when it was first saved. Bytes per token,
so the figures are machine-independent. The planner's per-block `act` term is printed beside the
measured total. Writes bench/results/saved_activations.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import torch

from bench.common import environment, write_json


def saved_by_module(preset: str, dtype: torch.dtype, batch: int, seq: int) -> dict[str, int]:
    """{module path inside the block: bytes saved for backward} for one LoRA block of `preset`."""
    from minilora.lora.surgery import apply_lora
    from minilora.models.config import FULL, ModelConfig
    from minilora.models.loader import quantize_linears
    from minilora.models.transformer import Transformer, rope_cos_sin

    base = ModelConfig.from_name(preset)
    cfg = dataclasses.replace(base, num_hidden_layers=1, layer_types=[FULL], vocab_size=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, r=16, alpha=32, dropout=0.0, verbose=False)
    block = model.model.layers[0]
    x = torch.randn(batch, seq, cfg.hidden_size).to(dtype).requires_grad_()
    cos, sin = rope_cos_sin(model.inv_freq_global, torch.arange(seq).expand(batch, seq), dtype)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), cos, sin]}
    stack, seen, by = ["(block)"], set(), defaultdict(int)

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            by[stack[-1]] += s.nbytes()
        return t

    for name, m in block.named_modules():
        if name:
            m.register_forward_pre_hook(lambda m, a, name=name: stack.append(name))
            m.register_forward_hook(lambda m, a, out: stack.pop() and None)  # None: keep the output
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, None, lean=True)  # as Transformer.forward runs a block that keeps its activations
    return dict(by)


def planned_per_block(preset: str, dtype: torch.dtype, batch: int, seq: int) -> int:
    """The planner's activation bytes for one block (2 blocks minus 1 block)."""
    from minilora.models.config import FULL, ModelConfig
    from minilora.train.memory_plan import plan_memory

    base = ModelConfig.from_name(preset)

    def kept(L):
        cfg = dataclasses.replace(base, num_hidden_layers=L, layer_types=[FULL] * L)
        plan = plan_memory(cfg, batch_size=batch, seq_len=seq, dtype=dtype, loss_chunk=1)
        return next(b for name, b, _ in plan.components if name.startswith("activations"))

    return kept(2) - kept(1)


def main() -> None:
    from minilora.dtypes import dtype_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma-3-1b,qwen3-0.6b", help="comma-separated presets")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=170)
    ap.add_argument("--out", default="saved_activations", help="results name under bench/results/")
    a = ap.parse_args()
    N = a.batch * a.seq
    rows = []
    for preset in a.models.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            by = saved_by_module(preset, dtype, a.batch, a.seq)
            total, planned = sum(by.values()), planned_per_block(preset, dtype, a.batch, a.seq)
            rows.append(
                {
                    "model": preset,
                    "dtype": dtype_name(dtype),
                    "bytes_per_token": total / N,
                    "planned_bytes_per_token": planned / N,
                    "by_module": {k: v / N for k, v in by.items()},
                }
            )
            print(
                f"\n{preset} {rows[-1]['dtype']}: {total / N:,.0f} bytes per token per block saved "
                f"(planner: {planned / N:,.0f})"
            )
            for name, b in sorted(by.items(), key=lambda kv: -kv[1]):
                print(f"  {name:<32}{b / N:>10,.0f}")
    write_json(a.out, {"environment": environment(), "batch": a.batch, "seq": a.seq, "rows": rows})


if __name__ == "__main__":
    main()
