"""Blockwise 8-bit quantization of optimizer states (bitsandbytes' 8-bit blockwise Adam format).

A float32 vector x of n elements is cut into nb = ceil(n / 256) blocks of 256 (the last block may
be short). Each block b keeps its absolute maximum a_b = max_i |x_i| (float32) and one uint8 code
per element, an index into a sorted 256-entry table ``code`` (the dynamic map of
``minilora.quant.maps.dynamic_map``: signed for Adam's first moment m, unsigned for the second
moment v, which is never negative):

    quantize:    q_i = argmin_k | x_i / a_b - code[k] |      (approximately, see rounding below)
    dequantize:  x_i ~= code[q_i] * a_b                        (one float32 product)

A block whose absmax is 0 stores code 0 everywhere and dequantizes to code[0] * 0 = (-)0.

Rounding (matches bitsandbytes' CPU kernel bit for bit, checked by tests/test_blockwise8.py):
bitsandbytes does not search the table per element. It builds a 65536-entry lookup table over
the normalized range [-1, 1], lut[j] = #{midpoints (code[k] + code[k+1]) / 2 < -1 + 2j / 65535},
and quantizes with

    s = clamp(x * (1 / a_b), -1, 1);   j = trunc(((s + 1) * 0.5) * 65535 + 0.5);   q = lut[j]

all in float32. This is the nearest code except within about 1.5e-5 (one lookup bin) of a
midpoint; in particular a value tiny next to its block's absmax (|s| < 1.5e-5) lands on the code
nearest the bin centre, not on the code nearest to s. We reproduce the lookup exactly so that
states are interchangeable with ``bitsandbytes.functional.quantize_blockwise(blocksize=256)``.
Inputs are assumed finite (a NaN/inf state means the run has already diverged).
"""

from __future__ import annotations

import torch

from minilora.quant.maps import dynamic_map

BLOCK = 256  # elements per absmax block, as in bitsandbytes' 8-bit optimizers
_LUT_SIZE = 65536  # bins of bitsandbytes' CPU lookup table over [-1, 1]

_tables: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def state_code(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(code, lut) for the signed (first moment) or unsigned (second moment) dynamic map.

    code: float32 (256,), sorted. lut: uint8 (65536,), bin j -> number of midpoints below
    -1 + 2j / 65535, the code index bitsandbytes assigns to that bin. Cached per device.
    """
    device = torch.device(device)
    key = (signed, device)
    if key not in _tables:
        code = dynamic_map(signed=signed)
        mid = 0.5 * (code[:-1] + code[1:])  # (255,) float32, as bitsandbytes computes them
        j = torch.arange(_LUT_SIZE, dtype=torch.float32)
        centre = -1.0 + (2.0 * j) / (_LUT_SIZE - 1)  # float32, same operation order as bnb
        # searchsorted(side="left") counts the midpoints strictly below each bin centre
        lut = torch.searchsorted(mid, centre, side="left").to(torch.uint8)
        _tables[key] = (code.to(device), lut.to(device))
    return _tables[key]


def num_blocks(n: int) -> int:
    """Number of 256-element blocks for n elements (the last one may be short)."""
    return -(-n // BLOCK)


def _quantize_rows(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor) -> None:
    """x float32 (rows, L) -> codes uint8 (rows, L), absmax float32 (rows,); one block per row."""
    am = x.abs().amax(dim=1, keepdim=True)  # (rows, 1)
    absmax.copy_(am.view(-1))
    s = torch.mul(x, 1.0 / am).clamp_(-1.0, 1.0)  # (rows, L) in [-1, 1]; NaN rows where am == 0
    # bin position ((s + 1) * 0.5) * 65535 + 0.5 in float32; (s + 1) * 0.5 is exact, so scaling
    # by 32767.5 in one multiply rounds identically
    j = s.add_(1.0).mul_(0.5 * (_LUT_SIZE - 1)).add_(0.5).to(torch.int32)  # truncation (t >= 0.5)
    zero = am == 0  # (rows, 1): bitsandbytes writes code 0 for all-zero blocks
    j.masked_fill_(zero, 0)
    codes.copy_(lut[j])
    codes.masked_fill_(zero, 0)


def quantize_blockwise8_(x: torch.Tensor, codes_out: torch.Tensor, absmax_out: torch.Tensor, signed: bool) -> None:
    """Quantize float32 x (n,) into codes_out uint8 (n,) and absmax_out float32 (nb,), in place."""
    n = x.numel()
    nb = num_blocks(n)
    if codes_out.numel() != n or absmax_out.numel() != nb:
        raise ValueError(
            f"quantize_blockwise8_: expected codes ({n},) and absmax ({nb},), "
            f"got {tuple(codes_out.shape)} and {tuple(absmax_out.shape)}."
        )
    _, lut = state_code(signed, x.device)
    xf, cf = x.reshape(-1).float(), codes_out.view(-1)
    full = n // BLOCK  # whole blocks, then the short tail block (if any)
    if full:
        _quantize_rows(
            xf[: full * BLOCK].view(full, BLOCK), cf[: full * BLOCK].view(full, BLOCK), absmax_out[:full], lut
        )  # (full, 256)
    if full * BLOCK < n:
        _quantize_rows(xf[full * BLOCK :].view(1, -1), cf[full * BLOCK :].view(1, -1), absmax_out[full:], lut)


def quantize_blockwise8(x: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 x (any shape) -> (codes uint8 (n,), absmax float32 (nb,))."""
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n), dtype=torch.float32, device=x.device)
    quantize_blockwise8_(x, codes, absmax, signed)
    return codes, absmax


def dequantize_blockwise8(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """codes uint8 (n,), absmax float32 (nb,) -> float32 (n,): code[q_i] * a_b."""
    n = codes.numel()
    if absmax.numel() != num_blocks(n):
        raise ValueError(f"dequantize_blockwise8: {n} codes need {num_blocks(n)} absmax values, got {absmax.numel()}.")
    code, _ = state_code(signed, codes.device)
    out = code[codes.reshape(-1).long()]  # (n,) float32 table values
    full = (n // BLOCK) * BLOCK
    if full:
        out[:full].view(-1, BLOCK).mul_(absmax[: full // BLOCK].unsqueeze(1))  # (nb_full, 256)
    if full < n:
        out[full:].mul_(absmax[-1])
    return out
