"""Selective recompute (models/recompute.py): gradients equal those without recompute bit for bit, the
bytes it keeps equal the planner's formula, and train.py runs with --gradient-checkpointing selective.

Bit for bit is the expectation, not a tolerance: selective recompute reruns the same elementwise ops
on the same inputs (the kept matmul outputs, the block input, the restored RNG state for dropout),
so every recomputed tensor equals the one the forward built, and backward runs the same kernels.
"""

import dataclasses
import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner import gemma3, llama_135m
from test_train import train
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minilora.lora.surgery import apply_lora, lora_modules
from minilora.models.config import FULL, SLIDING, ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.recompute import SAVED_OPS, keep_matmuls
from minilora.models.transformer import Transformer, rope_cos_sin
from minilora.train.memory_plan import plan_memory


def small(family: str, layers: int, width: int, softcap: bool = False) -> ModelConfig:
    """A 135M-class Llama or a Gemma 3 geometry with its widths divided by `width`."""
    base = llama_135m(layers) if family == "llama" else gemma3(layers)
    cfg = dataclasses.replace(
        base, vocab_size=64, hidden_size=base.hidden_size // width, intermediate_size=base.intermediate_size // width
    )
    if family == "gemma3":
        cfg = dataclasses.replace(cfg, layer_types=[SLIDING, FULL] * (layers // 2) + [FULL] * (layers % 2))
    return dataclasses.replace(cfg, attn_logit_softcapping=50.0) if softcap else cfg


def lora_model(cfg, dtype, r, dropout, quantize=True, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg).to(dtype)
    if quantize:
        quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, r=r, alpha=2 * r, dropout=dropout, verbose=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)  # B = 0 at init would make every dL/dA zero
    return model.train()


@settings(max_examples=8)  # each example builds and quantizes a 2-block model and runs 2 steps
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    r=st.integers(1, 16),
    dropout=st.sampled_from([0.0, 0.1]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 24),
    full=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_selective_gradients_equal_no_recompute_bit_for_bit(family, dtype, r, dropout, batch, seq, full, seed):
    """LoRA A/B gradients over an NF4 base (dropout on or off), selective on every block, or full
    on the first block and selective on the second, vs no recompute."""
    model = lora_model(small(family, 2, 8), dtype, r, dropout, seed=seed)
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        torch.manual_seed(seed)  # the same dropout masks
        logits = model(ids)
        return torch.autograd.grad(logits.float().pow(2).mean(), params)

    model.set_gradient_checkpointing(False)
    ref = grads()
    model.set_gradient_checkpointing(full, selective=True)
    assert (model.checkpoint_blocks, model.selective_blocks) == (full, 2 - full)
    for got, want in zip(grads(), ref):
        assert torch.equal(got, want)


@settings(max_examples=10)  # one block per example; 10 vary every term of the formula
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    quantize=st.booleans(),
    softcap=st.booleans(),
    r=st.integers(1, 8),
    dropout=st.sampled_from([0.0, 0.1]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 40),
    masked=st.booleans(),
)
def test_selective_keeps_what_the_planner_counts(family, dtype, quantize, softcap, r, dropout, batch, seq, masked):
    """The bytes the policy keeps in one block (every op output it marks MUST_SAVE, by distinct
    storage) plus the block input equal the planner's selective term; backward then runs (torch
    refuses a mutated kept tensor there)."""
    cfg = small(family, 1, 4, softcap)
    cfg = dataclasses.replace(cfg, layer_types=[FULL])
    model = lora_model(cfg, dtype, r, dropout, quantize)
    x = torch.randn(batch, seq, cfg.hidden_size).to(dtype).requires_grad_()
    cos, sin = rope_cos_sin(model.inv_freq_global, torch.arange(seq).expand(batch, seq), dtype)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] if masked else None  # the padded/packed path
    kept = {}

    def recording(ctx, op, *args, **kwargs):
        policy = keep_matmuls(ctx, op, *args, **kwargs)
        if policy == CheckpointPolicy.MUST_SAVE:
            outs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
            for t in outs:
                if isinstance(t, torch.Tensor) and t.dim() >= 1:  # not SDPA's 0-d RNG seed/offset
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return policy

    y = checkpoint(
        model.model.layers[0],
        x,
        cos,
        sin,
        mask,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, recording),
    )
    y.float().sum().backward()
    kw = {
        "batch_size": batch,
        "seq_len": seq,
        "dtype": dtype,
        "lora_r": r,
        "lora_dropout": dropout,
        "loss_chunk": 1,
        "quantize": "nf4" if quantize else "none",
    }

    def activations(full, selective):
        plan = plan_memory(cfg, recompute_blocks=full, selective_blocks=selective, **kw)
        return next(b for name, b, _ in plan.components if name.startswith("activations"))

    # A selective block keeps its input, as a fully recomputed one does, and what the policy saved.
    assert activations(0, 1) - activations(1, 0) == sum(kept.values())


def test_policy_keeps_matrix_products_only():
    names = {op.name() for op in SAVED_OPS}
    assert {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"} <= names
    assert not any("mul" in n or "add." in n or "silu" in n for n in names)


@pytest.mark.parametrize(
    "enabled,selective,want",
    [(False, True, (0, 4)), (1, True, (1, 3)), (2, 1, (2, 1)), (True, True, (4, 0)), (0, 9, (0, 4)), (3, 0, (3, 0))],
)
def test_set_gradient_checkpointing_selective_blocks(monkeypatch, enabled, selective, want):
    """The first `full` blocks recompute fully, the next `selective` ones with the selective policy."""
    from minilora.models import transformer
    from minilora.models.recompute import selective_context

    model = transformer.Transformer(ModelConfig.from_name("tiny")).double()
    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(
        transformer,
        "checkpoint",
        lambda layer, *a, **kw: calls.append((layer, kw.get("context_fn"))) or real(layer, *a, **kw),
    )
    model.set_gradient_checkpointing(enabled, selective=selective)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    full, sel = want
    layers = list(model.model.layers)
    assert calls == [(m, None) for m in layers[:full]] + [(m, selective_context) for m in layers[full : full + sel]]


def test_train_py_selective_end_to_end(tmp_path):
    """--gradient-checkpointing selective through train.py: it says so, saves it, and learns."""
    out = tmp_path / "sel"
    p = train(out, "--max-steps", "12", "--gradient-checkpointing", "selective", "--lora-dropout", "0.1")
    assert "recompute selective" in p.stdout
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["gradient_checkpointing"] == "selective"
    assert resolved["selective_blocks"] > 0 and resolved["recompute_blocks"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 12 and loss[-1] < loss[0]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
