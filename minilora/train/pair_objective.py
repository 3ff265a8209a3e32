"""What DPO and ORPO share: the pair forward, the per-pair terms, their logged metrics, and held-out
evaluation on pairs.

A PairBatch (data/pairs.py) holds rows 0..P-1 the chosen answers and P..2P-1 the rejected ones, in one
forward (TRL's concatenation); each row's summed log-probability comes from the chunked head
(loss.sequence_logprobs), so no (2P, T, V) logits exist.

By default the forwards (policy and reference) run the same pairs one row each (the PairBatch's
SharedPairs): the prompt once, both answers after it, each attending to the prompt and to itself. A
causal model computes the prompt's states without looking at either answer, so the two rows of TRL's
layout compute them twice; here the model runs sum(c + a_c + a_r) tokens instead of 2 sum(c + a), for a
prompt of c tokens and answers of a_c and a_r (and pads to the longest pair, not the longest answer
sequence). The log-probabilities are the same sums of the same terms, each term computed by the same
operations on the same inputs except for how a matmul blocks its rows: equal up to rounding
(tests/test_shared_prompt.py). share_prompt=False runs TRL's layout; --pair-split always does (it
backpropagates the chosen and the rejected rows one after the other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from minilora.data.packing import IGNORE, Batch
from minilora.data.pairs import pair_batches, split_rows
from minilora.dtensor import is_sharded
from minilora.train.loss import sequence_logprobs


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

    def __init__(self, chunk: int, split: bool = False, share_prompt: bool = True):
        self.chunk = chunk
        self.split = split  # --pair-split: the halves backpropagate in turn, the chosen one recomputed (logprobs)
        self.share_prompt = share_prompt and not split  # forwards over SharedPairs (module docstring)

    def rows(self, batch):
        """What the forwards of `batch` run: its SharedPairs (one row per pair), or the PairBatch itself."""
        shared = getattr(batch, "shared", None)
        return shared if self.share_prompt and shared is not None else batch

    def normalizer(self, batch) -> int:
        return batch.n_pairs

    def logprobs(self, model, batch) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((pi_c, pi_r), (n_c, n_r)), each (P,): both answers of every pair in one forward.

        With `split` (and grad enabled) the halves run one after the other: the P chosen rows under
        activation checkpointing (its forward keeps no activations; its backward recomputes it), then
        the P rejected rows as usual. Autograd runs the nodes made last first, so the rejected half's
        backward finishes (and frees its activations) before the chosen half's recompute begins: a
        step holds one answer per pair, about an SFT step's activations on the chosen answers, for one
        more forward of half the rows (about 7/6 of the joint step's compute). The same values up to
        rounding: a P-row matmul may block its sums otherwise than a 2P-row one."""
        if not (self.split and torch.is_grad_enabled()):
            logp, counts = sequence_logprobs(model, self.rows(batch), self.chunk)  # (2P,), (2P,)
            return split_rows(logp), split_rows(counts)
        P = batch.n_pairs
        chosen_rows = rows_of(batch, slice(0, P))
        if any(is_sharded(p) for p in model.parameters()):
            # FSDP2's DTensor gradients take only the non-reentrant kind (a reentrant backward would add
            # plain tensors into them), whose recompute keeps the whole half's activations
            chosen = checkpoint(sequence_logprobs, model, chosen_rows, self.chunk, use_reentrant=False)
        else:
            # Reentrant checkpointing: the forward runs without grad and backward's recompute as an
            # ordinary forward, so the recomputed blocks save lean (models/ops.rebuilt_in_backward). Its
            # output needs a gradient only if an input does, and the LoRA weights are not inputs:
            # `anchor` is that input. (Under DDP each LoRA gradient then arrives twice: train.py gives
            # DDP a static graph.)
            anchor = torch.empty(0, requires_grad=True)
            chosen = checkpoint(
                lambda _, rows: sequence_logprobs(model, rows, self.chunk), anchor, chosen_rows, use_reentrant=True
            )
        rejected = sequence_logprobs(model, rows_of(batch, slice(P, 2 * P)), self.chunk)  # (P,), (P,) each
        return (chosen[0], rejected[0]), (chosen[1], rejected[1])

    def terms(self, model, batch) -> PairTerms:
        raise NotImplementedError

    def __call__(self, model, batch) -> tuple[torch.Tensor, int, dict]:
        t = self.terms(model, batch)
        return t.loss.sum(), batch.n_pairs, pair_metrics(t)


def rows_of(batch, rows: slice) -> Batch:
    """The Batch of `rows` of `batch` (labelled-token count recounted), same T."""
    fields = {k: getattr(batch, k)[rows] for k in Batch.__dataclass_fields__ if k != "n_label_tokens"}
    return Batch(**fields, n_label_tokens=int((fields["labels"][:, 1:] != IGNORE).sum()))


def pair_metrics(t: PairTerms) -> dict[str, float]:
    """Sums over the pairs (the loop divides by the step's pairs): rewards, margin, reward accuracy."""
    return {
        "rewards/chosen": float(t.reward_c.sum()),
        "rewards/rejected": float(t.reward_r.sum()),
        "margin": float((t.reward_c - t.reward_r).sum()),
        "accuracy": float((t.reward_c > t.reward_r).sum()),
    }


@torch.no_grad()
def evaluate_pairs(model, objective: PairObjective, pairs, batch_size: int, pad_id: int) -> dict | None:
    """Held-out pairs, in eval mode: {"loss": mean loss, "pref_accuracy": share of pairs whose chosen
    answer the model scores higher, "margin": mean reward margin, "n": pairs}; None without pairs."""
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
