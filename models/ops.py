"""Memory-lean autograd functions for the transformer block: the same forward numbers as the plain
PyTorch ops, fewer bytes kept for backward; and the attention kernel's choice.

Letters: N rows (all leading dims), D the normalized width, F the MLP width; e bytes per element of
the activations' dtype.

    rms_norm      plain autograd keeps the float32 upcast of x (4 D per row, also for a bf16 x) and
                  rstd; this keeps x in its own dtype (e D) and rstd (4), and recomputes the float32
                  upcast in backward.
    gated_act     act(g) * u: plain autograd keeps g (for act's backward), act(g) and u (for the
                  product's); this keeps g and u, and recomputes act(g) in backward.
    rebuilt_in_backward
                  a tensor that backward can rebuild from tensors it keeps anyway is saved as the
                  recipe: Block's lean saves rebuild the normed attention and MLP inputs (which the
                  LoRA paths save for dL/dA) from the norms' inputs, and act(g) * u (down_proj's)
                  from g and u, running the forward's own ops (tests/test_lean_saves.py: same bits).
    attention     scaled_dot_product_attention, except that short 16-bit rows on the CPU run its
                  flash kernel in float32 (faster there, and more accurate), saving what the 16-bit
                  kernel saves; chosen by shape in attention_in_float32.

gated_act's backward runs the same aten ops, in the same order and dtypes, as autograd's backward of
the plain ops (derivatives.yaml: silu, gelu, mul), so its gradients are bit for bit autograd's;
rms_norm's computes the same derivative in closed form, r (gn - n mean(gn n)), in fewer passes than
autograd's term by term chain, so the two differ by float32 rounding (tests/test_ops.py bounds both
against float64); attention's is checked in tests/test_attention_cpu.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """The reference: x / sqrt(mean(x^2) + eps) in float32, then * w (cast to x's dtype first) or
    * (1 + w) in float32 (gemma, cast after). Autograd through it keeps float32 x."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.float())).type_as(x)
    return weight * xf.type_as(x)


class _RMSNormFn(torch.autograd.Function):
    """y = w * cast(n)  (Llama)   or   y = cast(n * (1 + w))  (Gemma),   n = x r,   r = (mean(x^2) + eps)^(-1/2)

    with x upcast to float32 and cast() back to x's dtype; w is frozen (the caller falls back to
    rms_norm_plain when it needs dL/dw). Saved: x (its own dtype) and r (float32, one per row).

    Backward, g = dL/dy, everything in float32 after the first line:
        gn = cast(g * w)  (Llama)   or   g (1 + w)  (Gemma)                     dL/dn
        dL/dx = gn r + dL/d(x^2) 2 x                     (n = x r; and r depends on x through x^2)
        dL/dr = sum_i gn_i x_i                           (a row sum)
        dL/d(mean) = -1/2 dL/dr r^3                      (d/dm m^(-1/2) = -1/2 r^3)
        dL/d(x_i^2) = dL/d(mean) / D
    which is r (gn - n mean(gn n)), computed in that form: five passes over (N, D) where the term by
    term form (the plain path's autograd) takes a dozen; the two differ by float32 rounding
    (tests/test_ops.py bounds both against float64).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, gemma: bool):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (N, 1) float32
        ctx.save_for_backward(x, r, weight)
        ctx.gemma = gemma
        n = xf * r  # (N, D) float32, not saved
        if gemma:
            return (n * (1.0 + weight.float())).type_as(x)
        return weight * n.type_as(x)

    @staticmethod
    def backward(ctx, g):
        x, r, weight = ctx.saved_tensors
        if ctx.gemma:
            gn = g.float() * (1.0 + weight.float())  # (N, D), a new tensor
        else:
            # The product's dtype is promote(w, x); autograd casts it to x's dtype, then to float32.
            gn = (g * weight).to(x.dtype).float()
        n = x.float() * r  # (N, D); not in place: x.float() of a float32 x is x itself
        mean_gn_n = torch.linalg.vecdot(gn, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # (N, 1)
        return gn.sub_(n.mul_(mean_gn_n)).mul_(r).to(x.dtype), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """rms_norm_plain's numbers, keeping x in its own dtype instead of its float32 copy. A trainable
    weight (full fine-tuning of norms) takes the plain path, whose autograd also gives dL/dw."""
    if weight.requires_grad and torch.is_grad_enabled():
        return rms_norm_plain(x, weight, eps, gemma)
    return _RMSNormFn.apply(x, weight, eps, gemma)


def gated_act_plain(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """The reference: act(g) * u, act = GELU-tanh (gelu) or SiLU. Autograd keeps g, act(g) and u."""
    return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u


class _GatedActFn(torch.autograd.Function):
    """y = act(g) * u,  act = SiLU (x sigmoid(x)) or GELU-tanh. Saved: g and u; act(g) is recomputed.

    Backward, with h = dL/dy:
        dL/du = h act(g)
        dL/dg = h u act'(g)       aten.silu_backward(h u, g) / aten.gelu_backward(h u, g, "tanh"),
                                  the kernels autograd's SiluBackward / GeluBackward call
    """

    @staticmethod
    def forward(ctx, g, u, gelu: bool):
        ctx.save_for_backward(g, u)
        ctx.gelu = gelu
        return gated_act_plain(g, u, gelu)

    @staticmethod
    def backward(ctx, h):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[:2]
        gg = gu = None
        if need_g:
            hu = h * u
            if ctx.gelu:
                gg = torch.ops.aten.gelu_backward(hu, g, approximate="tanh")
            else:
                gg = torch.ops.aten.silu_backward(hu, g)
        if need_u:
            gu = h * (F.gelu(g, approximate="tanh") if ctx.gelu else F.silu(g))
        return gg, gu, None


def gated_act(g: torch.Tensor, u: torch.Tensor, gelu: bool) -> torch.Tensor:
    """gated_act_plain's numbers and gradients, keeping g and u only (2 e F per row instead of 3 e F)."""
    return _GatedActFn.apply(g, u, gelu)


# --- inputs rebuilt in backward instead of kept ---------------------------------------------------
class _Rebuild:
    """The recipe that rebuilds a tensor a pack hook did not keep. Every save of the tensor (q, k and
    v's LoRA paths all save the normed x) shares one rebuild per backward, dropped after the last."""

    def __init__(self, fn):
        self.fn, self.value, self.saves, self.left = fn, None, 0, 0

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
            self.left = self.saves  # a second backward (retain_graph) rebuilds it once more
        value, self.left = self.value, self.left - 1
        if self.left <= 0:
            self.value = None
        return value


@dataclass(frozen=True)
class _Rebuilt:
    """A save of the rebuilt tensor: its shared recipe and the shape this save viewed it as."""

    recipe: _Rebuild
    shape: torch.Size


@contextlib.contextmanager
def rebuilt_in_backward(t: torch.Tensor, fn):
    """Inside the body, autograd keeps no copy of t: a save of t (or of a view of all of it, as a
    LoRA layer's reshape) keeps the recipe fn instead, and backward calls fn() (without grad) when it
    first needs t. fn must give t's bits from tensors backward keeps anyway (a norm's input, a gated
    activation's two inputs), so this saves t's bytes for an elementwise recompute."""
    # hooks do not stack (the innermost alone runs), so every other save goes to the hooks around
    # this body, if any (a measurement's); torch's own aot_autograd reads them the same way
    outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    if outer_pack is not None and outer_pack.__module__ == "torch.utils.checkpoint":
        yield  # inside a checkpointed forward or its recompute: t is the checkpoint's to drop or keep
        return
    recipe = _Rebuild(fn)
    ptr, offset, n = t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()

    def pack(s: torch.Tensor):
        same = s.untyped_storage().data_ptr() == ptr and s.storage_offset() == offset and s.numel() == n
        if same and s.is_contiguous():
            recipe.saves += 1
            return _Rebuilt(recipe, s.shape)
        return s if outer_pack is None else outer_pack(s)

    def unpack(p):
        if isinstance(p, _Rebuilt):
            return p.recipe.get().view(p.shape)
        return p if outer_unpack is None else outer_unpack(p)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# --- attention: one place chooses the kernel by shape ---------------------------------------------
# On the CPU, PyTorch's flash-attention backward in bf16 / fp16 takes nearly the same time for a
# batch of short rows as for the same tokens in long rows, while its float32 kernel's time follows
# the work (which grows with T). Attention over rows of T tokens (no cache) runs in float32 while
# T * head_dim is at most this; longer rows keep the 16-bit kernel, faster there. The crossover, measured by
# bench/attention_cpu.py, sits near the same T * head_dim for head_dim 64, 128 and 256.
FLOAT32_ATTENTION_MAX_T_HD = 320 * 64


def attention_in_float32(device_type: str, dtype: torch.dtype, seq_len: int, head_dim: int) -> bool:
    """Whether attention over rows of seq_len tokens runs in float32 (see the constant);
    minilora.train.memory_plan asks the same question to count what selective recompute keeps."""
    short = seq_len * head_dim <= FLOAT32_ATTENTION_MAX_T_HD
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and short


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive mask SDPA builds from it: 0 where allowed,
    -inf elsewhere, in `dtype`. Added to the scores it equals masking them (s + 0 = s, s - inf = -inf)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _float32_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean (True = may attend) or additive mask as the additive float32 mask the kernel takes."""
    if mask is None:
        return None
    return additive_mask(mask, torch.float32) if mask.dtype == torch.bool else mask.float()


class _Float32FlashFn(torch.autograd.Function):
    """out = softmax(q k^T * scale + mask) v for 16-bit q, k, v, computed by the CPU flash kernel in
    float32 (forward and backward), rounded to q's dtype once at the end.

    q (B, H, T, hd), k and v (B, Hkv, S, hd) with H a multiple of Hkv (query head h reads kv head
    h // (H / Hkv), the kernel's GQA); mask (B or 1, 1, T, S) or None for causal attention over
    T == S. Saved for backward, as the 16-bit kernel saves them: q, k, v and out in their own dtype
    and the float32 log-sum-exp (B, H, T). Backward upcasts them and calls the kernel's backward:
    with out rounded to 16 bits, its D = rowsum(dO * out) carries that rounding (as the 16-bit
    kernel's does), everything else is float32 until the gradients are cast to their inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float):
        m32 = _float32_mask(mask)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, mask is None, attn_mask=m32, scale=scale
        )  # (B, H, T, hd) float32, (B, H, T)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, mask = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g.float(),
            q.float(),
            k.float(),
            v.float(),
            out.float(),
            lse,
            0.0,
            mask is None,
            attn_mask=_float32_mask(mask),
            scale=ctx.scale,
        )
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None


def attention(q, k, v, mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v -> (B, H, T, hd): scaled_dot_product_attention, or for short
    16-bit rows on the CPU (attention_in_float32) its flash kernel in float32.

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with Hkv == H, or Hkv < H and enable_gqa; mask (B, 1, T, S)
    boolean (True = may attend) or additive in q's dtype, or None for causal attention over T == S.
    """
    # With or without gradients alike, so that a no-grad forward (evaluation, DPO's reference) gives
    # the training forward's numbers; a cached forward (S > T: generation) keeps SDPA.
    T, S = q.shape[-2], k.shape[-2]
    if S == T and attention_in_float32(q.device.type, q.dtype, T, q.shape[-1]):
        return _Float32FlashFn.apply(q, k, v, mask, scale)
    gqa = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **gqa)
