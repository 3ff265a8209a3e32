"""llama.cpp's 5-bit blocks Q5_0 and Q5_1: the types its K-quant recipes fall back to when a row
length is not a multiple of 256 (Q4_K -> Q5_0, Q5_K -> Q5_1; gguf_recipes.py).

Blocks of 32 values; q in 0..31, split into 4 low bits (qs) and a 5th bit (qh, one little-endian uint32):
    qs[i] = low4(q[i]) | low4(q[i + 16]) << 4     (i < 16)
    bit i of qh = bit 4 of q[i]                   (i < 32)
Q5_0, 22 bytes (5.5 bits a value): d float16, qh[4], qs[16];  xhat = d (q - 16)
    d = v / -16 where v is the value of largest |x|, so v lands on q = 0 exactly; q = min(31, trunc(x / d + 16.5))
Q5_1, 24 bytes (6 bits): d, m float16, qh[4], qs[16];  xhat = d q + m
    m = min x, d = (max x - min x) / 31, q = trunc((x - m) / d + 0.5)
(ggml-quants.c quantize_row_q5_0_ref / q5_1_ref: round half up by truncating x + 0.5, where the
values are known positive. The C computes 1/d once and multiplies; so do we.)

`*_ref` quantizes one block with the C's loop; the tuned form is the same arithmetic over all blocks
at once. gguf's own Q5_0 / Q5_1 quantizers implement the same reference, so tests compare bytes.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
TYPE_SIZE = {"Q5_0": 22, "Q5_1": 24}


def _pack(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 32) levels 0..31 -> (qh (nb, 4), qs (nb, 16)) bytes."""
    qs = (q[:, :16] & 15) | (q[:, 16:] & 15) << 4
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)  # (nb, 32)
    qh = np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)  # (nb, 4)
    return qh, qs.astype(np.uint8)


def quantize_q5_0_ref(x: np.ndarray) -> np.ndarray:
    """One block (32,) float32 -> (22,) bytes."""
    i = int(np.argmax(np.abs(x)))  # first of the largest |x| (C: strict `amax < |v|`, from max = +0)
    d = (x[i] if x[i] != 0 else F32(0)) / F32(-16)
    inv = F32(1) / d if d else F32(0)
    q = np.array([min(31, int(x[j] * inv + F32(16.5))) for j in range(32)], np.uint8)  # int(): C's truncation
    qh, qs = _pack(q[None])
    return np.concatenate([np.float16(d).reshape(1).view(np.uint8), qh[0], qs[0]])


def quantize_q5_1_ref(x: np.ndarray) -> np.ndarray:
    """One block (32,) float32 -> (24,) bytes."""
    lo, hi = x.min(), x.max()
    d = (hi - lo) / F32(31)
    inv = F32(1) / d if d else F32(0)
    q = np.array([int((x[j] - lo) * inv + F32(0.5)) for j in range(32)], np.uint8)
    qh, qs = _pack(q[None])
    head = np.concatenate([np.float16(d).reshape(1).view(np.uint8), np.float16(lo).reshape(1).view(np.uint8)])
    return np.concatenate([head, qh[0], qs[0]])


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % 32:
        raise ValueError(f"Q5_0 / Q5_1 need rows of a multiple of 32 values, got {x.shape[-1]}.")
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, 32)


def _rows(blocks: np.ndarray, x: np.ndarray, kind: str) -> np.ndarray:
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // 32 * TYPE_SIZE[kind])


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """Tuned: float (..., K), K % 32 == 0 -> GGUF bytes (..., K / 32 * type size) of Q5_0 or Q5_1."""
    b = _blocks(x)
    with np.errstate(divide="ignore"):
        if kind == "Q5_0":
            v = b[np.arange(len(b)), np.abs(b).argmax(axis=1)][:, None]  # (nb, 1) signed
            v = np.where(v != 0, v, F32(0))  # C starts from max = +0: an all-zero block gets d = -0
            d = v / F32(-16)
            inv = np.where(d != 0, F32(1) / d, F32(0))
            q = np.minimum(np.trunc(b * inv + F32(16.5)), 31)
            head = [d.astype(np.float16).view(np.uint8)]
        else:
            lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
            d = (hi - lo) / F32(31)
            inv = np.where(d != 0, F32(1) / d, F32(0))
            q = np.trunc((b - lo) * inv + F32(0.5))
            head = [d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8)]
    qh, qs = _pack(q.astype(np.uint8))
    return _rows(np.concatenate(head + [qh, qs], axis=1), x, kind)


def quantize_ref(x: np.ndarray, kind: str) -> np.ndarray:
    """The reference path: one block at a time."""
    one = quantize_q5_0_ref if kind == "Q5_0" else quantize_q5_1_ref
    return _rows(np.stack([one(b) for b in _blocks(x)]), x, kind)


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """GGUF bytes -> float32 values: Q5_0 d (q - 16), Q5_1 d q + m (ggml's dequantize_row_q5_0 / q5_1)."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, TYPE_SIZE[kind])
    d = b[:, 0:2].copy().view(np.float16).astype(F32)  # (nb, 1)
    rest = b[:, 2:] if kind == "Q5_0" else b[:, 4:]
    qh = rest[:, 0:4].copy().view("<u4")  # (nb, 1)
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (nb, 32)
    lo = np.concatenate([rest[:, 4:20] & 15, rest[:, 4:20] >> 4], axis=1)  # (nb, 32)
    q = (lo | hi << 4).astype(F32)
    if kind == "Q5_0":
        out = (q - F32(16)) * d
    else:
        out = q * d + b[:, 2:4].copy().view(np.float16).astype(F32)
    return out.reshape(*data.shape[:-1], data.shape[-1] // TYPE_SIZE[kind] * 32)
