"""Triton kernels: the LoRA term of a batch whose tokens use different adapters (shrink and expand).

Letters: N tokens (rows of x), K in_features, M out_features, L adapter slots, R the padded rank,
S segments. Every adapter is zero-padded to rank R (exact: minilora/lora/mixed_term.py's docstring), so
the adapters stack into A_pad (L, R, K) and B_pad (L, M, R) with scales s (L,). Or they stack without
padding (Blocks: minilora/lora/mixed_term.py's stacks, read in place): adapter a owns rank rows first[a]
.. first[a] + rank[a] - 1 of A (Σ, K) and of B^T (Σ, M), and every load masks at rank[a], which computes
what the zero padding computes. Token n uses adapter a = idx[n]; a = -1 contributes nothing (nor does an
all-zero slot, whose products are exact zeros):

    shrink   h[n] = A_pad[a] x[n]                 x (N, K) -> h (N, R)    reduce over K
    expand   y[n] = y[n] + s[a] (B_pad[a] h[n])   h (N, R) -> y (N, M)    reduce over R

This is the BGMV of Punica, S-LoRA and vLLM. Both products are float32, as LoRALinear and PEFT
compute the LoRA term: x (float32, bf16 or fp16) is widened to float32 exactly in registers, the
weights are float32 and tl.dot runs with input_precision="ieee" (no TF32, whose 10-bit mantissa
would move h by ~1e-3 relative: far more than the reference's float32 rounding). Each element is
then one float32 dot product, of length K (shrink) or R (expand); kernel and reference differ only in
the order of its additions, so each is within gamma_K = K u / (1 - K u) (u = 2^-24) of the exact
value relative to sum_k |A[a, r, k]| |x[n, k]|, and they differ by at most twice that; the
expand adds gamma_R relative to |s| |B| |h| and one rounding of s times the dot and one of the add
to y (tests/test_lora_bgmv.py and dispatch.py's self-check use exactly these bounds).

Segments (SGMV, for prefill). Consecutive tokens with one adapter form a segment: in a mixed batch
every token of a row shares the row's adapter, so a prefill of B rows of T tokens is B segments of T
tokens (fewer when neighbouring rows share an adapter). The launcher finds them with
unique_consecutive over idx and drops the -1 segments (their h rows stay 0, their y rows untouched).
A program owns one segment's tokens in blocks of BLOCK_N and one tile of outputs:

    shrink   grid (S, cdiv(max segment, BLOCK_N), cdiv(R, BLOCK_R) * SPLIT_K)
             for k0 in its K range, step BLOCK_K:  acc (BLOCK_N, BLOCK_R) += x tile (BLOCK_N, BLOCK_K)
                                                    @ A_pad[a] tile^T (BLOCK_K, BLOCK_R)
    expand   grid (S, cdiv(max segment, BLOCK_N), cdiv(M, BLOCK_M))
             for r0 in 0..R, step BLOCK_R:           acc (BLOCK_N, BLOCK_M) += h tile (BLOCK_N, BLOCK_R)
                                                    @ B_pad[a] tile^T (BLOCK_R, BLOCK_M)

so each adapter tile is loaded once per BLOCK_N tokens of a segment (once per segment for segments
up to BLOCK_N tokens), instead of once per token as the per-token BGMV does; a decoding batch is
segments of one token (or runs of rows that share an adapter), where the per-token and segmented
forms read the same bytes. Programs past the end of a shorter segment return at once. tl.dot needs
16 or more along each side: the token and rank tiles are at least 16 and masked, which costs nothing
where the kernel is bound by reading the weights (decoding) and little where segments are long.

Shrink reduces over the long K with few outputs (R), so at few tokens a GPU would have a handful of
programs: SPLIT_K programs share one output tile's K range and write float32 partials
(SPLIT_K, N, R) that are summed afterwards (deterministic, unlike atomics). Expand reduces over R
only, and has M / BLOCK_M output tiles per segment: no split.

Finding the segments needs the number of segments and the longest one on the host (one sync per
call); `segments(idx)` computes them once, and the launchers accept them, so shrink and expand of one
call (or every layer of a step, as vLLM does) share one sync.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import interpreting

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# PyTorch references: the per-token gather of minilora/lora/mixed_term.py's mixed_gathered
# ---------------------------------------------------------------------------------------------


def lora_shrink_reference(x: torch.Tensor, A_pad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h[n] = A_pad[idx[n]] x[n] in float32, 0 where idx[n] < 0: x (N, K), A_pad (L, R, K) -> (N, R)."""
    keep = idx >= 0  # (N,)
    h = torch.zeros(x.shape[0], A_pad.shape[1], dtype=torch.float32, device=x.device)  # (N, R)
    A = A_pad[idx[keep]].float()  # (n, R, K): each kept token's adapter
    h[keep] = torch.bmm(A, x[keep].float()[:, :, None])[:, :, 0]  # (n, R, K) @ (n, K, 1) -> (n, R)
    return h


def lora_expand_reference(
    y: torch.Tensor, h: torch.Tensor, B_pad: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """y[n] + s[idx[n]] B_pad[idx[n]] h[n] in float32 (a new tensor), y[n] where idx[n] < 0:
    y (N, M), h (N, R), B_pad (L, M, R), scale (L,) -> (N, M)."""
    keep = idx >= 0  # (N,)
    a = idx[keep]
    out = y.float().clone()  # (N, M)
    Bh = torch.bmm(B_pad[a].float(), h[keep].float()[:, :, None])[:, :, 0]  # (n, M, R) @ (n, R, 1) -> (n, M)
    out[keep] += scale[a].float()[:, None] * Bh
    return out


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (N, K) input rows: float32, bf16 or fp16
    a_ptr,  # float32 A: adapter a's rank rows are first[a] .. first[a] + rank[a] - 1 (padded: first = a R)
    h_ptr,  # (SPLIT_K, N, R) float32: h, or its partial sums when SPLIT_K > 1
    seg_start_ptr,  # (S,) int32 first token of each segment
    seg_len_ptr,  # (S,) int32 tokens in each segment
    seg_adapter_ptr,  # (S,) int32 adapter of each segment; -1: skipped (segments() drops the base's runs)
    a_first_ptr,  # (L,) int64 each adapter's first rank row in A
    rank_ptr,  # (L,) int32 each adapter's rank (rows of h past it stay 0)
    K,  # in_features
    R,  # h's width: the largest rank
    stride_xn,
    stride_xk,  # strides of x over (token, k)
    stride_ar,
    stride_ak,  # strides of A over (rank row, k)
    stride_hs,
    stride_hn,
    stride_hr,  # strides of h over (split, token, rank)
    BLOCK_N: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_R: tl.constexpr,  # ranks per tile (>= 16 for tl.dot)
    BLOCK_K: tl.constexpr,  # reduction step (>= 16)
    SPLIT_K: tl.constexpr,  # programs sharing one output tile's K range
):
    pid_s = tl.program_id(axis=0)  # segment
    pid_t = tl.program_id(axis=1)  # block of BLOCK_N tokens within the segment
    pid_rk = tl.program_id(axis=2)  # rank tile and K split
    seg_len = tl.load(seg_len_ptr + pid_s)
    if pid_t * BLOCK_N >= seg_len:  # the grid covers the longest segment; this one is shorter
        return
    adapter = tl.load(seg_adapter_ptr + pid_s).to(tl.int64)  # int64: L R K may pass 2^31
    if adapter < 0:  # an adapter the caller has no weights for here: its h rows stay 0
        return
    rank = tl.load(rank_ptr + adapter)
    pid_r = pid_rk // SPLIT_K
    pid_k = pid_rk % SPLIT_K
    if pid_r * BLOCK_R >= rank:  # a rank tile past this adapter's rank: its h stays 0
        return
    start = tl.load(seg_start_ptr + pid_s).to(tl.int64)

    offs_t = pid_t * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token offsets within the segment
    offs_n = start + offs_t  # (BLOCK_N,) token rows of x
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # a multiple of BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + offs_n[:, None] * stride_xn  # (BLOCK_N, 1)
    first = tl.load(a_first_ptr + adapter)
    a_cols = a_ptr + (first + offs_r[None, :]) * stride_ar  # (1, BLOCK_R): adapter a's A rows as columns

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_in = offs_k < k_end
        x_mask = (offs_t[:, None] < seg_len) & k_in[None, :]
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
        a_mask = k_in[:, None] & (offs_r[None, :] < rank)
        a = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=a_mask, other=0.0)  # (BLOCK_K, BLOCK_R) = A[a]^T
        # Widening a 16-bit x to float32 is exact; "ieee": true float32 products, never TF32.
        acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")

    out_mask = (offs_t[:, None] < seg_len) & (offs_r[None, :] < R)
    out = h_ptr + pid_k * stride_hs + offs_n[:, None] * stride_hn + offs_r[None, :] * stride_hr
    tl.store(out, acc, mask=out_mask)


@triton.jit
def _lora_expand_kernel(
    h_ptr,  # (N, R) float32 shrink output
    b_ptr,  # float32 B: adapter a's B[:, j] for j < rank[a] at rank row first[a] + j (padded: first = a M R)
    s_ptr,  # (L,) float32 scale of each adapter
    y_ptr,  # (N, M) float32, updated in place: y += s B h
    seg_start_ptr,  # (S,) int32 first token of each segment
    seg_len_ptr,  # (S,) int32 tokens in each segment
    seg_adapter_ptr,  # (S,) int32 adapter of each segment; -1: skipped
    b_first_ptr,  # (L,) int64 each adapter's first rank row in B
    rank_ptr,  # (L,) int32 each adapter's rank
    M,  # out_features
    R,  # h's width: the largest rank
    stride_hn,
    stride_hr,  # strides of h over (token, rank)
    stride_bm,
    stride_br,  # strides of B over (output, rank row)
    stride_yn,
    stride_ym,  # strides of y over (token, output)
    BLOCK_N: tl.constexpr,  # tokens per tile (>= 16 for tl.dot)
    BLOCK_M: tl.constexpr,  # outputs per tile (>= 16)
    BLOCK_R: tl.constexpr,  # reduction step over the rank (>= 16)
):
    pid_s = tl.program_id(axis=0)  # segment
    pid_t = tl.program_id(axis=1)  # block of BLOCK_N tokens within the segment
    pid_m = tl.program_id(axis=2)  # output tile
    seg_len = tl.load(seg_len_ptr + pid_s)
    if pid_t * BLOCK_N >= seg_len:  # the grid covers the longest segment; this one is shorter
        return
    adapter = tl.load(seg_adapter_ptr + pid_s).to(tl.int64)
    if adapter < 0:  # an adapter the caller has no weights for here: its y rows untouched
        return
    start = tl.load(seg_start_ptr + pid_s).to(tl.int64)
    rank = tl.load(rank_ptr + adapter)

    offs_t = pid_t * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token offsets within the segment
    offs_n = start + offs_t  # (BLOCK_N,) token rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    t_in = offs_t < seg_len
    m_in = offs_m < M
    first = tl.load(b_first_ptr + adapter)
    b_cols = b_ptr + first * stride_br + offs_m[None, :] * stride_bm  # (1, BLOCK_M): adapter a's B rows as columns

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        r_in = offs_r < rank
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_hn + offs_r[None, :] * stride_hr,
            mask=t_in[:, None] & r_in[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_R)
        b = tl.load(
            b_cols + offs_r[:, None] * stride_br, mask=r_in[:, None] & m_in[None, :], other=0.0
        )  # (BLOCK_R, BLOCK_M) = B[a]^T
        acc = tl.dot(h.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

    s = tl.load(s_ptr + adapter)
    y_mask = t_in[:, None] & m_in[None, :]
    y_ptrs = y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)  # (BLOCK_N, BLOCK_M)
    tl.store(y_ptrs, y + s * acc, mask=y_mask)  # the scale after the dot, as single_delta


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


class Segments(NamedTuple):
    """Runs of consecutive tokens with one adapter, the base's (-1) runs left out. A caller may renumber
    the adapters (minilora/lora/mixed_term.py maps the model's numbering to one layer's stacks) and mark some
    -1: the kernels skip those segments, as they skip the base's."""

    start: torch.Tensor  # (S,) int32 first token
    length: torch.Tensor  # (S,) int32 tokens
    adapter: torch.Tensor  # (S,) int32 adapter index; -1: skipped
    longest: int  # max(length), 0 when S = 0: the grid's token axis


def segments(idx: torch.Tensor) -> Segments:
    """The segments of a per-token adapter index idx (N,) (one host sync: the grid needs S and the longest)."""
    if idx.dim() != 1:
        raise ValueError(f"lora_bgmv: idx must be one adapter index per token, shape (N,), got {tuple(idx.shape)}.")
    adapter, length = torch.unique_consecutive(idx, return_counts=True)  # (S',), (S',)
    start = torch.cumsum(length, 0) - length
    keep = adapter >= 0  # the base contributes nothing: no program at all
    length = length[keep]
    longest = int(length.max()) if length.numel() else 0
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return Segments(as32(start[keep]), as32(length), as32(adapter[keep]), longest)


def _pick_config(longest: int, k: int, r: int, n_seg: int, interpret: bool | None = None):
    """(BLOCK_N, BLOCK_R, BLOCK_K or BLOCK_M, SPLIT_K, num_warps) by shape.

    Ranks and tokens at least 16 (tl.dot), ranks up to 64 in one tile (every LoRA rank in common use).
    The interpreter gets 16-wide tiles: its cost grows with tile area. Not tuned on a GPU yet: float32
    tiles of 16-32 tokens x 64 keep a float32 tl.dot (FMA units) in registers; the split aims for about
    two shrink programs per SM of an H100 (132 SMs), as in kernels/nf4_matmul.py.
    """
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    if interpreting() if interpret is None else interpret:
        return 16, block_r, 16, 1, 4
    block_n = 16 if longest <= 16 else 32
    block_k = 64
    tiles = n_seg * triton.cdiv(longest, block_n) * triton.cdiv(r, block_r)
    split = 1
    while tiles * split < 264 and k // (split * 2) >= 4 * block_k:
        split *= 2
    return block_n, block_r, block_k, split, 4


def _check(who: str, **tensors: torch.Tensor) -> torch.device:
    """One device for all, CUDA unless interpreting, and float dtypes where floats are expected."""
    devs = {t.device for t in tensors.values()}
    if len(devs) != 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"{who}: the tensors are on different devices ({where}); move them to one device.")
    dev = devs.pop()
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{who}: the tensors are on {dev}; the Triton kernel needs CUDA tensors "
            "(use the PyTorch reference, or minilora.lora.multi, which falls back to it)."
        )
    for name, t in tensors.items():
        if name == "idx":
            if t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{who}: idx has dtype {t.dtype}; pass integer adapter indices (int32 or int64).")
        elif name in _BLOCKS_DTYPES:
            if t.dtype != _BLOCKS_DTYPES[name]:
                raise ValueError(f"{who}: blocks.{name} has dtype {t.dtype}; it must be {_BLOCKS_DTYPES[name]}.")
        elif t.dtype not in (_X_DTYPES if name == "x" else (torch.float32,)):
            want = "float32, bfloat16 or float16" if name == "x" else "float32"
            raise ValueError(f"{who}: {name} has dtype {t.dtype}; it must be {want}.")
    return dev


def _check_idx(who: str, idx: torch.Tensor, n: int, n_adapters: int) -> None:
    if idx.shape != (n,):
        raise ValueError(f"{who}: idx has shape {tuple(idx.shape)}; pass one adapter index per token, shape ({n},).")
    if n and (int(idx.min()) < -1 or int(idx.max()) >= n_adapters):
        raise ValueError(
            f"{who}: idx holds values outside -1..{n_adapters - 1}; index the {n_adapters} adapter slots, "
            "or -1 for none."
        )


_BLOCKS_DTYPES = {"first": torch.int64, "rank": torch.int32}


def _block_tensors(blocks) -> dict[str, torch.Tensor]:
    """A Blocks' tensors by name, for _check (none for a padded stack)."""
    return {"first": blocks.first, "rank": blocks.rank} if blocks is not None else {}


class Blocks(NamedTuple):
    """Adapters stacked along the rank without padding (minilora/lora/mixed_term.py's stacks): adapter a
    owns rank rows first[a] .. first[a] + rank[a] - 1 of A (Σ, K) and of B^T (Σ, M)."""

    first: torch.Tensor  # (L,) int64
    rank: torch.Tensor  # (L,) int32
    R: int  # the largest rank: h's width


@functools.lru_cache(maxsize=64)
def _padded_blocks(L: int, R: int, rows_per_adapter: int, device: torch.device) -> Blocks:
    """A padded stack as Blocks: adapter a's rank rows start at a * rows_per_adapter (its stride over
    adapters in units of its rank stride), all of rank R (the padding is zeros)."""
    first = torch.arange(L, dtype=torch.int64, device=device) * rows_per_adapter
    return Blocks(first, torch.full((L,), R, dtype=torch.int32, device=device), R)


def _rank_layout(W: torch.Tensor, blocks: Blocks | None, rank_dim: int, other_dim: int):
    """(W, its Blocks, the stride of one rank row, the stride along the other dimension) for a padded W,
    A (L, R, K) or B (L, M, R) with blocks None, or for a stack W (Σ, K) / (Σ, M) and its Blocks."""
    if blocks is not None:
        return W, blocks, W.stride(0), W.stride(1)
    if W.stride(rank_dim) == 0 or W.stride(0) % W.stride(rank_dim):
        W = W.contiguous()  # an adapter's stride must be a whole number of rank rows
    rows = W.stride(0) // W.stride(rank_dim)
    return W, _padded_blocks(W.shape[0], W.shape[rank_dim], rows, W.device), W.stride(rank_dim), W.stride(other_dim)


def lora_shrink_triton(
    x: torch.Tensor,
    A_pad: torch.Tensor,
    idx: torch.Tensor,
    *,
    segs: Segments | None = None,
    config=None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """h = A_pad[idx[n]] x[n] per token, float32 (N, R); 0 where idx[n] < 0. x (N, K), A_pad (L, R, K), or
    with `blocks` the adapters' A stacked without padding, (Σ, K).

    segs: segments(idx), when the caller already has them; config: (BLOCK_N, BLOCK_R, BLOCK_K,
    SPLIT_K, num_warps) override (tests, bench).
    """
    who = "lora_shrink_triton"
    dev = _check(who, x=x, A_pad=A_pad, idx=idx, **_block_tensors(blocks))
    want = "(Σ, K) with blocks" if blocks else "(L, R, K)"
    if x.dim() != 2 or A_pad.dim() != (2 if blocks else 3) or A_pad.shape[-1] != x.shape[1]:
        raise ValueError(
            f"{who}: x {tuple(x.shape)} and A_pad {tuple(A_pad.shape)} must be (N, K) and {want} with one K."
        )
    n, k = x.shape
    A, blocks, stride_ar, stride_ak = _rank_layout(A_pad, blocks, rank_dim=1, other_dim=2)
    n_adapters, r = blocks.first.shape[0], blocks.R
    if segs is None:
        _check_idx(who, idx, n, n_adapters)
        segs = segments(idx)
    h = torch.zeros(n, r, dtype=torch.float32, device=dev)  # (N, R): base tokens stay 0
    if segs.longest == 0 or r == 0 or k == 0:
        return h
    n_seg = segs.start.numel()
    block_n, block_r, block_k, split, warps = config or _pick_config(segs.longest, k, r, n_seg)
    target = h.unsqueeze(0) if split == 1 else torch.zeros(split, n, r, dtype=torch.float32, device=dev)
    grid = (n_seg, triton.cdiv(segs.longest, block_n), triton.cdiv(r, block_r) * split)
    _lora_shrink_kernel[grid](
        x,
        A,
        target,
        segs.start,
        segs.length,
        segs.adapter,
        blocks.first,
        blocks.rank,
        k,
        r,
        x.stride(0),
        x.stride(1),
        stride_ar,
        stride_ak,
        target.stride(0),
        target.stride(1),
        target.stride(2),
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=warps,
    )
    if split > 1:
        torch.sum(target, 0, out=h)  # (SPLIT_K, N, R) float32 partials -> (N, R)
    return h


def lora_expand_triton(
    y: torch.Tensor,
    h: torch.Tensor,
    B_pad: torch.Tensor,
    scale: torch.Tensor,
    idx: torch.Tensor,
    *,
    segs: Segments | None = None,
    config=None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """y[n] += scale[idx[n]] B_pad[idx[n]] h[n] in place, float32; rows with idx[n] < 0 unchanged.
    y (N, M), h (N, R), B_pad (L, M, R), or with `blocks` the adapters' B^T stacked without padding,
    (Σ, M); scale (L,). Returns y.

    config: (BLOCK_N, BLOCK_R, BLOCK_M, _, num_warps) override (the shrink's tuple; the split is unused).
    """
    who = "lora_expand_triton"
    _check(who, y=y, h=h, B_pad=B_pad, scale=scale, idx=idx, **_block_tensors(blocks))
    want = "(Σ, M) with blocks" if blocks else "(L, M, R)"
    if y.dim() != 2 or h.dim() != 2 or B_pad.dim() != (2 if blocks else 3) or scale.dim() != 1:
        raise ValueError(f"{who}: y, h, B_pad and scale must be (N, M), (N, R), {want} and (L,).")
    n, m = y.shape
    B, blocks, stride_br, stride_bm = _rank_layout(B_pad, blocks, rank_dim=2, other_dim=1)
    n_adapters, r = blocks.first.shape[0], blocks.R
    if h.shape != (n, r) or B_pad.shape[1] != m or scale.shape[0] != n_adapters:
        raise ValueError(
            f"{who}: shapes y {tuple(y.shape)}, h {tuple(h.shape)}, B_pad {tuple(B_pad.shape)}, "
            f"scale {tuple(scale.shape)} do not fit (N, M), (N, R), {want}, (L,)."
        )
    if segs is None:
        _check_idx(who, idx, n, n_adapters)
        segs = segments(idx)
    if segs.longest == 0 or m == 0:
        return y
    block_n, block_r, block_m, _, warps = config or _pick_config(segs.longest, m, r, segs.start.numel())
    grid = (segs.start.numel(), triton.cdiv(segs.longest, block_n), triton.cdiv(m, block_m))
    _lora_expand_kernel[grid](
        h,
        B,
        scale,
        y,
        segs.start,
        segs.length,
        segs.adapter,
        blocks.first,
        blocks.rank,
        m,
        r,
        h.stride(0),
        h.stride(1),
        stride_bm,
        stride_br,
        y.stride(0),
        y.stride(1),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        num_warps=warps,
    )
    return y
