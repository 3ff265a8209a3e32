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

--precompute-reference computes every training pair's two reference values once, before the first
step (precompute), stores them in the run folder (STORED, with a fingerprint of the pairs they belong
to) and looks them up by pair index instead of running the reference forward: a step is then one
forward and one backward, as SFT's, and a resume reads the stored values back.

Otherwise the reference forward runs in the same step as the policy forward, on the same PairBatch, and
draws no random numbers (a disabled LoRA layer applies no dropout; a frozen adapter swapped in runs in
eval mode, without dropout: the reference is the model before tuning, not a noisy draw of it), so a
resumed run sees the same reference values and the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch

from minilora.lora.surgery import lora_disabled, lora_parameters
from minilora.train.loss import sequence_logprobs

STORED = "reference_logps.safetensors"  # in the run folder: (pairs, 2) float32, chosen then rejected


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


def fingerprint(pairs) -> str:
    """A hash of the encoded pairs' token ids and labels: which pairs, in which order, a table belongs to."""
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        for seq in (p.chosen, p.rejected):
            h.update(repr((seq.input_ids, seq.labels)).encode())
    return h.hexdigest()


def precompute(model, pairs, batch_size: int, pad_id: int, chunk: int, frozen=None, share_prompt=True) -> torch.Tensor:
    """(n, 2): log pi_ref of each pair's chosen and rejected answer, in the order of `pairs`, computed
    in batches of `batch_size` pairs without grad (every rank computes the whole table), one row per
    pair (SharedPairs) or, without share_prompt, one row per answer."""
    from minilora.data.pairs import pair_batches

    dev = next(model.parameters()).device
    table = torch.empty(len(pairs), 2, dtype=torch.float32)
    for b in pair_batches(pairs, batch_size, shuffle=False, pad_id=pad_id):
        b = b.to(dev)
        rho = reference_logprobs(model, b.shared if share_prompt else b, chunk, frozen).float().cpu()  # (2P,)
        table[b.pair_ids] = torch.stack(rho.chunk(2), dim=1)  # (P, 2)
    return table


def save_table(path: str, table: torch.Tensor, pairs) -> None:
    from safetensors.torch import save_file

    from minilora.fileio import write_file_atomic

    meta = {"fingerprint": fingerprint(pairs)}
    write_file_atomic(path, lambda tmp: save_file({"reference_logps": table.contiguous()}, tmp, metadata=meta))


def load_table(path: str, pairs) -> torch.Tensor | None:
    """The stored table when it belongs to these pairs; None when there is none or it is another's."""
    import os

    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint(pairs):
            return None
        return f.get_tensor("reference_logps")


def stored_table(out: str, model, objective, pairs, batch_size: int, pad_id: int, write: bool) -> torch.Tensor:
    """--precompute-reference: the run folder's table for these training pairs, or a new one (written
    there when `write`: rank 0)."""
    import os

    path = os.path.join(out, STORED)
    table = load_table(path, pairs)
    if table is None:
        table = precompute(model, pairs, batch_size, pad_id, objective.chunk, objective.frozen, objective.share_prompt)
        if write:
            save_table(path, table, pairs)
    return table
