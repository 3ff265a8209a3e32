"""LoRALinear against PEFT 0.21 (dense nn.Linear base, and bitsandbytes Linear4bit holding the same
NF4 bytes), merge/unmerge, apply_lora's selection and PEFT-style parameter report, and errors.

bitsandbytes' CPU dequantize_4bit (its C++ kernel) returns wrong values when in_features is a multiple
of 16 but not of the blocksize (e.g. (40, 96) at blocksize 64, checked against its own quantize_4bit);
the NF4 oracle tests therefore draw in_features from sizes it handles: multiples of 128 and 100.
"""

import contextlib
import copy
import io
import math
import warnings
from collections import OrderedDict
from unittest import mock

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import minilora.lora.layers as lora_mod
from minilora.lora.layers import AdapterError, LoRALinear
from minilora.lora.surgery import apply_lora, lora_parameters, lora_state_dict
from minilora.quant.linear import NF4Linear


def one(lin: nn.Module) -> nn.Module:
    """A model whose only module, named `lin` (PEFT's target), is `lin`."""
    return nn.Sequential(OrderedDict(lin=lin))


def bnb_linear4bit(nl: NF4Linear) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4, double quant) holding exactly the bytes of `nl`."""
    lin = nl.to_bnb()
    assert torch.equal(lin.weight.data.view(-1), nl.weight_packed)  # the very bytes, no requantization
    return lin


def peft_twin(ours: LoRALinear, base: nn.Module):
    """PEFT's LoRA layer over `base` holding the same adapter weights as `ours`."""
    cfg = LoraConfig(
        r=ours.r,
        lora_alpha=ours.alpha,
        target_modules=["lin"],
        lora_dropout=ours.dropout_p,
        use_rslora=ours.use_rslora,
        use_dora=ours.use_dora,
    )
    model = one(base)
    # PEFT picks its bitsandbytes LoRA layer (cast the LoRA term to the base dtype, then add) only for a
    # model marked as loaded in 4 bit, as transformers marks a BitsAndBytesConfig model; unmarked, it
    # wraps the Linear4bit in its generic layer (add in float32, round once), which is not QLoRA.
    model.is_loaded_in_4bit = isinstance(base, bnb.nn.Linear4bit)
    pm = get_peft_model(model, cfg)
    if model.is_loaded_in_4bit:
        assert type(pm.base_model.model.lin).__module__ == "peft.tuners.lora.bnb"
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if ours.use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if ours.use_dora:
        params.append(layer.lora_magnitude_vector["default"].weight)
    return pm, params


def fwd_bwd(module, params, x, seed):
    """Output and gradients (x, then params), with the dropout RNG and dL/dy fixed by `seed`."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(g)
    return [y, x.grad] + [p.grad for p in params]


def randomize(ours: LoRALinear, gen):
    """Non-zero B (so every gradient is non-trivial) and a non-trivial DoRA magnitude."""
    with torch.no_grad():
        ours.lora_A.weight.copy_(torch.randn(ours.lora_A.weight.shape, generator=gen) / math.sqrt(ours.in_features))
        ours.lora_B.weight.copy_(torch.randn(ours.lora_B.weight.shape, generator=gen) / math.sqrt(ours.r))
        if ours.use_dora:
            ours.lora_magnitude_vector.mul_(torch.rand(ours.out_features, generator=gen) + 0.5)


def ours_params(m):
    return [m.lora_A.weight, m.lora_B.weight] + ([m.lora_magnitude_vector] if m.use_dora else [])


def assert_same(got, want, dtype, bf16_ulps=0):
    """float32 tensors within float32 rounding; bf16 ones equal, or within `bf16_ulps` ulps of the
    largest value where one op is known to round differently (then float32 tensors computed from that
    output, such as the DoRA magnitude's gradient, inherit the bf16 difference)."""
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == torch.float32 and not bf16_ulps:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * (1 + b.abs().max().item()))
        else:
            tol = bf16_ulps * 2.0**-7 * b.float().abs().max().item()  # ulp <= 2^-7 |value|
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)


hyper = dict(
    r=st.integers(1, 12),
    alpha=st.sampled_from([1, 8, 16.0, 32, 0.5]),
    rslora=st.booleans(),
    dora=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    bias=st.booleans(),
    drop=st.sampled_from([(0.0, True), (0.25, True), (0.25, False)]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=12)  # each example builds PEFT's twin layer and compares forward and backward
@given(k=st.integers(1, 80), m=st.integers(1, 80), **hyper)
def test_matches_peft_dense(k, m, r, alpha, rslora, dora, dtype, batch, bias, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias).to(dtype)
    ours = LoRALinear(copy.deepcopy(lin), r, alpha, dropout=drop[0], use_rslora=rslora, use_dora=dora)
    randomize(ours, gen)
    pm, theirs = peft_twin(ours, copy.deepcopy(lin))
    ours.train(drop[1]), pm.train(drop[1])
    x = torch.randn(*batch, k, generator=gen).to(dtype)
    assert_same(fwd_bwd(ours, ours_params(ours), x, seed), fwd_bwd(pm, theirs, x, seed), dtype)


@settings(
    max_examples=10
)  # each example quantizes with both libraries and runs PEFT's QLoRA layer forward and backward
@given(k=st.sampled_from([100, 128, 256]), m=st.integers(1, 48), blocksize=st.sampled_from([32, 64, 128]), **hyper)
# QLoRA's usual case on purpose (bf16, no DoRA: the fused function), with and without dropout.
@example(
    k=128,
    m=24,
    blocksize=64,
    r=8,
    alpha=16,
    rslora=False,
    dora=False,
    dtype=torch.bfloat16,
    batch=[2, 5],
    bias=False,
    drop=(0.0, True),
    seed=1,
)
@example(
    k=256,
    m=7,
    blocksize=64,
    r=4,
    alpha=8,
    rslora=True,
    dora=False,
    dtype=torch.bfloat16,
    batch=[9],
    bias=False,
    drop=(0.25, True),
    seed=2,
)
def test_matches_peft_on_bitsandbytes_nf4(k, m, blocksize, r, alpha, rslora, dora, dtype, batch, bias, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias).to(dtype)
    nl = NF4Linear.from_linear(lin, blocksize=blocksize)
    ours = LoRALinear(nl, r, alpha, dropout=drop[0], use_rslora=rslora, use_dora=dora, lora_compute="float32")
    randomize(ours, gen)
    pm, theirs = peft_twin(ours, bnb_linear4bit(nl))
    ours.train(drop[1]), pm.train(drop[1])
    x = torch.randn(*batch, k, generator=gen).to(dtype)
    # NF4Linear adds the bias after the matmul, bitsandbytes inside it: one bf16 rounding apart.
    ulps = 3 if (bias and dtype == torch.bfloat16) else 0
    assert_same(fwd_bwd(ours, ours_params(ours), x, seed), fwd_bwd(pm, theirs, x, seed), dtype, ulps)


@settings(
    max_examples=10
)  # each example quantizes with both libraries and runs PEFT's QLoRA layer forward and backward
@given(
    k=st.sampled_from([64, 128]),
    m=st.integers(1, 48),
    rows=st.integers(1, 5),
    n=st.integers(1, 24),
    r=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    drop=st.sampled_from([(0.0, True), (0.25, True)]),
    seed=st.integers(0, 2**16),
)
def test_row_slices_match_peft_on_bitsandbytes_nf4(k, m, rows, n, r, dtype, drop, seed):
    """The fused NF4 function's float32 LoRA terms run over row slices (lora.LORA_SLICE_BYTES); with
    slices of 1-5 rows, so that most batches take several, outputs and gradients still equal PEFT's:
    float32 ones within float32 rounding, bf16 ones within one bf16 rounding step (a BLAS product
    over a few rows may differ from the whole-batch one in its last float32 bit, which can flip a
    bf16 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    nl = NF4Linear.from_linear(nn.Linear(k, m, bias=False).to(dtype))
    ours = LoRALinear(nl, r, 2 * r, dropout=drop[0], lora_compute="float32")
    randomize(ours, gen)
    pm, theirs = peft_twin(ours, bnb_linear4bit(nl))
    ours.train(drop[1]), pm.train(drop[1])
    x = torch.randn(n, k, generator=gen).to(dtype)
    with mock.patch.dict(lora_mod.LORA_SLICE_BYTES, {"cpu": rows * 4 * max(k, m)}):
        assert len(lora_mod._row_slices(n, max(k, m), torch.device("cpu"))) == -(-n // rows)
        got = fwd_bwd(ours, ours_params(ours), x, seed)
    for a, b in zip(got, fwd_bwd(pm, theirs, x, seed)):  # y, dL/dx (x's dtype), dL/dA, dL/dB (float32)
        assert_same([a], [b], a.dtype, bf16_ulps=1 if a.dtype == torch.bfloat16 else 0)


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [10, 64])  # on CUDA: the fused Triton matmul (<= 16 tokens), then dequantize + cuBLAS
def test_nf4_lora_matches_peft_qlora_on_each_device(device, n):
    """QLoRA's usual case (bf16, NF4 double quant, no dropout) against PEFT's QLoRA layer on a
    bitsandbytes Linear4bit holding the same bytes, on the CPU and (marked gpu) on CUDA, where both
    sides take their GPU kernels. Different GEMM kernels may accumulate in another order, flipping
    a bf16 rounding: values within 2 bf16 ulps of the largest one."""
    gen = torch.Generator().manual_seed(n)
    lin = nn.Linear(256, 48, bias=False).to(torch.bfloat16)  # 48 outputs: a ragged output tile
    nl = NF4Linear.from_linear(lin, blocksize=64).to(device)
    ours = LoRALinear(nl, 8, 16, dropout=0.0, lora_compute="float32").to(device)
    randomize(ours, gen)
    pm, theirs = peft_twin(ours, bnb_linear4bit(nl))
    x = torch.randn(n, 256, generator=gen).to(device, torch.bfloat16)
    got, want = fwd_bwd(ours, ours_params(ours), x, 0), fwd_bwd(pm, theirs, x, 0)
    assert all(t.device.type == device for t in got + want)
    assert_same(got, want, torch.bfloat16, bf16_ulps=2)


def test_fused_nf4_path_equals_unfused_in_float32():
    """The fused NF4 function (grad enabled) equals the plain composition (no_grad path) exactly."""
    torch.manual_seed(0)
    ours = LoRALinear(NF4Linear.from_linear(nn.Linear(128, 40, bias=True)), 8, 16)
    randomize(ours, torch.Generator().manual_seed(1))
    x = torch.randn(3, 7, 128)
    with torch.no_grad():
        plain = ours(x)
    assert torch.equal(ours(x).detach(), plain)


@pytest.mark.parametrize("mode, u_bytes", [("fused", 2), ("float32", 4), ("compute", 2)])
def test_fused_nf4_saves_no_weight_and_no_float32_x(mode, u_bytes):
    """Between forward and backward the NF4 LoRA functions keep x, A, B (the float32 parameters),
    u = A x (N, r; float32 on the float32 path, else bf16) and the mask only."""
    n, k, m, r = 64, 256, 192, 4
    ours = LoRALinear(NF4Linear.from_linear(nn.Linear(k, m).to(torch.bfloat16)), r, 8, dropout=0.1, lora_compute=mode)
    x = torch.randn(n, k, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x)
    big = [t for t in saved if t.numel() >= m * k or (t.dtype == torch.float32 and t.numel() >= n * k)]
    assert big == [], [(t.shape, t.dtype) for t in big]
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    assert nbytes == x.numel() * 2 + (r * k + m * r) * 4 + n * r * u_bytes + n * k  # x, A, B, u, bool mask
    y.float().sum().backward()
    assert x.grad is not None and ours.lora_A.weight.grad is not None


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(nf4, dora, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True).to(dtype)
    base = NF4Linear.from_linear(lin) if nf4 else lin
    ours = LoRALinear(base, 8, 16, use_dora=dora).eval()
    randomize(ours, torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(5, 128, dtype=dtype)
    with torch.no_grad():
        want = ours(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.merge()
            ours.merge()  # idempotent
        assert any("rounding" in str(w.message) for w in caught) == nf4
        got = ours(x)
    assert ours.merged
    if nf4:  # requantization: the merged layer is an NF4 approximation of W0 + s B A
        err = (got.float() - want.float()).abs().mean() / want.float().abs().mean()
        assert err < 0.1
    elif dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)
    ours.unmerge()
    ours.unmerge()  # idempotent
    assert not ours.merged
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is restored exactly
    with torch.no_grad():
        assert torch.equal(ours(x), want)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_weight_equals_peft_merge(dora):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    ours = LoRALinear(copy.deepcopy(lin), 8, 16, use_dora=dora)
    randomize(ours, torch.Generator().manual_seed(5))
    pm, _ = peft_twin(ours, copy.deepcopy(lin))
    merged = pm.merge_and_unload()
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged.lin.weight, rtol=1e-6, atol=1e-6)


def tiny_llama(tie=False):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def peft_message(model, **kw):
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kw))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return pm, buf.getvalue().strip()


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["mlp.down_proj"]])
@pytest.mark.parametrize("tie", [False, True])
def test_apply_lora_selects_and_reports_like_peft(targets, tie):
    ours, theirs = tiny_llama(tie), tiny_llama(tie)
    report = apply_lora(ours, targets, r=4, alpha=8, verbose=False)
    pm, msg = peft_message(theirs, r=4, lora_alpha=8, target_modules=targets)
    assert report["message"] == msg
    peft_names = {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)
    }
    assert set(report["modules"]) == peft_names
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(ours)) and len(lora_parameters(ours)) == len(trainable)


def test_report_counts_nf4_like_peft_on_bitsandbytes():
    """An all-NF4 model reports the same numbers as PEFT over bitsandbytes Linear4bit (logical numel)."""
    ours, theirs = tiny_llama(), tiny_llama()
    for model, wrap in (
        (ours, lambda lin: NF4Linear.from_linear(lin)),
        (theirs, lambda lin: bnb_linear4bit(NF4Linear.from_linear(lin))),
    ):
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name != "lm_head":
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, wrap(mod))
    report = apply_lora(ours, "all-linear", r=8, alpha=16, verbose=False)
    _, msg = peft_message(theirs, r=8, lora_alpha=16, target_modules="all-linear")
    assert report["message"] == msg


def test_apply_lora_seed_is_reproducible_and_prints(capsys):
    a, b = tiny_llama(), tiny_llama()
    apply_lora(a, ["q_proj"], r=4, seed=123)
    apply_lora(b, ["q_proj"], r=4, seed=123)
    assert "trainable params:" in capsys.readouterr().out
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("r", [0, -1, 1.5, True])
def test_bad_rank(r):
    with pytest.raises(AdapterError, match="rank"):
        apply_lora(tiny_llama(), "all-linear", r=r)
    with pytest.raises(AdapterError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r, 8)


def test_target_matching_nothing_lists_names():
    with pytest.raises(AdapterError, match=r"\['qkv'\].*'down_proj'.*'q_proj'"):
        apply_lora(tiny_llama(), ["q_proj", "qkv"])
    with pytest.raises(AdapterError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), 2, 8, dropout=1.0)
    with pytest.raises(AdapterError, match="init='pisa' is unknown; use one of default, gaussian, pissa"):
        LoRALinear(nn.Linear(4, 4), 2, 8, init="pisa")
    with pytest.raises(AdapterError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), 2, 8)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_matches_peft(init):
    """Same RNG state -> the same A as PEFT's init; B is zero, so the adapter starts as the base."""
    lin = nn.Linear(64, 32)
    torch.manual_seed(11)
    ours = LoRALinear(copy.deepcopy(lin), 8, 16, init=init)
    torch.manual_seed(11)
    pm = get_peft_model(
        one(copy.deepcopy(lin)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights=True if init == "default" else init),
    )
    layer = pm.base_model.model.lin
    assert torch.equal(ours.lora_A.weight, layer.lora_A["default"].weight)
    assert not ours.lora_B.weight.any()
    x = torch.randn(3, 64)
    assert torch.equal(ours(x), lin(x))
