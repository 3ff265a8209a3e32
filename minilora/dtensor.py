"""FSDP2 shards parameters and gradients as DTensors. These two helpers let code written for one
device take either kind of tensor unchanged."""

from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the elements this rank owns); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it); any other tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
