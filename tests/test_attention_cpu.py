"""models/ops.attention: attention over short 16-bit rows runs the CPU flash kernel in float32.

The float32 path is checked against a float64 reference of the very formulas the kernel computes,
within a bound derived from float32 and 16-bit rounding (reference_bounds), and the choice of path
against scaled_dot_product_attention itself: every other case (float32 inputs, long rows, a cache)
is SDPA's result bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minilora.models import ops

U16 = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the 16-bit dtypes
U32 = 2.0**-24
ETA16 = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}  # the 16-bit dtypes' subnormal spacing


def draw_mask(kind: str, B: int, T: int, gen: torch.Generator):
    """None (causal), or a (B, 1, T, T) boolean / additive mask: causal, random padded keys, and the
    diagonal always allowed (as models/transformer.build_mask: no row is empty)."""
    if kind == "causal":
        return None
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & (torch.rand(B, 1, T, generator=gen) > 0.3)
    allowed = (allowed | torch.eye(T, dtype=torch.bool))[:, None]  # (B, 1, T, T)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))


def reference_bounds(q, k, v, mask, scale, out16, g):
    """The float64 values of out, dq, dk, dv from the kernel's formulas, and their error bounds.

    With P = softmax(q k^T scale + mask) (GQA: kv head h // rep), the kernel computes, in float32:
        out = P v,  dv = P^T dO,  dP = dO v^T,  D = rowsum(dO * out16),  dS = P (dP - D) scale,
        dq = dS k,  dk = dS^T q
    where out16 is the forward's output as rounded to 16 bits (what it saves; the reference takes the
    function's own output). Error model (u32 = 2^-24, u16 the 16-bit unit roundoff, n = hd + S):
      - a score s = q.k scale is a float32 dot product: |ds| <= hd u32 |q||k| scale <= hd u32 smax,
        smax the largest |q||k| scale; P = exp(s - lse) then has relative error
        e_P <= 2 hd u32 smax + 2 S u32 (score error, log-sum-exp error, the exp and the normalising sum);
      - every float32 sum of n products adds at most n u32 times the sum of absolute products;
      - the result is rounded once to 16 bits: u16 |x|, or below the normal range half the subnormal
        spacing eta16 (fp16: 2^-25).
    So, with e = e_P + 2 n u32 (the dP and D sums):
        |out - ref| <= u16 |ref| + eta16 / 2 + (1 + u16) e (P |v|)       (and the same eta16 / 2 below)
        |dv - ref|  <= u16 |ref| + (1 + u16) e (P^T |dO|)
        |dq - ref|  <= u16 |ref| + (1 + u16) e (A |k|),   A = P (|dO||v|^T + rowsum(|dO||out16|)) scale
        |dk - ref|  <= u16 |ref| + (1 + u16) e (A^T |q|)
    (A bounds |dS| and, times e, its error.)"""
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    qd, kd, vd = (x.double() for x in (q, k, v))
    kr, vr = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)  # (B, H, S, hd)
    if mask is None:
        allowed = torch.ones(T, S, dtype=torch.bool).tril()
    else:
        allowed = mask if mask.dtype == torch.bool else mask == 0
    s = (qd @ kr.transpose(-1, -2)) * scale  # (B, H, T, S)
    P = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    out = P @ vr
    gd, o16 = g.double(), out16.double()
    dv = P.transpose(-1, -2) @ gd
    dP = gd @ vr.transpose(-1, -2)
    D = (gd * o16).sum(-1, keepdim=True)
    dS = P * (dP - D) * scale
    dq, dk = dS @ kr, dS.transpose(-1, -2) @ qd

    def fold(x):  # (B, H, S, hd) per query head -> (B, Hkv, S, hd): GQA sums over a kv head's queries
        return x.view(B, Hkv, rep, S, hd).sum(2)

    smax = float((qd.abs() @ kr.abs().transpose(-1, -2)).max() * scale)
    e_p = 2 * hd * U32 * smax + 2 * S * U32
    e = e_p + 2 * (hd + S) * U32
    a_abs = P * (gd.abs() @ vr.abs().transpose(-1, -2) + (gd.abs() * o16.abs()).sum(-1, keepdim=True)) * scale
    u16 = U16[q.dtype]
    refs = {"out": out, "dq": dq, "dk": fold(dk), "dv": fold(dv)}
    slack = {
        "out": e * (P @ vr.abs()),
        "dq": e * (a_abs @ kr.abs()),
        "dk": e * fold(a_abs.transpose(-1, -2) @ qd.abs()),
        "dv": e * fold(P.transpose(-1, -2) @ gd.abs()),
    }
    eta = ETA16[q.dtype] / 2
    return {n: (refs[n], u16 * refs[n].abs() + eta + (1 + u16) * slack[n]) for n in refs}


def run(fn, q, k, v, g):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(g)
    return out, [x.grad for x in leaves]


SHAPES = st.tuples(
    st.integers(1, 3),  # B
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]),  # (H, Hkv)
    st.integers(1, 40),  # T
    st.sampled_from([8, 16, 64]),  # hd
)


@given(
    shape=SHAPES,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    mask_kind=st.sampled_from(["causal", "bool", "additive"]),
    spread=st.sampled_from([0.1, 1.0, 3.0]),
    scale=st.sampled_from([None, 0.3, 1 / 16]),  # None: hd^-0.5; Gemma's query_pre_attn_scalar gives others
    seed=st.integers(0, 2**16),
)
def test_float32_kernel_within_the_derived_bound_of_float64(shape, dtype, mask_kind, spread, scale, seed):
    B, (H, Hkv), T, hd = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (
        (torch.randn(B, h, T, hd, generator=gen) * spread).to(dtype) for h in (H, Hkv, Hkv, H)
    )  # spread: scores from flat to peaked softmax
    mask = draw_mask(mask_kind, B, T, gen)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    scale = hd**-0.5 if scale is None else scale
    assert ops.attention_in_float32("cpu", dtype, T, hd)
    out, (dq, dk, dv) = run(lambda a, b, c: ops.attention(a, b, c, mask, scale, Hkv < H), q, k, v, g)
    bounds = reference_bounds(q, k, v, mask, scale, out.detach(), g)
    for name, got in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        ref, bound = bounds[name]
        err = (got.double() - ref).abs()
        assert got.dtype == dtype and bool((err <= bound).all()), (name, float((err - bound).max()))


def test_the_bound_catches_the_16_bit_kernel():
    """The bound is tight enough to fail scaled_dot_product_attention's own bf16 kernel on these
    inputs (it rounds P to bf16 before P v and P^T dO): the test above can fail."""
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, hd = 2, 6, 2, 40, 64
    q, k, v, g = (torch.randn(B, h, T, hd, generator=gen).bfloat16() for h in (H, Hkv, Hkv, H))
    scale = hd**-0.5
    out, grads = run(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True), q, k, v, g
    )
    bounds = reference_bounds(q, k, v, None, scale, out.detach(), g)
    over = [
        n
        for n, got in zip(("out", "dq", "dk", "dv"), (out, *grads))
        if ((got.double() - bounds[n][0]).abs() > bounds[n][1]).any()
    ]
    assert over, "the bf16 kernel met the float32 kernel's bound: the bound cannot tell them apart"


@given(
    shape=SHAPES,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mask_kind=st.sampled_from(["causal", "bool", "additive"]),
    case=st.sampled_from(["grad", "no_grad", "long_rows", "cache"]),
    seed=st.integers(0, 2**16),
)
def test_every_other_case_is_sdpa_bit_for_bit(shape, dtype, mask_kind, case, seed):
    """Float32 inputs, rows longer than FLOAT32_ATTENTION_MAX_T_HD or a cache (keys S > queries T, as in
    generation): SDPA's own output and gradients, bit for bit. 16-bit short rows, with or without
    gradients: SDPA's float32 kernel's output, rounded once (a no-grad forward, as evaluation and
    DPO's reference run it, gives the training forward's numbers)."""
    B, (H, Hkv), T, hd = shape
    S = T + 3 if case == "cache" else T
    gen = torch.Generator().manual_seed(seed)
    q, g = (torch.randn(B, H, T, hd, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, hd, generator=gen).to(dtype) for _ in range(2))
    mask = draw_mask(mask_kind, B, T, gen)
    if case == "cache":  # a cache: every query may also see the S - T earlier keys
        own = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T) if mask is None else mask
        own = own if own.dtype == torch.bool else own == 0
        allowed = torch.cat([torch.ones(B, 1, T, S - T, dtype=torch.bool), own], -1)  # (B, 1, T, S)
        mask = allowed if mask_kind != "additive" else torch.zeros(allowed.shape).masked_fill_(~allowed, -torch.inf)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    scale, gqa = hd**-0.5, Hkv < H
    kw = {"attn_mask": mask, "is_causal": mask is None, "scale": scale, "enable_gqa": gqa}

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, **kw)

    def ours(a, b, c):
        return ops.attention(a, b, c, mask, scale, gqa)

    float32_kernel = case in ("grad", "no_grad") and dtype != torch.float32
    if float32_kernel:
        m32 = mask if mask is None or mask.dtype == torch.bool else mask.float()
        expect = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **{**kw, "attn_mask": m32}).to(dtype)
        if case == "no_grad":
            with torch.no_grad():
                assert torch.equal(ours(q, k, v), expect)
        else:
            assert torch.equal(run(ours, q, k, v, g)[0], expect)
        return
    with pytest.MonkeyPatch.context() as mp:
        if case == "long_rows":
            mp.setattr(ops, "FLOAT32_ATTENTION_MAX_T_HD", T * hd - 1)
        out, grads = run(ours, q, k, v, g)
    ref_out, ref_grads = run(sdpa, q, k, v, g)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("mask_kind", ["causal", "additive"])
def test_float32_kernel_saves_what_the_16_bit_kernel_saves(mask_kind):
    """q, k, v, out in bf16 and the float32 log-sum-exp: the float32 copies are made again in
    backward, so the activation memory (and the planner's count) is the 16-bit kernel's."""
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, hd = 2, 6, 2, 24, 16
    q, k, v = (torch.randn(B, h, T, hd, generator=gen).bfloat16().requires_grad_() for h in (H, Hkv, Hkv))
    mask = draw_mask(mask_kind, B, T, gen)
    mask = None if mask is None else mask.bfloat16()

    def saved(fn):
        seen = {}

        def pack(t):
            if t is not mask:
                seen[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sorted(seen.values(), key=str)

    ours = saved(lambda: ops.attention(q, k, v, mask, hd**-0.5, True))
    theirs = saved(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    )
    assert ours == theirs
