"""Selective recompute: which ops of a checkpointed block keep their output for backward.

Full recompute (torch.utils.checkpoint) keeps only a block's input and runs the whole block again
in backward. Selective recompute (torch's selective activation checkpointing: the same non-reentrant
checkpoint with `context_fn=selective_context`) keeps the outputs of the matrix products, the ops
that hold nearly all of a block's FLOPs, and recomputes everything between them (norms, RoPE,
activations, residual adds, casts, NF4 dequantization): those are elementwise, so backward repeats
almost no FLOPs while the block keeps a fraction of what it keeps without recompute.

Kept: aten mm / addmm / bmm (the base linears: nf4_matmul is a dequantize then an mm; a dense base
is an mm) and the fused SDPA kernels (their output and log-sum-exp). The LoRA products call
torch.mm with out= (aten mm.out), which is not kept: they are rank-r, cheap to recompute, and their
(N, M) float32 result would be larger than the base's output. A Triton kernel (the fused NF4 matmul
on CUDA for few tokens) is no aten op: it runs again in backward. minilora.train.memory_plan counts the kept
bytes (checked against saved_tensors_hooks in tests/test_recompute.py).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten
SAVED_OPS = frozenset(
    getattr(aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(aten, name)
)


def keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The policy: keep the output of a matrix product, recompute every other op."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


selective_context = functools.partial(create_selective_checkpoint_contexts, keep_matmuls)
