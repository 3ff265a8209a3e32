"""The reference policy of DPO is the frozen base: no second model.

DPO scores the policy pi_theta against a reference pi_ref, the model before preference tuning:

    reward(y | x) = beta (log pi_theta(y | x) - log pi_ref(y | x))

A full fine-tune has to keep a frozen copy of the model for pi_ref (twice the weights). With LoRA,
pi_theta is the frozen base W0 plus the adapter, y = W0 x + s B A x, so the base alone *is* the model
before tuning: switch every LoRA layer off (lora.layers.lora_disabled) and the same modules compute
y = W0 x, the base model's forward exactly (its logits equal bit for bit). With QLoRA the base is the
NF4 weights already in memory, so the reference costs one extra forward per step and no memory
beyond that forward's transient activations: it runs under no_grad, nothing is kept for backward,
only its two numbers per pair (log pi_ref of the chosen and of the rejected answer) survive.
TRL does the same with PEFT's disable_adapter().

Starting from an SFT adapter (--init-adapter, train/init_adapter.py), the model before preference
tuning is the base plus that adapter: its weights are kept frozen beside the trained ones, and the
reference forward swaps them in (lora_weights_swapped) and back, bit for bit.

The reference forward runs in the same step as the policy forward, on the same PairBatch, and
draws no random numbers (a disabled LoRA layer applies no dropout; a frozen adapter swapped in runs in
eval mode, without dropout: the reference is the model before tuning, not a noisy draw of it), so a
resumed run sees the same reference values and the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch

from minilora.lora.layers import lora_disabled, lora_parameters
from minilora.train.loss import sequence_logprobs


@contextlib.contextmanager
def lora_weights_swapped(model, frozen: list[torch.Tensor]):
    """Inside the block the LoRA weights are `frozen` (in lora_parameters order); the trained values are
    copied back on exit, exactly. Between two micro-batches no autograd graph holds the weights, so
    writing into them is safe; each rank swaps its own shard under FSDP (the copies share its layout)."""
    params = lora_parameters(model)
    with torch.no_grad():
        trained = [p.detach().clone() for p in params]
        for p, f in zip(params, frozen):
            p.detach().copy_(f)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, t in zip(params, trained):
                p.detach().copy_(t)


def reference_logprobs(model, batch, chunk: int, frozen: list[torch.Tensor] | None = None) -> torch.Tensor:
    """log pi_ref of each row of `batch` (R,): the summed log-probabilities of its labelled tokens
    under the frozen base (every LoRA layer off), or under base + the frozen adapter `frozen`, without
    grad."""
    if frozen is None:
        with torch.no_grad(), lora_disabled(model):
            logp, _ = sequence_logprobs(model, batch, chunk)
        return logp
    was_training = model.training
    model.eval()  # LoRA on: no dropout in the reference (nor any draw from the RNG)
    try:
        with torch.no_grad(), lora_weights_swapped(model, frozen):
            logp, _ = sequence_logprobs(model, batch, chunk)
    finally:
        model.train(was_training)
    return logp
