"""A training step's memory and FLOPs, predicted from the model's geometry and the run's settings: the
Plan of peak memory by component that minilora/train/planner.py chooses settings with.

Shape letters: B rows per batch, T the longest batch's length, N = B T tokens, n labelled tokens,
L blocks, D hidden, H / Hkv query / kv heads, hd head dim, F MLP width, V vocabulary, r LoRA rank,
e bytes per compute-dtype element (4 float32, 2 bf16), c loss chunk rows.

Memory (bytes). Static, for the whole run:
    NF4 base        every block linear (M, K): M K / 2 codes + M K / 64 absmax codes (uint8)
                    + M K / (64 * 256) * 4 second-level scales (double quantization); unquantized: M K e
    dense           embeddings V D e, the untied head V D e, norms: per block 2 D (4 D with the
                    family's sandwich_norms) + 2 hd (q_norm, k_norm with qk_norm), and the final D
    LoRA            p = sum over adapted linears of r (K + M) float32 weights: 4 p; gradients 4 p;
                    AdamW states m, v: 8 p (32-bit) or 2 p + 2 p / 256 * 4 (8-bit blockwise);
                    with --optimizer-budget only that many state bytes stay on the device
Activations that autograd keeps per token per block (what each op saves for its backward; checked
against torch.autograd.graph.saved_tensors_hooks in tests/test_planner.py):
    norms           each RMSNorm keeps its input in its own dtype and a float32 rstd per row:
                    e D + 4 per norm (2 per block, 4 with sandwich_norms); with qk_norm the q_norm /
                    k_norm per head: (H + Hkv) (e hd + 4)
    LoRA inputs     u = x A^T per adapted linear, r elements (e on an NF4 base's 16-bit LoRA paths,
                    else 4), 1 byte per input element with dropout; the inputs themselves, the normed
                    attention and MLP inputs (e D each, shared by q, k, v / gate, up) and down's act(gate)
                    * up (e F), only in recomputed blocks: a block that keeps its activations rebuilds
                    them in backward from the norms' inputs and gate, up (models/ops.rebuilt_in_backward;
                    not where a dense base's LoRA path copies its input: bf16, or with dropout)
    attention       SDPA keeps q and its output (2 e H hd), k and v unrepeated (enable_gqa: 2 e Hkv hd)
                    and the float32 log-sum-exp (4 H); its output is o_proj's saved input
    MLP             gate and up, 2 e F (act(gate) is recomputed in backward)
Outside the blocks, per token: the final norm e D + 4; RoPE's cos and sin, 2 e hd per layer kind in
use (full, sliding); per labelled token the loss's gathered hidden state and dL/dh, 2 e D. Per row,
where the rows need one (packed rows, a pair's shared prompt, a sliding window shorter than T), one
additive attention mask of e T^2 per layer kind, shared by the layers and kept for backward.
Full recompute keeps only each block's input (e D) and rebuilds one block's activations during
backward. Selective recompute (models/recompute.py) keeps the block's input and the outputs of its
matrix products and reruns only the elementwise ops between them, per token per block (checked
against the outputs its policy keeps in tests/test_recompute.py):
    input           e D
    base linears    q, k, v, o, gate, up, down outputs: e (H hd + 2 Hkv hd + 2 D + 2 F)
    attention       SDPA's output e H hd (4 H hd where short 16-bit rows run it in float32 on the
                    CPU: models/ops.py) and its float32 log-sum-exp 4 H; with attention soft-capping
                    (no SDPA) the two batched products: the scores e H T and the output e H hd
    dense base      (--quantize none) each adapted linear's LoRA products, float32: 4 r + 4 M
(the NF4 + LoRA function computes its rank-r products with out=, which the policy recomputes; the
dropout mask is redrawn from the saved RNG state). `recompute_blocks` = k recomputes the first k
blocks fully, `selective_blocks` = s the next s selectively, and the rest keep everything.
Dequantized weights kept (`reuse_blocks` = w, NF4 base only): the last w blocks keep each quantized
linear's dequantized weight (M K e) from forward to backward, where its dL/dx is needed, instead of
dequantizing it again (kept_weight_bytes: in the first block that excludes q, k, v, whose input is the
frozen embedding's output, and every linear before the first adapted one), and holds it from one step
to the next, so such a block dequantizes once per run. Its bytes count for the whole step, in a
recomputed block too; in a block that keeps its activations they would be alive at the step's peak
anyway.
Transient peaks on top: the loss chunk (c, V) in float32, a few times (logits, softmax, the bf16
copy for dL/dh, soft-capping's tanh), one dequantized base weight (M K e, plus its float32
intermediate), the backward's gradients of one block (about one block's activations).
Runtime: the process's own memory before the model exists (Python, torch, libraries, allocator
pools), measured in this process (CPU RSS); 0 on CUDA, where max_memory_allocated excludes it.
Preference pairs (--objective dpo / orpo): a batch of P pairs runs as P rows, each the prompt once and
both answers (data/pairs.py's SharedPairs), so B = P and T the longest such row; with
--no-share-prompt or --pair-split it is 2P rows (one per answer), B = 2P; with --pair-split the halves
backpropagate in turn, so activations count B = P rows, and every row's forward runs twice (its
recompute: one more forward's FLOPs per token).
DPO's reference forward (LoRA off, no grad) runs before the policy forward and keeps no activations:
its peak is one block's transient and the loss chunk, both already in the step's transient, and only
its 2P log-probabilities survive; it adds one base forward's FLOPs per token (no LoRA, no backward),
none with --precompute-reference (a table of 2 floats per training pair instead).

FLOPs per token (a multiply-add is 2 FLOPs). Forward: 2 P_base (every block weight once)
+ 2 * 2 T_avg H hd (q k^T and p v over on average T/2 causal keys) + 2 P_lora; the head 2 D V per
labelled token. Backward with a frozen base: dL/dx through every base weight (2 P_base), the
attention twice (4 * ...), LoRA 4 P_lora (dL/dA, dL/dB, dL/dx); the head's dL/dh 2 D V. Fully
recomputed blocks run their forward again; selectively recomputed ones only their LoRA products
(2 P_lora) and elementwise ops, which count as 0 FLOPs (memory-bound, not GEMM time: an estimate
that is low by their time). FLOPs are reported, not turned into time: a step's time is measured
piece by piece (minilora/train/steptime.py), since a step is not all GEMMs at one rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minilora.dtypes import dtype_name
from minilora.models.attention_pattern import SLIDING
from minilora.models.ops import attention_in_float32

MiB = 2**20
NF4_BLOCK, ABSMAX_BLOCK, STATE_BLOCK = 64, 256, 256
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOCATOR_SLACK = {"recompute": 0.45, "loss": 0.55}  # CPU heap retention, fitted (see plan_memory)
MARGIN = 0.85  # plan against 85% of the budget: the prediction is within 15% of the measured peak


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(M, K) = (out, in) of each linear in one block."""
    D, F, Hhd, Kvhd = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    )
    return {
        "q_proj": (Hhd, D),
        "k_proj": (Kvhd, D),
        "v_proj": (Kvhd, D),
        "o_proj": (D, Hhd),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
    }


@dataclass
class Plan:
    """Predicted bytes per component, the peak, and time; of num_layers blocks, `recompute_blocks`
    recompute fully, `selective_blocks` selectively, and the last `reuse_blocks` keep their
    dequantized weights."""

    components: list[tuple[str, int, str]] = field(default_factory=list)  # (name, bytes, flag that shrinks it)
    peak: int = 0
    recompute_blocks: int = 0
    selective_blocks: int = 0
    reuse_blocks: int = 0
    num_layers: int = 0
    flops_per_token: float = 0.0
    tokens_per_step: int = 0
    dtype: str = "float32"
    budget: int | None = None
    loss_chunk: int = 256

    @property
    def recompute(self) -> str:
        """off, full, selective, or the mix: "full on 3 of 30 blocks + selective on 27 of 30 blocks"."""
        k, s, L = self.recompute_blocks, self.selective_blocks, self.num_layers
        parts = [name if n == L else f"{name} on {n} of {L} blocks" for name, n in (("full", k), ("selective", s)) if n]
        return " + ".join(parts) or "off"

    @property
    def weight_reuse(self) -> str:
        """off, on, or "on the last 12 of 30 blocks": which blocks keep their dequantized weights."""
        w, L = self.reuse_blocks, self.num_layers
        return "off" if w == 0 else "on" if w == L else f"on the last {w} of {L} blocks"

    def settings(self) -> dict:
        """What the run resolved (saved in config.json under "resolved")."""
        return {
            "dtype": self.dtype,
            "gradient_checkpointing": self.recompute,
            "recompute_blocks": self.recompute_blocks,
            "selective_blocks": self.selective_blocks,
            "weight_reuse_blocks": self.reuse_blocks,
            "loss_chunk": self.loss_chunk,
            "predicted_peak_bytes": self.peak,
            "memory_budget_bytes": self.budget,
        }

    def largest(self, shrinkable: bool = False) -> tuple[str, int, str]:
        """The biggest component (name, bytes, flag); shrinkable=True: the biggest a flag can shrink
        (the runtime, the embeddings and the norms cannot be)."""
        return max((c for c in self.components if c[2] or not shrinkable), key=lambda c: c[1])

    def too_big(self, budget: int) -> str:
        """Why the plan does not fit `budget` bytes (its MARGIN share), naming the largest part and
        the flag that lowers it, or saying that what no flag lowers is already too much."""
        name, size, flag = self.largest()
        head = (
            f"the run needs about {self.peak / MiB:,.0f} MiB (with recompute {self.recompute}) but "
            f"{budget * MARGIN / MiB:,.0f} MiB are available (85% of {budget / MiB:,.0f} MiB); the largest "
            f"part is {name} ({size / MiB:,.0f} MiB)"
        )
        fixed = sum(b for _, b, f in self.components if not f)
        if fixed > budget * MARGIN:
            return (
                f"{head}, and the parts no flag lowers need {fixed / MiB:,.0f} MiB on their own: free memory or "
                "raise --memory-budget (--plan shows every part)."
            )
        if not flag:
            name, size, flag = self.largest(shrinkable=True)
            head += f", which no flag lowers; the largest that one does is {name} ({size / MiB:,.0f} MiB)"
        return f"{head}: lower it with {flag}, or pass --plan to see every part."

    def table(self) -> str:
        rows = [f"{'component':<40}{'MiB':>12}"]
        rows += [f"{name:<40}{b / MiB:>12,.1f}" for name, b, _ in self.components]
        rows.append(f"{'predicted peak':<40}{self.peak / MiB:>12,.1f}")
        if self.budget is not None:
            rows.append(f"{'budget (x 0.85 margin)':<40}{self.budget * MARGIN / MiB:>12,.1f}")
        rows.append(
            f"compute dtype {self.dtype}, recompute {self.recompute}, dequantized weights kept {self.weight_reuse}, "
            f"loss chunk {self.loss_chunk} rows"
        )
        rows.append(
            f"FLOPs per token {self.flops_per_token / 1e9:,.3f} G, tokens per micro-batch {self.tokens_per_step:,}"
            " (the longest batch)"
        )
        return "\n".join(rows)


def plan_memory(
    cfg,
    *,
    batch_size: int,
    seq_len: int,
    label_tokens: int | None = None,
    dtype=torch.float32,
    quantize: str = "nf4",
    lora_r: int = 16,
    lora_targets=LINEARS,
    lora_dropout: float = 0.0,
    lora_compute: str = "fused",
    optimizer_bits: int = 32,
    optimizer_budget: int | None = None,
    loss_chunk: int = 256,
    recompute_blocks: int = 0,
    selective_blocks: int = 0,
    reuse_blocks: int = 0,
    runtime: int = 0,
    device_type: str = "cpu",
    attention_masks: int = 0,
    held_weights: bool = True,
    lean: bool = True,
) -> Plan:
    """The memory plan for one training step on a batch of batch_size x seq_len tokens; attention_masks:
    how many (B, 1, T, T) masks the forward builds (attention_mask_count). Under FSDP (plan_run) kept
    weights are not held between steps (held_weights=False: the codes are gathered anew each step, so a
    recomputed block keeps its weights from its recompute to its backward only), and with --pair-split
    the recompute of the checkpointed half saves without lean saves (lean=False)."""
    e = torch.empty((), dtype=dtype).element_size()
    L, D, F, V, r = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, lora_r
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    fam = cfg.traits  # the family's block: how many norms, q/k norms (models/config.py FAMILIES)
    n_norm = 4 if fam.sandwich_norms else 2  # RMSNorms of width D per block
    qk_norm_rows = H + Hkv if fam.qk_norm else 0  # RMSNorms of width hd per token per block
    N = batch_size * seq_len
    n = N if label_tokens is None else min(N, label_tokens)
    shapes = linear_shapes(cfg)
    adapted = [shapes[t] for t in LINEARS if t in lora_targets]
    per_block = sum(M * K for M, K in shapes.values())
    base = L * (
        per_block * (0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * ABSMAX_BLOCK)) if quantize == "nf4" else per_block * e
    )
    norms = (L * (n_norm * D + (2 * hd if fam.qk_norm else 0)) + D) * e  # + the final norm
    dense = V * D * e * (1 if cfg.tie_word_embeddings else 2) + norms
    p = L * sum(r * (M + K) for M, K in adapted)
    states = 8 * p if optimizer_bits == 32 else 2 * p + 2 * math.ceil(p / STATE_BLOCK) * 4
    if optimizer_budget is not None:
        states = min(states, optimizer_budget)

    # u = A x (N, r) per adapted linear: in the compute dtype on the fused and compute LoRA paths of
    # an NF4 base (lora/nf4_fused.py), else float32
    u_bytes = e if quantize == "nf4" and lora_compute != "float32" else 4
    # the LoRA paths' inputs (the normed attention and MLP inputs, e D each, and act(gate) * up, e F): a
    # block that keeps its activations rebuilds them in backward (lean saves) where the path saves its
    # input itself (an NF4 base's; a dense base's in float32 without dropout); a recomputed block keeps them
    rebuilt = quantize == "nf4" or (e == 4 and lora_dropout == 0)
    act = (
        (e * D + 4) * n_norm
        + (e * hd + 4) * qk_norm_rows
        + 2 * e * (H + Hkv) * hd
        + 4 * H
        + 2 * e * F
        + u_bytes * r * len(adapted)
    )
    if lora_dropout > 0:
        act += sum(K for _, K in adapted)  # one bool mask element per LoRA input element
    act_full = act + 2 * e * D + e * F  # the block's bytes without lean saves: a recomputed block's
    act = act if rebuilt and lean else act_full
    k = max(0, min(L, recompute_blocks))
    s = max(0, min(L - k, selective_blocks))
    # selective recompute's kept bytes per token per block (see the module docstring)
    if cfg.attn_logit_softcapping is None:
        # SDPA output + float32 log-sum-exp; short 16-bit rows on the CPU run it in float32 (models/ops.py)
        e_attn = 4 if attention_in_float32(device_type, dtype, seq_len, hd) else e
        sel_attention = e_attn * H * hd + 4 * H
    else:
        sel_attention = e * H * seq_len + e * H * hd  # scores (B, H, T, T) and p v, both from bmm
    sel = e * (D + H * hd + 2 * Hkv * hd + 2 * D + 2 * F) + sel_attention
    if quantize != "nf4":
        sel += sum(4 * r + 4 * M for M, _ in adapted)  # the dense LoRA path's mm outputs, float32
    rope = 2 * hd * e * len(set(cfg.layer_types))  # cos, sin per position, one pair per layer kind in use
    final_norm = e * D + 4  # its input and rstd, as every norm
    kept = N * ((L - k - s) * act + k * e * D + s * sel + rope + final_norm) + 2 * n * D * e  # + h_sel, dL/dh
    kept += attention_masks * batch_size * seq_len * seq_len * e
    block = N * act_full  # one block's activations: rebuilt by recompute, and its gradients in backward
    w = max(0, min(L, reuse_blocks)) if quantize == "nf4" else 0
    weights = [kept_weight_bytes(cfg, lora_targets, e, first=i == 0) for i in range(L)]
    if held_weights:  # held from step to step, recomputed blocks included
        weights_kept, weights_recomputed = sum(weights[L - w :]), 0
    else:  # blocks that keep their activations keep them for the step; one recomputed block's, transient
        weights_kept = sum(weights[max(L - w, k + s) :])
        weights_recomputed = max(weights[L - w : k + s], default=0)
    cap = cfg.final_logit_softcapping is not None
    c = min(loss_chunk, n)
    # per chunk, float32: z, z - lse and exp(z - lse); soft-capping adds z / cap and tanh; a 16-bit
    # head adds the 16-bit logits and the 16-bit softmax
    loss = c * V * (4 * 3 + (4 * 2 if cap else 0) + (2 * e if e != 4 else 0))
    Mmax, Kmax = max(shapes.values(), key=lambda s: s[0] * s[1])
    dequant = Mmax * Kmax * (e + 4)
    transient = max(loss, block * (2 if k + s else 1) + dequant + weights_recomputed)

    # CPU: glibc keeps freed blocks below its (growing) mmap threshold in the heap, so RSS runs above
    # the live bytes. Fitted to measured steady-state RSS (Llama 135M geometry at 2, 6 and 30 layers
    # in float32 and bf16, Gemma 3 at 2, recompute on and off): the backward's gradient buffers do not
    # reuse the freed activations (RSS holds the kept activations twice), each recomputed block leaves
    # about 45% of its saved activations behind (its backward's gradients outgrow what it saves, so
    # the fraction covers them too), and the loss chunk about half of its buffers.
    slack = 0
    if device_type == "cpu":
        slack = int(N * (L - k - s) * act + ALLOCATOR_SLACK["recompute"] * block * k + ALLOCATOR_SLACK["loss"] * loss)
        slack += int(N * s * sel + ALLOCATOR_SLACK["recompute"] * block * s)  # selective: as both of those
    plan = Plan(
        recompute_blocks=k,
        selective_blocks=s,
        reuse_blocks=w,
        num_layers=L,
        dtype=dtype_name(dtype),
        loss_chunk=loss_chunk,
    )
    plan.components = [
        ("runtime (Python, torch, allocator)", runtime, ""),
        (
            "base weights (NF4 codes + quant state)" if quantize == "nf4" else "base weights",
            int(base),
            "--quantize nf4",
        ),
        ("embeddings, head, norms", int(dense), ""),
        ("LoRA weights + gradients", 8 * p, "--lora-r"),
        (f"optimizer states ({optimizer_bits}-bit)", int(states), "--optimizer-bits 8 or --optimizer-budget"),
        (f"activations kept (recompute {plan.recompute})", int(kept), "--batch-size or --max-seq-len"),
        (f"dequantized weights kept ({plan.weight_reuse})", int(weights_kept), "--weight-reuse off"),
        (
            "transient (loss chunk / block backward)",
            int(transient),
            "--loss-chunk" if loss >= block else "--batch-size",
        ),
        ("allocator slack", slack, "--batch-size"),
    ]
    plan.peak = sum(b for _, b, _ in plan.components)
    plan.tokens_per_step = N
    plan.flops_per_token = flops_per_token(
        cfg, seq_len, lora_r, lora_targets, k, label_fraction=n / max(1, N), selective_blocks=s
    )
    return plan


def kept_weight_bytes(cfg, lora_targets, e: int, first: bool = False) -> int:
    """Bytes of the dequantized weights (M K e each) one block keeps from forward to backward with
    weight reuse: those of the linears whose input needs a gradient. In every block but the first, all
    of them (the block's input depends on earlier adapters); in the first, those after the first
    adapted linear in the block's order (q, k, v read the embedding's output, frozen; o_proj reads the
    attention of q, k, v; gate and up read the attention block's output; down_proj reads gate and up)."""
    shapes = linear_shapes(cfg)
    order = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    total, grad = 0, not first
    for group in order:
        if grad:
            total += sum(shapes[t][0] * shapes[t][1] * e for t in group)
        grad = grad or any(t in lora_targets for t in group)
    return total


def flops_per_token(
    cfg,
    seq_len: int,
    lora_r: int = 16,
    lora_targets=LINEARS,
    recompute_blocks: int = 0,
    label_fraction: float = 1.0,
    selective_blocks: int = 0,
    forward_only: bool = False,
) -> float:
    """Training FLOPs per token (forward + backward, see the module docstring); forward_only: the
    forward alone (DPO's reference forward)."""
    L, H, hd, D, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    shapes = linear_shapes(cfg)
    base = sum(M * K for M, K in shapes.values())
    lora = sum(lora_r * (M + K) for t, (M, K) in shapes.items() if t in lora_targets)
    attn = 2 * 2 * (seq_len / 2) * H * hd
    fwd_block = 2 * base + attn + 2 * lora
    bwd_block = 2 * base + 2 * attn + 4 * lora
    head = (2 + 2) * D * V * label_fraction
    if forward_only:
        return L * fwd_block + 2 * D * V * label_fraction
    return L * (fwd_block + bwd_block) + recompute_blocks * fwd_block + selective_blocks * 2 * lora + head


def attention_mask_count(model_cfg, seq_len: int, masked_rows: bool) -> int:
    """The (B, 1, T, T) masks a training forward builds (models/transformer.py): one per layer kind when
    its rows need one (masked_rows: packed rows, or a pair's shared prompt), else one for the sliding
    layers when their window is shorter than the rows (plain causal attention serves the rest)."""
    kinds = set(model_cfg.layer_types)
    if masked_rows:
        return len(kinds)
    return int(SLIDING in kinds and model_cfg.sliding_window is not None and seq_len > model_cfg.sliding_window)


# ------------------------------------------------------------------------------ FSDP per rank
# Plan components that FSDP divides over the ranks: the NF4 base,
# the LoRA weights with their gradients, the optimizer states, and the embeddings and head (split by
# vocabulary rows; the norms in that row are replicated but tiny). Everything else stays whole on
# every rank: activations belong to the rank's own micro-batch and the loss chunk is per rank.
SHARDED_COMPONENTS = ("base weights", "LoRA weights", "optimizer states", "embeddings, head")


def per_rank_components(
    components: list[tuple[str, int, str]], world: int, num_layers: int, sharded: tuple[str, ...] = SHARDED_COMPONENTS
) -> list[tuple[str, int, str]]:
    """A one-device plan's (name, bytes, flag) rows as FSDP over `world` ranks sees them, per rank.

    A sharded row of b bytes becomes ceil(b / W) (fully_shard pads dim 0 to a multiple of W);
    other rows stay whole. One more row: the gathered base of the blocks in flight, two of the L
    blocks (the running one and the one prefetched), less the rank's own shard of them:
        2 * base / L * (1 - 1 / W)
    """
    if world < 1 or num_layers < 1:
        raise ValueError(f"world={world} and num_layers={num_layers} must be at least 1.")
    rows, base = [], 0
    for name, b, flag in components:
        if name.startswith(sharded):
            rows.append((f"{name} / {world} ranks" if world > 1 else name, -(-b // world), flag))
            if name.startswith("base weights"):
                base = b
        else:
            rows.append((name, b, flag))
    if world > 1:
        rows.append(("gathered blocks in flight (2)", int(2 * base / num_layers * (1 - 1 / world)), "--parallel"))
    return rows
