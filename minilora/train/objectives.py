"""Training objectives: what one micro-batch contributes to a step, behind one interface.

An objective turns a micro-batch into (loss_sum, normalizer, metrics):

    loss_sum    a scalar tensor with gradient: the sum of the objective's per-item losses
    normalizer  how many items the sum is over, known from the batch before any forward
                (`objective.normalizer(batch)`): labelled tokens for SFT, pairs for DPO and ORPO
    metrics     sums over the same items (floats), e.g. {"rewards/chosen": sum over pairs}

A step of M micro-batches (gradient accumulation, and every rank) backpropagates each
loss_sum_m / N, N = sum_m normalizer_m (all-reduced over ranks), so the step's loss is the mean over
all its items, whatever their split into micro-batches (schedule.py); logged metrics are their sums
over the step divided by N. The loop, checkpoints, resume, DDP/FSDP and the planner do not know which
objective runs.

    sft   chunked_lm_loss (loss.py): summed next-token CE over labelled tokens, normalized by their count
    dpo   dpo.py: -log sigmoid(beta((pi_c - rho_c) - (pi_r - rho_r))) per pair, the frozen base as reference
    orpo  orpo.py: chosen NLL + lambda x odds-ratio term per pair, no reference

Pair objectives run a PairBatch (data/pairs.py): rows 0..P-1 the chosen answers, P..2P-1 the rejected
ones, in one forward (TRL's concatenation); each row's summed log-probability comes from the chunked
head (loss.sequence_logprobs), so no (2P, T, V) logits exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minilora.data.pairs import split_rows
from minilora.train.loss import chunked_lm_loss, sequence_logprobs

OBJECTIVES = ("sft", "dpo", "orpo")
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "margin", "accuracy")


class SFT:
    """The next-token loss on the labelled tokens, exactly as train.py computed it before objectives."""

    name = "sft"
    pairs = False

    def __init__(self, chunk: int):
        self.chunk = chunk

    def normalizer(self, batch) -> int:
        return batch.n_label_tokens

    def __call__(self, model, batch) -> tuple[torch.Tensor, int, dict]:
        loss_sum, n = chunked_lm_loss(model, batch, self.chunk)
        return loss_sum, n, {}


@dataclass
class PairTerms:
    """Per-pair values (P,) of a pair objective: the loss (with gradient), the rewards TRL logs
    (chosen, rejected), and the scores the model ranks the two answers by (preference accuracy)."""

    loss: torch.Tensor
    reward_c: torch.Tensor
    reward_r: torch.Tensor
    score_c: torch.Tensor
    score_r: torch.Tensor


class PairObjective:
    """Shared by DPO and ORPO: the pair forward, the step interface, and held-out evaluation.
    A subclass defines terms(model, batch) -> PairTerms."""

    pairs = True

    def __init__(self, chunk: int):
        self.chunk = chunk

    def normalizer(self, batch) -> int:
        return batch.n_pairs

    def logprobs(self, model, batch) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((pi_c, pi_r), (n_c, n_r)), each (P,): both answers of every pair in one forward."""
        logp, counts = sequence_logprobs(model, batch, self.chunk)  # (2P,), (2P,)
        return split_rows(logp), split_rows(counts)

    def terms(self, model, batch) -> PairTerms:
        raise NotImplementedError

    def __call__(self, model, batch) -> tuple[torch.Tensor, int, dict]:
        t = self.terms(model, batch)
        return t.loss.sum(), batch.n_pairs, pair_metrics(t)


def pair_metrics(t: PairTerms) -> dict[str, float]:
    """Sums over the pairs (the loop divides by the step's pairs): rewards, margin, reward accuracy."""
    return {
        "rewards/chosen": float(t.reward_c.sum()),
        "rewards/rejected": float(t.reward_r.sum()),
        "margin": float((t.reward_c - t.reward_r).sum()),
        "accuracy": float((t.reward_c > t.reward_r).sum()),
    }


def make_objective(name: str, chunk: int, beta=0.1, label_smoothing=0.0, dpo_loss="sigmoid", orpo_lambda=0.1):
    """The objective --objective NAME selects, with its hyperparameters."""
    if name == "sft":
        return SFT(chunk)
    if name == "dpo":
        from minilora.train.dpo import DPO

        return DPO(chunk, beta, label_smoothing, dpo_loss)
    if name == "orpo":
        from minilora.train.orpo import ORPO

        return ORPO(chunk, orpo_lambda)
    raise ValueError(f"Unknown objective '{name}'; use one of {', '.join(OBJECTIVES)}.")


class ObjectiveModule(torch.nn.Module):
    """Wraps the model so that DDP sees a whole micro-batch (reference forward included) as one forward."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch):
        return self.objective(self.model, batch)


@torch.no_grad()
def evaluate_pairs(model, objective: PairObjective, pairs, batch_size: int, pad_id: int) -> dict | None:
    """Held-out pairs, in eval mode: {"loss": mean loss, "pref_accuracy": share of pairs whose chosen
    answer the model scores higher, "margin": mean reward margin, "n": pairs}; None without pairs."""
    from minilora.data.pairs import pair_batches

    if not pairs:
        return None
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loss = right = margin = 0.0
    try:
        for b in pair_batches(pairs, batch_size, shuffle=False, pad_id=pad_id):
            b.pair_ids = None  # held-out pairs: the reference is computed, never looked up in the training table
            t = objective.terms(model, b.to(dev))
            loss += float(t.loss.sum())
            right += float((t.score_c > t.score_r).sum())
            margin += float((t.reward_c - t.reward_r).sum())
    finally:
        model.train(was_training)
    n = len(pairs)
    return {"loss": loss / n, "pref_accuracy": right / n, "margin": margin / n, "n": n}
