"""Checkpoints under FSDP, through torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the LoRA weights and AdamW moments; DCP records their global
layout, so a load on any number of ranks (one process included, without torchrun) reads back the
pieces it needs. A checkpoint folder is checkpoint.save_checkpoint's (state.json, rng.safetensors,
written atomically by rank 0) with dcp/ and optimizer_groups.json in place of optimizer.safetensors,
and adapter/ gathered from the shards in PEFT format, as one process writes it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from minilora.parallel import distributed as D

DCP_DIR = "dcp"  # inside a checkpoint folder: the DCP files (one .distcp per rank + .metadata)
GROUPS_FILE = "optimizer_groups.json"  # hyperparameters of the optimizer's groups (lr, betas, ...)


def is_dcp_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def _as_global(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard `t` as a DTensor laid out like parameter `like` (itself when not sharded)."""
    if not hasattr(like, "device_mesh"):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t.to(D.local(like).device), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def _optimizer_params(model: nn.Module, optimizer) -> list[tuple[str, torch.Tensor]]:
    """(LoRA name, parameter) in the optimizer's index order."""
    from minilora.lora.layers import lora_state_dict

    name_of = {id(p): n for n, p in lora_state_dict(model).items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [(name_of[id(p)], p) for p in params]


def sharded_state(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """What DCP saves: {"lora/<name>": weight, "optim/<name>/<key>": AdamW moment or step}, each
    weight and moment a DTensor under FSDP (so DCP knows its global shape and this rank's piece)."""
    from minilora.lora.layers import lora_state_dict

    sd = {f"lora/{n}": p.detach() for n, p in lora_state_dict(model).items()}
    opt = optimizer.state_dict()["state"]
    for i, (name, p) in enumerate(_optimizer_params(model, optimizer)):
        for key, t in opt.get(i, {}).items():
            sd[f"optim/{name}/{key}"] = t if t.dim() == 0 else _as_global(t, p)  # step: a replicated scalar
    return sd


def write_sharded_state(tmp: str, model: nn.Module, optimizer, adapter_meta: dict) -> None:
    """Write the LoRA weights and optimizer states into checkpoint folder `tmp` (every rank calls
    this with the same `tmp`): DCP shards, plus the gathered adapter in PEFT format and the optimizer
    hyperparameters, both from rank 0."""
    import torch.distributed.checkpoint as dcp

    from minilora.fileio import write_json
    from minilora.lora.adapter import save_adapter

    dcp.save(sharded_state(model, optimizer), checkpoint_id=os.path.join(tmp, DCP_DIR))
    full = D.full_adapter_state(model)  # a collective: every rank gathers, rank 0 writes
    if D.rank() == 0:
        save_adapter(model, os.path.join(tmp, "adapter"), state=full, **adapter_meta)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        write_json(os.path.join(tmp, GROUPS_FILE), groups, fsync=True)


def save_checkpoint(
    run_dir: str,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    train_state: dict,
    adapter_meta: dict,
    keep: int = 2,
) -> str | None:
    """checkpoint.save_checkpoint under FSDP (every rank calls it): rank 0 builds the temp folder,
    every rank writes its shards into it, rank 0 adds RNG and train state and renames it into place.
    Returns the checkpoint path on rank 0, None elsewhere."""
    from minilora.train import checkpoint as C

    def write(tmp):
        write_sharded_state(D.broadcast_path(tmp), model, optimizer, adapter_meta)

    path = None
    if D.rank() == 0:
        path = C.save_checkpoint(
            run_dir, step, model, optimizer, scheduler, train_state, adapter_meta, keep, write_state=write
        )
    else:
        write(None)
    D.barrier()  # nobody reads or prunes checkpoints before rank 0 has renamed this one into place
    return path


def read_sharded_state(path: str, model: nn.Module, optimizer) -> None:
    """Load a checkpoint written by write_sharded_state into this run's model and optimizer, on any
    number of ranks: DCP reads into each rank's shards (or whole tensors in a single process)."""
    import json

    import torch.distributed.checkpoint as dcp

    from minilora.lora.layers import lora_state_dict

    src = os.path.join(path, DCP_DIR)
    saved = dcp.FileSystemReader(src).read_metadata().state_dict_metadata
    sd = {f"lora/{n}": p.detach() for n, p in lora_state_dict(model).items()}  # loaded in place
    missing = [k for k in sd if k not in saved]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks LoRA tensors such as {missing[0][5:]}; it belongs to another "
            "--lora-targets/--lora-r configuration."
        )
    params = _optimizer_params(model, optimizer)
    for name, p in params:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            k = f"optim/{name}/{key}"
            if k in saved:
                sd[k] = torch.zeros((), dtype=torch.float32) if key == "step" else torch.zeros_like(p.detach())
    dcp.load(sd, checkpoint_id=src)
    state = {}
    for i, (name, _) in enumerate(params):
        keys = ("step", "exp_avg", "exp_avg_sq")
        if all(f"optim/{name}/{k}" in sd for k in keys):
            state[i] = {k: D.local(sd[f"optim/{name}/{k}"]) for k in keys}
    with open(os.path.join(path, GROUPS_FILE)) as f:
        groups = json.load(f)
    index = iter(range(len(params)))
    for g, mine in zip(groups, optimizer.param_groups):
        g["params"] = [next(index) for _ in mine["params"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
