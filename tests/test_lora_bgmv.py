"""The mixed-adapter LoRA kernels (kernels/lora_bgmv.py): shrink and expand equal their PyTorch references
for drawn shapes, adapter counts, index patterns and input dtypes; the dispatcher checks them once, falls
back with one warning when one is wrong, raises under MINILORA_KERNELS=strict and never runs them when
off; and minilora/lora/multi.py's mixed-batch path with the kernels equals its reference loop.

Letters: N tokens, K in_features, M out_features, L adapter slots, R padded rank.

Tolerances. Both sides compute each element as one float32 dot product of exact inputs (a 16-bit x widens
to float32 exactly), in different orders. Any order of a sum of n rounded products is within
gamma_n = n u / (1 - n u) (u = 2^-24) of the exact value relative to the sum of |terms|, so

    shrink   |h_kernel - h_ref| <= 2 gamma_K (|A[a]| |x[n]|)
    expand   |y_kernel - y_ref| <= 2 (gamma_{R+2} |s_a| (|B[a]| |h[n]|) + u |y[n]|)

(the expand's R-term dot, then one rounding for the product with s and one for the add to y: together at
most gamma_{R+2}; kernels/dispatch.py derives the same). Tokens of the base (-1) or of an all-zero slot
must come out exact: h = 0 and y unchanged. A wrong adapter, segment or tile errs by about the scale
itself, 10^4 or more times these bounds at the sizes drawn.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); `kernels_on_cpu` adds the CPU to
dispatch.KERNEL_DEVICES and forgets earlier verdicts, as in tests/test_selfcheck.py.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_multi_adapter import lora_bound, named_layer

import minilora.lora.mixed_term as term
import minilora.lora.multi as multi
from minilora.kernels import dispatch, lora_bgmv
from minilora.kernels.common import interpreting
from minilora.kernels.lora_bgmv import (
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink_reference,
    lora_shrink_triton,
    segments,
)

U = 2.0**-24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (BLOCK_N, BLOCK_R, BLOCK_K or BLOCK_M, SPLIT_K, num_warps): None is the launcher's choice; the others
# give several token blocks per segment, several rank tiles, a split K range and wider tiles.
CONFIGS = [None, (16, 16, 16, 2, 4), (16, 16, 16, 3, 4), (32, 32, 32, 1, 4)]

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="the CPU tests run the kernels under TRITON_INTERPRET=1"
)


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@st.composite
def index_patterns(draw, n: int, slots: int) -> list[int]:
    """One adapter index per token (-1 the base): all base, one adapter, each token's neighbours
    different, runs of drawn lengths (prefill rows), or any."""
    kind = draw(st.sampled_from(["base", "one", "each", "segments", "any"]))
    if kind == "base":
        return [-1] * n
    if kind == "one":
        return [draw(st.integers(0, slots - 1))] * n
    if kind == "each":
        return [i % (slots + 1) - 1 for i in range(n)]  # -1, 0, 1, ... cycling: no two neighbours equal
    if kind == "any":
        return draw(st.lists(st.integers(-1, slots - 1), min_size=n, max_size=n))
    out = []
    while len(out) < n:
        out += [draw(st.integers(-1, slots - 1))] * draw(st.integers(1, 20))
    return out[:n]


@st.composite
def problems(draw):
    """(x (N, K), A_pad (L, R, K), B_pad (L, M, R), s (L,), idx (N,)): adapters of drawn rank zero-padded
    to R, optionally an all-zero slot last (the base slot of minilora/lora/multi.py)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n, k, m = draw(st.integers(1, 40)), draw(st.integers(1, 80)), draw(st.integers(1, 48))
    n_ad = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(1, 40), min_size=n_ad, max_size=n_ad))
    zero_slot = draw(st.booleans())
    r = max(ranks)
    L = n_ad + zero_slot
    A, B = torch.zeros(L, r, k), torch.zeros(L, m, r)
    s = torch.zeros(L)
    for i, ri in enumerate(ranks):
        A[i, :ri] = torch.randn(ri, k, generator=g)
        B[i, :, :ri] = torch.randn(m, ri, generator=g)
        s[i] = draw(st.sampled_from([0.25, 2.0, -1.5]))
    dtype = draw(st.sampled_from(DTYPES))
    mag = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = (torch.randn(n, k, generator=g) * mag).to(dtype)
    idx = torch.tensor(draw(index_patterns(n, L)))
    return x, A, B, s, idx


def nothing(idx: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(N,) tokens that must come out exact: the base (-1), or an all-zero slot."""
    zero = A.flatten(1).abs().sum(1) == 0  # (L,)
    return (idx < 0) | zero[idx.clamp(min=0)]


def shrink_bound(x, A, idx):
    """2 gamma_K |A[a]| |x[n]| (float64, (N, R)); 0 for base tokens."""
    S = torch.bmm(A.double().abs()[idx.clamp(min=0)], x.double().abs()[:, :, None])[:, :, 0]  # (N, R)
    return (2 * gamma(x.shape[1]) * S).masked_fill((idx < 0)[:, None], 0)


def expand_bound(y, h, B, s, idx):
    """2 (gamma_{R+2} |s_a| |B[a]| |h[n]| + u |y[n]|) (float64, (N, M)); 0 for base tokens."""
    a = idx.clamp(min=0)
    Bh = torch.bmm(B.double().abs()[a], h.double().abs()[:, :, None])[:, :, 0]  # (N, M)
    bound = 2 * (gamma(B.shape[2] + 2) * s.double().abs()[a][:, None] * Bh + U * y.double().abs())
    return bound.masked_fill((idx < 0)[:, None], 0)


def assert_within(got, want, bound):
    err = (got.double() - want.double()).abs()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err / bound {(err / bound).nan_to_num(1e9).max()}"


# --- the kernels against their references --------------------------------------------------------------


@needs_interpreter
@given(problems(), st.sampled_from(CONFIGS))
def test_shrink_equals_reference(p, config):
    x, A, B, s, idx = p
    got, want = lora_shrink_triton(x, A, idx, config=config), lora_shrink_reference(x, A, idx)
    assert_within(got, want, shrink_bound(x, A, idx))
    assert (got[nothing(idx, A)] == 0).all() and (want[nothing(idx, A)] == 0).all()


@needs_interpreter
@given(problems(), st.sampled_from(CONFIGS))
def test_expand_equals_reference(p, config):
    x, A, B, s, idx = p
    g = torch.Generator().manual_seed(x.shape[0])
    h = torch.randn(x.shape[0], A.shape[1], generator=g) * 10.0 ** torch.randint(-3, 4, (), generator=g)  # (N, R)
    y = torch.randn(x.shape[0], B.shape[1], generator=g)  # (N, M)
    want = lora_expand_reference(y, h, B, s, idx)
    got = lora_expand_triton(y.clone(), h, B, s, idx, config=config)
    assert_within(got, want, expand_bound(y, h, B, s, idx))
    keep = nothing(idx, A)
    assert torch.equal(got[keep], y[keep]) and torch.equal(want[keep], y[keep])  # y untouched, bit for bit


@needs_interpreter
@given(
    ranks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    n=st.integers(1, 30),
    k=st.integers(1, 70),
    m=st.integers(1, 40),
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_stacked_blocks_equal_the_padded_stacks(ranks, n, k, m, config, seed):
    """Adapters stacked along the rank without padding (Blocks: each adapter's rows at its offset, masked at
    its rank) give the padded stacks' h and y: the same products, the padding's zeros never read. Ranks
    cross the 16-wide rank tiles and the split K range."""
    g = torch.Generator().manual_seed(seed)
    L, R = len(ranks), max(ranks)
    A_cat, Bt_cat = torch.randn(sum(ranks), k, generator=g), torch.randn(sum(ranks), m, generator=g)
    first = [sum(ranks[:a]) for a in range(L)]
    A_pad, B_pad = torch.zeros(L, R, k), torch.zeros(L, m, R)
    for a, (f, r) in enumerate(zip(first, ranks)):
        A_pad[a, :r], B_pad[a, :, :r] = A_cat[f : f + r], Bt_cat[f : f + r].T
    blocks = lora_bgmv.Blocks(torch.tensor(first), torch.tensor(ranks, dtype=torch.int32), R)
    s = torch.rand(L, generator=g) + 0.5
    x = torch.randn(n, k, generator=g)
    idx = torch.randint(-1, L, (n,), generator=g)
    h = lora_shrink_triton(x, A_cat, idx, config=config, blocks=blocks)
    assert_within(h, lora_shrink_reference(x, A_pad, idx), shrink_bound(x, A_pad, idx))
    h = torch.randn(n, R, generator=g)  # nonzero past every rank: the expand must not read past its own
    y = torch.randn(n, m, generator=g)
    got = lora_expand_triton(y.clone(), h, Bt_cat, s, idx, config=config, blocks=blocks)
    assert_within(got, lora_expand_reference(y, h, B_pad, s, idx), expand_bound(y, h, B_pad, s, idx))


@needs_interpreter
def test_expand_adds_in_place_and_shrink_reads_strided_input():
    g = torch.Generator().manual_seed(0)
    A, B, s = torch.randn(2, 4, 24, generator=g), torch.randn(2, 20, 4, generator=g), torch.tensor([0.5, 3.0])
    x = torch.randn(24, 9, generator=g).T  # (9, 24), strides (1, 9): not contiguous
    idx = torch.tensor([1, 1, 0, -1, 0, 0, 1, 1, 1])
    assert_within(lora_shrink_triton(x, A, idx), lora_shrink_reference(x, A, idx), shrink_bound(x, A, idx))
    h, y = torch.randn(9, 4, generator=g), torch.randn(9, 20, generator=g)
    out = y.clone()
    assert lora_expand_triton(out, h, B, s, idx) is out
    assert_within(out, lora_expand_reference(y, h, B, s, idx), expand_bound(y, h, B, s, idx))


def test_segments_are_runs_without_the_base():
    seg = segments(torch.tensor([2, 2, -1, -1, 0, 0, 0, 2, 1, 1, -1]))
    assert seg.start.tolist() == [0, 4, 7, 8]
    assert seg.length.tolist() == [2, 3, 1, 2]
    assert seg.adapter.tolist() == [2, 0, 2, 1]
    assert seg.longest == 3 and seg.start.dtype == torch.int32
    assert segments(torch.full((5,), -1)).longest == 0


@needs_interpreter
def test_launchers_reject_bad_inputs():
    x, A = torch.randn(3, 8), torch.randn(2, 4, 8)
    cases = [
        (lambda: lora_shrink_triton(x, A, torch.tensor([0, 1])), r"idx has shape \(2,\).*\(3,\)"),
        (lambda: lora_shrink_triton(x, A, torch.tensor([0, 2, -1])), r"outside -1\.\.1"),
        (lambda: lora_shrink_triton(x, A, torch.tensor([0, -2, 1])), r"outside -1\.\.1"),
        (lambda: lora_shrink_triton(x, torch.randn(2, 4, 9), torch.tensor([0, 0, 0])), "one K"),
        (lambda: lora_shrink_triton(x.double(), A, torch.tensor([0, 0, 0])), "float32, bfloat16 or float16"),
        (lambda: lora_shrink_triton(x, A.half(), torch.tensor([0, 0, 0])), "A_pad has dtype torch.float16"),
        (lambda: lora_shrink_triton(x, A, torch.tensor([0.0, 0, 0])), "integer adapter indices"),
        (
            lambda: lora_shrink_triton(
                x, A[0], torch.tensor([0, 0, 0]), blocks=lora_bgmv.Blocks(torch.tensor([0]), torch.tensor([4]), 4)
            ),
            "blocks.rank has dtype torch.int64; it must be torch.int32",
        ),
        (
            lambda: lora_shrink_triton(
                x, A, torch.tensor([0, 0, 0]), blocks=lora_bgmv.Blocks(torch.tensor([0]), torch.tensor([4]).int(), 4)
            ),
            r"\(Σ, K\) with blocks",
        ),
        (
            lambda: lora_expand_triton(
                torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(2, 5, 3), torch.ones(2), torch.tensor([0, 1, 0])
            ),
            "do not fit",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern) as e:
            call()
        assert "\n" not in str(e.value) and str(e.value).endswith(".")


# --- dispatch: the self-check, one warning and the fallback, strict, off -----------------------------------


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_VERDICTS", {})
    monkeypatch.delenv(dispatch.ENV, raising=False)


def spy(monkeypatch, name, body):
    """Replace kernel `name`'s launcher by body(real launcher, *args); returns the list of calls."""
    attr = f"{name}_triton"
    real, calls = getattr(lora_bgmv, attr), []

    def launcher(*args, **kwargs):
        calls.append(args)
        return body(real, *args, **kwargs)

    monkeypatch.setattr(lora_bgmv, attr, launcher)
    return calls


def raising(real, *args, **kwargs):
    raise RuntimeError("PTX compile failed\nsecond line of the log")


def next_adapter(real, *args, **kwargs):
    """The real kernel reading each token's neighbouring adapter slot (an off-by-one index)."""
    *rest, idx = args
    n_slots = rest[1].shape[0] if len(rest) == 2 else rest[3].shape[0]  # A_pad (L, R, K) or scale (L,)
    return real(*rest, torch.where(idx >= 0, (idx + 1) % n_slots, idx), **kwargs)


def short_segments(real, *args, **kwargs):
    """The real kernel missing the last token of every segment longer than one (an off-by-one length)."""
    seg = segments(args[-1])
    short = seg._replace(length=(seg.length - (seg.length > 1).int()).contiguous())
    return real(*args, segs=short, **kwargs)


def mixed_problem(dtype=torch.float32):
    """A mixed batch for term.mixed_gathered: x (B, T, K), rows (B,), slots (one untargeted), M."""
    g = torch.Generator().manual_seed(3)
    K, M = 24, 20
    slots = [
        (torch.randn(4, K, generator=g), torch.randn(M, 4, generator=g), 2.0),
        None,
        (torch.randn(7, K, generator=g), torch.randn(M, 7, generator=g), 0.5),
    ]
    rows = torch.tensor([0, 2, -1, 2, 1, 0])
    x = torch.randn(len(rows), 5, K, generator=g).to(dtype)
    return x, rows, slots, M


def pytorch_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setenv(dispatch.ENV, "off")
        return term.mixed_gathered(*args)


@needs_interpreter
@pytest.mark.parametrize("name", ["lora_shrink", "lora_expand"])
def test_self_check_passes_for_the_real_kernels(name):
    assert dispatch.self_check(name, "cpu") is None


@needs_interpreter
@pytest.mark.parametrize("name", ["lora_shrink", "lora_expand"])
@pytest.mark.parametrize(
    "body, expect",
    [(raising, "RuntimeError: PTX compile failed"), (next_adapter, "differs"), (short_segments, "differs")],
    ids=["raises", "next_adapter", "short_segments"],
)
def test_self_check_catches_broken_kernels(monkeypatch, name, body, expect):
    spy(monkeypatch, name, body)
    why = dispatch.self_check(name, "cpu")
    assert why is not None and expect in why and "\n" not in why, why


@needs_interpreter
@pytest.mark.parametrize("name", ["lora_shrink", "lora_expand"])
@pytest.mark.parametrize("body", [raising, next_adapter], ids=["raises", "wrong_values"])
def test_broken_kernel_warns_once_and_falls_back(monkeypatch, kernels_on_cpu, name, body):
    args = mixed_problem()
    want = pytorch_path(monkeypatch, *args)
    calls = spy(monkeypatch, name, body)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(term.mixed_gathered(*args), want)  # the PyTorch path, bit for bit
    assert len(calls) == 1  # the self-check's call only (it stops at the first wrong dtype)
    assert [w.category for w in caught] == [dispatch.KernelFallbackWarning]
    msg = str(caught[0].message)
    assert "\n" not in msg and f"kernel {name} failed" in msg and "using the PyTorch path" in msg


@needs_interpreter
def test_strict_raises_and_off_never_runs_the_kernels(monkeypatch, kernels_on_cpu):
    args = mixed_problem()
    want = pytorch_path(monkeypatch, *args)
    monkeypatch.setenv(dispatch.ENV, "strict")
    spy(monkeypatch, "lora_expand", next_adapter)
    for _ in range(2):  # and again: strict never falls back
        with pytest.raises(dispatch.KernelCheckError, match="^MINILORA_KERNELS=strict: the Triton kernel lora_expand"):
            term.mixed_gathered(*args)
    monkeypatch.setenv(dispatch.ENV, "off")
    monkeypatch.setattr(dispatch, "_VERDICTS", {})
    calls = spy(monkeypatch, "lora_shrink", raising)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(term.mixed_gathered(*args), want)
    assert calls == [] and dispatch._VERDICTS == {}


def test_cpu_never_takes_the_kernels_without_the_test_hook(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.bgmv_kernels(torch.zeros(2, 8)) is None


# --- the mixed-batch path with the kernels ------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_with_the_kernels_equals_the_reference_loop(monkeypatch, kernels_on_cpu, dtype):
    """term.mixed_gathered through both kernels (spied: they really run) equals mixed_reference, one matmul
    pair per adapter, within test_multi_adapter's bound for two float32 orders of s B (A x); base rows and
    rows of an adapter that does not target the layer are exactly 0."""
    x, rows, slots, M = mixed_problem(dtype)
    shrinks = spy(monkeypatch, "lora_shrink", lambda real, *a, **k: real(*a, **k))
    expands = spy(monkeypatch, "lora_expand", lambda real, *a, **k: real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = term.mixed_gathered(x, rows, slots, M)
    assert len(shrinks) == 3 + 1 and len(expands) == 1 + 1  # each self-check, then the call
    want = term.mixed_reference(x, rows, slots, M)
    assert got.shape == want.shape == (*x.shape[:-1], M)
    assert ((got.double() - want.double()).abs() <= lora_bound(x, slots, rows, M)).all()
    assert (got[rows == -1] == 0).all() and (got[rows == 1] == 0).all()
    assert term.mixed_gathered(x[:, 0], rows, slots, M).shape == (len(rows), M)  # (B, K): T = 1
    # added in place into a float32 base output (routed_forward's path): the expand writes into it
    base = torch.randn(*x.shape[:-1], M, generator=torch.Generator().manual_seed(4))
    out = base.clone()
    into = term.mixed_gathered(x, rows, slots, M, out)
    assert into.data_ptr() == out.data_ptr()
    assert ((into.double() - base.double() - want.double()).abs() <= lora_bound(x, slots, rows, M, into=base)).all()
    assert torch.equal(into[rows == -1], base[rows == -1]) and torch.equal(into[rows == 1], base[rows == 1])


@needs_interpreter
def test_segments_are_found_once_per_forward(monkeypatch, kernels_on_cpu):
    """Every layer of a forward passes the same rows tensor: its segments, a wait for the device each time,
    are found once, and found again for another rows tensor, rows changed in place, or another token count."""
    from minilora.kernels import lora_bgmv

    x, rows, slots, M = mixed_problem()
    term.mixed_gathered(x, rows.clone(), slots, M)  # the self-checks run first (they find segments too)
    calls = []
    real = lora_bgmv.segments
    monkeypatch.setattr(lora_bgmv, "segments", lambda idx: calls.append(idx) or real(idx))

    def check(x, rows):
        got = term.mixed_gathered(x, rows, slots, M)
        assert (
            (got.double() - term.mixed_reference(x, rows, slots, M).double()).abs() <= lora_bound(x, slots, rows, M)
        ).all()

    for _ in range(3):  # three layers of one forward
        check(x, rows)
    assert len(calls) == 1
    check(x[:, :2], rows)  # another token count
    assert len(calls) == 2
    other = rows.clone()
    check(x, other)
    assert len(calls) == 3
    other[0] = 1 - other[0]  # in place: adapter 0 becomes 1 (not targeted), the segments change
    check(x, other)
    assert len(calls) == 4 and torch.equal(calls[-1], other.repeat_interleave(x.shape[1]))


@needs_interpreter
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture's patches hold for every example
@given(
    n=st.integers(1, 4),
    ranks=st.lists(st.integers(1, 20), min_size=4, max_size=4),
    targeted=st.lists(st.booleans(), min_size=4, max_size=4),
    rows=st.lists(st.integers(-1, 3), min_size=2, max_size=7),
    T=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    into=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_read_the_stacks_in_place(monkeypatch, kernels_on_cpu, n, ranks, targeted, rows, T, dtype, into, seed):
    """Named adapters of drawn ranks: mixed_delta runs the kernels on the layer's stacks themselves (the
    same storage, no padded copy) and equals mixed_reference within test_multi_adapter's bound; rows of -1
    or of an adapter that does not target the layer get exactly nothing."""
    g = torch.Generator().manual_seed(seed)
    K, M = 24, 20
    slots = [
        (torch.randn(r, K, generator=g), torch.randn(M, r, generator=g), (i + 1) / 2) if targeted[i] or i == 0 else None
        for i, r in enumerate(ranks[:n])
    ]
    rows = torch.tensor([a if a < n else -1 for a in rows] + [0, -1])  # mixed: adapter 0 (targeted) and the base
    layer, adapters = named_layer(slots, K, M)
    x = torch.randn(len(rows), T, K, generator=g).to(dtype)
    base = torch.randn(len(rows), T, M, generator=g)
    monkeypatch.setattr(term, "padded_stacks", lambda *a: pytest.fail("padded the stacks again"))
    seen = spy(monkeypatch, "lora_shrink", lambda real, *a, **k: real(*a, **k))
    got = multi.mixed_delta(layer, x, rows, layer.adapters.table.names, base.clone() if into else None)
    want = term.mixed_reference(x, rows, slots, M)
    A_seen = seen[-1][1]  # (Σ, K): the kernel's A, the stacks themselves
    assert A_seen.untyped_storage().data_ptr() == adapters.stacks()[0].untyped_storage().data_ptr()
    expect = base.double() + want.double() if into else want.double()
    bound = lora_bound(x, slots, rows, M, into=base if into else None)
    assert ((got.double() - expect).abs() <= bound).all()
    nothing = torch.tensor([a < 0 or slots[a] is None for a in rows.tolist()])
    assert torch.equal(got[nothing], base[nothing] if into else torch.zeros_like(got[nothing]))


# --- on a GPU: real sizes ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens, seg", [(8, 1), (64, 1), (512, 128), (4096, 512)])
def test_gpu_real_sizes(n_tokens, seg):
    torch.manual_seed(0)
    K, M, R, L = 4096, 4096, 16, 9
    A, B = torch.randn(L, R, K, device="cuda") * 0.02, torch.randn(L, M, R, device="cuda") * 0.02
    s = torch.rand(L, device="cuda")
    idx = (torch.arange(n_tokens, device="cuda") // seg) % (L + 1) - 1  # segments of `seg` tokens, -1 included
    assert dispatch.self_check("lora_shrink", "cuda") is None and dispatch.self_check("lora_expand", "cuda") is None
    for dtype in DTYPES:
        x = torch.randn(n_tokens, K, device="cuda", dtype=dtype)
        h = lora_shrink_triton(x, A, idx)
        assert_within(h, lora_shrink_reference(x, A, idx), shrink_bound(x, A, idx))
        y = torch.randn(n_tokens, M, device="cuda")
        want = lora_expand_reference(y, h, B, s, idx)
        assert_within(lora_expand_triton(y.clone(), h, B, s, idx), want, expand_bound(y, h, B, s, idx))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_kernels_read_the_stacks_in_place(tokens):
    """On a GPU at a real layer's size: 8 named adapters of ranks 8 to 64 (one not on this layer), 32 rows of
    `tokens` tokens cycling over them and the base; mixed_delta takes the kernels over the stacks (their
    A shares the stacks' storage) and equals mixed_reference within test_multi_adapter's bound."""
    g = torch.Generator().manual_seed(0)
    K, M = 2048, 5632
    slots = [
        None if i == 3 else (torch.randn(r, K, generator=g) * 0.02, torch.randn(M, r, generator=g) * 0.02, 2.0)
        for i, r in enumerate([16, 8, 16, 16, 32, 16, 64, 16])
    ]
    layer, adapters = named_layer(slots, K, M)
    layer.cuda()
    rows = torch.arange(32, device="cuda") % 9 - 1  # -1, 0, ..., 7
    x = torch.randn(32, tokens, K, device="cuda", dtype=torch.bfloat16)
    seen = []
    real = lora_bgmv.lora_shrink_triton
    lora_bgmv.lora_shrink_triton = lambda *a, **k: seen.append(a[1]) or real(*a, **k)
    try:
        got = multi.mixed_delta(layer, x, rows, adapters.table.names)
    finally:
        lora_bgmv.lora_shrink_triton = real
    A_cat = adapters.stacks()[0]
    assert seen and seen[-1].untyped_storage().data_ptr() == A_cat.untyped_storage().data_ptr()
    cuda_slots = [multi.layer_slot(layer, name) for name in adapters.table.names]
    want = term.mixed_reference(x, rows, cuda_slots, M)
    assert ((got.double() - want.double()).abs() <= lora_bound(x, cuda_slots, rows, M).cuda()).all()
