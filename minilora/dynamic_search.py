"""8-bit blockwise quantization to the dynamic map, exactly as bitsandbytes' CPU kernel does it.

Double quantization stores each block of 256 centred absmax values c as 8-bit codes. The true
nearest map entry is not what bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, `quantize_cpu`) stores:
it trades accuracy near zero for speed with a 65536-bin lookup table over [-1, 1]:

    lut[i]  = #{ k : mid_k < v_i },   v_i = -1 + 2 i / 65535,   mid_k = (map[k] + map[k+1]) / 2
    normed  = c * (1 / absmax_block)                   (multiply by the float32 reciprocal)
    bin     = trunc((clamp(normed, -1, 1) + 1) * 0.5 * 65535 + 0.5)
    code    = lut[bin]                                 (an all-zero block stores code 0)

The bins are 3.05e-5 wide while the map's smallest entries are 1e-7 apart, so every |normed| below
about 1.5e-5 lands on +-2.125e-5 rather than on the map's exact 0. The codes are part of the
on-disk format (bitsandbytes dequantizes them with its own map), so minilora reproduces this
table step by step in float32 rather than taking the true nearest entry.
"""

from __future__ import annotations

import numpy as np
import torch

f32 = np.float32
LUT_SIZE = 65536


def build_lut(code: torch.Tensor) -> np.ndarray:
    """(65536,) uint8: for each bin centre v_i, the number of map midpoints strictly below it."""
    c = code.detach().cpu().numpy().astype(f32)
    mid = (f32(0.5) * (c[:-1] + c[1:])).astype(f32)  # (255,)
    i = np.arange(LUT_SIZE, dtype=f32)
    v = (f32(-1.0) + (f32(2.0) * i) / f32(LUT_SIZE - 1)).astype(f32)  # (65536,) float32 steps
    return np.searchsorted(mid, v, side="left").astype(np.uint8)  # mid < v  <=>  left insertion


def lut_bins(normed: np.ndarray) -> np.ndarray:
    """float32 normed values -> bin index, with the multiply-add fused as the compiled C++ does
    (one rounding of a * 65535 + 0.5, then truncation to an integer)."""
    a = ((np.clip(normed, f32(-1), f32(1)) + f32(1)) * f32(0.5)).astype(f32)
    fused = (a.astype(np.float64) * 65535.0 + 0.5).astype(f32)  # fma: single rounding to float32
    return fused.astype(np.int64)


_LUTS: dict[bool, np.ndarray] = {}


def quantize_blockwise_bnb(x: torch.Tensor, code: torch.Tensor, blocksize: int, signed: bool = True):
    """float32 x (m,) -> (uint8 codes (m,), float32 absmax (ceil(m / blocksize),)), bit-exact
    with `bitsandbytes.functional.quantize_blockwise` on the CPU for the given dynamic map."""
    if signed not in _LUTS:
        _LUTS[signed] = build_lut(code)
    lut = _LUTS[signed]
    m = x.numel()
    nb = -(-m // blocksize)
    xp = torch.nn.functional.pad(x.float(), (0, nb * blocksize - m)).view(nb, blocksize)  # (nb, bs)
    absmax = xp.abs().amax(dim=1)  # (nb,)
    inv = 1.0 / absmax  # (nb,) float32 reciprocal, inf for an all-zero block
    normed = torch.nan_to_num((xp * inv.unsqueeze(1)).reshape(-1)[:m], nan=0.0)  # (m,); 0*inf -> 0
    bins = lut_bins(normed.cpu().numpy().astype(f32))
    codes = lut[np.clip(bins, 0, LUT_SIZE - 1)]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:m].cpu().numpy()
    codes = np.where(zero_block, np.uint8(0), codes)
    return torch.from_numpy(codes).to(x.device), absmax
