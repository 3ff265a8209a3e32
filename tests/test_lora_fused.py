"""lora_compute="fused", the default LoRA path on a 16-bit NF4 base (_LoRANF4FusedFn): the compute
path's LoRA products, the term t started in the base matmul's float32 accumulator (addmm), so
x W0^T + t is rounded to the compute dtype once; the same for the input gradient's two parts.

- Its output agrees with a float64 reference of the exact sum within a bound derived below.
- A term far below half an ulp of the base output still moves the output on average, by its own
  size, with a bias or without; the float32 path (PEFT's numbers) rounds it away, so that test fails
  on that path. The same holds for the LoRA part of dL/dx, where the compute path rounds it away.
- dL/dA and dL/dB are the compute path's (PEFT's under torch.autocast) bit for bit: the same saved
  tensors, the same backward lines; dL/dx differs from it by a derived bound. Without grad, and with
  the fused Triton matmul standing in, the outputs are what they should be.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_lora import fwd_bwd, ours_params, randomize

from minilora.kernels import dispatch
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
    """y = rnd(rnd(S~) + b) (the bias as NF4Linear adds it), S~ the float32 sum of x W0^T started
    from t_c = rnd(s u_c B_c^T), u_c = rnd(x A_c^T). Against S0 + T + b in float64, S0 = x W0^T,
    T = s (x A^T) B^T (A, B the float32 master weights), U the 16-bit unit roundoff:
        |t_c - T| <= Et = 1.01 (3U + g_K) L + (g_(r+1) + U) vb   A_c, u_c's sum and rounding, B_c
                                                                 relative to L; t's float32 sum and
                                                                 its rounding relative to vb
        |rnd(S~) - (S0 + T)| <= e1 = E1 + U (|S0 + T| + E1),  E1 = Et + g_(K+1) (|x| |W0|^T + 1.01 vb)
        |y - S| <= e1 + U (|S| + e1)     with a bias (its add rounds once more), else e1
    with L = s (|x| |A|^T) |B|^T, vb = s |u_c| |B_c|^T, g_j = j 2^-24 / (1 - j 2^-24) (each product of
    two 16-bit numbers is exact in float32), and 1.01 for the second-order terms. `scale` sizes B
    from far below an ulp of y to far above it."""
    fused, _, gen = layers(k, m, r, bias, dtype, 0.0, seed)
    with torch.no_grad():
        fused.lora_B.weight.mul_(scale)
    x = torch.randn(n, k, generator=gen).to(dtype)
    y = fused(x)
    assert y.dtype == dtype and y.shape == (n, m)
    U, P = UNIT[dtype], parts(fused, x, dtype)
    A, B = fused.lora_A.weight.double(), fused.lora_B.weight.double()
    T = fused.scaling * (x.double() @ A.T) @ B.T
    S = P["xw"] + T + P["b"]
    Et = 1.01 * (3 * U + g(k)) * P["L"] + (g(r + 1) + U) * P["vb"]
    E1 = Et + g(k + 1) * (P["xw_abs"] + 1.01 * P["vb"])
    e1 = E1 + U * ((P["xw"] + T).abs() + E1)
    bound = e1 + (U * (S.abs() + e1) if bias else 0)
    err = (y.double() - S).abs()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


def ulp_of(v: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at each |v| (normal range)."""
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(v.abs().clamp_min(1e-30)))


def gap_toward(v: torch.Tensor, t: torch.Tensor, dtype) -> torch.Tensor:
    """The distance from each `dtype` value v to its neighbour on t's side: ulp(v), but half that
    where |v| is a power of two and t points toward zero (the binade below is twice as fine). v + t
    rounds back to v while |t| stays below half of it, so |t| < gap / 4 leaves a path that rounds t
    a few times on its way room before it could cross."""
    ulp = ulp_of(v, dtype)
    power_of_two = v.abs() == 2.0 ** torch.floor(torch.log2(v.abs().clamp_min(1e-30)))
    return torch.where(power_of_two & (v * t < 0), ulp / 2, ulp)


def mean_move(d: torch.Tensor, t: torch.Tensor, small: torch.Tensor) -> float:
    """sum(d t) / sum(t^2) over `small`: 1 when d follows t on average, 0 when t is rounded away."""
    assert small.sum() > 80_000
    return ((d * t)[small].sum() / (t * t)[small].sum()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode, kept", [("fused", True), ("float32", False)])
def test_a_term_below_half_an_ulp_still_moves_y_by_its_size(mode, kept, dtype, bias):
    """The base output y0 = rnd(S0) (+ b, rounded again: the bias as large as y0) and the LoRA term t,
    |t| ~ ulp(y0) / 10. D = y - y0 is 0 or an ulp either way; rounding S0 + t once makes E[D | t] = t
    when S0's position inside its ulp cell is spread out, and adding b after rounds a value already
    off y0's grid, which keeps that mean. So sum(D t) / sum(t^2) ~ 1 over the outputs with
    |t| < ulp / 4 (an eighth toward zero from a power of two: gap_toward; over 10^5 of them its spread
    is ~1%). The float32 path rounds y0 + t, which is y0 itself: the ratio is exactly 0."""
    gen = torch.Generator().manual_seed(0)
    nl = NF4Linear.from_linear(nn.Linear(256, 256, bias=bias).to(dtype))
    if bias:
        with torch.no_grad():
            nl.bias.copy_(torch.randn(256, generator=gen).to(dtype))
    ours = LoRALinear(nl, 8, 16, dropout=0.0, lora_compute=mode).eval()
    x = torch.randn(512, 256, generator=gen).to(dtype)
    with torch.no_grad():
        y0 = nl(x).double()  # (512, 256)
        ulp = ulp_of(y0, dtype)
        ours.lora_A.weight.copy_(torch.randn(8, 256, generator=gen) / 16)
        ours.lora_B.weight.copy_(torch.randn(256, 8, generator=gen))
        t = (x.double() @ ours.lora_A.weight.double().T) @ ours.lora_B.weight.double().T * ours.scaling
        live = (t.abs() > 0) & (y0.abs() > 1e-2)
        shrink = 0.1 * (ulp[live] / t.abs()[live]).median().item()  # |t| ~ ulp / 10
        ours.lora_B.weight.mul_(shrink)
        t = t * shrink
        small = live & (t.abs() < gap_toward(y0, t, dtype) / 4)  # chosen by t and y0 only, not by the result
        ratio = mean_move(ours(x).double() - y0, t, small)
    if kept:
        assert 0.9 < ratio < 1.1, ratio
    else:
        assert ratio == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode, kept", [("fused", True), ("compute", False)])
def test_the_lora_part_of_dx_below_half_an_ulp_still_moves_it(mode, kept, dtype):
    """dL/dx = g W0 + l, l = s (g B) A the LoRA path's part, |l| ~ ulp(G0) / 10 with G0 = rnd(g W0) the
    base's own input gradient: the same mean test as the output's. The compute path (PEFT's order
    under torch.autocast) rounds G0 + l_c, which is G0 itself: the ratio is exactly 0. l_c is l after
    bf16 casts of A and B and two rounded products, so it can pass l by a percent, and an l a hair
    under a quarter ulp toward zero from a power of two would then reach the boundary, an eighth away
    there: gap_toward."""
    gen = torch.Generator().manual_seed(1)
    nl = NF4Linear.from_linear(nn.Linear(256, 256, bias=False).to(dtype))
    ours = LoRALinear(nl, 8, 16, dropout=0.0, lora_compute=mode)
    x = torch.randn(512, 256, generator=gen).to(dtype)
    gy = torch.randn(512, 256, generator=gen).to(dtype)  # dL/dy
    xb = x.clone().requires_grad_(True)
    nl(xb).backward(gy)
    G0 = xb.grad.double()  # (512, 256)
    ulp = ulp_of(G0, dtype)
    with torch.no_grad():
        ours.lora_A.weight.copy_(torch.randn(8, 256, generator=gen))
        ours.lora_B.weight.copy_(torch.randn(256, 8, generator=gen) / 16)
        l = (gy.double() @ ours.lora_B.weight.double()) @ ours.lora_A.weight.double() * ours.scaling
        live = (l.abs() > 0) & (G0.abs() > 1e-2)
        shrink = 0.1 * (ulp[live] / l.abs()[live]).median().item()
        ours.lora_A.weight.mul_(shrink)
        l = l * shrink
        small = live & (l.abs() < gap_toward(G0, l, dtype) / 4)
    xo = x.clone().requires_grad_(True)
    ours(xo).backward(gy)
    ratio = mean_move(xo.grad.double() - G0, l, small)
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
    """For the same dL/dy = g and dropout draw, dL/dA and dL/dB equal the compute path's exactly: both
    save x, A, B, u_c and the mask, and run the same backward lines (_compute_path_grads). dL/dx
    shares the LoRA part l_c too; the compute path rounds G = g W0 and then G + l_c, the fused path
    G + l_c once, each from a float32 sum of M products (+ l_c):
        |dx_fused - dx_compute| <= (g_(M+1) + g_M) |g| |W0| + 2 g_(M+1) Ll + U (|G| + 2 (|G| + Ll))
    with |l_c| <= Ll = 1.05 s (|g| |B|) |A| / (1 - p) (the masters' casts, two sums of r and M
    products, dropout's scale), times 1.01. The outputs differ too: the compute path rounds
    x W0^T, + b, u_c B_c^T, * s and the sum (each at most U times its own magnitude), the fused path
    t and the sum; float32 accumulation on each side; 1.01 for the second-order terms."""
    fused, twin, gen = layers(k, m, r, bias, dtype, dropout, seed)
    x = torch.randn(n, k, generator=gen).to(dtype)
    got, want = fwd_bwd(fused, ours_params(fused), x, seed), fwd_bwd(twin, ours_params(twin), x, seed)
    for a, b in zip(got[2:], want[2:]):  # dL/dA, dL/dB
        assert a.dtype == b.dtype and torch.equal(a, b)
    U = UNIT[dtype]
    gy = torch.randn(n, m, generator=torch.Generator().manual_seed(seed)).to(dtype).double()  # fwd_bwd's dL/dy
    w0 = fused.base.dequantized_weight(dtype).double()
    G = gy @ w0
    A, B, s = fused.lora_A.weight.double(), fused.lora_B.weight.double(), fused.scaling
    Ll = 1.05 * s * (gy.abs() @ B.abs()) @ A.abs() / (1 - dropout)
    bound_dx = 1.01 * ((g(m + 1) + g(m)) * (gy.abs() @ w0.abs()) + 2 * g(m + 1) * Ll + U * (3 * G.abs() + 2 * Ll))
    assert got[1].dtype == want[1].dtype
    assert bool(((got[1].double() - want[1].double()).abs() <= bound_dx).all())
    if dropout == 0:  # the outputs' bound is written for undropped x
        P = parts(fused, x, dtype)
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


def test_where_the_fused_triton_matmul_runs_the_sums_are_rounded_in_peft_order(monkeypatch):
    """With kernels/dispatch.py choosing the fused NF4 matmul (CUDA, few tokens) there is no float32
    accumulator to start from the LoRA term: the product is rounded, then the term added, as the
    compute path does. Here a stand-in kernel (the plain product) is chosen; with s = 2 a power of
    two, rnd(rnd(u B_c^T) s) = rnd(s u B_c^T), so the output and every gradient are the compute
    path's bit for bit (and the output is not the fused one's without the stand-in)."""
    fused, twin, gen = layers(128, 48, 8, False, torch.bfloat16, 0.0, 1)
    assert fused.scaling == 2.0
    x = torch.randn(5, 128, generator=gen).bfloat16()
    own = fused(x)

    def kernel(a, q, transposed=False):
        w = dequantize_nf4(q, a.dtype)
        return (lambda a, q: a @ w) if transposed else (lambda a, q: a @ w.t())

    monkeypatch.setattr(dispatch, "matmul_kernel", kernel)
    got, want = fwd_bwd(fused, ours_params(fused), x, 0), fwd_bwd(twin, ours_params(twin), x, 0)
    for a, b in zip(got, want):  # y, dL/dx, dL/dA, dL/dB
        assert torch.equal(a, b)
    assert not torch.equal(own, got[0])
