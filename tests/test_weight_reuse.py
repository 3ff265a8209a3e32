"""Weight reuse: a quantized linear keeps its dequantized weight from forward to backward
(NF4Linear.keep_dequantized, Transformer.set_weight_reuse) instead of dequantizing it again.

It must change nothing but time and memory: outputs and gradients equal those without it bit for bit
(the backward's g @ W reads the same W the forward's dequantization produced); the backward then
dequantizes nothing; and the bytes it keeps equal the planner's "dequantized weights kept" term
(kept_weight_bytes) exactly. Those weights are held from one step to the next (NF4Linear.held_weight):
the same bytes, and no dequantization after the first step. The measured peak under --memory-budget
with reuse on, partly on and off is checked in tests/test_planner.py."""

import dataclasses
import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_lora import fwd_bwd, ours_params, randomize

import minilora.quant.linear as quant_linear
from minilora.lora.layers import LoRALinear
from minilora.lora.surgery import apply_lora
from minilora.models.config import ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.transformer import Transformer
from minilora.quant.linear import BYTE_VIEW, NF4Linear
from minilora.train.memory_plan import LINEARS, plan_memory

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def count_dequantize(monkeypatch) -> list:
    """Record each dequantize_nf4 call (every CPU path of the NF4 matmuls goes through it)."""
    calls, real = [], quant_linear.dequantize_nf4
    counted = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(quant_linear, "dequantize_nf4", counted)
    return calls


def saved_bytes(fn, model=None) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs its forward, with those of the
    dequantized weights `model`'s quantized linears hold afterwards (a recomputed block's saves go to
    torch's checkpoint, not here, but the weights it holds stay)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for m in [] if model is None else nf4_layers(model):
        if m._held is not None:
            w = m._held[1]
            seen[w.untyped_storage().data_ptr()] = w.untyped_storage().nbytes()
    return sum(seen.values())


def nf4_layers(model) -> list[NF4Linear]:
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


@settings(max_examples=40, deadline=None)
@given(
    k=st.sampled_from([64, 128, 192]),
    m=st.integers(1, 96),
    rows=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    lora=st.sampled_from([None, "fused", "float32", "compute"]),
    dropout=st.sampled_from([0.0, 0.3]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reuse_is_bit_for_bit_and_the_backward_dequantizes_nothing(k, m, rows, dtype, lora, dropout, bias, seed):
    """NF4Linear alone and under LoRA (fused, float32 and compute paths, with dropout): y, dL/dx, dL/dA and
    dL/dB equal with and without reuse; with it, forward and backward dequantize once in all (twice
    without), and the one saved extra is the dequantized W in the compute dtype."""
    gen = torch.Generator().manual_seed(seed)
    base = NF4Linear.from_weight(torch.randn(m, k, generator=gen) * 0.1, compute_dtype=dtype)
    if bias:
        base.bias = torch.randn(m, generator=gen).to(dtype)
    module, params = base, []
    if lora is not None:
        module = LoRALinear(base, r=4, alpha=8, dropout=dropout, lora_compute=lora)
        randomize(module, gen)
        params = ours_params(module)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    mp = pytest.MonkeyPatch()
    try:
        calls = count_dequantize(mp)
        results, counts, saved = [], [], []
        for keep in (False, True):
            base.keep_dequantized = keep
            for p in params:
                p.grad = None
            calls.clear()
            results.append(fwd_bwd(module, params, x, seed))
            counts.append(len(calls))
            saved.append(saved_bytes(lambda: module(x.clone().requires_grad_())))
    finally:
        mp.undo()
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
    assert counts == [2, 1]
    assert saved[1] - saved[0] == m * k * dtype.itemsize  # the kept W (M, K) in the compute dtype


def test_no_weight_is_kept_where_no_input_gradient_is_needed():
    """The weight serves only dL/dx: with an input that needs no gradient (the first block's q, k, v
    read the frozen embedding), nothing extra is saved and the forward dequantizes once as before."""
    base = NF4Linear.from_weight(torch.randn(32, 64) * 0.1, compute_dtype=torch.bfloat16)
    module = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(5, 64).to(torch.bfloat16)  # requires no grad
    sizes = []
    for keep in (False, True):
        base.keep_dequantized = keep
        sizes.append(saved_bytes(lambda: module(x)))
    assert sizes[0] == sizes[1]


def tiny_quantized(targets, dtype, layers=3):
    tiny = ModelConfig.from_name("tiny")
    cfg = dataclasses.replace(tiny, num_hidden_layers=layers, layer_types=tiny.layer_types[:1] * layers)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, targets=list(targets), r=4, alpha=8, dropout=0.0, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # non-zero B: every gradient path carries signal
    return cfg, model.train()


def planned_kept(cfg, dtype, targets, recompute, reuse) -> int:
    """The planner's "dequantized weights kept" bytes for tiny_quantized's model at batch 2 x 12."""
    plan = plan_memory(
        cfg,
        batch_size=2,
        seq_len=12,
        dtype=dtype,
        lora_r=4,
        lora_targets=tuple(targets),
        recompute_blocks=recompute[0],
        selective_blocks=recompute[1],
        reuse_blocks=reuse,
    )
    return next(b for name, b, _ in plan.components if name.startswith("dequantized weights kept"))


@settings(max_examples=12, deadline=None)
@given(
    targets=st.lists(st.sampled_from(LINEARS), min_size=1, max_size=7, unique=True),
    reuse=st.integers(0, 3),
    recompute=st.sampled_from([(0, 0), (1, 0), (0, 2), (1, 1)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
# every block keeps, the first included: its linears before the first adapted one keep nothing
@example(targets=["q_proj"], reuse=3, recompute=(0, 0), dtype=torch.float32)
@example(targets=["up_proj"], reuse=3, recompute=(0, 0), dtype=torch.bfloat16)
def test_a_model_keeps_what_the_planner_counts_and_trains_the_same(targets, reuse, recompute, dtype):
    """A 3-block model with any LoRA targets, the last `reuse` blocks keeping their weights, under
    full and selective recompute: the extra bytes saved or held equal the planner's "dequantized weights
    kept" term exactly, and the loss and every LoRA gradient equal the run without reuse bit for bit."""
    cfg, model = tiny_quantized(targets, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.set_gradient_checkpointing(recompute[0], selective=recompute[1])
    params = [p for p in model.parameters() if p.requires_grad]
    runs, sizes = [], []
    for w in (0, reuse):
        model.set_weight_reuse(w)
        sizes.append(saved_bytes(lambda: model(ids), model))
        loss = model(ids).float().pow(2).mean()
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for got, want in zip(runs[1], runs[0]):
        assert torch.equal(got, want)
    assert sizes[1] - sizes[0] == planned_kept(cfg, dtype, targets, recompute, reuse)


def test_train_py_weight_reuse_on_and_off_train_the_same_adapter(tmp_path):
    """--weight-reuse on and off through train.py (bf16, dropout): config.json records the blocks that
    kept their weights, and the two adapters are equal bit for bit."""
    from cli_runs import train
    from safetensors.torch import load_file

    adapters = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        p = train(out, "--dtype", "bfloat16", "--weight-reuse", mode, "--max-steps", "3", "--save-every", "0")
        assert p.returncode == 0, p.stderr[-2000:]
        assert f"dequantized weights kept {mode}" in p.stdout
        resolved = json.loads((out / "config.json").read_text())["resolved"]
        assert (resolved["weight_reuse_blocks"] > 0) == (mode == "on")
        adapters[mode] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapters["on"].keys() == adapters["off"].keys()
    for key in adapters["on"]:
        assert torch.equal(adapters["on"][key], adapters["off"][key]), key


@settings(max_examples=10, deadline=None)
@given(
    targets=st.lists(st.sampled_from(LINEARS), min_size=1, max_size=7, unique=True),
    recompute=st.sampled_from([(0, 0), (1, 0), (0, 1), (2, 0)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
@example(targets=list(LINEARS), recompute=(0, 0), dtype=torch.bfloat16)
def test_held_weights_dequantize_once_per_run_and_train_the_same(targets, recompute, dtype):
    """Three optimizer steps with every block reusing its weights against none, under full and selective
    recompute too: the same loss and LoRA gradients bit for bit in every step. The layers hold exactly
    the planner's "dequantized weights kept" bytes after the first step, and from the second step on a
    holding layer dequantizes nothing: the only dequantizations left are the forwards (and recomputes)
    of the layers whose input needs no gradient (they hold nothing)."""
    cfg, model = tiny_quantized(targets, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.set_gradient_checkpointing(recompute[0], selective=recompute[1])
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    mp = pytest.MonkeyPatch()
    try:
        calls = count_dequantize(mp)
        runs, per_step = {}, {}
        for w in (0, cfg.num_hidden_layers):
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            model.set_weight_reuse(w)
            opt = torch.optim.SGD(params, lr=0.5)
            runs[w], per_step[w] = [], []
            for _ in range(3):
                calls.clear()
                loss = model(ids).float().pow(2).mean()
                loss.backward()
                per_step[w].append(len(calls))
                runs[w].append([loss.detach()] + [p.grad.clone() for p in params])
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        mp.undo()
    for got, want in zip(runs[cfg.num_hidden_layers], runs[0]):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    layers = nf4_layers(model)
    held = [m for m in layers if m.held_weight(dtype, make=False) is not None]
    kept = planned_kept(cfg, dtype, targets, recompute, cfg.num_hidden_layers)
    assert sum(m.out_features * m.in_features * dtype.itemsize for m in held) == kept
    # without reuse every layer dequantizes in forward (twice in a recomputed block), and again in
    # backward where dL/dx is needed, every step
    assert per_step[0] == [per_step[0][0]] * 3
    recomputed = model.model.layers[: sum(recompute)]  # their forward runs again in backward
    forwards = sum(1 + any(m is r for blk in recomputed for r in nf4_layers(blk)) for m in layers if m not in held)
    assert per_step[cfg.num_hidden_layers][1:] == [forwards] * 2


def test_turning_reuse_off_frees_the_held_weights():
    """set_weight_reuse(0) leaves no held weight behind, set_weight_reuse(1) only the last block's; eval
    forwards (no grad) read the held weights without making new ones and give the same logits."""
    cfg, model = tiny_quantized(LINEARS, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    model.set_weight_reuse(cfg.num_hidden_layers)
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    assert all(m._held is None for m in nf4_layers(model))  # made only where a backward will need W
    model(ids).float().pow(2).mean().backward()
    holding = [m for m in nf4_layers(model) if m._held is not None]
    assert holding
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    model.set_weight_reuse(1)
    assert all(m._held is None for layer in model.model.layers[:-1] for m in nf4_layers(layer))
    assert all(m._held is not None for m in nf4_layers(model.model.layers[-1]))
    model.set_weight_reuse(0)
    assert all(m._held is None for m in nf4_layers(model))


def test_a_held_weight_follows_its_codes_and_fsdp_byte_views_hold_nothing():
    """Codes written in place (a load) or replaced (a .to()) make a new held W: the output equals a fresh
    layer's with those codes. Codes in FSDP's byte view are never held."""
    gen = torch.Generator().manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(48, 64, generator=gen) * 0.1, compute_dtype=torch.bfloat16)
    other = NF4Linear.from_weight(torch.randn(48, 64, generator=gen) * 0.1, compute_dtype=torch.bfloat16)
    layer.keep_dequantized = True
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    layer(x)
    assert layer.held_weight(torch.bfloat16, make=False) is not None
    with torch.no_grad():
        layer.weight_packed.copy_(other.weight_packed)
        layer.weight_absmax.copy_(other.weight_absmax)
        layer.weight_absmax2.copy_(other.weight_absmax2)
        layer.weight_offset.copy_(other.weight_offset)
    assert torch.equal(layer(x), other(x))
    layer.weight_packed = layer.weight_packed.clone()  # another storage
    assert torch.equal(layer(x), other(x))
    assert torch.equal(layer.held_weight(torch.bfloat16, make=False), other.dequantized_weight(torch.bfloat16))
    layer.weight_packed = layer.weight_packed.view(BYTE_VIEW)
    assert layer.held_weight(torch.bfloat16, make=True) is None
    assert torch.equal(layer(x), other(x))
