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

The reference forward runs in the same step as the policy forward, on the same PairBatch, and
draws no random numbers (a disabled LoRA layer applies no dropout), so a resumed run sees the same
reference values and the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import torch

from minilora.lora.layers import lora_disabled
from minilora.train.loss import sequence_logprobs


def reference_logprobs(model, batch, chunk: int) -> torch.Tensor:
    """log pi_ref of each row of `batch` (R,): the summed log-probabilities of its labelled tokens
    under the frozen base (every LoRA layer off), without grad."""
    with torch.no_grad(), lora_disabled(model):
        logp, _ = sequence_logprobs(model, batch, chunk)
    return logp
