"""Triton kernel: NF4 (optionally double quantized) -> bf16 / fp16 / fp32 in one pass.

Letters: n weight elements, nb = ceil(n / BLOCKSIZE) absmax blocks, nb2 = ceil(nb / 256)
second-level blocks. The math is minilora/quant/nf4.py's (the PyTorch reference
`dequantize_nf4_reference`, bit-exact with bitsandbytes):

    absmax_b = DYN[acode_b] * absmax2[b // 256] + offset      (double quant; else stored float32)
    w_i      = NF4[code_i] * absmax_{i // BLOCKSIZE}            (float32, cast once to the output)

One launch reads each packed byte once and writes each output once. The float32 absmax is
decoded inside the kernel from its 8-bit code (no intermediate absmax tensor in global memory,
no second launch). The 16-entry NF4 table is loaded once per program and looked up with tl.gather
(a conflict-free shared-memory read per element); the 256-entry dynamic map, read once per absmax
block, is gathered from global memory and stays in L1.

Each program handles BLOCK_SIZE packed bytes = 2 * BLOCK_SIZE outputs, as a (BLOCK_SIZE / VEC, VEC)
tile: a thread owns whole rows, so it loads VEC bytes in one instruction and, after splitting each
byte into its two codes, stores 2 * VEC contiguous outputs in one 16-byte instruction (VEC = 4 for
bf16/fp16, 2 for fp32). A row's 2 * VEC <= 8 elements never straddle an absmax block (BLOCKSIZE >=
32, a power of two), so the absmax is decoded once per row. `python -m bench.kernel_resources`
compiles this for sm_90a and shows it: 32-bit packed loads, 16-byte stores, no shared memory, no
spills.
The kernel is launched with enable_fp_fusion=False so `DYN * absmax2 + offset` rounds twice, like
the reference and bitsandbytes, instead of becoming one FMA: float32 outputs are then bit-exact.

The decoding helpers (`absmax_f32`, `nf4_table`, `nf4_lookup`) live in kernels/common.py, shared
with the fused matmul (kernels/nf4_matmul.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minilora.quant.nf4 import SUPPORTED_DTYPES, NF4Tensor

from .common import absmax_f32, check_nf4, nf4_lookup, nf4_table, tables

DEFAULT_BLOCK_SIZE = 1024  # packed bytes per program: 2048 outputs, 8 bytes per thread at 4 warps
DEFAULT_NUM_WARPS = 4


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # *uint8 (ceil(n/2),): two codes per byte, first in the high nibble
    absmax_ptr,  # *uint8 (nb,) absmax codes if DOUBLE_QUANT, else *float32 (nb,)
    absmax2_ptr,  # *float32 (nb2,) second-level absmax (unused if not DOUBLE_QUANT)
    offset_ptr,  # *float32 () offset added back to the absmax (same)
    nf4_ptr,  # *float32 (16,) NF4 table
    dyn_ptr,  # *float32 (256,) signed dynamic map (unused if not DOUBLE_QUANT)
    out_ptr,  # *bf16 | *fp16 | *fp32 (n,) output, contiguous
    n_elements,  # n: number of weights (odd n: the last low nibble is padding)
    n_bytes,  # ceil(n / 2): number of packed bytes
    BLOCKSIZE: tl.constexpr,  # elements per absmax block (power of two, 32..4096)
    DOUBLE_QUANT: tl.constexpr,  # absmax is 8-bit codes + absmax2 + offset
    BLOCK_SIZE: tl.constexpr,  # packed bytes per program (power of two)
    VEC: tl.constexpr,  # packed bytes per row: 8 // output element size (16-byte stores)
):
    pid = tl.program_id(axis=0).to(tl.int64)  # int64: 2 * BLOCK_SIZE * pid may pass 2^31
    ROWS: tl.constexpr = BLOCK_SIZE // VEC
    row = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) global row index: bytes VEC*row .. VEC*row+VEC-1
    offs_byte = row[:, None] * VEC + tl.arange(0, VEC)[None, :]  # (ROWS, VEC)
    byte = tl.load(packed_ptr + offs_byte, mask=offs_byte < n_bytes, other=0).to(tl.int32)  # (ROWS, VEC)

    # A row's 2 * VEC elements share one absmax block: decode it once per row.
    blk = (row * VEC // (BLOCKSIZE // 2)).to(tl.int32)  # (ROWS,)
    absmax = absmax_f32(blk, row * VEC < n_bytes, absmax_ptr, absmax2_ptr, offset_ptr, dyn_ptr, DOUBLE_QUANT)
    nf4 = nf4_table(nf4_ptr)  # (16,)
    hi = nf4_lookup(nf4, byte >> 4) * absmax[:, None]  # (ROWS, VEC) elements 2j, float32
    lo = nf4_lookup(nf4, byte & 15) * absmax[:, None]  # (ROWS, VEC) elements 2j+1

    # Interleave to (hi0, lo0, hi1, lo1, ...) inside each thread's row: one contiguous store.
    vals = tl.reshape(tl.join(hi, lo), (ROWS, 2 * VEC))  # (ROWS, 2 * VEC)
    offs_out = row[:, None] * (2 * VEC) + tl.arange(0, 2 * VEC)[None, :]  # (ROWS, 2 * VEC)
    tl.store(out_ptr + offs_out, vals.to(out_ptr.dtype.element_ty), mask=offs_out < n_elements)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def vec_bytes(dtype: torch.dtype) -> int:
    """Packed bytes per thread row: each byte gives two outputs, so 8 // size bytes fill a 16-byte store."""
    return 8 // dtype.itemsize


def dequantize_nf4_triton(
    q: NF4Tensor, dtype: torch.dtype | None = None, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """Dequantize `q` to `dtype` (default: q.dtype) with one Triton launch; returns shape q.shape."""
    dtype = q.dtype if dtype is None else dtype
    dev = check_nf4(q, "dequantize_nf4_triton")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dequantize_nf4_triton: output dtype {dtype} is not supported; use float32, bfloat16 or float16."
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"dequantize_nf4_triton: block_size {block_size} must be a power of two >= 16.")
    n = q.numel
    out = torch.empty(q.shape, dtype=dtype, device=dev)
    nf4, dyn = tables(dev)
    dq = q.double_quant
    n_bytes = (n + 1) // 2
    grid = (triton.cdiv(n_bytes, block_size),)
    _nf4_dequant_kernel[grid](
        q.packed,
        q.absmax,
        q.absmax2 if dq else q.absmax,  # placeholders are never read when not DOUBLE_QUANT
        q.offset if dq else q.absmax,
        nf4,
        dyn,
        out,
        n,
        n_bytes,
        BLOCKSIZE=q.blocksize,
        DOUBLE_QUANT=dq,
        BLOCK_SIZE=block_size,
        VEC=vec_bytes(dtype),
        enable_fp_fusion=False,  # round DYN * absmax2 and + offset separately, as the reference
        num_warps=DEFAULT_NUM_WARPS,
    )
    return out
