"""lora_compute="compute": the LoRA path in the base's 16-bit compute dtype, as PEFT runs it under
torch.autocast. Outputs and gradients equal PEFT + bitsandbytes (NF4 base) and PEFT (dense base)
inside torch.autocast("cpu", bf16) bit for bit, with and without dropout; the three LoRA paths are
different functions in 16 bits and the same one in float32; and the switch is refused with one
sentence when misspelt. The default path ("fused") has its own tests in test_lora_fused.py.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st
from test_lora import bnb_linear4bit, fwd_bwd, ours_params, peft_twin, randomize

from minilora.lora.layers import AdapterError, LoRALinear
from minilora.lora.surgery import apply_lora
from minilora.quant.linear import NF4Linear


def under_autocast(module, params, x, seed):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fwd_bwd(module, params, x, seed)


@given(
    k=st.sampled_from([128, 256, 300]),  # bitsandbytes' CPU dequantization needs these (see test_lora.py)
    m=st.integers(1, 40),
    r=st.integers(1, 12),
    alpha=st.sampled_from([1, 8, 16.0, 0.5]),
    rslora=st.booleans(),
    batch=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    nf4=st.booleans(),
    bias=st.booleans(),
    drop=st.sampled_from([(0.0, True), (0.25, True), (0.25, False)]),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
# the backward scales g by s (any s) or the rank-r products instead (s a power of two: the same bits)
@example(k=128, m=7, r=4, alpha=8, rslora=False, batch=[3], nf4=True, bias=False, drop=(0.0, True), grad=True, seed=1)
@example(k=128, m=7, r=3, alpha=8, rslora=False, batch=[3], nf4=True, bias=False, drop=(0.0, True), grad=True, seed=1)
def test_compute_path_is_peft_under_autocast_bit_for_bit(k, m, r, alpha, rslora, batch, nf4, bias, drop, grad, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias and not nf4).to(torch.bfloat16)  # NF4 + bias: one rounding apart (test_lora)
    base = NF4Linear.from_linear(lin, blocksize=64, compute_dtype=torch.bfloat16) if nf4 else lin
    ours = LoRALinear(base, r, alpha, dropout=drop[0], use_rslora=rslora, lora_compute="compute")
    randomize(ours, gen)
    pm, theirs = peft_twin(ours, bnb_linear4bit(base) if nf4 else lin)
    ours.train(drop[1]), pm.train(drop[1])
    x = torch.randn(*batch, k, generator=gen).bfloat16()
    if not grad:  # the unfused path (evaluation, DPO's reference): forward only
        with torch.no_grad():
            torch.manual_seed(seed)
            got = ours(x)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # with grad: bitsandbytes' no-grad CPU kernel
            want = pm(x.clone().requires_grad_())  # refuses some of these shapes; its values are the same
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
        return
    got, want = fwd_bwd(ours, ours_params(ours), x, seed), under_autocast(pm, theirs, x, seed)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_three_paths_differ_in_16_bits():
    """fused (the default), float32 (PEFT's numbers, test_lora.py) and compute are different functions
    whose outputs differ in the last bf16 bits, so the tests of each can tell them apart."""
    gen = torch.Generator().manual_seed(0)
    nl = NF4Linear.from_linear(nn.Linear(256, 64).bfloat16(), compute_dtype=torch.bfloat16)
    layers = {mode: LoRALinear(nl, 8, 16, dropout=0.0, lora_compute=mode) for mode in ("fused", "float32", "compute")}
    randomize(layers["fused"], gen)
    for layer in layers.values():
        layer.load_state_dict(layers["fused"].state_dict())
    assert LoRALinear(nl, 8, 16).lora_compute == "fused"
    x = torch.randn(32, 256, generator=gen).bfloat16()
    ys = {mode: layer(x) for mode, layer in layers.items()}
    for a, b in [("fused", "float32"), ("fused", "compute"), ("float32", "compute")]:
        assert ys[a].dtype == ys[b].dtype == torch.bfloat16 and not torch.equal(ys[a], ys[b]), (a, b)
        torch.testing.assert_close(ys[a].float(), ys[b].float(), rtol=0.03, atol=0.03)


def test_float32_base_computes_in_float32_either_way():
    gen = torch.Generator().manual_seed(0)
    nl = NF4Linear.from_linear(nn.Linear(128, 16), compute_dtype=torch.float32)
    layers = [LoRALinear(nl, 4, 8, dropout=0.0, lora_compute=mode) for mode in ("fused", "float32", "compute")]
    randomize(layers[0], gen)
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 128, generator=gen)
    ys = [layer(x) for layer in layers]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_misspelt_switch_is_one_sentence():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(AdapterError, match=r"^lora_compute='bf16' is invalid; pass one of fused, float32, compute\.$"):
        apply_lora(model, targets=["0"], r=2, lora_compute="bf16", verbose=False)


def test_train_py_runs_the_compute_path_and_records_it(tmp_path):
    """--lora-compute compute through train.py: the run trains, config.json records the choice, and
    its adapter differs from the float32 path's run (the same seed and data) by less than two runs of
    Adam steps could: a step moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba,
    section 2.1: 3.16 lr at betas (0.9, 0.999)), so two 3-step runs differ by at most twice 3 of those."""
    import json

    from cli_runs import train
    from safetensors.torch import load_file

    runs = {}
    for mode in ("float32", "compute"):
        out = tmp_path / mode
        p = train(out, "--dtype", "bfloat16", "--lora-compute", mode, "--max-steps", "3", "--save-every", "0")
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads((out / "config.json").read_text())["lora_compute"] == mode
        runs[mode] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        lr = json.loads((out / "config.json").read_text())["lr"]
    a, b = runs["float32"], runs["compute"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    step = lr * (1 - 0.9) / (1 - 0.999) ** 0.5  # the largest move of one Adam step (warmup only lowers lr)
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 2 * 3 * step, k
