"""Triton kernel: fused NF4 matmul, y = x W^T (forward) and dx = g W (input gradient).

Letters: N tokens (leading dims of x flattened), K in_features, M out_features; W is (M, K),
row-major, stored as NF4 (minilora/quant/nf4.py): element W[m, k] is number e = m K + k of the
flattened weight, its code is the (high if e is even, else low) nibble of packed[e // 2], and its
scale is absmax[e // BLOCKSIZE] (decoded from the 8-bit code when double quantized).

    forward    (TRANSPOSED=False):  y  = x W^T   x (N, K), y  (N, M)   reduce over K
    input grad (TRANSPOSED=True):   dx = g W     g (N, M), dx (N, K)   reduce over M

One kernel serves both: a program owns an output tile (BLOCK_N tokens x BLOCK_O outputs) and walks
the reduction dimension in steps of BLOCK_R. Each step loads the activation tile, dequantizes the
matching W tile in registers (NF4 lookup x absmax, float32, cast to the activation dtype exactly
like dequantize-then-matmul does) and feeds tl.dot with a float32 accumulator. The dense weight
never exists in global memory, so the kernel reads 0.5 (+ absmax) bytes per weight instead of
dequantize's 0.5 read + 2 written + 2 read again by cuBLAS.

That only pays when the matmul is bound by reading W: few tokens (decoding, small batches).
`use_fused` makes that choice by shape; at larger N, dequantize + cuBLAS wins. With few tokens
and few output tiles the GPU would be idle, so the reduction can be split (SPLIT_K programs per
output tile, float32 partial sums added afterwards).

Two ways to build the W tile. Real layers have K % BLOCKSIZE == 0, so a tile WIDTH <= BLOCKSIZE
columns wide is, row by row, WIDTH / 2 contiguous bytes under one absmax (`_nf4_row_tile`, the
ALIGNED path: one vector load and one absmax per tile row). Any other K takes element-wise index
arithmetic (`_nf4_tile`: odd K lets a row start mid-byte; masked lanes load code 0 and are zeroed
before the dot). `python -m bench.kernel_resources` shows what each costs on sm_90a.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minilora.quant.nf4 import NF4Tensor

from .common import absmax_f32, check_nf4, interpreting, nf4_lookup, nf4_table, tables

FUSED_MAX_TOKENS = 16  # use_fused's threshold; the bench (bench/dequant.py --matmul) measures it
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _nf4_tile(
    offs_row,  # (R,) int32 row indices of W (0..M)
    offs_col,  # (C,) int32 column indices of W (0..K)
    mask,  # (R, C) bool: in-bounds elements
    K,  # columns of W (row stride in elements)
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    offset_ptr,
    dyn_ptr,  # the NF4 state, see kernels/common.py
    nf4,  # (16,) float32 NF4 table (common.nf4_table)
    BLOCKSIZE: tl.constexpr,  # elements per absmax block
    DOUBLE_QUANT: tl.constexpr,  # absmax holds 8-bit codes
):
    """W[offs_row, offs_col] dequantized to float32, shape (R, C); 0 where masked."""
    e = offs_row[:, None] * K + offs_col[None, :]  # (R, C) flat element index
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)  # (R, C)
    nib = (byte >> (4 - 4 * (e & 1))) & 15  # even e: high nibble
    absmax = absmax_f32(e // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr, offset_ptr, dyn_ptr, DOUBLE_QUANT)
    return tl.where(mask, nf4_lookup(nf4, nib) * absmax, 0.0)


@triton.jit
def _nf4_row_tile(
    rows,  # (R,) int32 row indices of W
    row_mask,  # (R,) bool: rows that exist (and belong to this split)
    col0,  # first column of the tile: a multiple of WIDTH
    K_HALF,  # K // 2: bytes per row of W (K is a multiple of BLOCKSIZE, so even)
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    offset_ptr,
    dyn_ptr,  # the NF4 state, see kernels/common.py
    nf4,  # (16,) float32 NF4 table (common.nf4_table)
    BLOCKSIZE: tl.constexpr,  # elements per absmax block, a multiple of WIDTH
    DOUBLE_QUANT: tl.constexpr,  # absmax holds 8-bit codes
    WIDTH: tl.constexpr,  # columns in the tile
):
    """W[rows, col0 : col0 + WIDTH] dequantized to float32, shape (R, WIDTH); 0 in masked rows.

    The fast path for real layer shapes: K % BLOCKSIZE == 0 and WIDTH divides BLOCKSIZE, so each
    tile row is WIDTH / 2 contiguous bytes (one vector load) inside a single absmax block (one
    absmax per row, not per element). Nibbles are split and interleaved as in nf4_dequant.
    """
    first_byte = rows * K_HALF + col0 // 2  # (R,) byte of each row's first element
    offs = first_byte[:, None] + tl.arange(0, WIDTH // 2)[None, :]  # (R, WIDTH / 2)
    byte = tl.load(packed_ptr + offs, mask=row_mask[:, None], other=0).to(tl.int32)  # (R, WIDTH / 2)
    absmax = absmax_f32(
        first_byte // (BLOCKSIZE // 2), row_mask, absmax_ptr, absmax2_ptr, offset_ptr, dyn_ptr, DOUBLE_QUANT
    )  # (R,)
    absmax = tl.where(row_mask, absmax, 0.0)  # masked rows: every value NF4 * 0 = 0 (one select per row)
    hi = nf4_lookup(nf4, byte >> 4) * absmax[:, None]  # (R, WIDTH / 2) even columns
    lo = nf4_lookup(nf4, byte & 15) * absmax[:, None]  # odd columns
    return tl.reshape(tl.join(hi, lo), (rows.shape[0], WIDTH))  # (R, WIDTH)


@triton.jit
def _nf4_matmul_kernel(
    a_ptr,  # activations: x (N, K) forward, g (N, M) transposed
    packed_ptr,  # *uint8 (ceil(M K / 2),) NF4 codes of W (M, K)
    absmax_ptr,  # *uint8 (nb,) codes if DOUBLE_QUANT else *float32 (nb,)
    absmax2_ptr,  # *float32 (nb2,) second-level absmax (only if DOUBLE_QUANT)
    offset_ptr,  # *float32 () offset (only if DOUBLE_QUANT)
    nf4_ptr,  # *float32 (16,) NF4 table
    dyn_ptr,  # *float32 (256,) signed dynamic map
    out_ptr,  # (N, O) output in a's dtype, or (SPLIT_K, N, O) float32 partials
    N,
    M,
    K,
    K_HALF,  # tokens, W rows, W columns, K // 2
    stride_an,
    stride_ar,  # strides of a over (token, reduction index)
    stride_os,
    stride_on,
    stride_oo,  # strides of out over (split, token, output index)
    BLOCKSIZE: tl.constexpr,  # elements per absmax block
    DOUBLE_QUANT: tl.constexpr,  # absmax holds 8-bit codes
    TRANSPOSED: tl.constexpr,  # False: out = a W^T (O = M, R = K); True: out = a W (O = K, R = M)
    BLOCK_N: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_O: tl.constexpr,  # outputs per tile
    BLOCK_R: tl.constexpr,  # reduction step
    SPLIT_K: tl.constexpr,  # programs sharing one output tile's reduction
    ALIGNED: tl.constexpr,  # K % BLOCKSIZE == 0 and the tile's K-direction width divides BLOCKSIZE
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32), else "tf32" (unused by bf16/fp16)
    DOT_IN_F32: tl.constexpr,  # upcast both operands to float32 first (interpreter only, see below)
):
    pid_n = tl.program_id(axis=0)
    pid_o = tl.program_id(axis=1)
    pid_s = tl.program_id(axis=2)
    if TRANSPOSED:
        O = K
        R = M
    else:
        O = M
        R = K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
    r_per_split = tl.cdiv(tl.cdiv(R, SPLIT_K), BLOCK_R) * BLOCK_R  # a multiple of BLOCK_R
    r_start = pid_s * r_per_split
    r_end = tl.minimum(r_start + r_per_split, R)

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    nf4 = nf4_table(nf4_ptr)  # (16,) once per program
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        a_mask = (offs_n[:, None] < N) & (offs_r[None, :] < r_end)
        a = tl.load(
            a_ptr + offs_n[:, None] * stride_an + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0
        )  # (BLOCK_N, BLOCK_R)
        if ALIGNED and TRANSPOSED:  # tile rows r of W, columns o: contiguous bytes, one absmax per row
            w = _nf4_row_tile(
                offs_r,
                offs_r < r_end,
                pid_o * BLOCK_O,
                K_HALF,
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                offset_ptr,
                dyn_ptr,
                nf4,
                BLOCKSIZE,
                DOUBLE_QUANT,
                BLOCK_O,
            )  # (BLOCK_R, BLOCK_O) = W[r, o]
        elif ALIGNED:  # tile rows o of W, columns r
            w = _nf4_row_tile(
                offs_o,
                offs_o < O,
                r0,
                K_HALF,
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                offset_ptr,
                dyn_ptr,
                nf4,
                BLOCKSIZE,
                DOUBLE_QUANT,
                BLOCK_R,
            )  # W[o, r]
            w = tl.trans(w)  # (BLOCK_R, BLOCK_O)
        elif TRANSPOSED:  # any shape: element-wise index arithmetic
            w_mask = (offs_r[:, None] < r_end) & (offs_o[None, :] < O)
            w = _nf4_tile(
                offs_r,
                offs_o,
                w_mask,
                K,
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                offset_ptr,
                dyn_ptr,
                nf4,
                BLOCKSIZE,
                DOUBLE_QUANT,
            )  # (BLOCK_R, BLOCK_O) = W[r, o]
        else:
            w_mask = (offs_o[:, None] < O) & (offs_r[None, :] < r_end)
            w = _nf4_tile(
                offs_o,
                offs_r,
                w_mask,
                K,
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                offset_ptr,
                dyn_ptr,
                nf4,
                BLOCKSIZE,
                DOUBLE_QUANT,
            )  # (BLOCK_O, BLOCK_R) = W[o, r]
            w = tl.trans(w)  # (BLOCK_R, BLOCK_O)
        # Round W to the activation dtype first: the same numbers dequantize-then-matmul uses.
        w = w.to(a_ptr.dtype.element_ty)
        if DOT_IN_F32:
            # Triton 3.9's interpreter returns garbage for bf16 tl.dot operands. Products of two
            # bf16/fp16 numbers are exact in float32, so upcasting changes nothing numerically.
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    out_mask = (offs_n[:, None] < N) & (offs_o[None, :] < O)
    out_ptrs = out_ptr + pid_s * stride_os + offs_n[:, None] * stride_on + offs_o[None, :] * stride_oo
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _pick_config(
    n: int,
    o: int,
    r: int,
    transposed: bool,
    blocksize: int,
    dtype: torch.dtype = torch.bfloat16,
    interpret: bool | None = None,
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_O, BLOCK_R, SPLIT_K, num_warps, num_stages) by shape.

    The tile's width along K (BLOCK_R forward, BLOCK_O transposed) is 64, or the blocksize when
    smaller, so it divides the blocksize (the ALIGNED fast path). Small output tiles and a split
    reduction keep a GPU's SMs busy when N is tiny; the interpreter gets small tiles because its
    cost grows with tile area.

    num_stages 1 (no software pipelining): the kernel is bound by instruction issue, not by
    latency, and each extra stage adds instructions and registers to prefetch the packed bytes,
    activations and absmax; latency is hidden by occupancy instead (several programs per SM).
    `python -m bench.kernel_resources` shows the instruction and register counts on sm_90a, and
    bench/dequant.py times 2 and 3 stages beside 1 on a GPU. float32 activations (explicit calls
    only: use_fused never picks them) get 16-token tiles and 8 warps: their FMA-based tl.dot spills
    registers otherwise.
    """
    block_n = 16 if n <= 16 or dtype == torch.float32 else 32
    if interpreting() if interpret is None else interpret:
        return block_n, 16, min(32, blocksize), 1, 4, 1
    kw = min(64, blocksize)
    block_o, block_r = (kw, 64) if transposed else (64, kw)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(o, block_o)
    split = 1
    while tiles * split < 264 and r // (split * 2) >= 4 * block_r:  # aim for ~2 programs per SM
        split *= 2
    return block_n, block_o, block_r, split, 8 if dtype == torch.float32 else 4, 1


def aligned(q: NF4Tensor, width: int) -> bool:
    """Whether tiles `width` columns wide take the fast path: whole rows of absmax blocks."""
    return q.shape[1] % q.blocksize == 0 and q.blocksize % width == 0


def _launch(a: torch.Tensor, q: NF4Tensor, transposed: bool, who: str, config=None) -> torch.Tensor:
    dev = check_nf4(q, who)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(a).__name__}.")
    if len(q.shape) != 2:
        raise ValueError(f"{who}: the NF4 weight must be 2-D (out_features, in_features), got shape {tuple(q.shape)}.")
    m, k = q.shape
    r_dim, o_dim = (m, k) if transposed else (k, m)
    if a.device != dev:
        raise ValueError(f"{who}: the input is on {a.device} but the NF4 weight is on {dev}; move them to one device.")
    if a.dtype not in _DTYPES:
        raise ValueError(f"{who}: input dtype {a.dtype} is not supported; use bfloat16, float16 or float32.")
    if a.dim() == 0 or a.shape[-1] != r_dim:
        name = "g (..., out_features)" if transposed else "x (..., in_features)"
        raise ValueError(
            f"{who}: {name} has shape {tuple(a.shape)}, but the weight is {m}x{k}; its last dim must be {r_dim}."
        )
    lead = a.shape[:-1]
    a2 = a.reshape(-1, r_dim)  # (N, R): a view when possible; strides are passed, no copy needed
    n = a2.shape[0]
    out = torch.empty((n, o_dim), dtype=a.dtype, device=dev)  # (N, O)
    if n == 0:
        return out.reshape(*lead, o_dim)
    block_n, block_o, block_r, split, warps, stages = config or _pick_config(
        n, o_dim, r_dim, transposed, q.blocksize, a.dtype
    )
    target = out.unsqueeze(0) if split == 1 else torch.empty((split, n, o_dim), dtype=torch.float32, device=dev)
    nf4, dyn = tables(dev)
    dq = q.double_quant
    grid = (triton.cdiv(n, block_n), triton.cdiv(o_dim, block_o), split)
    _nf4_matmul_kernel[grid](
        a2,
        q.packed,
        q.absmax,
        q.absmax2 if dq else q.absmax,
        q.offset if dq else q.absmax,
        nf4,
        dyn,
        target,
        n,
        m,
        k,
        k // 2,
        a2.stride(0),
        a2.stride(1),
        target.stride(0),
        target.stride(1),
        target.stride(2),
        BLOCKSIZE=q.blocksize,
        DOUBLE_QUANT=dq,
        TRANSPOSED=transposed,
        BLOCK_N=block_n,
        BLOCK_O=block_o,
        BLOCK_R=block_r,
        SPLIT_K=split,
        ALIGNED=aligned(q, block_o if transposed else block_r),
        DOT_PRECISION="ieee" if a.dtype == torch.float32 or interpreting() else "tf32",
        DOT_IN_F32=interpreting(),
        num_warps=warps,
        num_stages=stages,
    )
    if split > 1:
        out.copy_(target.sum(0))  # (SPLIT_K, N, O) float32 partials -> (N, O), rounded once
    return out.reshape(*lead, o_dim)


def nf4_matmul_triton(x: torch.Tensor, q: NF4Tensor, *, config=None) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., M) in x.dtype, W (M, K) NF4, without materializing W.

    config: optional (BLOCK_N, BLOCK_O, BLOCK_R, SPLIT_K, num_warps, num_stages) override (tests, bench).
    """
    return _launch(x, q, False, "nf4_matmul_triton", config)


def nf4_matmul_t_triton(g: torch.Tensor, q: NF4Tensor, *, config=None) -> torch.Tensor:
    """g (..., M) @ W -> (..., K) in g.dtype: the input gradient of y = x W^T."""
    return _launch(g, q, True, "nf4_matmul_t_triton", config)


def use_fused(x: torch.Tensor, q: NF4Tensor, transposed: bool = False) -> bool:
    """Whether the fused kernel should replace dequantize + cuBLAS for this call.

    Fused wins only when reading W dominates: at most FUSED_MAX_TOKENS tokens (rows of x); with
    16-bit activations (a float32 tl.dot without TF32 runs on FMA units: 16 per weight element at
    16 tokens, where reading the weight leaves time for about 5); and when W's rows are whole
    absmax blocks (the ALIGNED path, true of every real layer). Else dequantize-then-matmul.
    Shapes and dtypes only: which devices may run the kernel is kernels/dispatch.py's decision.
    """
    if x.device != q.packed.device or x.dtype not in _DTYPES[:2] or len(q.shape) != 2:
        return False
    if q.shape[1] % q.blocksize:
        return False
    r_dim = q.shape[0] if transposed else q.shape[1]
    if x.dim() == 0 or x.shape[-1] != r_dim or q.numel >= 2**31:
        return False
    return 0 < x.numel() // r_dim <= FUSED_MAX_TOKENS
