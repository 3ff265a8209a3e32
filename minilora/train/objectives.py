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

Pair objectives (pair_objective.py) run a PairBatch (data/pairs.py): rows 0..P-1 the chosen answers,
P..2P-1 the rejected ones, in one forward (by default one row per pair, the prompt shared: SharedPairs).
"""

from __future__ import annotations

import torch

from minilora.train.dpo import DPO
from minilora.train.loss import chunked_lm_loss
from minilora.train.orpo import ORPO

OBJECTIVES = ("sft", "dpo", "orpo")


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


def make_objective(
    name: str,
    chunk: int,
    beta=0.1,
    label_smoothing=0.0,
    dpo_loss="sigmoid",
    orpo_lambda=0.1,
    pair_split=False,
    share_prompt=True,
):
    """The objective --objective NAME selects, with its hyperparameters."""
    if name == "sft":
        return SFT(chunk)
    if name == "dpo":
        return DPO(chunk, beta, label_smoothing, dpo_loss, pair_split, share_prompt)
    if name == "orpo":
        return ORPO(chunk, orpo_lambda, pair_split, share_prompt)
    raise ValueError(f"Unknown objective '{name}'; use one of {', '.join(OBJECTIVES)}.")


class ObjectiveModule(torch.nn.Module):
    """Wraps the model so that DDP sees a whole micro-batch (reference forward included) as one forward."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch):
        return self.objective(self.model, batch)
