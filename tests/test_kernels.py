"""Triton NF4 kernels (kernels/nf4_dequant.py, kernels/nf4_matmul.py) against their references.

Chain of oracles: kernel == PyTorch reference (minilora.quant.nf4.dequantize_nf4_reference) and
reference == bitsandbytes.functional.dequantize_4bit; fused matmul == dequantize-then-matmul.
On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), whose float32 -> bf16
cast truncates where a GPU rounds to nearest even, so bf16/fp16 outputs are compared within one
ulp and float32 exactly. The `gpu` test repeats the comparisons at real sizes on CUDA, exactly.

Letters: N tokens, K in_features, M out_features (W is (M, K)).
"""

import copy
import math

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.kernels import common, nf4_matmul  # noqa: E402
from minilora.kernels.nf4_dequant import dequantize_nf4_triton  # noqa: E402
from minilora.kernels.nf4_matmul import nf4_matmul_t_triton, nf4_matmul_triton, use_fused  # noqa: E402
from minilora.quant.nf4 import NF4Tensor, dequantize_nf4_reference, quantize_nf4  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal, or adjacent representable values (same sign: bit patterns differ by one)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        assert torch.equal(got, want), (got - want).abs().max()
        return
    a = got.view(_INT_VIEW[got.dtype]).int()
    b = want.view(_INT_VIEW[want.dtype]).int()
    same_sign = got.float() * want.float() >= 0
    bad = ((a - b).abs() > 1) | ~same_sign
    assert not bad.any(), f"{int(bad.sum())} values off by more than one ulp, e.g. {got[bad][:4]} vs {want[bad][:4]}"


def random_weight(seed: int, shape, scale_exp: int, case: str, blocksize: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 10.0**scale_exp
    flat = w.view(-1)
    if case == "zero_block":
        flat[:blocksize] = 0  # an all-zero block: absmax 0, every value must come back 0
    elif case == "outlier":
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] *= 1e4
    big = torch.finfo(dtype).max  # an fp16 outlier stays finite
    return w.clamp(-big, big).to(dtype)


def bnb_dequantize(q: NF4Tensor) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit of q, in q's shape and dtype.

    bnb transposes its output when the packed tensor has one row (a single byte), which fails for
    3-D shapes; asking it for the flat (n,) tensor avoids that and changes no value.
    """
    packed, state = q.to_bnb()
    state.shape = torch.Size([q.numel])
    return bnbF.dequantize_4bit(packed, state).view(q.shape)


@st.composite
def nf4_tensors(draw, max_numel=3000):
    """(q, draws) for a drawn shape (numel often not a multiple of the block), blocksize, scale."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_numel:
        shape = (max_numel // 7 - draw(st.integers(0, 1)), 7)  # odd or even numel
    wdtype = draw(st.sampled_from(DTYPES))
    exp = draw(st.integers(-6, 3) if wdtype == torch.float16 else st.integers(-20, 20))
    case = draw(st.sampled_from(["plain", "zero_block", "outlier"]))
    w = random_weight(draw(st.integers(0, 2**31 - 1)), shape, exp, case, blocksize, wdtype)
    return quantize_nf4(w, blocksize=blocksize, double_quant=draw(st.booleans()))


# --- dequantization ------------------------------------------------------------------------------


@given(nf4_tensors(), st.sampled_from(DTYPES), st.sampled_from([16, 64, 1024]))
def test_dequant_kernel_matches_reference(q, dtype, block_size):
    """Any shape/blocksize/scale/double-quant, any output dtype, several program sizes."""
    got = dequantize_nf4_triton(q, dtype, block_size=block_size)
    assert got.shape == q.shape
    assert_within_one_ulp(got, dequantize_nf4_reference(q, dtype))


@given(nf4_tensors())
def test_reference_and_kernel_match_bitsandbytes(q):
    """The reference is bnb's dequantize_4bit bit for bit; the kernel within one ulp of it."""
    theirs = bnb_dequantize(q)
    assert torch.equal(dequantize_nf4_reference(q), theirs)
    assert_within_one_ulp(dequantize_nf4_triton(q), theirs)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape,blocksize,block_size",
    [
        ((3, 37), 32, 16),  # numel 111: ragged last block, odd numel (padding nibble), ragged program
        ((64,), 64, 1024),  # exactly one block
        ((1,), 4096, 16),  # one element, a block far larger than the tensor
        ((1, 200), 128, 16),  # a one-row matrix
        ((257, 33), 32, 16),  # more than 256 blocks: several second-level blocks (absmax2)
    ],
)
def test_dequant_odd_sizes(shape, blocksize, block_size, double_quant):
    w = random_weight(0, shape, 0, "plain", blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    theirs = bnb_dequantize(q)
    for dtype in DTYPES:
        ref = dequantize_nf4_reference(q, dtype)
        assert_within_one_ulp(dequantize_nf4_triton(q, dtype, block_size=block_size), ref)
    assert torch.equal(dequantize_nf4_triton(q, torch.float32, block_size=block_size), theirs)


# --- fused matmul ----------------------------------------------------------------------------------


def assert_matmul_close(got: torch.Tensor, a: torch.Tensor, w: torch.Tensor, transposed: bool) -> None:
    """got ~ a @ w^T (or a @ w) computed in a.dtype by PyTorch, w the dequantized weight (M, K).

    Bound: both results are within a few roundings of the exact product; with
    scale = |a| @ |w| (float64) each side errs by at most about eps * scale (output rounding, the
    interpreter's truncating weight cast) plus float32 accumulation, so 3 eps * scale holds
    for bf16/fp16 and 4 R 2^-24 * scale (R the reduction length) for float32.
    """
    ref = (a @ w) if transposed else F.linear(a, w)  # dequantize-then-matmul, in a.dtype
    wt = w.double().abs() if transposed else w.double().abs().T
    scale = a.double().abs() @ wt
    r = w.shape[0] if transposed else w.shape[1]
    eps = 4 * r * 2.0**-24 if a.dtype == torch.float32 else 3 * torch.finfo(a.dtype).eps
    err = (got.double() - ref.double()).abs()
    assert got.dtype == a.dtype and got.shape == ref.shape
    assert (err <= eps * scale + 1e-30).all(), f"max err {err.max()} vs tol {(eps * scale).max()}"


@st.composite
def matmul_cases(draw):
    m = draw(st.integers(1, 40))  # m = 1: a one-row weight
    if draw(st.booleans()):  # rows of whole absmax blocks: the kernel's ALIGNED path (real layers)
        blocksize = draw(st.sampled_from([32, 64, 128]))
        k = blocksize * draw(st.integers(1, 3))
    else:  # any K: rows start mid-block and mid-byte (the element-wise path)
        blocksize, k = draw(st.sampled_from(BLOCKSIZES)), draw(st.integers(1, 72))
    dtype = draw(st.sampled_from(DTYPES))
    exp = draw(st.integers(-3, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    w = random_weight(seed, (m, k), exp, draw(st.sampled_from(["plain", "zero_block"])), blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=draw(st.booleans()))
    lead = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=2)))  # (N,) or (B, T)
    # None: the launcher's choice; else (BLOCK_N, BLOCK_O, BLOCK_R, SPLIT_K, num_warps, num_stages)
    config = draw(st.sampled_from([None, (16, 32, 16, 3, 4, 1), (32, 16, 32, 2, 4, 2)]))
    return q, dtype, lead, seed, config


@settings(max_examples=15)  # the Triton interpreter runs every program of a launch in Python
@given(matmul_cases())
def test_fused_matmul_forward(case):
    q, dtype, lead, seed, config = case
    m, k = q.shape
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = nf4_matmul_triton(x, q, config=config)  # (..., M)
    assert y.shape == (*lead, m)
    assert_matmul_close(y, x, dequantize_nf4_reference(q, dtype), transposed=False)


@settings(max_examples=15)  # the Triton interpreter runs every program of a launch in Python
@given(matmul_cases())
def test_fused_matmul_input_grad(case):
    """nf4_matmul_t_triton(g) is the input gradient of y = x W^T, as autograd computes it."""
    q, dtype, lead, seed, config = case
    m, k = q.shape
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(*lead, k, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(*lead, m, generator=gen).to(dtype)
    w = dequantize_nf4_reference(q, dtype)
    F.linear(x, w).backward(g)  # autograd's dL/dx = g W, in dtype
    dx = nf4_matmul_t_triton(g, q, config=config)  # (..., K)
    assert dx.shape == x.shape
    assert_matmul_close(dx, g, w, transposed=True)
    if dtype == torch.float32:  # and against autograd itself, within float32 accumulation error
        torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5 * float(g.abs().max()) * k)


@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_matmul_aligned_path_with_split_and_ragged_tiles(double_quant):
    """K % blocksize == 0 takes the row-tile path; M, N not multiples of the tile, split reduction."""
    q = quantize_nf4(random_weight(3, (37, 192), 0, "zero_block", 64), blocksize=64, double_quant=double_quant)
    assert nf4_matmul.aligned(q, 32) and not nf4_matmul.aligned(quantize_nf4(torch.randn(37, 96), 64), 32)
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        x, g = torch.randn(5, 192, generator=gen).to(dtype), torch.randn(5, 37, generator=gen).to(dtype)
        w = dequantize_nf4_reference(q, dtype)
        for config in (None, (16, 16, 32, 3, 4, 1), (16, 32, 16, 2, 4, 1)):
            assert_matmul_close(nf4_matmul_triton(x, q, config=config), x, w, transposed=False)
            assert_matmul_close(nf4_matmul_t_triton(g, q, config=config), g, w, transposed=True)


def test_fused_matmul_noncontiguous_input():
    q = quantize_nf4(torch.randn(24, 40), blocksize=32)
    x = torch.randn(40, 5).T  # (5, 40) with strides (1, 5)
    assert_matmul_close(nf4_matmul_triton(x, q), x, dequantize_nf4_reference(q, torch.float32), False)


# --- launcher validation and dispatch ---------------------------------------------------------------


def test_launchers_reject_bad_inputs(monkeypatch):
    q = quantize_nf4(torch.randn(8, 64), blocksize=32)
    with pytest.raises(ValueError, match="output dtype"):
        dequantize_nf4_triton(q, torch.int8)
    with pytest.raises(ValueError, match="these parts mix the two"):  # refused where it is made
        NF4Tensor(q.packed, q.absmax.float(), q.shape, q.dtype, q.blocksize, q.absmax2, q.offset)
    with pytest.raises(ValueError, match="packed holds 255 bytes but shape"):
        NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, q.blocksize, q.absmax2, q.offset)
    bad, short = copy.copy(q), copy.copy(q)  # fields changed after construction reach the launchers' own checks
    bad.absmax, short.packed = q.absmax.float(), q.packed[:-1]
    with pytest.raises(ValueError, match="absmax has dtype"):
        dequantize_nf4_triton(bad)
    with pytest.raises(ValueError, match="packed has 255 elements, expected 256"):
        dequantize_nf4_triton(short)
    strided = NF4Tensor(
        torch.stack([q.packed, q.packed], 1)[:, 0], q.absmax, q.shape, q.dtype, q.blocksize, q.absmax2, q.offset
    )
    with pytest.raises(ValueError, match="not contiguous"):
        dequantize_nf4_triton(strided)
    with pytest.raises(ValueError, match="last dim must be 64"):
        nf4_matmul_triton(torch.randn(3, 8), q)
    with pytest.raises(ValueError, match="last dim must be 8"):
        nf4_matmul_t_triton(torch.randn(3, 64), q)
    with pytest.raises(ValueError, match="input dtype"):
        nf4_matmul_triton(torch.ones(3, 64, dtype=torch.int32), q)
    with pytest.raises(ValueError, match="must be 2-D"):
        nf4_matmul_triton(torch.randn(3, 8), quantize_nf4(torch.randn(2, 4, 8), blocksize=32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # outside the interpreter CPU tensors are refused
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dequantize_nf4_triton(q)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        nf4_matmul_triton(torch.randn(3, 64), q)


def test_use_fused_by_shape_and_dtype():
    """Few 16-bit tokens over whole absmax blocks, on the weight's device; which devices may run the
    kernel at all is kernels/dispatch.py's decision (tests/test_selfcheck.py)."""
    q = quantize_nf4(torch.randn(8, 64), blocksize=32)
    for dtype in (torch.bfloat16, torch.float16):
        assert use_fused(torch.randn(16, 64).to(dtype), q)
        assert use_fused(torch.randn(1, 8).to(dtype), q, transposed=True)
        assert not use_fused(torch.randn(nf4_matmul.FUSED_MAX_TOKENS + 1, 64).to(dtype), q)
        assert not use_fused(torch.randn(1, 64, dtype=dtype, device="meta"), q)  # another device
        assert not use_fused(torch.randn(0, 64).to(dtype), q)
    assert not use_fused(torch.randn(1, 64), q)  # float32: never
    assert not use_fused(torch.randn(1, 64).bfloat16(), quantize_nf4(torch.randn(8, 48), blocksize=32))  # K % 32


# --- the real compiler, without a GPU ---------------------------------------------------------------


def test_every_kernel_configuration_compiles_for_sm90():
    """The interpreter runs the Python, not Triton's compiler: layouts, tl.dot shape rules and
    dtype lowering are only checked by compiling. bench/kernel_resources.py --check compiles every
    configuration the launchers can pick (and odd-shape variants) for sm_90a with Triton's own
    ptxas, which needs no GPU, and exits 1 naming each variant that fails."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no CUDA backend to compile with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# --- GPU: the same comparisons at real sizes, exactly (a GPU rounds casts to nearest even) -----------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1152, 1024), (6912, 1152), (4096, 4096), (4095, 333)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gpu_real_sizes(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quantize_nf4(w.cpu(), blocksize=64, double_quant=double_quant).to("cuda")
    theirs = bnb_dequantize(q)  # bnb's CUDA kernel
    assert torch.equal(dequantize_nf4_triton(q), theirs)
    for dtype in DTYPES:
        assert torch.equal(dequantize_nf4_triton(q, dtype), dequantize_nf4_reference(q, dtype))
    m, k = shape
    for n in (1, 7, 16, 64):
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, m, device="cuda", dtype=torch.bfloat16)
        wd = dequantize_nf4_reference(q, torch.bfloat16)
        assert_matmul_close(nf4_matmul_triton(x, q), x, wd, transposed=False)
        assert_matmul_close(nf4_matmul_t_triton(g, q), g, wd, transposed=True)
        assert use_fused(x, q) == (n <= nf4_matmul.FUSED_MAX_TOKENS and k % 64 == 0)
    # the dispatcher end to end: NF4Linear forward and input gradient on CUDA
    from minilora.quant.linear import NF4Linear

    lin = NF4Linear(q)
    x = torch.randn(2, 3, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    y.backward(torch.ones_like(y))
    assert_matmul_close(y.detach(), x.detach(), wd, transposed=False)
    assert_matmul_close(x.grad, torch.ones_like(y), wd, transposed=True)
    assert common.interpreting() is False
