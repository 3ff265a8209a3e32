"""What the NF4 kernels share: the in-kernel decoding of codes and absmax, and the launcher checks.

Used by kernels/nf4_dequant.py and kernels/nf4_matmul.py. The math is minilora/quant/nf4.py's:

    absmax_b = DYN[acode_b] * absmax2[b // 256] + offset      (double quant; else stored float32)
    w_i      = NF4[code_i] * absmax_{i // BLOCKSIZE}            (float32)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from minilora.quant.maps import dynamic_map, nf4_code
from minilora.quant.nf4 import BLOCKSIZE2, BLOCKSIZES, NF4Tensor


@triton.jit
def nf4_table(nf4_ptr):
    """The 16 NF4 values (float32, (16,)) as a tensor of the program, loaded once."""
    return tl.load(nf4_ptr + tl.arange(0, 16))


@triton.jit
def nf4_lookup(table, nib):
    """NF4 value (float32) of each 4-bit code in `nib` (any shape, int32 in [0, 15]).

    tl.gather from the 16-entry table, which Triton lowers to a shared-memory lookup (conflict-free:
    16 words in 16 banks): one instruction per element with a 32-bit address, where a global-memory
    lookup costs a 64-bit address (two instructions) and a load through L1.
    """
    flat = tl.reshape(nib, (nib.numel,))  # tl.gather wants the index's rank to be the table's
    return tl.reshape(tl.gather(table, flat, 0), nib.shape)


@triton.jit
def absmax_f32(
    blk,  # int32 tensor: absmax block index of each element
    mask,  # bool tensor (same shape): which lanes are real elements
    absmax_ptr,  # *uint8 (nb,) codes if DOUBLE_QUANT else *float32 (nb,) absmax
    absmax2_ptr,  # *float32 (nb2,) second-level absmax (read only if DOUBLE_QUANT)
    offset_ptr,  # *float32 () mean of the first-level absmax (only if DOUBLE_QUANT)
    dyn_ptr,  # *float32 (256,) signed dynamic map (only if DOUBLE_QUANT)
    DOUBLE_QUANT: tl.constexpr,  # whether absmax holds 8-bit codes
):
    """First-level absmax (float32) of each element's block, decoded in registers."""
    if DOUBLE_QUANT:
        acode = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)  # 256 = BLOCKSIZE2
        absmax = tl.load(dyn_ptr + acode) * scale2 + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


# ---------------------------------------------------------------------------------------------
# Launcher helpers
# ---------------------------------------------------------------------------------------------

_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 table (16,), signed dynamic map (256,)), float32, cached per device."""
    if device not in _TABLES:
        _TABLES[device] = (nf4_code(device), dynamic_map(True).to(device))
    return _TABLES[device]


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_nf4(q: NF4Tensor, who: str) -> torch.device:
    """Validate an NF4Tensor's buffers for a Triton launch; returns their device."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{who}: expected an NF4Tensor, got {type(q).__name__}.")
    dev = q.packed.device
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{who}: the NF4 tensor is on {dev}; the Triton kernel needs CUDA tensors "
            "(move it with q.to('cuda') or use dequantize_nf4, which falls back to PyTorch)."
        )
    if q.blocksize not in BLOCKSIZES:
        raise ValueError(f"{who}: blocksize {q.blocksize} is not supported; use a power of two from 32 to 4096.")
    n, nb = q.numel, -(-q.numel // q.blocksize)
    if n == 0:
        raise ValueError(f"{who}: the NF4 tensor is empty.")
    if n >= 2**31:
        raise ValueError(f"{who}: {n} elements exceed the kernel's int32 indexing; split the tensor.")
    parts = [("packed", q.packed, torch.uint8, (n + 1) // 2)]
    if q.double_quant:
        parts += [
            ("absmax", q.absmax, torch.uint8, nb),
            ("absmax2", q.absmax2, torch.float32, -(-nb // BLOCKSIZE2)),
            ("offset", q.offset, torch.float32, 1),
        ]
    else:
        parts += [("absmax", q.absmax, torch.float32, nb)]
    for name, t, dtype, size in parts:
        if t.device != dev:
            raise ValueError(
                f"{who}: {name} is on {t.device} but packed is on {dev}; keep the NF4 state on one device."
            )
        if t.dtype != dtype:
            raise ValueError(f"{who}: {name} has dtype {t.dtype}, expected {dtype}.")
        if t.numel() != size:
            raise ValueError(
                f"{who}: {name} has {t.numel()} elements, expected {size} for shape "
                f"{tuple(q.shape)} at blocksize {q.blocksize}."
            )
        if not t.is_contiguous():
            raise ValueError(f"{who}: {name} is not contiguous; call .contiguous() on it first.")
    return dev
