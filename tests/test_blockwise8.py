"""Blockwise 8-bit state quantization against bitsandbytes (the oracle) and a float64 nearest-code
reference. Shapes: n elements, blocks of 256."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.quant.blockwise8 import BLOCK, dequantize_blockwise8, num_blocks, quantize_blockwise8
from minilora.quant.maps import dynamic_map


@st.composite
def state_vectors(draw):
    """A float32 vector with blocks of very different magnitudes, zero blocks, ties and edges."""
    n = draw(st.integers(1, 5 * BLOCK + 37))
    seed = draw(st.integers(0, 2**31 - 1))
    signed = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    # per-element magnitudes from 1e-12 to 1e3: tiny values next to a big block absmax
    x *= 10.0 ** torch.randint(-12, 4, (n,), generator=g).float()
    kind = draw(st.sampled_from(["plain", "zero_block", "constant", "code_points", "midpoints"]))
    code = dynamic_map(signed)
    if kind == "zero_block":
        b = draw(st.integers(0, num_blocks(n) - 1))
        x[b * BLOCK : (b + 1) * BLOCK] = 0.0
    elif kind == "constant":
        x[:] = draw(st.floats(-1e3, 1e3, allow_nan=False, width=32))
    elif kind == "code_points":  # values exactly on table entries, block absmax 1
        x = code[torch.randint(0, 256, (n,), generator=g)].clone()
        x[0] = 1.0
    elif kind == "midpoints":  # exact midpoints between neighbouring entries (rounding ties)
        mid = 0.5 * (code[:-1] + code[1:])
        x = mid[torch.randint(0, 255, (n,), generator=g)].clone()
        x[0] = 1.0
    if not signed:
        x = x.abs()
    return x.float(), signed


@given(state_vectors())
def test_codes_and_absmax_bit_identical_to_bitsandbytes(case):
    x, signed = case
    codes, absmax = quantize_blockwise8(x, signed)
    ref_codes, ref_state = bnbF.quantize_blockwise(x, code=dynamic_map(signed), blocksize=BLOCK)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes, ref_codes.reshape(-1))
    # dequantization: the same float32 product code[q] * absmax as bitsandbytes
    ours = dequantize_blockwise8(codes, absmax, signed)
    theirs = bnbF.dequantize_blockwise(ref_codes, ref_state).reshape(-1)
    assert torch.equal(ours, theirs)


@given(state_vectors())
def test_codes_are_nearest_up_to_one_lookup_bin(case):
    """Against a float64 nearest-table-entry search: the chosen entry is at most one lookup bin
    (2 / 65535 of the normalized range) farther from x / absmax than the nearest entry."""
    x, signed = case
    codes, absmax = quantize_blockwise8(x, signed)
    code = dynamic_map(signed).double()
    a = absmax.double().repeat_interleave(BLOCK)[: x.numel()]
    s = torch.where(a > 0, x.double() / a, torch.zeros_like(a))  # (n,) in [-1, 1]
    nearest = (s[:, None] - code[None, :]).abs().min(dim=1).values  # (n,)
    chosen = (s - code[codes.long()]).abs()
    zero = a == 0
    assert torch.all(chosen[~zero] <= nearest[~zero] + 2.0 / 65535 + 1e-7)
    assert torch.all(codes[zero] == 0)


def test_zero_vector_roundtrips_to_zero_and_shapes_are_checked():
    codes, absmax = quantize_blockwise8(torch.zeros(300), signed=True)
    assert torch.all(codes == 0) and torch.all(absmax == 0)
    assert torch.all(dequantize_blockwise8(codes, absmax, True) == 0)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise8(codes, absmax[:1], True)
