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
Inits as PEFT: "default" = A kaiming-uniform(a=sqrt(5)), B = 0; "gaussian" = A ~ N(0, 1/r), B = 0.

On an NF4 base without DoRA, one autograd function (_LoRANF4Fn) does base + LoRA: it saves x, the
small (N, r) product A x and the dropout mask, never a float32 copy of x and never the
dequantized weight (dequantized again, in chunks, in backward), and it computes the float32 LoRA
terms over row slices, so no (N, K) or (N, M) float32 temporary is built either. See
bench/lora_layer.py.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import torch
import torch.nn as nn

from minilora.lora.dora import dora_delta, merged_dora_weight, row_norm
from minilora.models.loader import set_module
from minilora.quant.linear import NF4_BUFFERS, NF4Linear, nf4_matmul, nf4_matmul_t
from minilora.quant.nf4 import quantize_nf4

INITS = ("default", "gaussian")


class AdapterError(ValueError):
    """A LoRA configuration or adapter that does not fit the model (one clear sentence)."""


# --- dense weight of a base layer ----------------------------------------------------------------
def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W0 (M, K) of an nn.Linear or an NF4Linear (dequantized), in `dtype` (default: its own)."""
    if isinstance(base, NF4Linear):
        return base.dequantized_weight(dtype)
    w = base.weight
    return w if dtype is None else w.to(dtype)


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


class _LoRANF4Fn(torch.autograd.Function):
    """y = (x_c W0^T + b).to(x dtype) + (s * (d(x_f) A^T) B^T).to(x dtype)

    x (N, K); x_c = x in the base's compute dtype; x_f = x in float32; d(z) = z * (mask / (1-p)) is
    dropout (identity without a mask); W0 (M, K) NF4; A (r, K), B (M, r) float32. u = d(x_f) A^T (N, r) is saved.

    Backward, g = dL/dy (N, M), g_f = s * g in float32 (the cast's backward, then the scaling):
        dL/dB = g_f^T u                                  (M, N) @ (N, r) -> (M, r)
        dL/du = g_f B                                    (N, M) @ (M, r) -> (N, r)
        dL/dA = (dL/du)^T d(x_f)                         (r, N) @ (N, K) -> (r, K)
        dL/dx = (g_c W0).to(x dtype) + d'(dL/du A).to(x dtype)
              d' multiplies by mask / (1-p) again; W0 is dequantized again here (quant_linear.nf4_matmul_t).
    Each term is rounded where PEFT + bitsandbytes round it, so the results agree with them. The
    float32 LoRA terms are computed over row slices (_row_slices), so dL/dA and dL/dB are sums of
    per-slice products; slicing changes only float32 summation order and BLAS blocking (last-bit
    differences, which can move a 16-bit output by one rounding step). A batch that fits one slice
    (every small test, and a CUDA training batch) computes exactly PEFT's products.
    """

    @staticmethod
    def forward(ctx, x, A, B, base: NF4Linear, scaling: float, p: float):
        in_dtype, cdt = x.dtype, base.compute_dtype or x.dtype
        q = base.weight_nf4
        y = nf4_matmul(x.to(cdt), q)  # (N, K) @ (K, M) -> (N, M); fused Triton kernel on CUDA when it wins
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)  # NF4Linear adds the bias after the matmul
        y = y.to(in_dtype)
        # Dropout as nn.Dropout draws it: noise = bernoulli(1-p) / (1-p), x * noise. Drawn slice by
        # slice, which on the CPU consumes the generator exactly as one whole draw (the PEFT tests
        # with dropout and several slices check it); only the 1-byte mask is kept for backward.
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if p > 0 else None  # (N, K)
        u = torch.empty(x.shape[0], A.shape[0], dtype=torch.float32, device=x.device)  # (N, r)
        # The sum goes into a new tensor, not into y: selective recompute keeps the base matmul's
        # output as it was computed and refuses (and would double-count) an in-place add into it.
        out = torch.empty_like(y)  # (N, M) in x's dtype
        rows = _row_slices(x.shape[0], max(x.shape[1], y.shape[1]), x.device)
        lora = torch.empty(rows[0][1] - rows[0][0], y.shape[1], dtype=torch.float32, device=x.device) if rows else None
        for i0, i1 in rows:
            xf = x[i0:i1].float()  # (rows, K) float32, not saved
            if mask is not None:
                noise = torch.empty_like(xf).bernoulli_(1 - p).div_(1 - p)
                torch.ne(noise, 0, out=mask[i0:i1])
                xf = xf * noise  # (not in place: for float32 x, x[i0:i1].float() is x itself)
            # The rank-r products use out= (aten's mm.out): the selective-recompute policy
            # (models/recompute.py) saves mm outputs, and these are cheap to recompute.
            torch.mm(xf, A.t(), out=u[i0:i1])  # (rows, K) @ (K, r) -> (rows, r)
            term = torch.mm(u[i0:i1], B.t(), out=lora[: i1 - i0]).mul_(scaling)  # (rows, r) @ (r, M) -> (rows, M)
            torch.add(y[i0:i1], term.to(in_dtype), out=out[i0:i1])
        ctx.save_for_backward(x, A, B, u, mask)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        return out

    @staticmethod
    def backward(ctx, g):
        x, A, B, u, mask = ctx.saved_tensors
        s, p, base = ctx.scaling, ctx.p, ctx.base
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        gx = None
        if need_x:
            cdt = base.compute_dtype or x.dtype
            gx = nf4_matmul_t(g.to(cdt), base.weight_nf4).to(x.dtype)  # (N, M) @ (M, K) -> (N, K)
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


# --- the layer -----------------------------------------------------------------------------------
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
    ):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)) or isinstance(base, LoRALinear):
            raise AdapterError(f"LoRALinear wraps an nn.Linear or an NF4Linear, not {type(base).__name__}.")
        check_rank(r)
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout={dropout!r} is invalid; pass a probability in [0, 1).")
        if init not in INITS:
            raise AdapterError(f"LoRA init={init!r} is unknown; use one of {', '.join(INITS)}.")
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout_p, self.init = r, alpha, float(dropout), init
        self.use_rslora, self.use_dora = bool(use_rslora), bool(use_dora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
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

    def reset_lora_parameters(self) -> None:
        if self.init == "default":
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
        if self.merged or self.disabled:
            return self.base(x)
        A, B, s = self.lora_A, self.lora_B, self.scaling
        p = self.dropout_p if self.training else 0.0
        nf4 = isinstance(self.base, NF4Linear)
        if nf4 and not self.use_dora and torch.is_grad_enabled():
            lead = x.shape[:-1]
            y = _LoRANF4Fn.apply(x.reshape(-1, self.in_features), A.weight, B.weight, self.base, s, p)
            return y.view(*lead, self.out_features)  # (N, M) -> (..., M)
        result = self.base(x)  # (..., M) in the base's output dtype
        out_dtype = result.dtype
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


def check_targets(model_cfg, targets, flag: str = "--lora-targets") -> list[str]:
    """select_targets on the model `model_cfg` describes, built on the meta device (no weights, no
    memory): the AdapterError apply_lora would raise, prefixed with `flag`, before anything is loaded
    or written."""
    from minilora.models.loader import no_random_init
    from minilora.models.transformer import Transformer

    with torch.device("meta"), no_random_init():
        model = Transformer(model_cfg)
    model.tie_weights()
    try:
        return select_targets(model, targets)
    except AdapterError as e:
        raise AdapterError(f"{flag}: {e}") from None


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
) -> dict:
    """Replace the targeted linears by LoRALinear in place, freeze everything else, and return
    {"trainable", "total", "percent", "message", "modules"} (message printed as PEFT prints it).
    `ranks` / `alphas` override r / alpha per module name (used when loading PEFT's rank_pattern)."""
    check_rank(r)
    names = select_targets(model, targets)
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            rr, aa = (ranks or {}).get(name, r), (alphas or {}).get(name, alpha)
            set_module(model, name, LoRALinear(model.get_submodule(name), rr, aa, dropout, init, use_rslora, use_dora))
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
    disable_adapter()). Restored on exit, also after an exception; a merged adapter is refused (its
    base weight holds the adapter)."""
    mods = list(lora_modules(model).values())
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
