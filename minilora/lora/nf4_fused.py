"""The NF4 base + LoRA autograd functions behind LoRALinear on an NF4 base (minilora/lora/layers.py),
one per LoRA path (layers.LORA_COMPUTE): _LoRANF4Fn (float32: PEFT's numbers), _LoRANF4AutocastFn
(compute: PEFT's under torch.autocast) and _LoRANF4FusedFn (fused, the default: compute's products,
the term started in the base matmul's float32 accumulator and rounded once with it).

Letters: N tokens (all leading dims of x flattened), K in_features, M out_features, r rank.

Each saves x, A, B (the parameters), the small (N, r) product A x and the dropout mask, never a
float32 copy of x; the dequantized weight only where the block keeps it (NF4Linear.keep_dequantized,
chosen by the memory planner, and then held from step to step: NF4Linear.held_weight), else it is
dequantized again in backward. The float32 path computes its LoRA terms over row slices, so no
(N, K) or (N, M) float32 temporary is built either. See bench/lora_layer.py.
"""

from __future__ import annotations

import math

import torch

from minilora.quant.linear import NF4Linear, nf4_matmul_t

# --- the fused NF4 + LoRA function ----------------------------------------------------------------
# The LoRA path runs in float32 over (rows, K) and (rows, M) slices of at most this many bytes, so no
# (N, K) or (N, M) float32 temporary is ever built. On the CPU an 8 MiB slice is reused from glibc's
# heap instead of being mapped and page-faulted afresh, and is still large enough for efficient
# GEMMs; on CUDA a training batch is one slice (few launches). bench/lora_layer.py measures it.
LORA_SLICE_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def _row_slices(n: int, width: int, device: torch.device) -> list[tuple[int, int]]:
    """[(i0, i1), ...] covering rows 0..n so that a float32 (rows, width) slice fits LORA_SLICE_BYTES."""
    rows = max(1, LORA_SLICE_BYTES.get(device.type, LORA_SLICE_BYTES["cuda"]) // (4 * max(1, width)))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _base_output(x: torch.Tensor, base: NF4Linear, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W0^T + b -> (N, M) in x's dtype, as NF4Linear computes it (the bias added after the matmul),
    W0 dequantized if kept for the backward (base.keep_dequantized, when keep: dL/dx is needed)); the
    fused Triton kernel on CUDA when it wins. No autograd: the callers' backward owns dL/dx."""
    y, w = base.keep_product(x, keep and base.keep_dequantized)  # (N, K) @ (K, M) -> (N, M)
    return (y if base.bias is None else y + base.bias.to(y.dtype)), w


def _lora_u(x: torch.Tensor, A: torch.Tensor, p: float, rows: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(u = d(x_f) A^T (N, r) float32, the dropout mask (N, K) bool or None), over the row slices `rows`.

    Dropout as nn.Dropout draws it: noise = bernoulli(1-p) / (1-p), x * noise. Drawn slice by slice,
    which on the CPU consumes the generator exactly as one whole draw (the PEFT tests with dropout
    and several slices check it); only the 1-byte mask is kept for backward."""
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if p > 0 else None  # (N, K)
    u = torch.empty(x.shape[0], A.shape[0], dtype=torch.float32, device=x.device)  # (N, r)
    for i0, i1 in rows:
        xf = x[i0:i1].float()  # (rows, K) float32, not saved
        if mask is not None:
            noise = torch.empty_like(xf).bernoulli_(1 - p).div_(1 - p)
            torch.ne(noise, 0, out=mask[i0:i1])
            xf = xf * noise  # (not in place: for float32 x, x[i0:i1].float() is x itself)
        # out= (aten's mm.out): the selective-recompute policy (models/recompute.py) saves mm
        # outputs, and the rank-r products are cheap to recompute.
        torch.mm(xf, A.t(), out=u[i0:i1])  # (rows, K) @ (K, r) -> (rows, r)
    return u, mask


class _LoRANF4Fn(torch.autograd.Function):
    """y = (x_c W0^T + b).to(x dtype) + (s * (d(x_f) A^T) B^T).to(x dtype)

    x (N, K); x_c = x in the base's compute dtype; x_f = x in float32; d(z) = z * (mask / (1-p)) is
    dropout (identity without a mask); W0 (M, K) NF4; A (r, K), B (M, r) float32. u = d(x_f) A^T (N, r) is saved.

    Backward, g = dL/dy (N, M), g_f = s * g in float32 (the cast's backward, then the scaling):
        dL/dB = g_f^T u                                  (M, N) @ (N, r) -> (M, r)
        dL/du = g_f B                                    (N, M) @ (M, r) -> (N, r)
        dL/dA = (dL/du)^T d(x_f)                         (r, N) @ (N, K) -> (r, K)
        dL/dx = (g_c W0).to(x dtype) + d'(dL/du A).to(x dtype)
              d' multiplies by mask / (1-p) again; W0 is dequantized again here (quant_linear.nf4_matmul_t)
              unless the forward kept it.
    Each term is rounded where PEFT + bitsandbytes round it, so the results agree with them. The
    float32 LoRA terms are computed over row slices (_row_slices), so dL/dA and dL/dB are sums of
    per-slice products; slicing changes only float32 summation order and BLAS blocking (last-bit
    differences, which can move a 16-bit output by one rounding step). A batch that fits one slice
    (every small test, and a CUDA training batch) computes exactly PEFT's products.
    """

    @staticmethod
    def forward(ctx, x, A, B, base: NF4Linear, scaling: float, p: float):
        in_dtype, cdt = x.dtype, base.compute_dtype or x.dtype
        y, w = _base_output(x.to(cdt), base, ctx.needs_input_grad[0])  # (N, M); w (M, K) or None
        y = y.to(in_dtype)
        rows = _row_slices(x.shape[0], max(x.shape[1], y.shape[1]), x.device)
        u, mask = _lora_u(x, A, p, rows)  # (N, r) float32, (N, K) bool or None
        # The sum goes into a new tensor, not into y: selective recompute keeps the base matmul's
        # output as it was computed and refuses (and would double-count) an in-place add into it.
        out = torch.empty_like(y)  # (N, M) in x's dtype
        lora = torch.empty(rows[0][1] - rows[0][0], y.shape[1], dtype=torch.float32, device=x.device) if rows else None
        for i0, i1 in rows:
            # out= (aten's mm.out): the selective-recompute policy (models/recompute.py) saves mm
            # outputs, and this one is cheap to recompute.
            term = torch.mm(u[i0:i1], B.t(), out=lora[: i1 - i0]).mul_(scaling)  # (rows, r) @ (r, M) -> (rows, M)
            torch.add(y[i0:i1], term.to(in_dtype), out=out[i0:i1])
        ctx.save_for_backward(x, A, B, u, mask, w)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        return out

    @staticmethod
    def backward(ctx, g):
        x, A, B, u, mask, w = ctx.saved_tensors
        s, p, base = ctx.scaling, ctx.p, ctx.base
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        gx = None
        if need_x:
            cdt = base.compute_dtype or x.dtype
            gx = nf4_matmul_t(g.to(cdt), base.weight_nf4, w).to(x.dtype)  # (N, M) @ (M, K) -> (N, K)
        gA = torch.zeros_like(A) if need_A else None  # (r, K)
        gB = torch.zeros_like(B) if need_B else None  # (M, r)
        for i0, i1 in _row_slices(x.shape[0], max(x.shape[1], g.shape[1]), x.device):
            gf = g[i0:i1].float() * s  # (rows, M) float32
            if need_B:
                gB.addmm_(gf.t(), u[i0:i1])  # (M, rows) @ (rows, r) -> (M, r)
            gu = gf @ B  # (rows, M) @ (M, r) -> (rows, r)
            del gf
            keep = None if mask is None else mask[i0:i1].float().div_(1 - p)  # d' on these rows
            if need_A:
                xf = x[i0:i1].float()
                if keep is not None:
                    xf = xf * keep  # d(x_f) again, bit for bit
                gA.addmm_(gu.t(), xf)  # (r, rows) @ (rows, K) -> (r, K)
                del xf
            if need_x:
                gl = gu @ A  # (rows, r) @ (r, K) -> (rows, K) float32
                if keep is not None:
                    gl = gl * keep
                gx[i0:i1] += gl.to(x.dtype)
        return gx, gA, gB, None, None, None


def _rank_r_product(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x A^T (N, r) in x's dtype, through aten's mm.out: the selective-recompute policy
    (models/recompute.py) saves mm outputs, and this one is cheap to recompute."""
    return torch.mm(x, A.t(), out=torch.empty(x.shape[0], A.shape[0], dtype=x.dtype, device=x.device))


def _dropout_c(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d(x) in x's dtype c, the mask or None): PEFT on the CPU under autocast drops out float32 x,
    noise = bernoulli(1 - p) / (1 - p), then autocast rounds it to c (a transient float32 copy)."""
    if p == 0:
        return x, None
    noise = torch.empty(x.shape, device=x.device).bernoulli_(1 - p).div_(1 - p)  # (N, K) float32
    return (x.float() * noise).to(x.dtype), noise != 0


class _LoRANF4AutocastFn(torch.autograd.Function):
    """y = x W0^T (+ b) + s * (d(x) A_c^T) B_c^T, every term in x's dtype c (bf16 / fp16): PEFT +
    bitsandbytes under torch.autocast, op for op, so the outputs and gradients are its bits.

    x (N, K) in c; A_c = A.to(c) (r, K), B_c = B.to(c) (M, r) from the float32 master weights; d(x) =
    (x_f * noise).to(c), noise = bernoulli(1 - p) / (1 - p) in float32 (PEFT's layers cast x to the
    adapter's float32 before dropout when CPU autocast is on; under CUDA autocast its bitsandbytes
    layer drops out in c, one rounding apart). Each product is a c GEMM (float32 accumulation inside,
    one rounding to c per output), so no float32 copy of the (N, M) LoRA term or of dL/dy is made,
    and of x only while dropout draws. u = d(x) A_c^T (N, r) is saved.

    Backward, g = dL/dy (N, M) in c, every line rounded to c as autograd rounds it under autocast:
        g_t = g s                                        (N, M)        the `* scaling`
        dL/dB = (g_t^T u).float()                        (M, N) @ (N, r)
        dL/du = g_t B_c                                  (N, M) @ (M, r)
        dL/dA = ((dL/du)^T d(x)).float()                 (r, N) @ (N, K)
        dL/dx = g W0 + d'(dL/du A_c)                     W0 kept or dequantized again; d' multiplies by noise in float32
    Against the float32 LoRA path (_LoRANF4Fn) each LoRA product carries one more rounding to c
    (relative 2^-8 in bf16) on a term that is itself rounded to c before it reaches y; the float32
    master weights, optimizer states and gradient accumulation keep every update.
    """

    @staticmethod
    def forward(ctx, x, A, B, base: NF4Linear, scaling: float, p: float):
        c = x.dtype
        A_c, B_c = A.to(c), B.to(c)  # (r, K), (M, r)
        y, w = _base_output(x, base, ctx.needs_input_grad[0])  # (N, M); w (M, K) or None
        xd, mask = _dropout_c(x, p)  # (N, K) in c, (N, K) bool or None
        u = _rank_r_product(xd, A_c)  # (N, K) @ (K, r) -> (N, r)
        ub = torch.mm(u, B_c.t(), out=torch.empty_like(y))  # (N, r) @ (r, M) -> (N, M): out=, as in _lora_u
        out = y + ub * scaling  # * s and + in c, as autocast rounds
        ctx.save_for_backward(x, A, B, u, mask, w)  # A, B: the parameters; backward casts them again
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        return out

    @staticmethod
    def backward(ctx, g):
        gA, gB, gl, w = _compute_path_grads(ctx, g)
        # the base's dL/dx + the LoRA path's, each rounded to c and added in c (PEFT's two roundings)
        gx = None if gl is None else nf4_matmul_t(g, ctx.base.weight_nf4, w) + gl
        return gx, gA, gB, None, None, None


def _compute_path_grads(ctx, g: torch.Tensor):
    """(dL/dA, dL/dB, the LoRA path's dL/dx (N, K) in c, the kept W0 or None) for _LoRANF4AutocastFn's
    backward lines (its docstring); a gradient not needed is None."""
    x, A, B, u, mask, w = ctx.saved_tensors
    A_c, B_c = A.to(x.dtype), B.to(x.dtype)  # the forward's casts, bit for bit; not kept in between
    s, p = ctx.scaling, ctx.p
    need_x, need_A, need_B = ctx.needs_input_grad[:3]
    keep = None if mask is None else mask.float().div_(1 - p)  # the forward's float32 noise, bit for bit
    if math.frexp(s)[0] == 0.5:  # s = 2^k: scaling commutes with every rounding (barring float32 under- or
        # overflow), so the small products are scaled instead of g: the same bits, one (N, M) pass fewer
        gB = (g.t() @ u).mul_(s).float() if need_B else None  # (M, r)
        gu = (g @ B_c).mul_(s)  # (N, r)
    else:
        g_t = g * s  # (N, M)
        gB = (g_t.t() @ u).float() if need_B else None  # (M, r)
        gu = g_t @ B_c  # (N, r)
        del g_t
    gA = None
    if need_A:
        xd = x if keep is None else (x.float() * keep).to(x.dtype)
        gA = (gu.t() @ xd).float()  # (r, K)
    gl = None
    if need_x:
        gl = gu @ A_c  # (N, K)
        if keep is not None:
            gl = (gl.float() * keep).to(x.dtype)
    return gA, gB, gl, w


class _LoRANF4FusedFn(torch.autograd.Function):
    """y = (x W0^T + t)_c (+ b),   t = (s u B_c^T)_c,   u = d(x) A_c^T   (N, r) in c

    The compute path's products (_LoRANF4AutocastFn: x in the base's 16-bit compute dtype c, A_c and
    B_c cast from the float32 master weights), with the LoRA term t added where the base's sum is
    still float32: one addmm whose float32 accumulator starts from t, so x W0^T + t is rounded to c
    once (quant/linear.py's nf4_matmul with add). The bias follows, as NF4Linear adds it.

    Why: PEFT adds the rounded term to an already rounded y0 = (x W0^T)_c, and (y0 + t)_c = y0
    whenever |t| < ulp(y0) / 2. Early in training, with B small, most of the adapter's effect is
    below that, so it is dropped; rounding x W0^T + t once instead moves y by one ulp with a chance
    that grows with t, keeping the effect on average (tests/test_lora_fused.py measures the mean).
    The bias added after rounds a value that is already off y0's grid, so it keeps that average.
    The term's own error is relative, as the compute path's: A, u, B and t each rounded to c.

    Backward: the compute path's lines (_compute_path_grads), so dL/dA and dL/dB are PEFT's under
    torch.autocast bit for bit; dL/dx = (g W0 + l)_c, l = d'(dL/du A_c) in c: the LoRA path's
    part joins the base's dL/dx matmul the same way, rounded once where PEFT rounds twice.

    Where the fused Triton matmul runs (kernels/dispatch.py: CUDA, few tokens) it has no float32
    accumulator to start from t, and the sums are rounded twice, in PEFT's order.
    """

    @staticmethod
    def forward(ctx, x, A, B, base: NF4Linear, scaling: float, p: float):
        c = x.dtype
        A_c, B_c = A.to(c), B.to(c)  # (r, K), (M, r)
        xd, mask = _dropout_c(x, p)  # (N, K), (N, K) bool or None
        u = _rank_r_product(xd, A_c)  # (N, K) @ (K, r) -> (N, r)
        t = torch.empty(x.shape[0], B.shape[0], dtype=c, device=x.device)  # (N, M)
        # s u B_c^T rounded once (alpha inside the product). out= (aten's addmm.out): not kept by
        # selective recompute (models/recompute.py), as _rank_r_product; beta=0 ignores t's contents.
        torch.addmm(t, u, B_c.t(), beta=0, alpha=scaling, out=t)  # (N, r) @ (r, M) -> (N, M)
        keep = ctx.needs_input_grad[0] and base.keep_dequantized
        y, w = base.keep_product(x, keep, add=t)  # (x W0^T + t)_c, w (M, K) or None
        if base.bias is not None:
            y = y + base.bias.to(c)
        ctx.save_for_backward(x, A, B, u, mask, w)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        return y

    @staticmethod
    def backward(ctx, g):
        gA, gB, gl, w = _compute_path_grads(ctx, g)
        gx = None if gl is None else nf4_matmul_t(g, ctx.base.weight_nf4, w, add=gl)  # (g W0 + l)_c
        return gx, gA, gB, None, None, None
