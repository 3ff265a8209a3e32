"""models/ops.py and the attention's GQA path: the same forward bits as the plain ops, autograd's
gradients (bit for bit, or within a derived float64 bound where the summation order changes), and
fewer bytes saved for backward, counted with torch.autograd.graph.saved_tensors_hooks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.models import ops, transformer
from minilora.models.config import ModelConfig
from minilora.models.ops import gated_act, gated_act_plain, rms_norm, rms_norm_plain

DTYPES = [torch.float32, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves while fn(*args) runs, leaving out the storages
    of args that are not activations (those passed with requires_grad=False: weights)."""
    skip = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and not a.requires_grad}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def grads(fn, inputs, g):
    """dL/d(inputs) for L = sum(fn(*inputs) * g), through a fresh leaf copy of each input."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    out.backward(g)
    return out, [x.grad for x in leaves]


@st.composite
def norm_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    D = draw(st.integers(1, 96))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3]))  # tiny and huge rows; float32 x^2 stays finite
    x = (torch.randn(*lead, D, dtype=torch.float64) * scale).to(dtype)
    if draw(st.booleans()):  # an all-zero row: rstd = eps^-1/2
        x.view(-1, D)[0] = 0
    if draw(st.booleans()) and len(lead) >= 2:  # a transposed view, as q_norm / k_norm get (B, H, T, hd)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return (
        dtype,
        x,
        torch.randn(D, dtype=torch.float64).to(dtype),
        draw(st.sampled_from([1e-6, 1e-5])),
        draw(st.booleans()),
    )


@given(case=norm_case(), seed=st.integers(0, 2**16))
def test_rms_norm_equals_plain_path_and_float64_keeping_x_in_its_dtype(case, seed):
    """Forward bit for bit the plain path's (Llama w * cast(n) and Gemma cast(n (1 + w))), dL/dx (computed
    as r (gn - n mean(gn n)), where the plain path's autograd goes term by term) and the plain path's
    both within a derived bound of float64, and x kept in its own dtype (e D + 4 bytes per row)."""
    dtype, x, w, eps, gemma = case
    torch.manual_seed(seed)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    x.requires_grad_()
    y_ref, (gx_ref,) = grads(lambda x: rms_norm_plain(x, w, eps, gemma), [x], g)
    y, (gx,) = grads(lambda x: rms_norm(x, w, eps, gemma), [x], g)
    assert torch.equal(y, y_ref)

    # float64: dL/dx = r (gn - n mean(gn n)), gn = dL/dn as the function forms it (one rounding in
    # the compute dtype for Llama). Float32 error: r carries (D + 3) u (a sum of D squares, a
    # rsqrt), every other term a few u, the row sum D u of sum |gn x|; then one rounding to dtype.
    D, u = x.shape[-1], UNIT_ROUNDOFF[torch.float32]
    x64, g64, w64 = x.detach().double(), g.double(), w.double()
    gn = g64 * (1 + w64) if gemma else (g * w).double()
    r = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    n = x64 * r
    want = r * (gn - n * (gn * n).mean(-1, keepdim=True))
    scale = r * gn.abs() + r.pow(3) * x64.abs() * (gn * x64).abs().mean(-1, keepdim=True)
    bound = 4 * (D + 8) * u * scale + UNIT_ROUNDOFF[dtype] * want.abs()
    assert ((gx.double() - want).abs() <= bound).all()
    assert ((gx_ref.double() - want).abs() <= bound).all()

    x0 = x.detach().requires_grad_()
    per_row = x.numel() // D
    assert saved_bytes(lambda x, w: rms_norm(x, w, eps, gemma), x0, w) == x.numel() * x.element_size() + 4 * per_row


def test_rms_norm_with_a_trainable_weight_gets_its_gradient():
    """Full fine-tuning of norms: dL/dw exists and equals the plain path's."""
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    for gemma in (False, True):
        w = torch.randn(16, requires_grad=True)
        (rms_norm(x, w, 1e-6, gemma) * g).sum().backward()
        got, w.grad = w.grad, None
        (rms_norm_plain(x, w, 1e-6, gemma) * g).sum().backward()
        assert got is not None and torch.equal(got, w.grad)


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    F_=st.integers(1, 80),
    gelu=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 8.0, 30.0]),
    needs=st.sampled_from([(True, True), (True, False), (False, True)]),
    seed=st.integers(0, 2**16),
)
def test_gated_act_equals_plain_path_bit_for_bit_keeping_gate_and_up(dtype, shape, F_, gelu, scale, needs, seed):
    """act(g) * u (SiLU, GELU-tanh; saturated gates at 30): forward, dL/dg and dL/du bit for bit
    autograd's through the plain ops, and only g and u saved (2 e F per row, not 3 e F)."""
    torch.manual_seed(seed)
    g0 = (torch.randn(*shape, F_) * scale).to(dtype).requires_grad_(needs[0])
    u0 = torch.randn(*shape, F_).to(dtype).requires_grad_(needs[1])
    h = torch.randn(*shape, F_).to(dtype)
    y_ref, ref = grads(lambda g, u: gated_act_plain(g, u, gelu), [g0, u0], h)
    y, got = grads(lambda g, u: gated_act(g, u, gelu), [g0, u0], h)
    assert torch.equal(y, y_ref)
    for a, b, need in zip(got, ref, needs):
        assert (a is None and b is None) if not need else torch.equal(a, b)
    g1, u1 = g0.detach().requires_grad_(), u0.detach().requires_grad_()
    assert saved_bytes(lambda g, u: gated_act(g, u, gelu), g1, u1) == 2 * g0.numel() * g0.element_size()


def attention_magnitudes(q, k, v, g, mask, scale):
    """Float64 term-by-term magnitudes of dL/dk and dL/dv (every product of the backward in absolute
    value) at (B, Hkv, S, hd), summed over each kv head's query heads."""
    rep = q.shape[1] // k.shape[1]
    q, k, v, g = (t.double() for t in (q, k, v, g))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, S, hd)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    if mask is None:  # plain causal
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()  # (T, S)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    o = p @ v  # (B, H, T, hd)
    dp = g.abs() @ v.abs().transpose(-1, -2) + (g.abs() * o.abs()).sum(-1, keepdim=True)  # |dO v| + |rowsum(dO o)|
    dk = scale * (p * dp).transpose(-1, -2) @ q.abs()  # (B, H, S, T) @ (B, H, T, hd) -> (B, H, S, hd)
    dv = p.transpose(-1, -2) @ g.abs()  # (B, H, S, hd)
    B, H, S, hd = dk.shape
    return [t.view(B, H // rep, rep, S, hd).sum(2) for t in (dk, dv)]


def random_mask(B, T):
    """Right padding and a packed boundary: a real (B, 1, T, T) mask, as training batches build it."""
    seg = (torch.arange(T) >= T // 2).long().expand(B, T)
    valid = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1))
    return transformer.build_mask(torch.arange(T), valid, seg, seg, None)


@given(
    dtype=st.sampled_from(DTYPES),
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    Hkv=st.integers(1, 3),
    rep=st.integers(2, 4),
    hd=st.sampled_from([8, 16, 64]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_gqa_gradients_equal_the_repeated_path_within_a_derived_bound(dtype, B, T, Hkv, rep, hd, masked, seed):
    """SDPA with enable_gqa against SDPA on repeat_interleave'd k, v (the old path): the same output
    and dL/dq bits; dL/dk and dL/dv sum each kv head's rep query heads in another order (inside the
    kernel instead of repeat_interleave's backward), so both paths are held to the float64 result:
    within (hd + T + 8) u32 of the term-by-term magnitude (float32 dot products over hd and the keys,
    a few roundings) plus (rep + 4) roundings to dtype (P, dP, dS, each head's sum) and the last one."""
    torch.manual_seed(seed)
    H, scale = Hkv * rep, hd**-0.5
    q = torch.randn(B, H, T, hd).to(dtype)
    k, v = torch.randn(B, Hkv, T, hd).to(dtype), torch.randn(B, Hkv, T, hd).to(dtype)
    g = torch.randn(B, H, T, hd).to(dtype)
    mask = random_mask(B, T) if masked else None
    assert transformer.sdpa_takes_gqa(q, k, v, mask)  # the CPU flash kernel takes GQA, with or without a mask
    kw = {"attn_mask": mask, "is_causal": mask is None, "scale": scale}

    def old(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **kw)

    def new(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)

    leaves = [t.requires_grad_() for t in (q, k, v)]
    o_old, (dq_old, dk_old, dv_old) = grads(old, leaves, g)
    o_new, (dq_new, dk_new, dv_new) = grads(new, leaves, g)
    o64, (_, dk64, dv64) = grads(old, [t.double() for t in leaves], g.double())
    assert torch.equal(o_new, o_old) and torch.equal(dq_new, dq_old)
    mk, mv = attention_magnitudes(q.detach(), k.detach(), v.detach(), g, mask, scale)
    u, ud = UNIT_ROUNDOFF[torch.float32], UNIT_ROUNDOFF[dtype]
    for want, mag, got_old, got_new in [(dk64, mk, dk_old, dk_new), (dv64, mv, dv_old, dv_new)]:
        bound = ((hd + T + 8) * u + (rep + 4) * ud) * mag + ud * want.abs()
        for got in (got_old, got_new):
            assert ((got.double() - want).abs() <= bound).all()


def with_and_without_gqa(attn, x, cos, sin, mask):
    """({gqa: output}, {gqa: bytes saved for backward}) of the attention module with k, v handed to
    SDPA unrepeated where torch's dispatch takes it (gqa True) and repeated by the module (False)."""
    out, size = {}, {}
    for gqa in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            real = transformer.sdpa_takes_gqa
            mp.setattr(transformer, "sdpa_takes_gqa", lambda *a: real(*a) if gqa else False)
            out[gqa] = attn(x, cos, sin, mask)
            size[gqa] = saved_bytes(lambda: attn(x, cos, sin, mask))
    return out, size


@given(
    dtype=st.sampled_from(DTYPES),
    T=st.integers(1, 24),
    rep=st.integers(1, 3),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_module_keeps_kv_at_hkv_heads_with_the_same_output(dtype, T, rep, masked, seed):
    """The Attention module with and without SDPA's GQA (sdpa_takes_gqa forced off: the old repeat):
    the same output bits, and 2 e (H - Hkv) hd bytes per token fewer saved (k and v unrepeated)."""
    torch.manual_seed(seed)
    B, Hkv, hd, D = 2, 2, 16, 48
    cfg = ModelConfig(
        family="llama",
        name="t",
        vocab_size=8,
        hidden_size=D,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=Hkv * rep,
        num_key_value_heads=Hkv,
        head_dim=hd,
    )
    attn = transformer.Attention(cfg, 0).to(dtype).requires_grad_(False)
    x = torch.randn(B, T, D).to(dtype).requires_grad_()
    cos, sin = transformer.rope_cos_sin(transformer.rope_inv_freq(hd, 1e4, None), torch.arange(T).expand(B, T), dtype)
    mask = random_mask(B, T) if masked else None
    out, size = with_and_without_gqa(attn, x, cos, sin, mask)
    e = torch.empty((), dtype=dtype).element_size()
    assert torch.equal(out[True], out[False])
    assert size[False] - size[True] == 2 * B * T * (Hkv * rep - Hkv) * hd * e


def test_sdpa_takes_gqa_only_where_a_fused_kernel_would_run():
    """Where only the math backend may run (it would repeat k, v itself and build the scores), the
    module repeats k, v itself and keeps the old path; with the fused kernels allowed it does not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, kv = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16)
    assert transformer.sdpa_takes_gqa(q, kv, kv, None)
    with sdpa_kernel([SDPBackend.MATH]):
        assert not transformer.sdpa_takes_gqa(q, kv, kv, None)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_attention_gqa_on_cuda_saves_kv_unrepeated_where_a_fused_kernel_takes_it(masked):
    """On CUDA, sdpa_takes_gqa asks torch's own dispatch (flash, cuDNN or memory-efficient kernels,
    whichever accept Hkv < H for these inputs): when it says yes, k and v are saved at Hkv heads and
    the output agrees with the repeated path; when it says no, the module repeats as before."""
    torch.manual_seed(0)
    dev, dtype, B, T, Hkv, rep, hd, D = "cuda", torch.bfloat16, 2, 64, 2, 4, 64, 128
    cfg = ModelConfig(
        family="llama",
        name="t",
        vocab_size=8,
        hidden_size=D,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=Hkv * rep,
        num_key_value_heads=Hkv,
        head_dim=hd,
    )
    attn = transformer.Attention(cfg, 0).to(dev, dtype).requires_grad_(False)
    x = torch.randn(B, T, D, device=dev, dtype=dtype, requires_grad=True)
    pos = torch.arange(T, device=dev).expand(B, T)
    cos, sin = transformer.rope_cos_sin(transformer.rope_inv_freq(hd, 1e4, None), pos, dtype)
    mask = random_mask(B, T).to(dev) if masked else None
    q = torch.empty(B, Hkv * rep, T, hd, device=dev, dtype=dtype)
    kv = torch.empty(B, Hkv, T, hd, device=dev, dtype=dtype)
    takes = transformer.sdpa_takes_gqa(q, kv, kv, mask)
    out, size = with_and_without_gqa(attn, x, cos, sin, mask)
    torch.testing.assert_close(out[True], out[False])
    assert size[False] - size[True] == (2 * B * T * (Hkv * rep - Hkv) * hd * 2 if takes else 0)


@given(
    dtype=st.sampled_from(DTYPES),
    family=st.sampled_from(["llama", "gemma3"]),
    T=st.integers(2, 40),
    pieces=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
# T == head_dim (llama 8, gemma3 16): rope's cos and sin are then saved with a mask's shape
@example(dtype=torch.float32, family="llama", T=8, pieces=2, seed=0)
@example(dtype=torch.bfloat16, family="llama", T=8, pieces=3, seed=1)
@example(dtype=torch.float32, family="gemma3", T=16, pieces=2, seed=0)
@example(dtype=torch.bfloat16, family="gemma3", T=16, pieces=4, seed=1)
def test_packed_rows_share_one_additive_mask_per_layer_kind_with_the_same_bits(dtype, family, T, pieces, seed):
    """Packed rows need a mask. Handed to SDPA as a boolean, each layer converted it to an additive
    mask and kept its own copy for backward; Transformer.forward converts it once (additive_mask), so
    the layers of a kind keep one shared (B, 1, T, T) tensor, and the hidden states and the
    gradients are the same bits as with the boolean mask."""
    import dataclasses

    torch.manual_seed(seed)
    base = ModelConfig.from_name("tiny")  # Gemma 3: sliding and full layers
    if family == "llama":
        base = ModelConfig.from_name("smollm2-135m")
        base = dataclasses.replace(
            base,
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    L = 3
    cfg = dataclasses.replace(base, num_hidden_layers=L, layer_types=(list(base.layer_types) * L)[:L], sliding_window=8)
    model = transformer.Transformer(cfg).to(dtype)
    B = 2
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    seg = (torch.arange(T) * pieces // T + 1).expand(B, T).contiguous()  # (B, T): `pieces` packed examples a row

    def run():
        model.zero_grad()
        h = model(ids, segment_ids=seg, return_hidden=True)
        h.float().square().sum().backward()
        return h, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def is_mask(t):
        return t.dtype == torch.bool or bool(((t == 0) | (t == float("-inf"))).all())

    def run_counting_masks():
        masks = set()

        def pack(t):
            # A mask holds only "may attend" marks: True/False, or 0/-inf. The shape alone is not enough:
            # rope's x * cos[:, None] keeps cos and sin as (B, 1, T, hd), which is (B, 1, T, T) when T == hd.
            if t.dim() == 4 and t.shape[1] == 1 and t.shape[-2:] == (T, T) and is_mask(t):
                masks.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return (*run(), len(masks))

    # SDPA itself (FLOAT32_ATTENTION_MAX_T_HD = 0), and for a 16-bit model the CPU's float32 kernel,
    # which keeps the mask it is given (so a boolean mask is shared too)
    for limit in (0, ops.FLOAT32_ATTENTION_MAX_T_HD):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "FLOAT32_ATTENTION_MAX_T_HD", limit)
            h_new, g_new, n_new = run_counting_masks()
            mp.setattr(transformer, "additive_mask", lambda allowed, dtype: allowed)  # the boolean mask, as before
            h_old, g_old, n_old = run_counting_masks()
        assert torch.equal(h_new, h_old) and all(torch.equal(a, b) for a, b in zip(g_new, g_old))
        float32_kernel = ops.attention_in_float32("cpu", dtype, T, cfg.head_dim) if limit else False
        assert (n_new, n_old) == (len(set(cfg.layer_types)), len(set(cfg.layer_types)) if float32_kernel else L)
