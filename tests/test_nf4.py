"""NF4 + double quantization against bitsandbytes, the oracle, bit for bit.

bitsandbytes.functional.quantize_4bit / dequantize_4bit run on the CPU; every drawn case
compares packed bytes, absmax (or its 8-bit codes), second-level absmax, offset and the
dequantized values for exact equality. bitsandbytes 0.50's CPU dequantize_4bit misplaces the
absmax of some 2-D shapes whose rows are shorter than a block (e.g. (3, 16) or (4, 16) at
blocksize 32: row 2 is scaled by block 0's absmax; checked against a table lookup by hand), so
the oracle dequantizes the same bytes as a flat (n,) tensor (_bnb_dequantize), which it gets right.
"""

import math
import os
import re

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import minilora.quant.nf4 as nf4_mod  # noqa: E402
from minilora.quant.linear import dequantize_nf4  # noqa: E402
from minilora.quant.maps import dynamic_map, nf4_code  # noqa: E402
from minilora.quant.nf4 import (  # noqa: E402
    NF4Tensor,
    dequantize_nf4_cpu,
    dequantize_nf4_reference,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@st.composite
def weights(draw, max_numel=6000):
    """A tensor with a drawn shape, dtype, scale and one of the edge cases drawn on purpose."""
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_numel:
        shape = (max_numel // 7, 7)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # fp16 overflows past 65504: keep its scales in range
    exp = draw(st.integers(-8, 3) if dtype == torch.float16 else st.integers(-20, 20))
    w = torch.randn(shape, generator=g) * (10.0**exp)
    case = draw(st.sampled_from(["plain", "zero_block", "all_zero", "outlier", "ties", "constant"]))
    flat = w.view(-1)
    if case == "zero_block":
        flat[: min(flat.numel(), blocksize)] = 0
    elif case == "all_zero":
        flat.zero_()
    elif case == "outlier":
        i = draw(st.integers(0, flat.numel() - 1))
        flat[i] = flat.abs().max() * (1e4 if dtype != torch.float16 else 10) + 1
    elif case == "ties":
        # values exactly at NF4 midpoints of a block whose absmax is 1: ties must go bnb's way
        code = nf4_code()
        mids = (code[:-1] + code[1:]) / 2
        idx = torch.randint(0, 15, (flat.numel(),), generator=g)
        flat.copy_(mids[idx])
        flat[:: max(1, blocksize)] = 1.0
    elif case == "constant":
        flat.fill_(draw(st.floats(-3, 3, allow_nan=False)))
    w = w.to(dtype)
    assume(torch.isfinite(w).all())
    return w, blocksize


def _bnb(w, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def _bnb_dequantize(packed, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of (packed, state), asked for the flat (n,) tensor (see the
    module docstring), in the state's shape."""
    shape, state.shape = state.shape, torch.Size([math.prod(state.shape)])
    try:
        return bnbF.dequantize_4bit(packed, state).view(shape)
    finally:
        state.shape = shape


@given(weights(), st.booleans())
def test_quantize_bytes_identical_to_bitsandbytes(wb, double_quant):
    w, blocksize = wb
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = _bnb(w, blocksize, double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.absmax2, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
    else:
        assert q.absmax2 is None and q.offset is None


@given(weights(), st.booleans(), st.sampled_from(DTYPES), st.sampled_from([32, 100, 4096, 1 << 16]))
def test_dequantize_identical_to_bitsandbytes(wb, double_quant, out_dtype, chunk):
    """dequantize_nf4 (the tuned CPU path here) and the readable reference; the tuned path over
    chunk sizes: several chunks, ragged ends, chunk < blocksize."""
    w, blocksize = wb
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = _bnb(w, blocksize, double_quant)
    state.dtype = out_dtype  # bitsandbytes dequantizes to the state's dtype
    expected = _bnb_dequantize(packed, state)
    old, nf4_mod.DEQUANT_CHUNK = nf4_mod.DEQUANT_CHUNK, chunk
    try:
        got = dequantize_nf4(q, out_dtype)
    finally:
        nf4_mod.DEQUANT_CHUNK = old
    assert got.dtype == out_dtype and got.shape == w.shape
    assert torch.equal(got.view(-1), expected.reshape(-1))
    assert torch.equal(dequantize_nf4_reference(q, out_dtype).view(-1), expected.reshape(-1))


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@given(weights(), st.booleans(), st.sampled_from(DTYPES), st.sampled_from([32, 100, 4096, 1 << 16]))
def test_tuned_cpu_path_is_the_reference_bit_for_bit(wb, double_quant, out_dtype, chunk):
    """dequantize_nf4_cpu (chunks, a pair table read as float64) == the readable reference, bit
    for bit (signed zeros included), over chunk sizes; and it leaves the thread count as it was."""
    w, blocksize = wb
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    threads = torch.get_num_threads()
    old, nf4_mod.DEQUANT_CHUNK = nf4_mod.DEQUANT_CHUNK, chunk
    try:
        got = dequantize_nf4_cpu(q, out_dtype)
    finally:
        nf4_mod.DEQUANT_CHUNK = old
    want = dequantize_nf4_reference(q, out_dtype)
    assert got.dtype == want.dtype == out_dtype and got.shape == want.shape == w.shape
    assert torch.equal(got.view(_BITS[out_dtype]), want.view(_BITS[out_dtype]))
    assert torch.get_num_threads() == threads


def test_dequantize_exact_in_flush_denormal_mode():
    """The tuned CPU path gathers byte pairs as float64 bit patterns; a pair whose second value is
    NF4 0.0 spells a float64 subnormal. Flush-to-zero / denormals-are-zero must not touch it."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w.view(-1)[1::2] = 0  # every byte's low nibble decodes to 0.0
    q = quantize_nf4(w, blocksize=64)
    want = dequantize_nf4_reference(q, torch.float32)
    assert (want.view(-1)[1::2] == 0).all() and (want.view(-1)[::2] != 0).any()
    old = torch.set_flush_denormal(True)
    try:
        got = dequantize_nf4(q, torch.float32)
    finally:
        torch.set_flush_denormal(False)
    if not old:
        pytest.skip("this CPU has no flush-denormal mode")
    assert torch.equal(got, want)


@given(weights(max_numel=3000), st.booleans())
@example((torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), 32), False)  # rows < a block
def test_from_bnb_dequantizes_like_bitsandbytes(wb, double_quant):
    """Wrapping bitsandbytes' own output (no requantization) gives bitsandbytes' values."""
    w, blocksize = wb
    packed, state = _bnb(w, blocksize, double_quant)
    q = NF4Tensor.from_bnb(packed, state)
    assert torch.equal(dequantize_nf4(q), _bnb_dequantize(packed, state))


@given(weights(max_numel=3000), st.booleans())
def test_to_bnb_from_bnb_round_trip_lossless(wb, double_quant):
    w, blocksize = wb
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = q.to_bnb()
    # bitsandbytes dequantizes our state exactly as ours does
    assert torch.equal(_bnb_dequantize(packed, state), dequantize_nf4(q))
    q2 = NF4Tensor.from_bnb(packed, state)
    for name in ("packed", "absmax", "absmax2", "offset"):
        a, b = getattr(q, name), getattr(q2, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (q2.shape, q2.dtype, q2.blocksize) == (q.shape, q.dtype, q.blocksize)


@settings(max_examples=8)  # each example writes and reads a safetensors file
@given(weights(max_numel=3000), st.booleans())
def test_safetensors_round_trip_lossless(tmp_path_factory, wb, double_quant):
    w, blocksize = wb
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    path = str(tmp_path_factory.mktemp("nf4") / "w.safetensors")
    q.save(path)
    q2 = NF4Tensor.load(path)
    assert torch.equal(dequantize_nf4(q2), dequantize_nf4(q))
    assert torch.equal(q2.packed, q.packed) and torch.equal(q2.absmax, q.absmax)
    assert (q2.shape, q2.dtype, q2.blocksize, q2.double_quant) == (q.shape, q.dtype, q.blocksize, q.double_quant)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_mean_abs_error_matches_bitsandbytes_figure():
    """quantizing randn(1024, 1024) at blocksize 64: the same error as bitsandbytes (~0.0728)."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for dq in (False, True):
        q = quantize_nf4(w, blocksize=64, double_quant=dq)
        ours = (dequantize_nf4(q, torch.float32) - w).abs().mean().item()
        packed, state = _bnb(w, 64, dq)
        theirs = (_bnb_dequantize(packed, state) - w).abs().mean().item()
        assert ours == theirs
        assert 0.070 < ours < 0.075


def test_bits_per_parameter():
    w = torch.randn(4096, 4096)
    assert quantize_nf4(w, 64, double_quant=False).bits_per_param() == pytest.approx(4.5, abs=1e-6)
    # 4 + 8/64 + 32/(64*256) = 4.127 (plus the 4-byte offset, negligible here)
    assert quantize_nf4(w, 64, double_quant=True).bits_per_param() == pytest.approx(4.127, abs=1e-3)


def test_maps_equal_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed))


@pytest.mark.parametrize(
    "make, blocksize, message",
    [
        (lambda: torch.tensor([1.0, float("nan")]), 64, "NaN or inf"),
        (lambda: torch.tensor([1.0, float("inf")]), 64, "NaN or inf"),
        (lambda: torch.empty(0), 64, "empty"),
        (lambda: torch.ones(4, dtype=torch.float64), 64, "dtype"),
        (lambda: torch.ones(4, dtype=torch.int32), 64, "dtype"),
        (lambda: torch.ones(4), 48, "blocksize 48"),
        (lambda: torch.ones(4), 8192, "blocksize 8192"),
    ],
)
def test_bad_input_raises_clear_error(make, blocksize, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(make(), blocksize=blocksize)


def test_bad_output_dtype():
    q = quantize_nf4(torch.ones(8))
    for dequantize in (dequantize_nf4, dequantize_nf4_cpu, dequantize_nf4_reference):
        with pytest.raises(ValueError, match="output dtype"):
            dequantize(q, torch.float64)


def test_an_nf4_state_whose_parts_do_not_fit_is_refused_where_it_is_made():
    """A larger shape, short codes or scales, another blocksize, or double quantization's parts half
    there gave a size mismatch deep in dequantization, or silently wrong values (uint8 absmax codes used as
    scales without absmax2); a plain tensor given to dequantize_nf4 an AttributeError; blocksize 64.0 a
    slicing TypeError."""
    import dataclasses

    q = quantize_nf4(torch.randn(40, 100), blocksize=64)
    for change, said in (
        ({"shape": torch.Size((80, 100))}, "packed holds 2000 bytes but shape (80, 100) needs 4000"),
        ({"packed": q.packed[:-1]}, "packed holds 1999 bytes"),
        ({"absmax": q.absmax[:-1]}, "absmax holds 62 scales but 4000 values need 63"),
        ({"blocksize": 128}, "absmax holds 63 scales but 4000 values need 32"),
        ({"absmax2": None}, "these parts mix the two"),
        ({"offset": None}, "these parts mix the two"),
        ({"blocksize": 64.0}, "blocksize 64.0 is not one of"),
    ):
        with pytest.raises(ValueError, match=re.escape(said)):
            dataclasses.replace(q, **change)
    with pytest.raises(ValueError, match="takes an NF4Tensor"):
        dequantize_nf4(torch.randn(4, 4))
    with pytest.raises(ValueError, match="blocksize 64.0 is not supported"):
        quantize_nf4(torch.randn(4, 64), blocksize=64.0)
