"""LoRA layers over a dense (nn.Linear) or NF4 (NF4Linear) base, and the model surgery around them.

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

import contextlib
import math
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import minilora.lora.inits as inits
from minilora.lora.dora import dora_delta, merged_dora_weight, row_norm
from minilora.lora.multi import DEFAULT, NamedLoRALinear, routed_forward
from minilora.lora.nf4_fused import (  # noqa: F401  (LORA_SLICE_BYTES, _row_slices re-exported)
    LORA_SLICE_BYTES,
    _LoRANF4AutocastFn,
    _LoRANF4Fn,
    _LoRANF4FusedFn,
    _row_slices,
)
from minilora.models.loader import set_module
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


def check_rank(r) -> None:
    """A LoRA rank is an integer >= 1 (a bool is not a rank)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"LoRA rank r={r!r} is invalid; pass an integer r >= 1 (typically 8 to 64).")


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
        if lora_compute not in LORA_COMPUTE:
            raise AdapterError(f"lora_compute={lora_compute!r} is invalid; pass one of {', '.join(LORA_COMPUTE)}.")
        if not isinstance(base, (nn.Linear, NF4Linear)) or isinstance(base, LoRALinear):
            raise AdapterError(f"LoRALinear wraps an nn.Linear or an NF4Linear, not {type(base).__name__}.")
        check_rank(r)
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout={dropout!r} is invalid; pass a probability in [0, 1).")
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


# --- model surgery --------------------------------------------------------------------------------
def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / NF4Linear by name, skipping those already wrapped by a LoRALinear."""
    inside = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, NF4Linear)) and not isinstance(m, LoRALinear) and id(m) not in inside
    }


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return name.split(".")[-1] == "lm_head" or (head is not None and module is head)


def select_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear modules `targets` selects ("all-linear", a regex string, or a list of
    module-name suffixes as PEFT's target_modules); an AdapterError when one selects nothing."""
    linears = _linear_modules(model)
    if targets == "all-linear":
        names = [n for n, m in linears.items() if not _is_output_head(model, n, m)]
    elif isinstance(targets, str):
        names = [n for n in linears if re.fullmatch(targets, n)]
    else:
        targets = list(targets)
        names = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            have = sorted({n.split(".")[-1] for n in linears})
            raise AdapterError(
                f"LoRA target(s) {missing} match no linear module in the model; the linear module names are {have}."
            )
    if not names:
        have = sorted({n.split(".")[-1] for n in linears})
        raise AdapterError(
            f"LoRA targets {targets!r} match no linear module in the model; the linear module names are {have}."
        )
    return names


def check_targets(
    model_cfg, targets, flag: str = "--lora-targets", init: str = "default", r: int = 1, rho: float = 1.0
) -> list[str]:
    """select_targets on the model `model_cfg` describes, built on the meta device (no weights, no
    memory): the AdapterError apply_lora would raise, prefixed with `flag`, before anything is loaded
    or written; and for a weight-aware `init`, that rank r fits every target (inits.why_not)."""
    from minilora.models.loader import no_random_init
    from minilora.models.transformer import Transformer

    with torch.device("meta"), no_random_init():
        model = Transformer(model_cfg)
    model.tie_weights()
    try:
        names = select_targets(model, targets)
    except AdapterError as e:
        raise AdapterError(f"{flag}: {e}") from None
    for name in names:
        why = inits.why_not(init, r, model.get_submodule(name), rho=rho)
        if why is not None:
            raise AdapterError(f"--init {init} --lora-r {r} on {name}: {why}; lower --lora-r.")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) as PEFT's get_nb_trainable_parameters: parameters once each, and an NF4
    weight at its logical size (PEFT counts a bitsandbytes Params4bit as 2 x its packed bytes); an
    NF4Linear's bias is a buffer here but a frozen parameter in bitsandbytes, so it counts too."""
    trainable = total = 0
    for _, prm in model.named_parameters():
        total += prm.numel()
        trainable += prm.numel() if prm.requires_grad else 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.out_features * m.in_features + (0 if m.bias is None else m.bias.numel())
    return trainable, total


def trainable_report(model: nn.Module) -> dict:
    trainable, total = parameter_counts(model)
    pct = 100 * trainable / total if total else 0.0
    msg = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    return {"trainable": trainable, "total": total, "percent": pct, "message": msg}


def apply_lora(
    model: nn.Module,
    targets="all-linear",
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    init: str = "default",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
    verbose: bool = True,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    loftq_iters: int = 1,
    lora_compute: str = "fused",
) -> dict:
    """Replace the targeted linears by LoRALinear in place, freeze everything else, and return
    {"trainable", "total", "percent", "message", "modules"} (message printed as PEFT prints it).
    `ranks` / `alphas` override r / alpha per module name (used when loading PEFT's rank_pattern).
    A weight-aware `init` (pissa, olora, loftq) needs dense targets: apply it before quantizing."""
    check_rank(r)
    names = select_targets(model, targets)
    for name in names:  # every target checked before any is changed
        why = inits.why_not(init, (ranks or {}).get(name, r), model.get_submodule(name), use_dora)
        if why is not None:
            raise AdapterError(f"LoRA on {name}: {why}.")
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            rr, aa = (ranks or {}).get(name, r), (alphas or {}).get(name, alpha)
            layer = LoRALinear(
                model.get_submodule(name), rr, aa, dropout, init, use_rslora, use_dora, loftq_iters, lora_compute
            )
            set_module(model, name, layer)
    report = trainable_report(model)
    report["modules"] = names
    if verbose:
        print(report["message"])
    return report


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A.weight": A, "<path>.lora_B.weight": B, ["<path>.lora_magnitude_vector": m]}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(lora_state_dict(model).values())


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Inside the block every LoRA layer computes its frozen base alone, y = W0 x + b, the very call
    the model made before apply_lora (so its outputs equal the base model's bit for bit): with QLoRA
    the NF4 base is the reference policy DPO needs, and no second model is loaded (TRL's
    disable_adapter()). Named adapters (lora/multi.py) are off too. Restored on exit, also after an
    exception; a merged adapter is refused (its base weight holds the adapter)."""
    mods = [m for m in model.modules() if isinstance(m, (LoRALinear, NamedLoRALinear))]
    if any(m.merged for m in mods):
        raise AdapterError(
            "lora_disabled needs the adapter unmerged (merge_lora folded it into the base); unmerge it first."
        )
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d
