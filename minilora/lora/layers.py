"""LoRA layers over a dense (nn.Linear) or NF4 (NF4Linear) base (minilora/lora/surgery.py puts them in a model).

Letters: N tokens (all leading dims of x flattened), K in_features, M out_features, r rank.

    y = W0 x + b + s * B A dropout(x)        A (r, K), B (M, r), W0 (M, K) frozen
    s = alpha / r,  or alpha / sqrt(r) with rsLoRA (arXiv 2312.03732)

DoRA (use_dora=True) adds a trainable magnitude per output row; its formula is in minilora/lora/dora.py.

Numerics follow PEFT 0.21 step for step, so the same weights give the same outputs and gradients:
the adapter weights (A, B, magnitude) are float32 while the base computes in its own dtype
(typically bf16); x is cast to float32 for the LoRA path. PEFT then combines the two differently
per base, and we do the same:
  - dense base:  y = (base(x) + s B A x).to(base dtype)      (the add happens in float32)
  - NF4 base:    y = base(x) + (s B A x).to(base dtype)      (bitsandbytes layer: cast, then add)
Inits as PEFT's init_lora_weights: "default" = A kaiming-uniform(a=sqrt(5)), B = 0; "gaussian" = A ~
N(0, 1/r^2), B = 0; and from the weight, "pissa", "pissa_niter_N", "olora", "loftq" (their math and
derivations in minilora/lora/inits.py).

On an NF4 base without DoRA, one autograd function per LoRA path (minilora/lora/nf4_fused.py) does
base + LoRA without a float32 copy of x, and keeps the dequantized weight only where planned.

The LoRA path's precision on a 16-bit base, lora_compute (a float32 base computes in float32 either
way, and DoRA keeps float32):
  - "fused" (the default on an NF4 base): the compute path's products, with the term added inside
    the base matmul's float32 sum and rounded once (_LoRANF4FusedFn: why that keeps small updates
    that PEFT's order of rounding drops). A dense base runs the float32 path.
  - "float32": PEFT's numbers above, bit for bit.
  - "compute": as PEFT under torch.autocast: the float32 master weights cast to the base's 16-bit
    compute dtype, every LoRA product and the add in that dtype.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import minilora.lora.inits as inits
from minilora.lora.dora import dora_delta, merged_dora_weight, row_norm
from minilora.lora.multi import DEFAULT, routed_forward
from minilora.lora.nf4_fused import (  # noqa: F401  (LORA_SLICE_BYTES, _row_slices re-exported)
    LORA_SLICE_BYTES,
    _LoRANF4AutocastFn,
    _LoRANF4Fn,
    _LoRANF4FusedFn,
    _row_slices,
)
from minilora.models.transformer import adapter_rows
from minilora.quant.linear import NF4_BUFFERS, NF4Linear
from minilora.quant.nf4 import quantize_nf4

INITS = inits.RANDOM_INITS + inits.WEIGHT_INITS  # pissa_niter_N: N a positive integer (inits.is_known)
LORA_COMPUTE = ("fused", "float32", "compute")  # the LoRA path's precision (module docstring)


class AdapterError(ValueError):
    """A LoRA configuration or adapter that does not fit the model (one clear sentence)."""


# --- dense weight of a base layer ----------------------------------------------------------------
def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W0 (M, K) of an nn.Linear or an NF4Linear (dequantized), in `dtype` (default: its own)."""
    if isinstance(base, NF4Linear):
        return base.dequantized_weight(dtype)
    w = base.weight
    return w if dtype is None else w.to(dtype)


# --- the layer -----------------------------------------------------------------------------------
def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_rank(r, label: str = "r") -> None:
    """A LoRA rank is an integer >= 1 (a bool is not a rank); `label` names the argument that gave it."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"LoRA rank {label}={r!r} is invalid; pass an integer >= 1 (typically 8 to 64).")


def check_alpha(alpha, label: str = "alpha") -> None:
    """lora_alpha is a finite real number (NaN or inf would make every output NaN or inf)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise AdapterError(f"LoRA {label}={alpha!r} is invalid; pass a finite number (typically 2 x the rank).")


def check_settings(r, alpha, dropout, init: str, lora_compute: str, loftq_iters) -> None:
    """The AdapterError for settings that fit no layer: rank, alpha, dropout, lora_compute, loftq_iters."""
    if lora_compute not in LORA_COMPUTE:
        raise AdapterError(f"lora_compute={lora_compute!r} is invalid; pass one of {', '.join(LORA_COMPUTE)}.")
    check_rank(r)
    check_alpha(alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"LoRA dropout={dropout!r} is invalid; pass a probability in [0, 1).")
    if init == "loftq" and (isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 1):
        raise AdapterError(f"LoRA loftq_iters={loftq_iters!r} is invalid; pass an integer >= 1.")


class LoRALinear(nn.Module):
    """y = W0 x + b + s * B A dropout(x), s = alpha/r (alpha/sqrt(r) with rsLoRA); see the module docstring.

    With use_dora, PEFT's DoRA: y = W0 x + b + (c - 1) W0 d(x) + c s B A d(x), c = m / ||W0 + s B A||_row
    (detached), m = `lora_magnitude_vector` (M,), initialised to ||W0 + s B A||_row.

    Submodules are named so that parameter names are PEFT's saved keys minus the
    `base_model.model.` prefix: `<path>.lora_A.weight`, `<path>.lora_B.weight`,
    `<path>.lora_magnitude_vector`. The frozen base layer is `<path>.base`.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        loftq_iters: int = 1,
        lora_compute: str = "fused",
    ):
        super().__init__()
        check_settings(r, alpha, dropout, init, lora_compute, loftq_iters)
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise AdapterError(f"LoRALinear wraps an nn.Linear or an NF4Linear, not {type(base).__name__}.")
        why = inits.why_not(init, r, base, use_dora)
        if why is not None:
            raise AdapterError(f"LoRA {why}.")
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout_p, self.init, self.loftq_iters = r, alpha, float(dropout), init, loftq_iters
        self.use_rslora, self.use_dora = bool(use_rslora), bool(use_dora)
        self.lora_compute = lora_compute
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight_packed.device if isinstance(base, NF4Linear) else base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.reset_lora_parameters()
        if use_dora:
            with torch.no_grad():
                norm = row_norm(base_weight(base, torch.float32), self.lora_B.weight @ self.lora_A.weight, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm)  # (M,) float32
        self.merged = False
        self.disabled = False  # inside lora_disabled(model): the base alone
        self._unmerged = None  # the base's original weight (dense) or NF4 buffers while merged
        self.adapters = None  # named adapters beside this default one, once any is loaded (lora/multi.py)
        self.train(base.training)  # built in a model in eval mode, its dropout stays off

    def reset_lora_parameters(self) -> None:
        """A, B (and for PiSSA / OLoRA / LoftQ the base) as `init` says; see minilora/lora/inits.py."""
        if inits.reads_weights(self.init):
            inits.init_from_weights(self, self.loftq_iters)  # lora_A / lora_B were drawn first, as PEFT's
            return
        if self.init in ("default", "eva"):  # eva: this A until eva.py sets the data's directions (PEFT's order)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, "
            f"rslora={self.use_rslora}, dora={self.use_dora}, merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = adapter_rows()  # (B,) adapter per row inside model(..., adapter_ids=...), else None
        if rows is not None or (self.adapters is not None and self.adapters.table.active != DEFAULT):
            return routed_forward(self, x, rows)  # a mixed batch, or a named adapter active: lora/multi.py
        if self.merged or self.disabled:
            return self.base(x)
        A, B, s = self.lora_A, self.lora_B, self.scaling
        p = self.dropout_p if self.training else 0.0
        nf4 = isinstance(self.base, NF4Linear)
        c = (self.base.compute_dtype or x.dtype) if nf4 else self.base.weight.dtype
        autocast = self.lora_compute == "compute" and c != torch.float32 and not self.use_dora
        fused = self.lora_compute == "fused" and c != torch.float32 and nf4 and not self.use_dora
        if nf4 and not self.use_dora and (torch.is_grad_enabled() or fused):  # fused: evaluation sees training's sums
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)  # (N, K)
            if autocast or fused:
                fn = _LoRANF4FusedFn if fused else _LoRANF4AutocastFn
                y = fn.apply(x2.to(c), A.weight, B.weight, self.base, s, p)
            else:
                y = _LoRANF4Fn.apply(x2, A.weight, B.weight, self.base, s, p)
            return y.view(*lead, self.out_features)  # (N, M) -> (..., M)
        result = self.base(x)  # (..., M) in the base's output dtype
        out_dtype = result.dtype
        if autocast:  # PEFT under torch.autocast: the LoRA products and the add in c
            xd = self.lora_dropout(x.to(A.weight.dtype)).to(c)  # PEFT on the CPU: dropout on float32 x
            return result + F.linear(F.linear(xd, A.weight.to(c)), B.weight.to(c)) * s
        xf = x.to(A.weight.dtype)  # float32 for the LoRA path
        if not self.use_dora:
            lora = B(A(self.lora_dropout(xf))) * s  # (..., K) -> (..., r) -> (..., M)
            return result + lora.to(out_dtype) if nf4 else (result + lora).to(out_dtype)
        dropped = p > 0
        xd = self.lora_dropout(xf) if dropped else xf
        w0 = base_weight(self.base)
        extra = dora_delta(xd, None if dropped else result, w0, self.base.bias, A, B, self.lora_magnitude_vector, s)
        return (result + extra).to(out_dtype)

    # --- merge / unmerge -----------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s * B A (M, K) float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (M, r) @ (r, K)

    def merged_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """The weight with the adapter folded in, (M, K) float32: W0 + s B A, or with DoRA
        m / ||W0 + s B A||_row * (W0 + s B A)."""
        delta = self.delta_weight()
        return merged_dora_weight(w0, delta, self.lora_magnitude_vector) if self.use_dora else w0.float() + delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (idempotent). Dense: W0 += s B A (DoRA: its merged
        weight), the original kept for an exact unmerge. NF4: dequantize, add, requantize, with a
        warning: the requantization adds rounding error on top of the adapter."""
        if self.merged:
            return
        base = self.base
        if isinstance(base, NF4Linear):
            new = self.merged_weight(base.dequantized_weight(torch.float32))
            q = quantize_nf4(new.to(base.weight_dtype), base.blocksize, base.weight_absmax2 is not None)
            self._unmerged = {k: getattr(base, k) for k in NF4_BUFFERS}
            for k, v in zip(NF4_BUFFERS, (q.packed, q.absmax, q.absmax2, q.offset)):
                setattr(base, k, v)
            warnings.warn(
                "merge_lora on an NF4 base requantizes W0 + s B A to NF4, which adds rounding "
                "error; merged outputs differ slightly from the unmerged adapter.",
                stacklevel=3,
            )
        else:
            w = base.weight
            new = self.merged_weight(w)
            self._unmerged = w.data
            w.data = new.to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base exactly as it was before merge (idempotent)."""
        if not self.merged:
            return
        if isinstance(self.base, NF4Linear):
            for k, v in self._unmerged.items():
                setattr(self.base, k, v)
        else:
            self.base.weight.data = self._unmerged
        self._unmerged, self.merged = None, False
