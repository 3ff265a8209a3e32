"""LoRA+ (arXiv 2402.12354): B learns R times faster than A, as PEFT's create_loraplus_optimizer groups it.

With y = W0 x + s B A x, the paper's scaling analysis (model width n -> inf) shows that one learning
rate for A and B cannot make both factors learn efficiently: the rate that keeps the updates of A
stable is too small for B (the efficient rates scale as eta_A ~ n^-1, eta_B ~ n^0). It therefore sets
eta_B = R eta_A with R > 1 (2^4 in its experiments); R = 1 is plain LoRA.

The parameter groups, in PEFT 0.21's order and rules (its empty groups left out):
    group A: every trainable LoRA weight that is not lora_B and not 1-D     lr = eta,     wd
    group B: lora_B weights and 1-D parameters (DoRA's magnitude)            lr = R eta,   wd
(PEFT's embedding group and "no decay" group hold LoRA on embeddings and lora_B biases; minilora has
neither.) The weight decay of both is --weight-decay, PEFT's `loraplus_weight_decay`. Each group also
carries `lr_ratio` (1 or R): the learning-rate schedule and a resume scale every group's lr by it.
"""

from __future__ import annotations

import torch.nn as nn

from minilora.lora.surgery import lora_state_dict


def lora_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """[{params, lr, weight_decay, lr_ratio}] for A and for B (module docstring); ratio 0: one group,
    every LoRA parameter at lr (plain LoRA, the layout runs without --lora-plus-ratio have)."""
    params = lora_state_dict(model)
    if ratio == 0:
        return [{"params": list(params.values()), "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0}]
    fast = [p for n, p in params.items() if ".lora_B." in n or p.ndim == 1]  # PEFT: "lora_B" in name or 1-D
    slow = [p for n, p in params.items() if not (".lora_B." in n or p.ndim == 1)]
    return [
        {"params": slow, "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0},
        {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay, "lr_ratio": float(ratio)},
    ]


def learning_rates(lr: float, ratio: float) -> dict[str, float]:
    """The peak learning rate of each factor, as config.json records them."""
    return {"lora_A": lr, "lora_B": lr * (ratio or 1.0)}
