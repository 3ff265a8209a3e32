"""FSDP2 shards parameters and gradients as DTensors. These helpers let code written for one device
take either kind of tensor unchanged."""

from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2's parameters and gradients)."""
    return hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the elements this rank owns); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it); any other tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_region(t: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's shard of `t` lies in the whole tensor, one slice per dimension: all of it
    unless `t` is a DTensor (under FSDP a range of rows, torch.chunk's split of dim 0 over the ranks).
    Checkpoints store and load pieces by it (minilora/parallel/sharded_checkpoint.py)."""
    if not is_sharded(t):
        return tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # DCP's own helper

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t.to_local().shape):
        raise RuntimeError(f"shard of shape {tuple(t.to_local().shape)} where its placements give {tuple(shape)}")
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))
