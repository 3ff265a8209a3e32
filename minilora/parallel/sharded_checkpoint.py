"""Checkpoints under FSDP, shard by shard, in safetensors and JSON (nothing is unpickled); and the
one reader every mode resumes with, whichever mode wrote the checkpoint.

A checkpoint folder is checkpoint.save_checkpoint's (state.json, rng.safetensors, written atomically
by rank 0, and adapter/: the whole LoRA weights in PEFT format). One process and DDP add
optimizer.safetensors, the whole AdamW state. Under FSDP every rank holds only some rows of each
AdamW moment, and writes them as they are, into optimizer_shards/ in place of optimizer.safetensors:

  optimizer_shards/index.json              written by rank 0:
      {"format": "minilora.optimizer_shards/1", "world_size": W,
       "param_groups": [{"lr": ..., "betas": [...], ...}, ...],      the hyperparameters, in order
       "params": {"<LoRA name>": {"shape": [rows, cols], "step": t}}} whole shape, AdamW step count
  optimizer_shards/rank_00000.safetensors  written by rank r (one file per rank, W in all):
      tensors  "<LoRA name>/exp_avg", "<LoRA name>/exp_avg_sq": the rows this rank holds
      metadata {"offsets": JSON {"<tensor name>": [row, col]}}: where each piece starts in the whole

The LoRA weights themselves come from adapter/ (rank 0 gathers them for it anyway). To load, every
rank works out which part of each whole tensor it holds now (dtensor.local_region: all of it
on one process or under DDP, a range of rows under FSDP on any number of ranks) and reads just the
pieces that overlap that part (safetensors' get_slice), or slices it out of adapter/ and
optimizer.safetensors. So any checkpoint resumes in any mode: 1 -> N ranks, N -> 1, N -> M, DDP <->
FSDP. Checkpoints of earlier versions, written through torch.distributed.checkpoint (a dcp/ folder
whose .metadata is a pickle), are refused unread (check_readable).
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
import torch.nn as nn

from minilora.dtensor import local_region
from minilora.parallel import distributed as D
from minilora.train.checkpoint import OLD_DCP_DIR, OPTIMIZER_FILE, SHARDS_DIR

INDEX = "index.json"
FORMAT = "minilora.optimizer_shards/1"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state (FSDP runs only use 32-bit states)


def check_readable(path: str) -> None:
    """Raise UsageError for a checkpoint in the old torch.distributed.checkpoint format, without
    opening anything in it: its dcp/.metadata is a pickle, and unpickling a file can run any code."""
    from minilora.cli import UsageError

    if os.path.lexists(os.path.join(path, OLD_DCP_DIR)):
        raise UsageError(
            f"checkpoint {path} is in the old torch.distributed.checkpoint format (dcp/.metadata is a "
            "pickle, which minilora never loads because unpickling can run code); start a new run in "
            "another --out."
        )


def _rank_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank_{rank:05d}.safetensors")


def _optimizer_params(model: nn.Module, optimizer) -> list[tuple[str, torch.Tensor]]:
    """(LoRA name, parameter) in the optimizer's index order."""
    from minilora.lora.surgery import lora_state_dict

    name_of = {id(p): n for n, p in lora_state_dict(model).items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [(name_of[id(p)], p) for p in params]


# ------------------------------------------------------------------------------------------ write
def write_optimizer_shards(folder: str, model: nn.Module, optimizer) -> None:
    """Every rank writes its rows of each AdamW moment to rank_XXXXX.safetensors in `folder`; rank 0
    also writes index.json. Returns once every rank's file is on disk."""
    from safetensors.torch import save_file

    from minilora.fileio import write_json

    os.makedirs(folder, exist_ok=True)
    sd = optimizer.state_dict()
    tensors, offsets, params = {}, {}, {}
    for i, (name, p) in enumerate(_optimizer_params(model, optimizer)):
        if i not in sd["state"]:  # never stepped: no state to keep
            continue
        start = [s.start for s in local_region(p)]
        for key in MOMENTS:
            tensors[f"{name}/{key}"] = sd["state"][i][key].contiguous()  # (rows of this rank, cols)
            offsets[f"{name}/{key}"] = start
        params[name] = {"shape": list(p.shape), "step": float(sd["state"][i]["step"])}
    path = _rank_file(folder, D.rank())
    save_file(tensors, path, metadata={"offsets": json.dumps(offsets)})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    if D.rank() == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        index = {"format": FORMAT, "world_size": D.world_size(), "param_groups": groups, "params": params}
        write_json(os.path.join(folder, INDEX), index, fsync=True)
    D.barrier()  # rank 0 renames the checkpoint into place only when every rank's file is complete


def write_sharded_state(tmp: str, model: nn.Module, optimizer, adapter_meta: dict) -> None:
    """Write the LoRA weights and optimizer state into checkpoint folder `tmp` (every rank calls this
    with the same `tmp`): the gathered adapter in PEFT format from rank 0, the AdamW moments from
    every rank (write_optimizer_shards)."""
    from minilora.lora.adapter import save_adapter

    full = D.full_adapter_state(model)  # a collective: every rank gathers, rank 0 writes
    if D.rank() == 0:
        save_adapter(model, os.path.join(tmp, "adapter"), state=full, **adapter_meta)
    write_optimizer_shards(os.path.join(tmp, SHARDS_DIR), model, optimizer)


def save_checkpoint(
    run_dir: str,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    train_state: dict,
    adapter_meta: dict,
    keep: int = 2,
    rng: dict | None = None,
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
            run_dir, step, model, optimizer, scheduler, train_state, adapter_meta, keep, write_state=write, rng=rng
        )
    else:
        write(None)
    D.barrier()  # nobody reads or prunes checkpoints before rank 0 has renamed this one into place
    return path


# ------------------------------------------------------------------------------------------- read
def read_state(path: str, model: nn.Module, optimizer) -> None:
    """Load the LoRA weights and AdamW state of checkpoint `path`, written in any mode, into this
    run's model and optimizer, in any mode: each rank takes the part of each tensor it holds."""
    from minilora.lora.adapter import load_adapter

    check_readable(path)
    load_adapter(model, os.path.join(path, "adapter"))  # copies this rank's part (dtensor.local_region)
    params = _optimizer_params(model, optimizer)
    if os.path.isdir(os.path.join(path, SHARDS_DIR)):
        sd = _read_shards(os.path.join(path, SHARDS_DIR), params)
    else:
        sd = _read_whole(os.path.join(path, OPTIMIZER_FILE), params)
    index = iter(range(len(params)))
    for g, mine in zip(sd["param_groups"], optimizer.param_groups):
        g["params"] = [next(index) for _ in mine["params"]]
    optimizer.load_state_dict(sd)


def _read_whole(path: str, params: list) -> dict:
    """optimizer.safetensors (one process or DDP), each moment cut to this rank's part."""
    from minilora.optim.paged_adamw import read_optimizer_state

    sd = read_optimizer_state(path)
    for i, st in sd["state"].items():
        p = params[int(i)][1]
        if hasattr(p, "device_mesh"):  # FSDP: 32-bit moments, shaped like the whole parameter
            st.update({k: st[k][local_region(p)] for k in MOMENTS if k in st})
    return sd


def _read_shards(folder: str, params: list) -> dict:
    """optimizer_shards/ (FSDP on any number of ranks): this rank's part of each moment, read from
    the pieces that overlap it."""
    from safetensors import SafetensorError, safe_open

    try:
        with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}")
        with contextlib.ExitStack() as stack:
            pieces = {}  # tensor name -> [(open file, its key there, where the piece starts)]
            for r in range(int(index["world_size"])):
                f = stack.enter_context(safe_open(_rank_file(folder, r), framework="pt"))
                offsets = json.loads((f.metadata() or {})["offsets"])
                for key in f.keys():
                    pieces.setdefault(key, []).append((f, key, offsets[key]))
            state = {}
            for i, (name, p) in enumerate(params):
                saved = index["params"].get(name)
                if saved is None:
                    continue
                if saved["shape"] != list(p.shape):
                    raise ValueError(f"{name} has shape {saved['shape']}, this run's is {list(p.shape)}")
                region = local_region(p)
                state[i] = {"step": torch.tensor(float(saved["step"]))}
                for key in MOMENTS:
                    state[i][key] = _assemble(pieces.get(f"{name}/{key}", []), region, f"{name}/{key}")
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise ValueError(
            f"checkpoint {os.path.dirname(folder)} has unreadable or incomplete optimizer shards ({e}); "
            "resume from another checkpoint or start a new run in another --out."
        ) from None
    return {"state": state, "param_groups": index["param_groups"]}


def _assemble(pieces: list, region: tuple[slice, ...], name: str) -> torch.Tensor:
    """The part `region` of a whole tensor, copied from the saved pieces that overlap it (pieces are
    disjoint, so the overlaps must add up to the whole region)."""
    out = torch.empty([s.stop - s.start for s in region], dtype=torch.float32)
    filled = 0
    for f, key, offset in pieces:
        piece = f.get_slice(key)
        shape = piece.get_shape()
        lo = [max(s.start, o) for s, o in zip(region, offset)]
        hi = [min(s.stop, o + n) for s, o, n in zip(region, offset, shape)]
        if len(offset) != len(region) or any(h <= l for l, h in zip(lo, hi)):
            continue
        src = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))
        dst = tuple(slice(l - s.start, h - s.start) for l, h, s in zip(lo, hi, region))
        out[dst] = piece[src]
        filled += math.prod(h - l for l, h in zip(lo, hi))
    if filled != out.numel():
        raise ValueError(f"its pieces of {name} cover {filled} of the {out.numel()} values this rank needs")
    return out
