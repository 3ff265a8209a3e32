"""DPO (Rafailov et al. 2023), its conservative form (label smoothing) and IPO (Azar et al. 2023).

Letters: P pairs in a micro-batch; for one pair, pi_c and pi_r are log pi_theta of the chosen and
the rejected answer (summed over the answer's tokens, loss.sequence_logprobs), rho_c and rho_r the
same under the reference (the frozen base, reference.py), n_c and n_r the answers' token counts,
beta > 0, eps in [0, 0.5) the label smoothing.

sigmoid (DPO; eps > 0: conservative DPO, which treats each label as flipped with probability eps):

    z = beta ((pi_c - rho_c) - (pi_r - rho_r))
    L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

  Gradient. d/dz[-log sigmoid(z)] = -sigmoid(-z) = sigmoid(z) - 1 and d/dz[-log sigmoid(-z)] = sigmoid(z), so

    dL/dz    = (1 - eps)(sigmoid(z) - 1) + eps sigmoid(z) = sigmoid(z) - (1 - eps)
    dL/dpi_c = beta (sigmoid(z) - 1 + eps),      dL/dpi_r = -beta (sigmoid(z) - 1 + eps)

  and dpi/dtheta = sum_t dlog p(y_t | x, y_<t)/dtheta, which TokenCrossEntropyFn backpropagates per
  token. With eps = 0 the pull on a pair fades as the policy already prefers the chosen answer
  (sigmoid(z) -> 1) and is largest, beta, where it prefers the rejected one; with eps > 0 the
  gradient changes sign at sigmoid(z) = 1 - eps, so a (possibly mislabelled) pair cannot drive z to
  infinity. The reference values carry no gradient.

ipo (IPO, with log-ratios averaged over each answer's tokens, as TRL and the IPO authors do):

    h = (pi_c - rho_c) / n_c - (pi_r - rho_r) / n_r
    L = (h - 1 / (2 beta))^2
    dL/dh = 2 (h - 1 / (2 beta)),   dL/dpi_c = dL/dh / n_c,   dL/dpi_r = -dL/dh / n_r

  a regression of the log-ratio margin onto 1/(2 beta) instead of pushing it without bound.

Logged as TRL logs them: rewards r_c = beta (pi_c - rho_c), r_r = beta (pi_r - rho_r), the margin
r_c - r_r, and the accuracy [r_c > r_r]. Held-out pairs also report the preference accuracy
[pi_c > pi_r]: before any training the adapter is zero, pi = rho and every reward is 0, while
[pi_c > pi_r] already says how the base ranks the pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minilora.train.pair_objective import PairObjective, PairTerms

LOSSES = ("sigmoid", "ipo")


def dpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    rho_c: torch.Tensor,
    rho_r: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    n_c: torch.Tensor | None = None,
    n_r: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-pair loss (P,) of the module docstring; all inputs (P,); n_c, n_r only for ipo."""
    if loss_type == "sigmoid":
        z = beta * ((pi_c - rho_c) - (pi_r - rho_r))  # (P,)
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "ipo":
        h = (pi_c - rho_c) / n_c.clamp(min=1) - (pi_r - rho_r) / n_r.clamp(min=1)  # (P,)
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"Unknown DPO loss '{loss_type}'; use one of {', '.join(LOSSES)}.")


class DPO(PairObjective):
    """-log sigmoid(beta((pi_c - rho_c) - (pi_r - rho_r))) per pair (or its conservative / IPO form)."""

    name = "dpo"

    def __init__(
        self,
        chunk: int,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        split=False,
        share_prompt=True,
    ):
        super().__init__(chunk, split, share_prompt)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.frozen = None  # --init-adapter: the initial LoRA weights, the reference beside the base (reference.py)
        self.stored = None  # --precompute-reference: (pairs, 2) reference values, looked up by pair index

    def terms(self, model, batch) -> PairTerms:
        from minilora.train.reference import reference_logprobs

        if self.stored is not None and batch.pair_ids is not None:  # the training pairs, precomputed
            rho = self.stored[batch.pair_ids.cpu()].to(batch.input_ids.device)  # (P, 2)
            rho_c, rho_r = rho[:, 0], rho[:, 1]
        else:
            rho = reference_logprobs(model, self.rows(batch), self.chunk, self.frozen)  # (2P,), no grad
            rho_c, rho_r = rho.chunk(2)  # (P,) each
        (pi_c, pi_r), (n_c, n_r) = self.logprobs(model, batch)  # (P,) each, with grad
        loss = dpo_loss(pi_c, pi_r, rho_c, rho_r, self.beta, self.label_smoothing, self.loss_type, n_c, n_r)
        with torch.no_grad():
            r_c, r_r = self.beta * (pi_c - rho_c), self.beta * (pi_r - rho_r)
        return PairTerms(loss, r_c, r_r, pi_c.detach(), pi_r.detach())
