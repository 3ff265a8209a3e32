"""LoRA initialisations, named as PEFT's `init_lora_weights`: two that know nothing of W, three that know W.

Letters: M out_features, K in_features, r rank, k = min(M, K); s the LoRA scaling (alpha/r, or
alpha/sqrt(r) with rsLoRA); W (M, K) the layer's weight; A (r, K), B (M, r); y = W0 x + s B A x.

Random, B = 0 (the model starts exactly at W0 = W; only A's scale differs):
  default    A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(K), 1/sqrt(K)): nn.Linear's own init
  gaussian   A ~ N(0, 1/r^2)  (std 1/r, as PEFT)

From W; the adapter takes part of W and the frozen base keeps the rest, so that at step 0
W0 + s B A = W (up to rounding) and the model computes what it computed before:
  pissa      W = U S V^T (SVD, S descending). The top-r triplets become the adapter:
                 A = sqrt(S_r / s) V_r^T   (r, K)        B = U_r sqrt(S_r / s)   (M, r)
             so s B A = U_r S_r V_r^T, the best rank-r approximation of W (Eckart-Young); the base
             is the residual W0 = W - s B A = sum_{i > r} u_i s_i v_i^T. Splitting sqrt(S_r / s) over
             both factors makes every column of B and row of A equally long (||B e_i|| = ||A^T e_i|| =
             sqrt(s_i / s)), so neither factor starts at zero and their gradients are on one scale.
             PiSSA (arXiv 2404.02948) trains the principal directions and freezes the noise.
  pissa_niter_N  the same with torch.svd_lowrank(W, q=r, niter=N) (Halko et al.'s randomized SVD:
             N power iterations on a random r-column sketch), O(M K r) instead of O(M K k).
  olora      W = Q R (Householder QR; Q (M, k) orthonormal columns, R (k, K) upper triangular). The
             first r columns of Q and rows of R become the adapter:
                 B = Q[:, :r]   A = R[:r]   W0 = W - s B A = W - s Q_r R_r
             B starts orthonormal (B^T B = I_r), which OLoRA (arXiv 2406.01775) finds converges faster;
             since Q_r R_r is the part of W in span(q_1..q_r), W0 + s B A = W for any s.
  loftq      for an NF4 base (LoftQ, arXiv 2310.08659): minimize ||W - dq(Q) - s B A||_F over NF4
             codes Q and rank-r B A, alternating, with s B_0 A_0 = 0, for t = 1..T (T = --loftq-iters):
                 Q_t = NF4(W - s B_{t-1} A_{t-1})
                 s B_t A_t = the best rank-r approximation of E_t = W - dq(Q_t):  E_t = U S V^T,
                 A_t = sqrt(S_r / s) V_r^T,  B_t = U_r sqrt(S_r / s)
             The base is Q_T. With T = 1 the base is plain NF4(W), what any QLoRA loader makes of W, and
             ||W - dq(Q_1) - s B A||_F^2 = ||E_1||_F^2 - sum_{i <= r} s_i(E_1)^2, strictly below plain
             NF4's ||E_1||_F^2 unless E_1 = 0. PEFT's loftq_init returns A = sqrt(S_r) V_r^T, B =
             U_r sqrt(S_r), which reconstruct W only when s = 1; dividing by s as PiSSA does keeps
             W ~ dq(Q) + s B A for every alpha, and is PEFT's for s = 1.

Each follows PEFT 0.21 operation for operation (float32 SVD/QR of W, the residual cast back to W's
dtype), so the same W gives the same A, B and base; tests/test_inits.py compares them.

Saving for the original weights (PEFT's path_initial_model_for_weight_conversion): PiSSA and OLoRA
change the base. After training, W0 + s B A = W + s (B A - B_i A_i) with B_i, A_i the initial
factors, and B A - B_i A_i = [B, -B_i] [A; A_i] is a rank-2r LoRA on W itself:
    A' = [A; A_i] (2r, K)   B' = [B, -B_i] (M, 2r)   r' = 2r   alpha' = 2 alpha (rsLoRA: sqrt(2) alpha)
so that s' = alpha'/r' (alpha'/sqrt(r')) = s. The layer keeps A_i, B_i (buffers lora_A0, lora_B0) for it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn as nn

from minilora.quant.linear import dequantize_nf4
from minilora.quant.nf4 import quantize_nf4

RANDOM_INITS = ("default", "gaussian")
WEIGHT_INITS = ("pissa", "pissa_niter_N", "olora", "loftq")  # pissa_niter_N: N a positive integer
DATA_INITS = ("eva",)  # A from the layer's inputs on training batches (eva.py), after apply_lora
CHANGES_BASE = ("pissa", "olora")  # converted to a rank-2r LoRA on the original weights when saved
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def known_inits() -> str:
    return ", ".join(RANDOM_INITS + WEIGHT_INITS + DATA_INITS)


def is_known(init: str) -> bool:
    return init in RANDOM_INITS + DATA_INITS or init in ("pissa", "olora", "loftq") or bool(_NITER.fullmatch(str(init)))


def reads_weights(init: str) -> bool:
    """Whether the init computes A, B from W (and so needs the dense W before any quantization)."""
    return is_known(init) and init not in RANDOM_INITS + DATA_INITS


def changes_base(init: str) -> bool:
    """PiSSA and OLoRA move part of W into the adapter; LoftQ's base is NF4 of W (T = 1)."""
    return init in CHANGES_BASE or bool(_NITER.fullmatch(str(init)))


def why_not(init: str, r: int, base: nn.Module, use_dora: bool = False, rho: float = 1.0) -> str | None:
    """None, or why LoRA of rank r with `init` cannot wrap `base` (the end of one sentence); rho: EVA's."""
    if not is_known(init):
        return f"init={init!r} is unknown; use one of {known_inits()}"
    if init == "eva" and round(r * rho) > base.in_features:
        return (
            f"init 'eva' takes round(r x rho) = {round(r * rho)} directions of the layer's {base.in_features} "
            f"inputs, more than there are"
        )
    if not reads_weights(init):
        return None
    if use_dora:
        return f"init {init!r} cannot be combined with DoRA; use init 'default' or 'gaussian' with DoRA"
    if not isinstance(base, nn.Linear):
        return (
            f"init {init!r} computes the adapter from the dense weight W, but this layer is already "
            f"{type(base).__name__}; apply LoRA before quantizing (train.py quantizes the base afterwards)"
        )
    k = min(base.out_features, base.in_features)
    if r > k:
        return f"init {init!r} takes r directions of W, so r={r} must be at most min(out, in) = {k}"
    return None


def save_note(init: str, r: int, quantize: str, loftq_iters: int = 1) -> str | None:
    """What train.py tells the user about the adapter it wrote for this init, or None."""
    nf4 = " (NF4 of the residual here; on NF4 of the original weights it differs by NF4 rounding, as PEFT warns)"
    if changes_base(init):
        return (
            f"adapter: --init {init} trained against a changed base{nf4 if quantize == 'nf4' else ''}; adapter/ "
            f"holds B A - B0 A0 as a rank-{2 * r} LoRA for the original weights (r and lora_alpha doubled)"
        )
    if init == "loftq" and loftq_iters > 1:
        return (
            f"adapter: --loftq-iters {loftq_iters} trained against NF4(W - s B A), not NF4(W); loaded on the "
            "plain NF4 base (eval.py, exports, PEFT) it differs from the trained model by NF4 rounding"
        )
    return None


# --- the math, on a weight --------------------------------------------------------------------------
def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, scaling: float):
    """(A, B) = (sqrt(S_r/s) Vh_r, U_r sqrt(S_r/s)): s B A = U_r S_r Vh_r. PEFT writes diag(d) @ Vh and
    U @ diag(d); a product with a diagonal matrix adds only exact zeros, so the broadcasts are bitwise it.
    Both are made row-major as a matmul's output is: LAPACK's U is column-major, and a product with a
    column-major operand takes another BLAS path, which rounds the residual W - s B A differently."""
    root = torch.sqrt(S[:r] / scaling)  # (r,)
    return (root.unsqueeze(1) * Vh[:r]).contiguous(), (U[:, :r] * root).contiguous()  # (r, K), (M, r)


@torch.no_grad()
def pissa(w: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A (r, K), B (M, r), residual (M, K) in w's dtype) with s B A + residual = W; see the module doc.
    niter: None for the exact SVD, else torch.svd_lowrank with that many power iterations (draws
    from the global generator, as PEFT does)."""
    w32 = w.float()  # (M, K)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w32, full_matrices=False)  # (M, k), (k,), (k, K)
    else:
        U, S, V = torch.svd_lowrank(w32, q=r, niter=niter)  # (M, r), (r,), (K, r)
        Vh = V.t()
    A, B = _split(U, S, Vh, r, scaling)
    return A, B, (w32 - scaling * B @ A).to(w.dtype)  # PEFT's order: (s B) @ A


@torch.no_grad()
def olora(w: torch.Tensor, r: int, scaling: float):
    """(A = R[:r] (r, K), B = Q[:, :r] (M, r), residual W - s B A in w's dtype) from W = Q R."""
    w32 = w.float()
    Q, R = torch.linalg.qr(w32)  # (M, k), (k, K)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, (w32 - scaling * B @ A).to(w.dtype)


@torch.no_grad()
def loftq(w: torch.Tensor, r: int, scaling: float, iters: int = 1, blocksize: int = 64, double_quant: bool = True):
    """(A (r, K), B (M, r), Q) alternating NF4 quantization and a rank-r SVD, `iters` times (module doc).
    Q is an NF4Tensor of w's shape and dtype; it is quantized from float32 (quantize_nf4 computes in
    float32 whatever the input, so for iters=1 the codes are those of NF4(w) in w's own dtype)."""
    if iters < 1:
        raise ValueError(f"loftq iters={iters!r} is invalid; pass an integer >= 1.")
    w32 = w.float()  # (M, K)
    res = w32
    for t in range(iters):
        q = quantize_nf4(res, blocksize, double_quant)
        err = w32 - dequantize_nf4(q, torch.float32)  # (M, K) the quantization error E_t
        U, S, Vh = torch.linalg.svd(err, full_matrices=False)
        R, L = _split(U, S, Vh, r, 1.0)  # L R = s B_t A_t, the rank-r part of E_t
        if t + 1 < iters:
            res = w32 - L @ R  # W - s B_t A_t, quantized next (PEFT's product, so Q_t is PEFT's for any s)
    root = math.sqrt(scaling)
    return R / root, L / root, dataclasses.replace(q, dtype=w.dtype)  # A, B: s B A = L R


def niter_of(init: str) -> int | None:
    m = _NITER.fullmatch(init)
    return int(m.group(1)) if m else None


# --- on a layer ------------------------------------------------------------------------------------
@torch.no_grad()
def init_from_weights(layer: nn.Module, loftq_iters: int = 1) -> None:
    """Set layer.lora_A / lora_B from its dense base weight and replace the base as the init says
    (PiSSA/OLoRA: the residual, same dtype; LoftQ: an NF4Linear holding Q). `layer` is a LoRALinear
    whose base is an nn.Linear (callers check); A, B are float32, like every adapter weight here."""
    from minilora.quant.linear import NF4Linear

    init, base, s, r = layer.init, layer.base, layer.scaling, layer.r
    w = base.weight  # (M, K)
    if init == "loftq":
        A, B, q = loftq(w, r, s, loftq_iters)
        layer.base = NF4Linear(q, base.bias, compute_dtype=w.dtype)
    else:
        A, B, residual = olora(w, r, s) if init == "olora" else pissa(w, r, s, niter_of(init))
        w.copy_(residual)
        # the initial factors, for the rank-2r adapter on the original weights (module doc)
        layer.register_buffer("lora_A0", A.clone(), persistent=False)
        layer.register_buffer("lora_B0", B.clone(), persistent=False)
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)


# --- saving for the original weights -------------------------------------------------------------
def converted_state(mods: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rank-2r adapter on the original weights: for every layer holding initial factors,
    lora_A -> [A; A_i] (2r, K), lora_B -> [B, -B_i] (M, 2r) (PEFT's subtract_mutated_init)."""
    out = dict(state)
    for name, m in mods.items():
        if getattr(m, "lora_A0", None) is None:
            continue
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        out[a] = torch.cat([state[a].detach().float().cpu(), m.lora_A0.float().cpu()], dim=0)  # (2r, K)
        out[b] = torch.cat([state[b].detach().float().cpu(), -m.lora_B0.float().cpu()], dim=1)  # (M, 2r)
    return out


def converted_config(cfg: dict) -> dict:
    """adapter_config.json for the converted adapter, as PEFT's save_pretrained writes it: a plain LoRA
    (init_lora_weights true) of twice the rank, alpha scaled so that the scaling s is unchanged."""
    cfg = dict(cfg)
    grow = math.sqrt(2) if cfg.get("use_rslora") else 2  # alpha/sqrt(2r) = s needs sqrt(2) alpha
    cfg["init_lora_weights"] = True
    cfg["r"] = 2 * cfg["r"]
    cfg["lora_alpha"] = cfg["lora_alpha"] * grow
    cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: v * grow for k, v in (cfg.get("alpha_pattern") or {}).items()}
    return cfg


__all__ = [
    "CHANGES_BASE",
    "RANDOM_INITS",
    "WEIGHT_INITS",
    "changes_base",
    "converted_config",
    "converted_state",
    "init_from_weights",
    "is_known",
    "known_inits",
    "loftq",
    "olora",
    "pissa",
    "save_note",
    "reads_weights",
    "why_not",
]
