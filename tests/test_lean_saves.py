"""Lean saves (models/ops.rebuilt_in_backward, Block.forward's lean): a block that keeps its
activations keeps no copy of its normed attention and MLP inputs, nor of act(gate) * up, and rebuilds
them in backward from what the norms and the gated activation keep anyway.

- The gradients (every LoRA weight and the block input) are the bits of the same step without lean
  saves, over families (Llama, Gemma 3's sandwich norms, Qwen3's q/k norms), dtypes, dropout, the three
  LoRA paths on an NF4 base, DoRA, and a dense base.
- A rebuilt tensor is rebuilt once however many saves share it, dropped after the last, and rebuilt
  again for a second backward (retain_graph); saves of other tensors still reach the hooks around the
  body (a measurement's).
- What autograd keeps shrinks by exactly the rebuilt tensors' bytes (the planner's formula is checked
  against the same saves in tests/test_planner.py).
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner import block_saved_bytes  # what autograd saves in one block's forward

from minilora.lora.surgery import apply_lora
from minilora.models.config import FULL, ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.ops import rebuilt_in_backward
from minilora.models.transformer import Transformer

PRESETS = {"llama": "smollm2-135m", "gemma3": "gemma-3-1b", "qwen3": "qwen3-0.6b"}


def small(family: str) -> ModelConfig:
    base = ModelConfig.from_name(PRESETS[family])
    return dataclasses.replace(
        base,
        num_hidden_layers=2,
        layer_types=[FULL] * 2,
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )


def grads(model: Transformer, ids: torch.Tensor, lean: bool, seed: int) -> dict[str, torch.Tensor]:
    """Every gradient of one forward + backward (dropout drawn from `seed`), and the embedding
    output's as "x" (the blocks' input gradient, through both blocks)."""
    model.lean_saves = lean
    model.zero_grad(set_to_none=True)
    emb = {}

    def keep(module, args, out):
        out.retain_grad()
        emb["x"] = out

    h = model.model.embed_tokens.register_forward_hook(keep)
    torch.manual_seed(seed)
    logits = model(ids)
    h.remove()
    logits.float().square().mean().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out | {"x": emb["x"].grad.clone()}


@settings(max_examples=14, deadline=None)
@given(
    family=st.sampled_from(list(PRESETS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dropout=st.sampled_from([0.0, 0.1]),
    path=st.sampled_from(["fused", "compute", "float32", "dora", "dense"]),
    seed=st.integers(0, 2**16),
)
def test_lean_saves_give_the_same_gradient_bits(family, dtype, dropout, path, seed):
    torch.manual_seed(seed)
    model = Transformer(small(family)).to(dtype)
    if path != "dense":
        quantize_linears(model, compute_dtype=dtype)
    lora_compute = path if path in ("fused", "compute", "float32") else "fused"
    apply_lora(model, r=4, alpha=8, dropout=dropout, use_dora=path == "dora", lora_compute=lora_compute, verbose=False)
    model.model.embed_tokens.weight.requires_grad_(True)  # so the blocks' input has a gradient too
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B = 0 would hide the A gradients and the LoRA term
    model.train()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(seed))
    lean, kept = grads(model, ids, True, seed), grads(model, ids, False, seed)
    assert lean.keys() == kept.keys() and len(lean) > 10
    for name in kept:
        assert torch.equal(lean[name], kept[name]), name


def test_a_rebuilt_tensor_is_built_once_per_backward_and_other_saves_reach_the_outer_hooks():
    x = torch.randn(5, 3, requires_grad=True)
    w1, w2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    calls, outer = [], []
    t = torch.tanh(x)  # (5, 3), saved by tanh's backward too (its output), so not only by the products

    def rebuild():
        calls.append(1)
        return torch.tanh(x.detach())

    def pack(s):
        outer.append(s.shape)
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        with rebuilt_in_backward(t, rebuild):
            y = (t @ w1).sin().sum() + (t.reshape(15).view(5, 3) @ w2).sum()  # two saves of all of t
    assert calls == []  # nothing rebuilt in forward
    assert torch.Size([5, 4]) in outer  # sin's input: a save that is not t, passed to the outer hook
    assert torch.Size([5, 3]) not in outer  # t itself (the products' saves) never reaches it
    y.backward(retain_graph=True)
    assert len(calls) == 1  # both products' saves share one rebuild
    g1 = (w1.grad.clone(), w2.grad.clone(), x.grad.clone())
    w1.grad = w2.grad = x.grad = None
    y.backward()
    assert len(calls) == 2  # dropped after its last save; a second backward rebuilds it
    for a, b in zip(g1, (w1.grad, w2.grad, x.grad)):
        assert torch.equal(a, b)
    with torch.no_grad():
        ref = (torch.tanh(x) @ w1).sin().sum() + (torch.tanh(x) @ w2).sum()
    assert torch.equal(y, ref)


def test_a_save_of_part_of_the_tensor_is_kept_as_it_is():
    """Only saves of the whole tensor (any view of all of it) become the recipe; a slice is kept."""
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(4, 2, requires_grad=True)
    t = x * 2
    calls = []
    with rebuilt_in_backward(t, lambda: calls.append(1) or x.detach() * 2):
        y = (t[:3] @ w).sum()
    y.backward()
    lean = w.grad.clone()
    w.grad = None
    (t.detach()[:3] @ w).sum().backward()  # the same product without the hook: the same ops, the same bits
    assert calls == [] and torch.equal(lean, w.grad)


@pytest.mark.parametrize("family", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_saves_keep_exactly_the_rebuilt_bytes_less(family, dtype):
    """One NF4 + LoRA block: saved bytes without lean minus with lean = the two normed inputs (e D
    each) and act(gate) * up (e F) per token."""
    cfg = dataclasses.replace(small(family), num_hidden_layers=1, layer_types=[FULL])
    model = Transformer(cfg).to(dtype)
    quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    B, T = 2, 9
    kept, lean = (block_saved_bytes(model, B, T, dtype, lean) for lean in (False, True))
    e = torch.empty((), dtype=dtype).element_size()
    assert kept - lean == B * T * e * (2 * cfg.hidden_size + cfg.intermediate_size)
