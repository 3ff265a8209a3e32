"""Weight-aware LoRA inits (minilora/lora/inits.py) against PEFT 0.21: PiSSA, randomized PiSSA, OLoRA and
LoftQ give PEFT's A, B and base for the same weights; LoftQ lowers plain NF4's error; the adapter
written for the original weights is PEFT's path_initial_model_for_weight_conversion adapter, and PEFT
applies it to the original model with the logits of the trained one.

Two deliberate differences, each checked for what it is:
  - on a bf16 base PEFT rounds A and B to bf16 when it moves the adapter beside the base layer (the
    values are rounded, the storage stays float32), after computing the residual from the unrounded
    ones; minilora keeps them float32, so W0 + s B A reconstructs W more closely. Compared: ours
    rounded to bf16 equal PEFT's bit for bit, and the residual bases are equal.
  - PEFT's loftq_init ignores the LoRA scaling s (its A, B reconstruct W only when s = 1); ours divide
    by s as PiSSA does. Compared: A, B equal PEFT's at s = 1, and s B A equals PEFT's B A at any s.
PEFT's loftq_init moves W to "cuda" unconditionally; the oracle runs its own source with that one
line set to "cpu" (asserted present, so a PEFT change fails here rather than silently).
"""

import copy
import inspect
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.lora import inits
from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.layers import AdapterError, LoRALinear
from minilora.lora.surgery import apply_lora, lora_modules
from minilora.quant.linear import NF4Linear, dequantize_nf4
from minilora.quant.nf4 import quantize_nf4


def one(lin: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(lin=lin))


def peft_loftq():
    """PEFT's loftq_init, run on the CPU (see the module docstring)."""
    import peft.utils.loftq_utils as LU

    src = inspect.getsource(LU.loftq_init)
    needle = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert needle in src, "PEFT's loftq_init changed; update the oracle"
    ns = dict(vars(LU))
    exec(compile(src.replace(needle, 'compute_device = "cpu"'), LU.__file__, "exec"), ns)
    return ns["loftq_init"]


def weight(m, k, scale, seed, rank_deficient=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g) * scale
    if rank_deficient:  # half the rows repeat the others: rank <= ceil(m / 2)
        w[m // 2 :] = w[: m - m // 2].clone()
    return w


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------ PiSSA / OLoRA vs PEFT
@given(
    init=st.sampled_from(["pissa", "olora", "pissa_niter_1", "pissa_niter_4"]),
    m=st.integers(1, 40),
    k=st.integers(1, 40),
    r_frac=st.floats(0, 1),
    alpha=st.sampled_from([1.0, 8.0, 24.5]),
    rslora=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scale=st.sampled_from([1e-4, 0.02, 30.0]),
    deficient=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    init="pissa",
    m=1,
    k=1,
    r_frac=1.0,
    alpha=8.0,
    rslora=False,
    dtype=torch.float32,
    scale=0.02,
    deficient=False,
    seed=0,
)
@example(
    init="olora",
    m=40,
    k=3,
    r_frac=1.0,
    alpha=1.0,
    rslora=True,
    dtype=torch.bfloat16,
    scale=30.0,
    deficient=True,
    seed=1,
)
def test_pissa_and_olora_match_peft(init, m, k, r_frac, alpha, rslora, dtype, scale, deficient, seed):
    r = max(1, round(r_frac * min(m, k)))
    lin = nn.Linear(k, m).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(weight(m, k, scale, seed, deficient))
    w = lin.weight.detach().float().clone()
    theirs, ours = one(copy.deepcopy(lin)), one(copy.deepcopy(lin))
    torch.manual_seed(seed)  # the randomized SVD draws from the global generator after PEFT's nn.Linear inits
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init, use_rslora=rslora)
    pl = get_peft_model(theirs, cfg).base_model.model.lin
    apply_lora(ours, ["lin"], r=r, alpha=alpha, dropout=0.0, init=init, use_rslora=rslora, seed=seed, verbose=False)
    mine = ours.lin
    A, B = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
    assert mine.lora_A.weight.dtype == torch.float32 and mine.base.weight.dtype == dtype
    torch.testing.assert_close(mine.base.weight, pl.base_layer.weight, rtol=1e-5, atol=0)  # the residual
    a, b = mine.lora_A.weight.detach(), mine.lora_B.weight.detach()
    a, b = a.to(dtype).float(), b.to(dtype).float()  # bf16 base: PEFT's are ours rounded (module docstring)
    if init.startswith("pissa_niter"):  # compared through B A and the residual (above)
        torch.testing.assert_close(b @ a, B @ A, rtol=1e-5, atol=1e-6 * scale)
    else:
        torch.testing.assert_close(a, A, rtol=1e-5, atol=0)
        torch.testing.assert_close(b, B, rtol=1e-5, atol=0)
    # the model starts where it was: residual + s B A = W, up to the residual's rounding to its dtype
    ulp = torch.finfo(dtype).eps
    back = mine.base.weight.float() + mine.delta_weight()
    assert (back - w).abs().max() <= 4 * ulp * (w.abs().max() + mine.delta_weight().abs().max()) + 1e-6 * scale


def test_pissa_takes_the_top_singular_directions():
    """Independent of PEFT: s B A is the best rank-r approximation of W (Eckart-Young), A's rows are
    orthogonal with norms sqrt(S_i / s) and so are B's columns; OLoRA's B has orthonormal columns."""
    w = weight(24, 36, 0.05, 3)
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    for r, s in ((1, 2.0), (5, 0.5), (24, 1.0)):
        A, B, res = inits.pissa(w, r, s)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close((s * B @ A).double(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close((A @ A.T).diag().double(), S[:r] / s, rtol=1e-5, atol=0)
        torch.testing.assert_close((B.T @ B).double(), torch.diag(S[:r] / s), rtol=0, atol=1e-5)
        assert res.double().norm().item() == pytest.approx(S[r:].norm().item(), rel=1e-5, abs=1e-5)
        A, B, res = inits.olora(w, r, s)
        torch.testing.assert_close(B.T @ B, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(res + s * B @ A, w, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- LoftQ vs PEFT
@given(
    m=st.integers(1, 48),
    k=st.sampled_from([64, 128, 192]),
    r=st.integers(1, 8),
    iters=st.integers(1, 3),
    s=st.sampled_from([1.0, 2.0, 0.25]),
    scale=st.sampled_from([1e-3, 0.05, 4.0]),
    zero_block=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loftq_matches_peft_and_beats_plain_nf4(m, k, r, iters, s, scale, zero_block, seed):
    r = min(r, m)
    w = weight(m, k, scale, seed)
    if zero_block:
        w[0, :64] = 0  # an all-zero NF4 block
    dq_p, A_p, B_p = peft_loftq()(w.clone(), 4, r, iters)
    A, B, q = inits.loftq(w, r, s, iters, double_quant=False)  # PEFT quantizes without double quant
    dq = dequantize_nf4(q, torch.float32)
    assert torch.equal(dq, dq_p)  # the same NF4 base, bit for bit (minilora's NF4 is bitsandbytes')
    if s == 1.0:
        torch.testing.assert_close(A, A_p, rtol=1e-5, atol=1e-7 * scale)
        torch.testing.assert_close(B, B_p, rtol=1e-5, atol=1e-7 * scale)
    torch.testing.assert_close(s * B @ A, B_p @ A_p, rtol=1e-5, atol=1e-6 * scale)
    err = (w - (dq + s * B @ A)).norm().item()
    peft_err = (w - (dq_p + B_p @ A_p)).norm().item()  # PEFT's value (an error near rounding when r covers E)
    assert err == pytest.approx(peft_err, rel=1e-5, abs=1e-6 * w.norm().item())
    plain = (w - dequantize_nf4(quantize_nf4(w, 64, False), torch.float32)).norm().item()
    if iters == 1:  # Eckart-Young: ||E||^2 - sum of the top r sigma_i(E)^2, below ||E||^2 unless E = 0
        assert err < plain or plain == 0


def test_loftq_layer_is_the_plain_nf4_base_plus_a_correction():
    """apply_lora(init="loftq") on a dense layer: the base becomes NF4Linear holding exactly the codes a
    QLoRA load makes of W (double quant, one iteration), and W0 + s B A is closer to W than W0 alone."""
    lin = nn.Linear(128, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(weight(48, 128, 0.05, 7))
    w = lin.weight.detach().float()
    model = one(copy.deepcopy(lin))
    apply_lora(model, ["lin"], r=8, alpha=16, dropout=0.0, init="loftq", verbose=False)
    layer = model.lin
    plain = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    assert isinstance(layer.base, NF4Linear) and layer.base.weight_dtype == torch.bfloat16
    for name in ("weight_packed", "weight_absmax", "weight_absmax2", "weight_offset"):
        assert torch.equal(getattr(layer.base, name), getattr(plain, name)), name
    assert torch.equal(layer.base.bias, lin.bias)
    w0 = layer.base.dequantized_weight(torch.float32)
    assert (w - w0 - layer.delta_weight()).norm() < 0.9 * (w - w0).norm()
    assert not hasattr(layer, "lora_A0")  # the base is plain NF4(W): nothing to convert at save


# ------------------------------------------------------------- saving for the original weights
def tiny_llama(seed=0):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 17], [4, 4, 8, 15, 16, 23, 42]])


@pytest.mark.parametrize(
    "init, rslora, targets", [("pissa", False, ["q_proj", "v_proj"]), ("olora", True, "all-linear")]
)
def test_converted_adapter_is_peft_conversion(tmp_path, init, rslora, targets):
    """PEFT's workflow (save the initial adapter, train, save_pretrained(path_initial_model_for_weight_
    conversion=...)) and ours (save_adapter) write the same tensors and config; PEFT applies ours to the
    ORIGINAL model with the logits of the trained model, minilora loads it the same way."""
    hf = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_rslora=rslora)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", **kw))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": every A and B moves
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    ours = copy.deepcopy(hf)
    apply_lora(ours, targets, r=4, alpha=8, dropout=0.0, init=init, use_rslora=rslora, verbose=False)
    trained = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in pm.named_parameters()}
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            m.lora_A.weight.copy_(trained[name + ".lora_A.weight"])
            m.lora_B.weight.copy_(trained[name + ".lora_B.weight"])
    save_adapter(ours, str(tmp_path / "ours"), None)

    theirs_t, ours_t = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert sorted(theirs_t) == sorted(ours_t)
    for key in theirs_t:
        assert ours_t[key].shape[0 if "lora_A" in key else 1] == 8  # rank 2r
        torch.testing.assert_close(ours_t[key], theirs_t[key], rtol=1e-6, atol=0)
    theirs_c, ours_c = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("peft", "ours"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert ours_c[key] == theirs_c[key], key
    assert ours_c["r"] == 8 and ours_c["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))

    with torch.no_grad():
        want = ours.eval()(IDS).logits  # the trained model: residual base + s B A
        got = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()(IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, hf(IDS).logits, atol=1e-3)  # training really moved the model
        again = copy.deepcopy(hf)
        load_adapter(again, str(tmp_path / "ours"))
        torch.testing.assert_close(again.eval()(IDS).logits, want, rtol=1e-5, atol=1e-5)
    # convert=False: the adapter as trained, rank r on the residual, as PEFT saves it without conversion
    save_adapter(ours, str(tmp_path / "raw"), None, convert=False)
    raw = json.load(open(tmp_path / "raw" / "adapter_config.json"))
    assert raw["r"] == 4 and raw["init_lora_weights"] == init


# ------------------------------------------------------------------------------------ refusals
def test_refusals_are_one_sentence():
    cases = [
        (lambda: LoRALinear(nn.Linear(8, 8), 2, 4, init="pissa", use_dora=True), "cannot be combined with DoRA"),
        (lambda: LoRALinear(nn.Linear(8, 4), 5, 4, init="olora"), "r=5 must be at most min(out, in) = 4"),
        (lambda: LoRALinear(NF4Linear.from_linear(nn.Linear(64, 8)), 2, 4, init="loftq"), "already NF4Linear"),
        (lambda: LoRALinear(nn.Linear(8, 8), 2, 4, init="pissa_niter_0"), "unknown; use one of default, gaussian"),
        (lambda: apply_lora(one(nn.Linear(8, 4)), ["lin"], r=6, init="pissa", verbose=False), "LoRA on lin:"),
    ]
    for make, text in cases:
        with pytest.raises(AdapterError) as e:
            make()
        msg = str(e.value)
        assert text in msg and msg.endswith(".") and msg.count(". ") == 0, msg
