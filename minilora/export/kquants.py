"""llama.cpp's K-quant block formats Q4_K, Q5_K and Q6_K: our quantizers and dequantizers.

A row of K values (K a multiple of QK_K = 256) is cut into super-blocks of 256; each super-block is
stored alone. Layouts (ggml-common.h block_q4_K / block_q5_K / block_q6_K), byte offsets per block:

Q4_K, 144 bytes (4.5 bits a value): 8 sub-blocks j of 32 values, xhat = (d sc_j) q - (dmin m_j), q in 0..15
    0   d, dmin          two float16
    4   scales[12]       eight 6-bit sc_j and eight 6-bit m_j:  for k < 4
                           byte k     = sc_k | (sc_{k+4} >> 4) << 6
                           byte 4 + k = m_k  | (m_{k+4}  >> 4) << 6
                           byte 8 + k = (sc_{k+4} & 15) | (m_{k+4} & 15) << 4
    16  qs[128]          for chunk c < 4 (values 64c..64c+63), i < 32:  qs[32c + i] = q[64c + i] | q[64c + 32 + i] << 4
Q5_K, 176 bytes (5.5 bits): as Q4_K with q in 0..31; the low 4 bits in qs, the 5th bits in qh[32]
    (at byte 16, before qs): bit 2c of qh[i] is bit 4 of q[64c + i], bit 2c + 1 that of q[64c + 32 + i]
Q6_K, 210 bytes (6.5625 bits): 16 sub-blocks j of 16 values, xhat = (d sc_j) (q - 32), q in 0..63
    0   ql[128]          for half h < 2 (values 128h..), i < 32, low4 = q & 15:
                           ql[64h + i]      = low4(q[128h + i])      | low4(q[128h + 64 + i]) << 4
                           ql[64h + 32 + i] = low4(q[128h + 32 + i]) | low4(q[128h + 96 + i]) << 4
    128 qh[64]           qh[32h + i] = sum_k (q[128h + 32k + i] >> 4) << 2k,  k < 4
    192 scales[16]       int8 sc_j
    208 d                float16

Quantization (ggml-quants.c quantize_row_q4_K_ref / q5_K / q6_K; the searches in kquant_search.py):
  Q4_K, Q5_K: per sub-block, weights w_i = sqrt(mean_i x_i^2) + |x_i| (every value counts, larger ones
    more) and make_qkx2_quants finds s_j, m_j (Q4_K: nmax 15, trials rmin -1 + 0.1 k, k <= 20; Q5_K:
    nmax 31, rmin -0.5 + 0.1 k, k <= 15). The scales and offsets are then quantized to 6 bits against
    their super-block maxima, d = max_j s_j / 63, sc_j = min(63, round(s_j / d)), and likewise dmin, m_j
    (d, dmin rounded to float16), and every value is re-rounded on that final grid:
        q = clamp(round((x + dmin m_j) / (d sc_j)), 0, nmax)    (where d sc_j = 0 the search's q stand).
  Q6_K: per sub-block of 16, make_qx_quants (nmax 32) finds s_j; the s_j of largest magnitude s* maps
    to -128: iscale = -128 / s*, d = 1 / iscale, sc_j = min(127, round(iscale s_j)), and
        q = clamp(round(x / (d sc_j)), -32, 31) + 32.
    A super-block whose s_j are all below 1e-15 is all zero bytes.

Every function comes as a reference (`*_ref`: one super-block, the C's loops) and the tuned form
(all super-blocks of a tensor at once, vectorized, in chunks that stay in cache); both yield the
same parts and so the same bytes. `*_parts` -> (q levels, scales...) is packed by `pack_*`;
`value_*` computes xhat from the parts in the C dequantizer's float32 order, which is what gguf's
dequantizer (and llama.cpp) must read back from the bytes.
"""

from __future__ import annotations

import numpy as np

from minilora.export.kquant_search import (
    F32,
    GROUP_MAX_EPS,
    fsum,
    make_qkx2_quants,
    make_qkx2_quants_ref,
    make_qx_quants,
    make_qx_quants_ref,
    nearest_int,
    seq_sum,
)

QK_K = 256
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}  # nmax, rmin, rdelta, nstep
CHUNK = 512  # super-blocks per vectorized step: (32, 8 * 512) float32 arrays of 512 KiB stay in L2


# ------------------------------------------------------------------------------- Q4_K / Q5_K
def qkx_parts_ref(x: np.ndarray, kind: str):
    """One super-block (256,) float32 -> (q (256,) uint8, d f16, dmin f16, sc (8,) uint8, m (8,) uint8)."""
    nmax, rmin, rdelta, nstep = SEARCH[kind]
    L, scales, mins = np.zeros(QK_K, np.uint8), np.zeros(8, F32), np.zeros(8, F32)
    for j in range(8):
        xj = x[32 * j : 32 * j + 32]
        w = np.sqrt(fsum(xj * xj) / F32(32)) + np.abs(xj)
        L[32 * j : 32 * j + 32], scales[j], mins[j] = make_qkx2_quants_ref(xj, w, nmax, rmin, rdelta, nstep)
    max_scale = max_min = F32(0)  # C: `if (scale > max_scale) max_scale = scale`, from +0
    for s, v in zip(scales, mins):
        max_scale, max_min = s if s > max_scale else max_scale, v if v > max_min else max_min
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    sc = np.array([min(63, int(nearest_int(inv_scale * s)) & 0xFF) for s in scales], np.uint8)  # C: a uint8 first
    m = np.array([min(63, int(nearest_int(inv_min * v)) & 0xFF) for v in mins], np.uint8)
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        dj = F32(d) * F32(sc[j])
        if not dj:
            continue
        dm = F32(dmin) * F32(m[j])
        xj = x[32 * j : 32 * j + 32]
        L[32 * j : 32 * j + 32] = np.clip(nearest_int((xj + dm) / dj), 0, nmax)
    return L, d, dmin, sc, m


def qkx_parts(x: np.ndarray, kind: str):
    """Tuned: (nb, 256) float32 -> (q (nb, 256) uint8, d (nb,) f16, dmin (nb,) f16, sc (nb, 8), m (nb, 8))."""
    nmax, rmin, rdelta, nstep = SEARCH[kind]
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, nb*8): one sub-block per column
    w = np.sqrt(seq_sum(xs * xs) / F32(32)) + np.abs(xs)  # (32, nb*8)
    L, scales, mins = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep)
    L = L.T.reshape(nb, 8, 32)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)  # (nb,)
    max_scale, max_min = np.where(max_scale > 0, max_scale, F32(0)), np.where(max_min > 0, max_min, F32(0))  # +0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))[:, None]
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))[:, None]
        sc = np.minimum(nearest_int(inv_scale * scales) & 0xFF, 63).astype(np.uint8)  # (nb, 8)
        m = np.minimum(nearest_int(inv_min * mins) & 0xFF, 63).astype(np.uint8)
        d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
        dj = (d.astype(F32)[:, None] * sc)[..., None]  # (nb, 8, 1)
        dm = (dmin.astype(F32)[:, None] * m)[..., None]
        q = np.clip(np.rint((x.reshape(nb, 8, 32) + dm) / dj), 0, nmax)
    L = np.where(dj != 0, q, L).astype(np.uint8)
    return L.reshape(nb, QK_K), d, dmin, sc, m


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) bytes (the layout in the module docstring)."""
    return np.concatenate(
        [sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6, (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4],
        axis=1,
    ).astype(np.uint8)


def unpack_scales(b: np.ndarray):
    """(nb, 12) bytes -> (sc, m), each (nb, 8) uint8: the inverse of pack_scales."""
    lo, hi = b[:, 8:12], np.concatenate([b[:, 0:4] >> 6, b[:, 4:8] >> 6], axis=1)
    sc = np.concatenate([b[:, 0:4] & 63, (lo & 15) | hi[:, :4] << 4], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (lo >> 4) | hi[:, 4:] << 4], axis=1)
    return sc, m


def pack_qkx(kind: str, L, d, dmin, sc, m) -> np.ndarray:
    """Parts -> (nb, 144) Q4_K or (nb, 176) Q5_K blocks."""
    nb = L.shape[0]
    q = L.reshape(nb, 4, 2, 32)  # chunk c, half h, i: value 64c + 32h + i
    qs = ((q[:, :, 0] & 15) | (q[:, :, 1] & 15) << 4).reshape(nb, 128)
    head = [d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), pack_scales(sc, m)]
    if kind == "Q5_K":  # bit 4 of value 64c + 32h + i goes to bit 2c + h of qh[i]
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)[None, :, :, None]
        head.append(np.bitwise_or.reduce(((q >> 4) << shifts).reshape(nb, 8, 32), axis=1).astype(np.uint8))
    return np.concatenate(head + [qs.astype(np.uint8)], axis=1)


def unpack_qkx(kind: str, b: np.ndarray):
    """(nb, 144 | 176) blocks -> parts (L, d, dmin, sc, m): the inverse of pack_qkx."""
    nb = b.shape[0]
    d, dmin = b[:, 0:2].copy().view(np.float16)[:, 0], b[:, 2:4].copy().view(np.float16)[:, 0]
    sc, m = unpack_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8)[None, None, :, None]
    L = (qs & 15).reshape(nb, 8, 32)
    if kind == "Q5_K":
        L = L | ((b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    return L.reshape(nb, QK_K).astype(np.uint8), d, dmin, sc, m


def value_qkx(L, d, dmin, sc, m) -> np.ndarray:
    """xhat (nb, 256) float32 = (d sc_j) q - (dmin m_j), as ggml's dequantize_row_q4_K multiplies."""
    nb = L.shape[0]
    dj = (d.astype(F32)[:, None] * sc.astype(F32))[..., None]  # (nb, 8, 1)
    mj = (dmin.astype(F32)[:, None] * m.astype(F32))[..., None]
    return (dj * L.reshape(nb, 8, 32).astype(F32) - mj).reshape(nb, QK_K)


# ------------------------------------------------------------------------------- Q6_K
def q6_k_parts_ref(x: np.ndarray):
    """One super-block (256,) float32 -> (q (256,) uint8, d f16, sc (16,) int8)."""
    L, scales = np.zeros(QK_K, np.uint8), np.zeros(16, F32)
    for j in range(16):
        L[16 * j : 16 * j + 16], scales[j] = make_qx_quants_ref(x[16 * j : 16 * j + 16], 32)
    i = int(np.argmax(np.abs(scales)))  # first of the largest |s_j| (C's strict >)
    if np.abs(scales[i]) < GROUP_MAX_EPS:
        return np.zeros(QK_K, np.uint8), np.float16(0), np.zeros(16, np.int8)
    iscale = F32(-128) / scales[i]
    d = np.float16(F32(1) / iscale)
    sc = np.array([min(127, int(nearest_int(iscale * s))) for s in scales], np.int8)
    for j in range(16):
        dj = F32(d) * F32(sc[j])
        if dj:
            L[16 * j : 16 * j + 16] = np.clip(nearest_int(x[16 * j : 16 * j + 16] / dj), -32, 31) + 32
    return L, d, sc


def q6_k_parts(x: np.ndarray):
    """Tuned: (nb, 256) float32 -> (q (nb, 256) uint8, d (nb,) f16, sc (nb, 16) int8)."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, nb*16): one sub-block per column
    L, scales = make_qx_quants(xs, 32)
    L, scales = L.T.reshape(nb, 16, 16), scales.reshape(nb, 16)
    s_max = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]  # (nb,) signed
    zero = np.abs(s_max) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / s_max
        d = np.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
        sc = np.where(zero[:, None], 0, np.minimum(nearest_int(iscale[:, None] * scales), 127)).astype(np.int8)
        dj = (d.astype(F32)[:, None] * sc)[..., None]  # (nb, 16, 1)
        q = np.clip(np.rint(x.reshape(nb, 16, 16) / dj), -32, 31) + F32(32)
    L = np.where(dj != 0, q, np.where(zero[:, None, None], 0, L)).astype(np.uint8)
    return L.reshape(nb, QK_K), d, sc


def pack_q6_k(L, d, sc) -> np.ndarray:
    """Parts -> (nb, 210) Q6_K blocks."""
    nb = L.shape[0]
    q = L.reshape(nb, 2, 4, 32)  # half h, quarter k, i: value 128h + 32k + i
    lo = q & 15
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2)  # (nb, 2, 64)
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    parts = [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)]
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=1)


def unpack_q6_k(b: np.ndarray):
    """(nb, 210) blocks -> parts (L, d, sc): the inverse of pack_q6_k."""
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8)[None, None, :, None]  # (nb, 2, 2, 64)
    lo = (ql & 15).reshape(nb, 2, 4, 32)  # quarters 0, 1 from the low nibbles, 2, 3 from the high
    hi = (b[:, 128:192].reshape(nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    L = (lo | hi << 4).reshape(nb, QK_K).astype(np.uint8)
    return L, b[:, 208:210].copy().view(np.float16)[:, 0], b[:, 192:208].copy().view(np.int8)


def value_q6_k(L, d, sc) -> np.ndarray:
    """xhat (nb, 256) float32 = (d sc_j) (q - 32), as ggml's dequantize_row_q6_K multiplies."""
    nb = L.shape[0]
    dj = (d.astype(F32)[:, None] * sc.astype(F32))[..., None]  # (nb, 16, 1)
    return (dj * (L.reshape(nb, 16, 16).astype(F32) - F32(32))).reshape(nb, QK_K)


# ------------------------------------------------------------------------------- rows
def parts_ref(kind: str, x: np.ndarray):
    """The reference parts of one super-block."""
    return q6_k_parts_ref(x) if kind == "Q6_K" else qkx_parts_ref(x, kind)


def parts(kind: str, x: np.ndarray):
    """The tuned parts of (nb, 256) super-blocks."""
    return q6_k_parts(x) if kind == "Q6_K" else qkx_parts(x, kind)


def pack(kind: str, p) -> np.ndarray:
    return pack_q6_k(*p) if kind == "Q6_K" else pack_qkx(kind, *p)


def unpack(kind: str, b: np.ndarray):
    return unpack_q6_k(b) if kind == "Q6_K" else unpack_qkx(kind, b)


def value(kind: str, p) -> np.ndarray:
    return value_q6_k(*p) if kind == "Q6_K" else value_qkx(*p)


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """float (..., K), K % 256 == 0 -> the GGUF bytes (..., K / 256 * type size) of Q4_K, Q5_K or Q6_K."""
    if x.shape[-1] % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} values, got {x.shape[-1]}.")
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)  # (nb, 256)
    out = np.empty((flat.shape[0], TYPE_SIZE[kind]), np.uint8)
    for s in range(0, flat.shape[0], CHUNK):
        out[s : s + CHUNK] = pack(kind, parts(kind, flat[s : s + CHUNK]))
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * TYPE_SIZE[kind])


def quantize_ref(x: np.ndarray, kind: str) -> np.ndarray:
    """The reference path of quantize(): one super-block at a time (slow; for tests)."""
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    blocks = [pack(kind, [np.asarray(v)[None] for v in parts_ref(kind, b)]) for b in flat]
    return np.concatenate(blocks).reshape(*x.shape[:-1], x.shape[-1] // QK_K * TYPE_SIZE[kind])


def dequantize(b: np.ndarray, kind: str) -> np.ndarray:
    """GGUF bytes (..., n * type size) -> float32 (..., n * 256), our own reading of the layout."""
    flat = np.ascontiguousarray(b, dtype=np.uint8).reshape(-1, TYPE_SIZE[kind])
    return value(kind, unpack(kind, flat)).reshape(*b.shape[:-1], b.shape[-1] // TYPE_SIZE[kind] * QK_K)
