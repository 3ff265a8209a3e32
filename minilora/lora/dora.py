"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353) exactly as PEFT 0.21 computes it.

Letters: N tokens (leading dims of x flattened), K in_features, M out_features, r rank.

DoRA splits the adapted weight into a direction and a learned per-output-row magnitude m (M,):

    W' = m / ||W0 + s B A||_row * (W0 + s B A)          ||.||_row: L2 norm of each row (M,)

with s the LoRA scaling. PEFT calls the norm "column-wise" because it follows the paper's (K, M)
convention; on torch's (M, K) weight it is the norm of each of the M rows. m starts as
||W0 + s B A||_row (= ||W0||_row with B = 0), so W' = W0 at initialisation.

Forward, with c = m / ||W0 + s B A||_row (M,) treated as a constant in backward (the norm is
detached, as in the paper's section 4.3 and PEFT), d = dropout:

    y = base(x) + (c - 1) * (W0 d(x)) + c * s * B A d(x)

Without active dropout W0 d(x) = base(x) - bias is reused; with it, W0 d(x) is recomputed
(PEFT does the same). The gradient reaches m through c = m / norm and A, B through B A d(x)
only (never through the norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_norm(w0: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W0 + s B A||_row: (M, K), (M, K) -> (M,), in W0's dtype (PEFT's get_weight_norm)."""
    w = w0 + scaling * lora_weight  # (M, K)
    return torch.linalg.norm(w, dim=1).to(w.dtype)  # (M,)


def dora_delta(
    x: torch.Tensor,
    base_result: torch.Tensor | None,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.nn.Linear,
    lora_B: torch.nn.Linear,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """(c - 1) * W0 x + c * s * B A x, to be added to base(x). x (..., K) float32 (already dropped
    out when dropout is active); base_result = base(x) when x is not dropped out, else None."""
    w0 = w0.to(x.dtype)  # (M, K)
    lora_weight = lora_B.weight @ lora_A.weight  # (M, r) @ (r, K) -> (M, K)
    norm = row_norm(w0, lora_weight.detach(), scaling).detach()  # (M,) constant in backward
    c = (magnitude / norm).view(1, -1)  # (1, M)
    lora_result = lora_B(lora_A(x))  # (..., K) -> (..., r) -> (..., M)
    if base_result is None:
        base_result = F.linear(x, w0)  # (..., M), no bias
    elif bias is not None:
        base_result = base_result - bias
    return (c - 1) * base_result + c * lora_result * scaling  # (..., M)


def merged_dora_weight(w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = m / ||W0 + dW||_row * (W0 + dW), dW = s B A already scaled; float32 (M, K)."""
    w0 = w0.float()
    norm = row_norm(w0, delta, 1.0).detach()  # (M,)
    return (magnitude.detach() / norm).view(-1, 1) * (w0 + delta)  # (M, 1) * (M, K)
