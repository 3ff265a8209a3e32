"""Training on several processes (torchrun): data parallel (DDP) and sharded data parallel (FSDP2).

Shape letters: W ranks (world size), L transformer blocks.

DDP keeps a whole copy of the NF4 base on every rank and all-reduces the LoRA gradients. FSDP2
(`torch.distributed.fsdp.fully_shard`) shards it: every parameter is split along dim 0 into W
pieces, a rank keeps one piece, and a block's pieces are all-gathered just before that block runs
(forward, and again in backward) and freed right after. Per rank, at rest:

    base bytes / W  +  LoRA weights, gradients and optimizer states / W

plus, while a block runs, that block's gathered base (two blocks with prefetching). NF4 codes and
their quantization state are frozen parameters for this (buffers are not sharded); each
transformer block is one fully_shard unit, under one root unit over the whole model (shard_root).
The embeddings and head are split by vocabulary rows
instead (minilora/parallel/vocab_parallel.py: each rank keeps V/W rows and the lookup and the chunked loss
exchange hidden states, never the table; FSDP would gather the whole table for the whole step);
the final norm stays whole. After the all-gather a block's NF4Linear sees its whole codes and
dequantizes exactly as on one device, so losses equal a single-process run over the same global
batch. Gradients are reduce-scattered as averages over ranks, as DDP all-reduces them; trainable
parameters must therefore live in blocks.

Checkpoints under FSDP: minilora/parallel/sharded_checkpoint.py (pieces placed by local_region).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from minilora.dtensor import full, local
from minilora.parallel.errors import ParallelError
from minilora.quant.linear import NF4_BUFFERS

PARALLEL_CHOICES = ("auto", "ddp", "fsdp")
NF4_PARAM_NAMES = NF4_BUFFERS[:3]  # weight_offset: a scalar, replicated


# ----------------------------------------------------------------------------------- process group
def init_distributed() -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device) from torchrun's environment; (0, 1, None) when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, world, device


def close_distributed() -> None:
    """Destroy the process group if one was made, so its backend threads stop before the interpreter
    exits (a rank left to exit with them running can abort: "terminate called without an active
    exception"). Garbage in reference cycles (FSDP's modules and hooks, and the collectives' work
    objects they hold) is collected first, while the interpreter is whole: freed during its
    shutdown instead, such a tensor can still abort the rank after its run finished."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(x: float | int, world: int) -> float:
    if world <= 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's `blob`, in rank order, on every rank (each padded to the longest for all_gather)."""
    if not is_distributed():
        return [blob]
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([len(blob)], device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    mine = torch.zeros(max(int(n) for n in sizes), dtype=torch.uint8)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    out = [torch.empty_like(mine, device=dev) for _ in sizes]
    dist.all_gather(out, mine.to(dev))
    return [bytes(t[: int(n)].cpu().numpy()) for t, n in zip(out, sizes)]


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def broadcast_path(path: str | None) -> str:
    """Rank 0's `path` on every rank (e.g. the temp folder rank 0 created)."""
    if not is_distributed():
        return path
    import torch.distributed as dist

    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------ choosing a strategy
def choose_parallel(requested: str, world: int, fits_one_device: bool | None = None) -> str:
    """The data-parallel strategy for this run: "none" (one process), "ddp" or "fsdp".

    `auto` picks fsdp when the memory planner says the model does not fit one device
    (`fits_one_device=False`), else ddp; None (not planned yet) counts as fitting.
    """
    if requested not in PARALLEL_CHOICES:
        raise ParallelError(f"--parallel {requested!r} is unknown; use one of {', '.join(PARALLEL_CHOICES)}.")
    if requested == "fsdp":
        return "fsdp"
    if world <= 1:
        return "none"
    if requested == "auto" and fits_one_device is False:
        return "fsdp"
    return "ddp"


def check_parallel(
    parallel: str, launched_by_torchrun: bool, optimizer_bits: int, use_dora: bool = False, init: str = "default"
) -> None:
    """Raise ParallelError for a --parallel fsdp run that cannot work, before anything is written."""
    if parallel != "fsdp":
        return
    if not launched_by_torchrun:
        raise ParallelError(
            "--parallel fsdp shards the model over several processes; launch it with "
            "`torchrun --nproc_per_node N train.py ...` (or drop --parallel fsdp)."
        )
    if optimizer_bits != 32:
        # 8-bit states are blockwise over each rank's local shard, so a checkpoint could not be
        # resharded onto another number of ranks
        raise ParallelError(
            "--optimizer-bits 8 is not supported with --parallel fsdp; use --optimizer-bits 32 "
            "(FSDP already divides the optimizer states by the number of ranks)."
        )
    if use_dora:
        # load_sharded initializes LoRA before the base weights exist; DoRA's magnitude needs them
        raise ParallelError("--use-dora is not supported with --parallel fsdp; drop --use-dora or use --parallel ddp.")
    if init not in ("default", "gaussian"):
        # PiSSA / OLoRA / LoftQ read each target's whole weight, and load_sharded builds LoRA before the
        # weights exist; every DDP rank computes the same init instead
        raise ParallelError(
            f"--init {init} is not supported with --parallel fsdp; use --parallel ddp or --init default."
        )


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


# ----------------------------------------------------------------------------------------- FSDP2
def nf4_buffers_to_parameters(model: nn.Module) -> int:
    """Re-register every NF4Linear's codes and quantization state as frozen parameters, which
    fully_shard shards (it leaves buffers whole on every rank). Returns how many tensors moved.

    The uint8 tensors (the codes, and the absmax codes of double quantization) become parameters of
    a one-byte floating dtype viewing the same bytes (quant/linear.py's BYTE_VIEW; weight_nf4 views
    them back): fully_shard before torch 2.12 makes every shard a parameter that asks for gradients,
    which an integer tensor cannot be. Its all-gather moves a block's mixed dtypes as bytes, so
    the codes arrive bit for bit."""
    from minilora.quant.linear import BYTE_VIEW, NF4Linear

    moved = 0
    for m in model.modules():
        if not isinstance(m, NF4Linear):
            continue
        for name in NF4_PARAM_NAMES:
            t = m._buffers.pop(name, None)
            if t is None:  # weight_absmax2 without double quantization
                continue
            t = t.view(BYTE_VIEW) if t.dtype == torch.uint8 else t
            m.register_parameter(name, nn.Parameter(t, requires_grad=False))
            moved += 1
    return moved


def return_freed_blocks_to_the_os(device: torch.device) -> bool:
    """On the CPU, have glibc mmap every allocation of 64 KiB or more, so that freeing it returns the
    memory to the OS. Under FSDP each step all-gathers and dequantizes every block into fresh
    buffers of many sizes; glibc's heap kept those freed buffers (RSS grew about 2 GB a step on
    Gemma 3 1B geometry, 2.6x one process), with this setting RSS stays flat. Costs page faults on
    each large allocation. True when set (glibc only; CUDA memory has its own caching allocator)."""
    if device.type != "cpu":
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """fully_shard each transformer block (in place): afterwards every block parameter is a DTensor
    sharded along dim 0 over the W ranks; embeddings and head become vocabulary-parallel (this
    rank's V/W rows, minilora/parallel/vocab_parallel.py); the final norm stays whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from minilora.parallel.vocab_parallel import shard_vocab

    nf4_buffers_to_parameters(model)
    return_freed_blocks_to_the_os(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    check_trainable_sharded(model)
    shard_vocab(model, rank(), world)
    shard_root(model, mesh)
    return model


def shard_root(model: nn.Module, mesh) -> None:
    """fully_shard the whole model as the root unit, over none of its own parameters (the blocks are
    their own units; the vocabulary-parallel embedding / head and the norms stay as they are). FSDP
    lets a root keep its gathered parameters from forward to backward (backward starts with it); with
    no unit above the blocks, each block was a root, so after a forward every rank held the whole
    base gathered (about 15 MB per Gemma 3 1B block). Under one root a block frees its gathered
    parameters after its forward and gathers them again in backward."""
    from torch.distributed.fsdp import fully_shard

    in_blocks = {id(p) for block in model.model.layers for p in block.parameters()}
    fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if id(p) not in in_blocks})


def check_trainable_sharded(model: nn.Module) -> None:
    """Raise ParallelError when a trainable parameter lies outside the blocks (its gradient would not
    be averaged over the ranks), e.g. LoRA on the output head."""
    loose = [n for n, p in model.named_parameters() if p.requires_grad and not hasattr(p, "device_mesh")]
    if loose:
        raise ParallelError(
            f"--parallel fsdp trains parameters inside the transformer blocks only, not {loose[0]}; "
            "leave it out of --lora-targets or use --parallel ddp."
        )


def nf4_resident_bytes(model: nn.Module) -> int:
    """Bytes of NF4 codes and quantization state held by this rank (its shards under FSDP)."""
    from minilora.quant.linear import NF4Linear

    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            for name in NF4_BUFFERS:
                t = getattr(m, name, None)
                if t is not None:
                    t = local(t)
                    total += t.numel() * t.element_size()
    return total


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole LoRA tensor on the CPU}; under FSDP a collective (every rank must call it)."""
    from minilora.lora.surgery import lora_state_dict

    out = {}
    for k, v in lora_state_dict(model).items():
        v = v.detach()
        out[k] = full(v).cpu()
    return out


def streams_load(model_name: str, quantize: str) -> bool:
    """Whether --parallel fsdp loads block by block (load_sharded): every NF4 checkpoint; the
    `tiny` preset is built in memory (and small), so it is built whole and then sharded."""
    return quantize == "nf4" and model_name != "tiny"


def load_sharded(
    name_or_path: str,
    dtype: torch.dtype,
    device: torch.device,
    world: int,
    lora: dict,
    blocksize: int = 64,
    double_quant: bool = True,
):
    """(model, tokenizer, LoRA report): an NF4 + LoRA model loaded straight into this rank's shards,
    so no rank ever holds the whole model, not even as NF4.

    1. The model is built on the meta device (no memory), each block linear given a stand-in
       weight of its shape that costs nothing (a broadcast zero); apply_lora(**lora) then draws
       exactly the initial A, B that it draws on a loaded model (they depend on shapes and order).
    2. The checkpoint is streamed by models/loader.py's read_weights (the reader load_model uses,
       with its checks), each block linear quantized to NF4 as it arrives (the bf16 copy of one
       weight at a time); a block is fully_shard-ed once its last tensor is in: this rank keeps 1/W.
    3. Of the embedding and an untied head only this rank's vocabulary rows are read
       (minilora/parallel/vocab_parallel.py); the final norm is read whole.
    Peak per rank: its shards + the blocks still incomplete (one, unless a block spans two files)
    + one bf16 weight. Every rank reads and quantizes every block and keeps its own shard.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from minilora.lora.surgery import apply_lora
    from minilora.models import loader as L
    from minilora.models.transformer import Transformer
    from minilora.parallel import vocab_parallel as VP

    ckpt = L.resolve_checkpoint(name_or_path)
    cfg = L.read_config(ckpt, L.preset_name(name_or_path, ckpt))
    VP.check_vocab(cfg.vocab_size, world)
    with torch.device("meta"), L.no_random_init():
        model = Transformer(cfg)
    model.tie_weights()
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # before LoRA renames the linears
    for name, mod in model.named_modules():  # 1. stand-ins, then LoRA
        if isinstance(mod, nn.Linear) and L.is_block_linear(name + ".weight"):
            mod.weight = nn.Parameter(
                torch.zeros((), dtype=dtype).expand(mod.out_features, mod.in_features), requires_grad=False
            )
    report = apply_lora(model, **lora)
    return_freed_blocks_to_the_os(device)
    mesh = init_device_mesh(device.type, (world,))

    lo, hi = VP.vocab_range(cfg.vocab_size, world, dist.get_rank())
    vocab = {"model.embed_tokens.weight", "lm_head.weight"}
    left = [0] * cfg.num_hidden_layers  # tensors still to come, per block
    for n in expected:
        if n.startswith("model.layers."):
            left[int(n.split(".")[2])] += 1
    rows = {}  # this rank's vocabulary rows
    nf4 = dict(blocksize=blocksize, double_quant=double_quant)
    for ours, t in L.read_weights(ckpt, cfg, expected, rows={n: (lo, hi) for n in vocab}):  # 2. streamed
        if ours in vocab:
            rows[ours] = t.to(device=device, dtype=dtype, copy=True)  # 3. this rank's rows only
            continue
        L.place_tensor(model, ours, t, dtype, device, nf4)
        del t
        if ours.startswith("model.layers."):
            i = int(ours.split(".")[2])
            left[i] -= 1
            if not left[i]:  # the block is whole: shard it, keeping 1/W
                nf4_buffers_to_parameters(model.model.layers[i])
                fully_shard(model.model.layers[i], mesh=mesh)
    model.inv_freq_global = model.inv_freq_global.to(device)
    model.inv_freq_local = model.inv_freq_local.to(device)
    check_trainable_sharded(model)
    VP.install(model, rows, lo)
    shard_root(model, mesh)
    return model, L.load_tokenizer(ckpt), report
