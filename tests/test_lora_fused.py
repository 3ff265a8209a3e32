"""lora_compute="fused", the default LoRA path on a 16-bit NF4 base (_LoRANF4FusedFn): the compute
path's LoRA products, the term joined to the base matmul as r extra input columns, so y is rounded
to the compute dtype once.

- Its output agrees with a float64 reference of the exact sum within a bound derived below.
- A term far below half an ulp of the base output still moves the output on average, by its own
  size; the float32 path (PEFT's numbers) rounds it away, so that test fails on that path.
- Its gradients are the compute path's (PEFT's under torch.autocast) bit for bit: the same saved
  tensors, the same backward. Without grad, and with the fused Triton matmul standing in, the
  outputs are what they should be.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_lora import fwd_bwd, ours_params, randomize

import minilora.lora.nf4_fused as nf4_fused
from minilora.lora.layers import LoRALinear
from minilora.quant.linear import NF4Linear, dequantize_nf4

UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff: |rnd(v) - v| <= UNIT |v|


def layers(k, m, r, bias, dtype, dropout, seed, other="compute"):
    """The same LoRA weights on one NF4 base: the fused path and the path `other`."""
    gen = torch.Generator().manual_seed(seed)
    nl = NF4Linear.from_linear(nn.Linear(k, m, bias=bias).to(dtype), blocksize=64)
    fused = LoRALinear(nl, r, 2 * r, dropout=dropout)
    randomize(fused, gen)
    twin = LoRALinear(nl, r, 2 * r, dropout=dropout, lora_compute=other)
    twin.load_state_dict(fused.state_dict())
    return fused, twin, gen


def parts(layer: LoRALinear, x: torch.Tensor, dtype) -> dict:
    """In float64 from the layer's values, x (n, K) in c (undropped):
    xw = x W0^T; b (rounded to c, as every path adds it); L = s (|x| |A|^T) |B|^T; and from the
    compute path's own u_c = x A_c^T (the same op, so the same bits): t = s u_c B_c^T and
    vb = s |u_c| |B_c|^T, what the LoRA term's roundings scale with."""
    xd, w0 = x.double(), layer.base.dequantized_weight(dtype).double()
    A, B, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    m = w0.shape[0]
    b = layer.base.bias.to(dtype).double() if layer.base.bias is not None else torch.zeros(m, dtype=torch.float64)
    u_c = (x @ A.to(dtype).t()).double()  # (n, r)
    B_c = B.to(dtype).double()
    L = s * (xd.abs() @ A.double().abs().T) @ B.double().abs().T
    return dict(xw=xd @ w0.T, b=b, t=s * u_c @ B_c.T, vb=s * u_c.abs() @ B_c.abs().T, xw_abs=xd.abs() @ w0.abs().T, L=L)


def g(j: int) -> float:
    """gamma_j = j 2^-24 / (1 - j 2^-24): the float32 error bound of a sum of j terms, relative to the
    sum of their magnitudes."""
    return j * 2.0**-24 / (1 - j * 2.0**-24)


@settings(max_examples=60, deadline=None)
@given(
    k=st.sampled_from([64, 128, 320]),
    m=st.integers(1, 80),
    r=st.integers(1, 16),
    n=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
@example(k=64, m=1, r=1, n=1, bias=True, dtype=torch.bfloat16, scale=1.0, seed=0)
def test_output_is_the_float64_sum_rounded_once(k, m, r, n, bias, dtype, scale, seed):
    """y = rnd(S~), S~ the GEMM's float32 sum of the K + r + 1 products of [x | v | 1] and
    [W0 | B_c | b], v = (s u_c)_c, u_c = (x A_c^T)_c. Against S = x W0^T + s (x A^T) B^T + b in float64
    (A, B the float32 master weights):
        |y - S| <= E + U (|S| + E),   U the 16-bit unit roundoff (the one rounding of S~),
        E = g_n (|x| |W0|^T + 1.01 L + |b|)       float32 accumulation, n = K + r + 1
          + 1.01 (4U + g_K) L                     A, u, v, B each rounded to c (U each) and u's own
                                                  accumulation, every one bounded by L
    with L = s (|x| |A|^T) |B|^T, g_n = n 2^-24 / (1 - n 2^-24) (each product of two 16-bit numbers
    is exact in float32), and 1.01 for the second-order terms. `scale` sizes B from far below an ulp
    of y to far above it."""
    fused, _, gen = layers(k, m, r, bias, dtype, 0.0, seed)
    with torch.no_grad():
        fused.lora_B.weight.mul_(scale)
    x = torch.randn(n, k, generator=gen).to(dtype)
    y = fused(x)
    assert y.dtype == dtype and y.shape == (n, m)
    U, P = UNIT[dtype], parts(fused, x, dtype)
    A, B = fused.lora_A.weight.double(), fused.lora_B.weight.double()
    S = P["xw"] + fused.scaling * (x.double() @ A.T) @ B.T + P["b"]
    E = g(k + r + 1) * (P["xw_abs"] + 1.01 * P["L"] + P["b"].abs()) + 1.01 * (4 * U + g(k)) * P["L"]
    err = (y.double() - S).abs()
    bound = E + U * (S.abs() + E)
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode, kept", [("fused", True), ("float32", False)])
def test_a_term_below_half_an_ulp_still_moves_y_by_its_size(mode, kept, dtype):
    """The base output y0 = rnd(S0) and the LoRA term t, |t| ~ ulp(y0) / 10. D = y - y0 is 0 or one
    ulp either way; rounding S0 + t once makes E[D | t] = t when S0's position inside its ulp cell is
    spread out, so sum(D t) / sum(t^2) ~ 1 over the outputs with |t| < ulp / 4 (over 10^5 of them
    its spread is ~1%). The float32 path rounds y0 + t, which is y0 itself: the ratio is exactly 0."""
    gen = torch.Generator().manual_seed(0)
    nl = NF4Linear.from_linear(nn.Linear(256, 256, bias=False).to(dtype))
    ours = LoRALinear(nl, 8, 16, dropout=0.0, lora_compute=mode).eval()
    x = torch.randn(512, 256, generator=gen).to(dtype)
    with torch.no_grad():
        y0 = nl(x).double()  # (512, 256)
        ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(y0.abs().clamp_min(1e-30)))
        ours.lora_A.weight.copy_(torch.randn(8, 256, generator=gen) / 16)
        ours.lora_B.weight.copy_(torch.randn(256, 8, generator=gen))
        t = (x.double() @ ours.lora_A.weight.double().T) @ ours.lora_B.weight.double().T * ours.scaling
        live = (t.abs() > 0) & (y0.abs() > 1e-2)
        shrink = 0.1 * (ulp[live] / t.abs()[live]).median().item()  # |t| ~ ulp / 10
        ours.lora_B.weight.mul_(shrink)
        t = t * shrink
        small = live & (t.abs() < ulp / 4)  # chosen by t and y0 only, not by the result
        assert small.sum() > 80_000
        d = ours(x).double() - y0
    ratio = ((d * t)[small].sum() / (t * t)[small].sum()).item()
    if kept:
        assert 0.9 < ratio < 1.1, ratio
    else:
        assert ratio == 0.0


@settings(max_examples=30, deadline=None)
@example(k=64, m=1, r=1, n=1, bias=True, dtype=torch.float16, dropout=0.0, seed=1)  # x W0^T + b cancels
@example(k=64, m=3, r=5, n=1, bias=False, dtype=torch.bfloat16, dropout=0.0, seed=0)  # a large LoRA term
@given(
    k=st.sampled_from([64, 128]),
    m=st.integers(1, 64),
    r=st.integers(1, 8),
    n=st.integers(1, 24),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    dropout=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_gradients_are_the_compute_paths_bit_for_bit(k, m, r, n, bias, dtype, dropout, seed):
    """For the same dL/dy and dropout draw, dL/dx, dL/dA and dL/dB equal the compute path's exactly:
    both save x, A_c, B_c, u_c and the mask, and share one backward. The outputs differ: the compute
    path rounds x W0^T, + b, u_c B_c^T, * s and the sum (each at most U times its own magnitude), the
    fused path v = s u_c (U of vb) and the sum; float32 accumulation on each side; 1.01 for the
    second-order terms."""
    fused, twin, gen = layers(k, m, r, bias, dtype, dropout, seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    got, want = fwd_bwd(fused, ours_params(fused), x, seed), fwd_bwd(twin, ours_params(twin), x, seed)
    for a, b in zip(got[1:], want[1:]):  # dL/dx, dL/dA, dL/dB
        assert a.dtype == b.dtype and torch.equal(a, b)
    if dropout == 0:  # the outputs' bound is written for undropped x
        U, P = UNIT[dtype], parts(fused, x, dtype)
        xw, b, t = P["xw"], P["b"], P["t"]
        sums = xw.abs() + (xw + b).abs() + 2 * t.abs() + 2 * (xw + b + t).abs() + P["vb"]
        bound = 1.01 * U * sums + 2 * g(k + r + 1) * (P["xw_abs"] + P["vb"] + b.abs())
        assert bool(((got[0].double() - want[0].double()).abs() <= bound).all())


def test_without_grad_the_same_output():
    """Evaluation and generation (no grad) compute the training forward's sums, bit for bit."""
    fused, _, gen = layers(128, 48, 8, True, torch.bfloat16, 0.0, 0)
    x = torch.randn(3, 7, 128, generator=gen).bfloat16()
    with torch.no_grad():
        a = fused(x)
    assert torch.equal(a, fused(x))


def test_where_the_fused_triton_matmul_runs_the_compute_path_runs(monkeypatch):
    """With kernels/dispatch.py choosing the fused NF4 matmul (CUDA, few tokens) there is no W0 to
    join; the compute path's forward runs instead. Here a stand-in kernel (the plain product) is
    chosen, and the output is the compute path's, bit for bit (and not the fused one's)."""
    fused, twin, gen = layers(128, 48, 8, False, torch.bfloat16, 0.0, 1)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    want, own = twin(x), fused(x)
    stand_in = lambda a, q: torch.nn.functional.linear(a, dequantize_nf4(q, a.dtype))  # noqa: E731
    monkeypatch.setattr(nf4_fused.dispatch, "matmul_kernel", lambda a, q, transposed=False: stand_in)
    got = fused(x)
    assert torch.equal(got, want) and not torch.equal(own, want)
