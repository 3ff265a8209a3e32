"""Plan a run before it starts: the settings chosen from the predicted memory
(minilora/train/memory_plan.py): how many blocks recompute their activations and how, and how many keep
their dequantized weights, within --memory-budget or the free memory."""

from __future__ import annotations

import torch

from minilora.train.memory_plan import (
    LINEARS,
    MARGIN,
    Plan,
    attention_mask_count,
    flops_per_token,
    per_rank_components,
    plan_memory,
)
from minilora.train.process_memory import free_memory, rss_bytes, warm_runtime


def choose_recompute(fits, num_layers: int) -> int | None:
    """The fewest recomputed blocks k in 0..L with fits(k) (memory falls as k grows); None if none fits."""
    if fits(0):
        return 0
    if not fits(num_layers):
        return None
    lo, hi = 0, num_layers  # fits(hi) and not fits(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def choose_checkpointing(fits, num_layers: int) -> tuple[int, int] | None:
    """--gradient-checkpointing auto: (full, selective) block counts with fits(full, selective). Off
    if that fits; else full recompute on the fewest blocks that fit, the rest keeping everything; None
    if full recompute everywhere does not fit. Never selective: a block that keeps its activations
    rebuilds its LoRA inputs (lean saves), so on an NF4 base it keeps less than a selective block,
    which also runs every op of its forward again through torch's dispatch mode (1.4-1.5x the step
    on the CPU), while one fully recomputed block frees nearly all of a block's bytes for one forward."""
    k = choose_recompute(lambda k: fits(k, 0), num_layers)
    return None if k is None else (k, 0)


def choose_weight_reuse(fits, num_layers: int) -> int:
    """--weight-reuse auto: the most blocks w in 0..L that keep their dequantized weights with fits(w)
    (memory grows with w); 0 when none fits. plan_run asks it after the recompute choice, which is
    made with no weights kept: reuse is turned off before any block recomputes."""
    off = choose_recompute(lambda k: fits(num_layers - k), num_layers)  # the fewest blocks without it
    return 0 if off is None else num_layers - off


def choose_settings(
    fits, num_layers: int, recompute: tuple[int, int] | None = None, reuse: str = "auto"
) -> tuple[int, int, int] | None:
    """(full, selective, reuse) block counts with fits(full, selective, reuse), for
    --gradient-checkpointing (recompute: the fixed counts, or None for auto: choose_checkpointing) and
    --weight-reuse (auto, on, off). Auto reuse is chosen last, with the recompute choice made without
    it, so memory that is short turns reuse off before it turns recompute on. None: nothing fits."""
    L = num_layers
    w_min = L if reuse == "on" else 0
    chosen = recompute if recompute is not None else choose_checkpointing(lambda k, s: fits(k, s, w_min), L)
    if chosen is None:
        return None
    k, s = chosen
    return k, s, (w_min if reuse != "auto" else choose_weight_reuse(lambda w: fits(k, s, w), L))


# ------------------------------------------------------------------------------ train.py
def longest_batch(encoded, batch_kw: dict, share_prompt: bool = False) -> tuple[int, int]:
    """(rows, length) of the batch with the most padded tokens that these batching arguments produce.
    A batch of preference pairs has two rows per pair (both answers, padded to one length), or with
    share_prompt one row per pair, the prompt once and both answers (data/pairs.py's SharedPairs);
    steptime.batch_shapes forms them."""
    from minilora.train.steptime import longest_shape

    rows, length, _ = longest_shape(encoded, batch_kw, share_prompt)
    return rows, length


def plan_run(
    tc,
    model_cfg,
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int],
    fsdp_ranks: int = 1,
) -> tuple[Plan, str | None]:
    """The plan for a TrainConfig on `device`, with --gradient-checkpointing resolved (auto:
    choose_checkpointing); and an error sentence when even full recompute does not fit the budget
    (--memory-budget or the free memory).
    fsdp_ranks > 1: per rank, with the base, LoRA weights and optimizer states sharded over that
    many ranks (per_rank_components)."""
    from minilora.train.loss import default_chunk

    L = model_cfg.num_hidden_layers
    budget = int(tc.memory_budget) if tc.memory_budget != "auto" else free_memory(device) + rss_bytes()
    targets = LINEARS if tc.lora_targets == "all-linear" else tuple(tc.lora_targets.split(","))
    opt_budget = int(tc.optimizer_budget) if tc.optimizer_budget.isdigit() else None
    runtime = warm_runtime(device, dtype, recompute=False)
    chunk = tc.loss_chunk or default_chunk(device)
    pairs = getattr(tc, "objective", "sft") != "sft"
    split = pairs and getattr(tc, "pair_split", False)
    rows = shape[0] // 2 if split else shape[0]  # --pair-split: one half's activations at a time
    shared = pairs and getattr(tc, "share_prompt", False) and not split
    masks = attention_mask_count(model_cfg, shape[1], getattr(tc, "pack", False) or shared)

    def make(k: int, s: int = 0, w: int = 0) -> Plan:
        p = plan_memory(
            model_cfg,
            batch_size=rows,
            seq_len=shape[1],
            dtype=dtype,
            quantize=tc.quantize,
            lora_r=tc.lora_r,
            lora_targets=targets,
            lora_dropout=tc.lora_dropout,
            lora_compute="float32" if getattr(tc, "use_dora", False) else getattr(tc, "lora_compute", "fused"),
            optimizer_bits=tc.optimizer_bits,
            optimizer_budget=opt_budget,
            loss_chunk=chunk,
            recompute_blocks=k,
            selective_blocks=s,
            reuse_blocks=w,
            runtime=runtime,
            device_type=device.type,
            attention_masks=masks,
            held_weights=fsdp_ranks == 1,  # FSDP gathers the codes anew each step: nothing is held
            lean=not (split and fsdp_ranks > 1),  # FSDP's --pair-split recompute: a non-reentrant checkpoint
        )
        if fsdp_ranks > 1:
            p.components = per_rank_components(p.components, fsdp_ranks, L)
            p.peak = sum(b for _, b, _ in p.components)
        return p

    fixed = {"off": (0, 0), "on": (L, 0), "selective": (0, L)}.get(tc.gradient_checkpointing)
    reuse = getattr(tc, "weight_reuse", "auto")

    def fits(k: int, s: int, w: int) -> bool:
        return make(k, s, w).peak <= budget * MARGIN

    if fixed != (0, 0) and not (fixed is None and fits(0, 0, L if reuse == "on" else 0)):
        runtime = warm_runtime(device, dtype, recompute=True)  # the run recomputes: what recompute loads too
    chosen = choose_settings(fits, L, fixed, reuse)
    plan = make(*(chosen or (L, 0, L if reuse == "on" else 0)))
    if getattr(tc, "objective", "sft") == "dpo" and not tc.precompute_reference:  # a base forward per token
        plan.flops_per_token += flops_per_token(model_cfg, shape[1], 0, (), forward_only=True)
    if split:  # both halves: every row once, and the chosen half's forward once more (its recompute)
        plan.tokens_per_step = shape[0] * shape[1]
        plan.flops_per_token += flops_per_token(model_cfg, shape[1], tc.lora_r, targets, forward_only=True) / 2
    plan.budget = budget
    error = None
    if plan.peak > budget * MARGIN:
        error = plan.too_big(budget)
    return plan, error
