"""ORPO (Hong et al. 2024): the SFT loss on the chosen answer plus lambda x an odds-ratio term; no reference.

Letters: for one pair, pi_c and pi_r are the summed log-probabilities of the chosen and the rejected
answer (loss.sequence_logprobs), n_c and n_r their token counts, lambda > 0 (--orpo-lambda).

Length-normalized log-probabilities (the paper's and TRL's), and the odds of an answer:

    l = pi / n  (< 0),      odds = p / (1 - p) with p = exp(l),      log odds = l - log(1 - exp(l))

    log OR = (l_c - l_r) - (log(1 - exp(l_c)) - log(1 - exp(l_r)))
    L_OR   = -log sigmoid(log OR)
    L      = -l_c + lambda L_OR                                        per pair, averaged over pairs

-l_c is the chosen answer's mean token NLL, the SFT term of the paper's eq. 2 for one example, over
the answer's tokens as minilora's SFT computes it (TRL's ORPOTrainer takes its NLL over prompt and
answer tokens, averaged over the batch's tokens; its odds-ratio term is the one here).
log(1 - exp(l)) is computed as TRL's log1mexp: log(-expm1(l)) near 0, log1p(-exp(l)) below -ln 2.

Gradient. d/dl [l - log(1 - e^l)] = 1 + e^l / (1 - e^l) = 1 / (1 - e^l), so

    dlog OR/dl_c = 1 / (1 - e^{l_c}),             dlog OR/dl_r = -1 / (1 - e^{l_r})
    dL_OR/dlog OR = sigmoid(log OR) - 1
    dL/dl_c = -1 + lambda (sigmoid(log OR) - 1) / (1 - e^{l_c})
    dL/dl_r = lambda (1 - sigmoid(log OR)) / (1 - e^{l_r})
    dL/dpi = dL/dl / n

The odds-ratio term always raises the chosen answer and lowers the rejected one, more strongly the
likelier an answer already is (1 / (1 - e^l) grows as p -> 1), and fades as the odds ratio grows.

Logged as TRL logs them: rewards r = lambda l per answer, margin r_c - r_r, accuracy [r_c > r_r];
the preference accuracy of held-out pairs is [l_c > l_r], the same ranking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minilora.train.pair_objective import PairObjective, PairTerms


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    pi_c: torch.Tensor, pi_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor, lam: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the per-pair loss (P,), l_c (P,), l_r (P,)) of the module docstring; inputs (P,)."""
    l_c, l_r = pi_c / n_c.clamp(min=1), pi_r / n_r.clamp(min=1)  # (P,) mean log-prob per token
    log_or = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))
    return -l_c - lam * F.logsigmoid(log_or), l_c, l_r


class ORPO(PairObjective):
    """-l_c - lambda log sigmoid(log OR) per pair (module docstring)."""

    name = "orpo"

    def __init__(self, chunk: int, lam: float = 0.1, split: bool = False, share_prompt: bool = True):
        super().__init__(chunk, split, share_prompt)
        self.lam = lam

    def terms(self, model, batch) -> PairTerms:
        (pi_c, pi_r), (n_c, n_r) = self.logprobs(model, batch)  # (P,) each, with grad
        loss, l_c, l_r = orpo_loss(pi_c, pi_r, n_c, n_r, self.lam)
        l_c, l_r = l_c.detach(), l_r.detach()
        return PairTerms(loss, self.lam * l_c, self.lam * l_r, l_c, l_r)
