"""The scale searches behind llama.cpp's K-quants (ggml-quants.c): make_qkx2_quants and make_qx_quants.

Each finds, for one block of n values x with weights w, integer levels l in a fixed range and the
float parameters that map them back, minimizing the weighted squared error

    E = sum_i w_i (x_i - xhat_i)^2.

make_qkx2_quants (Q4_K, Q5_K): xhat = s l - m with l in 0..nmax and m >= 0 (an offset below zero).
  1. start from the min/max grid: m0 = min(min x, 0), s0 = (max x - m0) / nmax, l = round((x - m0) / s0);
  2. for each of nstep + 1 trial grids, iscale = (nmax + rmin + rdelta k) / (max x - m) (k = 0..nstep)
     rounds l = clamp(round(iscale (x - m)), 0, nmax), then solves the weighted least-squares line
     x ~ s l + mn for that l in closed form (Sw = sum w, Sl = sum w l, Sll = sum w l^2, Sx = sum w x,
     Sxl = sum w x l, D = Sw Sll - Sl^2):
         s = (Sw Sxl - Sx Sl) / D,   mn = (Sll Sx - Sl Sxl) / D,
     and if mn > 0 (an offset above zero, which the format cannot hold) mn = 0, s = Sxl / Sll;
  3. a trial whose E is lower replaces the incumbent (l, s, m = mn). As in llama.cpp, the incumbent's
     m is also the m the next trials grid from.
  Returned: l, s and -m (the format stores the positive offset).

make_qx_quants (Q6_K, rmse_type 1): xhat = s l with l in -nmax..nmax-1 and weights w = x^2.
  s0 = max / -nmax where max is the value of largest |x| (so that value lands on -nmax exactly),
  then 18 trial grids iscale = -(nmax + 0.1 k) / max (k = -9..9, k != 0); for each trial's l the
  least-squares scale is s = Sxl / Sll, whose error is E = sum w x^2 - Sxl^2 / Sll, so a trial wins
  when Sxl^2 / Sll exceeds the incumbent's s Sxl (compared as Sxl^2 > best Sll, no division).

Both functions exist twice: `*_ref`, one block at a time, a line-for-line port of the C (the
reference); and the tuned form, the same arithmetic vectorized over N blocks. The tuned form holds a
block's values as a column: x is (n, N), element i of every block in row i, so every per-element
step is one numpy operation over all blocks and every sum runs row by row, in C's order.

Exactness. Every value is float32 and every operation a float32 operation in the C source's order,
so the reference and the tuned form produce the same bytes (tests/test_kquants.py). Sums are
sequential (s += a_i, i = 0..n-1) as in C, never numpy's pairwise sum. nearest_int adds 1.5 * 2^23 in
float32, which rounds to the nearest integer with ties to even: np.rint. A llama.cpp build that
contracts a * b + c into one FMA instruction can round an intermediate differently in the last bit
and so, rarely, pick another trial; the result is then another near-optimal grid, not an error.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: a block whose max |x| is below this is all zero


def nearest_int(v):
    """llama.cpp's nearest_int: round to the nearest integer, ties to even (float32 in, int32 out)."""
    return np.rint(v).astype(np.int32)


def fsum(a: np.ndarray) -> np.float32:
    """sum of a 1-D float32 array in index order (C's `for (i...) s += a[i]`)."""
    s = F32(0)
    for v in a:
        s = F32(s + v)
    return s


def seq_sum(a: np.ndarray) -> np.ndarray:
    """(n, N) C-contiguous -> (N,): column sums added row by row in float32, the order fsum uses.

    numpy sums pairwise only along the fast (last) axis; a reduction over the first axis of a
    C-contiguous array adds whole rows into the accumulator, one after another (numpy.sum's notes).
    """
    return np.add.reduce(a, axis=0)


# ------------------------------------------------------------------------------- make_qkx2_quants
def make_qkx2_quants_ref(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """One block: x, w (n,) float32 -> (l (n,) uint8, s, -m). ggml-quants.c's make_qkx2_quants (use_mad false)."""
    mn, mx = F32(min(x.min(), 0)), x.max()
    sum_w, sum_x = fsum(w), fsum(w * x)
    if mx == mn:
        return np.zeros(len(x), np.uint8), F32(0), -mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(np.uint8)
    best = fsum(w * np.square(scale * L + mn - x))
    for k in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / (mx - mn)
        la = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(np.uint8)
        sum_l, sum_l2, sum_xl = fsum(w * la), fsum(w * la * la), fsum(w * la * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min, this_scale = F32(0), sum_xl / sum_l2
            err = fsum(w * np.square(this_scale * la + this_min - x))
            if err < best:
                L, best, scale, mn = la, err, this_scale, this_min
    return L, scale, -mn


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Tuned: x, w (n, N) float32, one block per column -> (l (n, N) uint8, s (N,), -m (N,))."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mn, mx = x.min(axis=0), x.max(axis=0)  # (N,)
        mn = np.where(mn > 0, F32(0), mn)
        flat = mx == mn  # all values equal (all zero included): l = 0, s = 0
        sum_w, sum_x = seq_sum(w), seq_sum(w * x)  # (N,)
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = _levels(x - mn, iscale, 0, nmax)  # (n, N), float32 levels
        best = _error(L, scale, mn, x, w)
        for k in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / (mx - mn)  # mn: the incumbent's, as in C
            la = _levels(x - mn, iscale, 0, nmax)
            wl = w * la
            sum_l, sum_xl = seq_sum(wl), seq_sum(wl * x)
            sum_l2 = seq_sum(np.multiply(wl, la, out=wl))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            above = this_min > 0
            this_min = np.where(above, F32(0), this_min)
            this_scale = np.where(above, sum_xl / sum_l2, this_scale)
            err = _error(la, this_scale, this_min, x, w)
            take = (D > 0) & (err < best)  # (N,)
            L = np.where(take, la, L)
            best, scale, mn = np.where(take, err, best), np.where(take, this_scale, scale), np.where(take, this_min, mn)
    L = np.where(flat, F32(0), L).astype(np.uint8)
    return L, np.where(flat, F32(0), scale), -mn


def _levels(t, iscale, lo: int, hi: int):
    """clamp(round(iscale * t), lo, hi) in place on the temporary t (n, N); iscale (N,)."""
    np.multiply(t, iscale, out=t)
    np.rint(t, out=t)
    np.maximum(t, F32(lo), out=t)
    return np.minimum(t, F32(hi), out=t)


def _error(L, scale, mn, x, w):
    """sum_i w_i (scale l_i + mn - x_i)^2 per column, each step in C's order."""
    e = L * scale
    e += mn
    e -= x
    e *= e
    e *= w
    return seq_sum(e)


# ------------------------------------------------------------------------------- make_qx_quants
def make_qx_quants_ref(x, nmax: int):
    """One block: x (n,) float32 -> (l + nmax (n,) uint8, s). ggml-quants.c's make_qx_quants, rmse_type 1, no qw."""
    i = int(np.argmax(np.abs(x)))  # first index of the largest |x|, as C's strict `>`
    amax, mx = np.abs(x[i]), x[i]
    if amax < GROUP_MAX_EPS:
        return np.zeros(len(x), np.uint8), F32(0)
    w = x * x
    iscale = F32(-nmax) / mx
    lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)  # C's int l, used as a float
    L = (lv + nmax).astype(np.uint8)
    sumlx, suml2 = fsum(w * x * lv), fsum(w * lv * lv)
    scale = sumlx / suml2 if suml2 else F32(0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(k)) / mx
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        sumlx, suml2 = fsum(w * x * lv), fsum(w * lv * lv)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = (lv + nmax).astype(np.uint8)
            scale = sumlx / suml2
            best = scale * sumlx
    return L, scale


def make_qx_quants(x, nmax: int):
    """Tuned: x (n, N) float32, one block per column -> (l + nmax (n, N) uint8, s (N,))."""
    n, N = x.shape
    cols = np.arange(N)
    mx = x[np.abs(x).argmax(axis=0), cols]  # (N,): the value of largest |x|, first one on ties
    zero = np.abs(mx) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = x * x
        wx = w * x  # C's w*x[i]*l is (w x) l

        def trial(iscale):
            lv = np.clip(np.rint(iscale * x), -nmax, nmax - 1)  # (n, N) float32 levels
            return lv, seq_sum(wx * lv), seq_sum(w * lv * lv)

        lv, sumlx, suml2 = trial(F32(-nmax) / mx)
        L = lv
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for k in range(-9, 10):
            if k == 0:
                continue
            lv, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(k)) / mx)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(take, lv, L)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    L = np.where(zero, F32(0), L + F32(nmax)).astype(np.uint8)
    return L, np.where(zero, F32(0), scale)
