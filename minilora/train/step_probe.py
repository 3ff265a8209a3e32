"""The step-time probe: the pieces of one training step (minilora/train/steptime.py's model), timed on
this device with the run's own modules on random weights. steptime.predict runs it as

    python -m minilora.train.step_probe SPEC      # SPEC: JSON of probe_step's arguments

in a process of its own, which prints one JSON line: {"step_time": ...}, {"skipped": why} or {"failed": why}.

Shape letters: B rows, T the batch's length, D hidden, L blocks.

A Transformer of one block per layer kind that costs differently is built from the run's ModelConfig
(meta device, then random weights; NF4 through loader.quantize_linears; LoRA through apply_lora with
the run's rank, targets, dropout, rsLoRA, DoRA). Its real forward runs once without grad, and a
pre-hook keeps each block's inputs (hidden states, RoPE tables, mask) as the run builds them. Then:
  block   forward + backward of one block at (B, T, D) under each recompute mode the plan gave any
          blocks (off; selective and full through torch's checkpoint, as Transformer.forward calls it),
          with and without its dequantized weights kept where the plan has blocks of each (held
          between steps, as the run's are: the warm-up run makes them, so the timed runs dequantize
          nothing)
  rest    chunked_lm_loss with the blocks removed: embedding, masks, RoPE, final norm and the chunked
          head/loss at the run's loss chunk, forward and backward (the embedding's output stands in
          for the last block's, so the backward runs as far as it would)
  optimizer  gradient clipping and a PagedAdamW step over L blocks' worth of LoRA parameters
  reference  (DPO) each block mode's forward, and the rest's forward, without grad and with every
          LoRA layer off (train/reference.py), reading the weights a block holds, scaled by its count
Each piece runs once to warm up, then REPEATS times (fewer, at least once, when TARGET_S is spent;
none once the budget is spent) and its median counts. Then the block and the rest run once more at
T - 1 tokens a row: shapes not seen before, whose kernels are chosen then (on the CPU oneDNN creates
a primitive for every new GEMM shape, 20-40 ms each on a 2-core machine, dozens of shapes a step);
what that run takes beyond the median is what a micro-batch of a new shape adds, once per process.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from minilora.dtypes import DTYPES, dtype_name
from minilora.train.steptime import DEFAULT_BUDGET_S, PROBE_ENV, ProbeSkipped, StepTime

TARGET_S = 10.0  # each piece is timed REPEATS times after its warm-up, fewer (at least once) past this
REPEATS = 3


class _Clock:
    """Times pieces within a budget: a warm-up run, then the median of up to REPEATS runs, as many as
    fit the target time shared among the pieces left (at least one)."""

    def __init__(self, device: torch.device, budget: float, pieces: int):
        t0 = time.perf_counter()
        self.device, self.budget, self.left = device, budget, pieces
        self.deadline, self.target = t0 + budget, t0 + min(budget, TARGET_S)

    def _once(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _check(self) -> None:
        if time.perf_counter() > self.deadline:
            raise ProbeSkipped(f"the probe ran out of its {self.budget:g} s budget ({PROBE_ENV})")

    def first(self, fn, setup=lambda: None) -> float:
        """One run of fn (at shapes it has not run at yet: what their kernel selection costs)."""
        self._check()
        setup()
        return self._once(fn)

    def median(self, fn, setup=lambda: None) -> float:
        self._check()
        setup()
        warm = self._once(fn)
        room = (self.target - time.perf_counter()) / max(1, self.left)
        times = []
        for _ in range(max(1, min(REPEATS, int(room / max(warm, 1e-6))))):
            setup()
            times.append(self._once(fn))
        self.left -= 1
        return statistics.median(times)


def build_probe_model(model_cfg, layer_types: list[str], dtype, device, quantize: str, lora_kw: dict):
    """A Transformer of len(layer_types) blocks of model_cfg's geometry on random weights, quantized
    and adapted as the run's model is (the plan reads only config.json: no checkpoint is needed)."""
    from minilora.lora.surgery import apply_lora
    from minilora.models.loader import no_random_init, quantize_linears
    from minilora.models.transformer import Transformer

    cfg = replace(model_cfg, num_hidden_layers=len(layer_types), layer_types=list(layer_types))
    with torch.device("meta"), no_random_init():
        model = Transformer(cfg)
    rope = dict(model.named_buffers())  # the RoPE frequencies are built real (on the CPU); to_empty would drop them
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            # std 0.02 (transformers' initializer_range) keeps the logits' spread that of a real model: exp of
            # a logit more than ~87 below the largest underflows, a path 30x slower on some CPUs
            # a vector (norm weight, bias) of 1 - norm_offset: each RMSNorm scales by 1, as at init
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 - cfg.traits.norm_offset)
    for name, b in rope.items():
        setattr(model, name, b.to(device))
    model.tie_weights()
    model.to(dtype)
    if quantize == "nf4":
        quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, **{**lora_kw, "verbose": False})
    return model.train()


KEPT = ", weights kept"  # a mode's suffix where the block keeps its dequantized weights (set_weight_reuse)


def block_modes(
    model_cfg, recompute: tuple[int, int], pack: bool, length: int, reuse: int = 0
) -> dict[tuple[str, str], int]:
    """{(layer kind, recompute mode): blocks} of the run. The run's first recompute[0] blocks recompute
    fully, the next recompute[1] selectively (Transformer.set_gradient_checkpointing); the last `reuse`
    keep their dequantized weights (Transformer.set_weight_reuse: the mode ends in KEPT). Layer kinds cost
    differently only where their masks differ: unpacked rows longer than the sliding window (full layers
    then take SDPA's causal path, sliding layers an additive mask); elsewhere one kind stands for all."""
    kinds = model_cfg.layer_types
    window = model_cfg.sliding_window
    distinct = len(set(kinds)) > 1 and not pack and window is not None and length > window
    counts: dict[tuple[str, str], int] = {}
    for i, kind in enumerate(kinds):
        mode = "full" if i < recompute[0] else "selective" if i < recompute[0] + recompute[1] else "off"
        mode += KEPT if i >= len(kinds) - reuse else ""
        key = (kind if distinct else kinds[0], mode)
        counts[key] = counts.get(key, 0) + 1
    return counts


def probe_step(
    model_cfg,
    device,
    dtype,
    rows: int,
    length: int,
    labels: int,
    *,
    quantize="nf4",
    lora_kw=None,
    recompute=(0, 0),
    reuse=0,
    loss_chunk=64,
    pack=False,
    optimizer_bits=32,
    optimizer_budget=None,
    max_grad_norm=1.0,
    grad_accum=1,
    budget: float = DEFAULT_BUDGET_S,
    reference=False,
) -> StepTime:
    """Measure the step model's pieces (module docstring) for a run of model_cfg at rows x length;
    with `reference`, DPO's reference forward too."""
    from torch.utils.checkpoint import checkpoint

    from minilora.data.packing import IGNORE, Batch
    from minilora.lora.surgery import lora_disabled
    from minilora.models.recompute import selective_context
    from minilora.models.transformer import keep_dequantized_weights
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.train.loss import chunked_lm_loss

    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    L, B, T = model_cfg.num_hidden_layers, rows, length
    counts = block_modes(model_cfg, recompute, pack, T, reuse)
    kinds = list(dict.fromkeys(kind for kind, _ in counts))
    clock = _Clock(device, budget, len(counts) + 2 + (len(counts) + 1 if reference else 0))

    model = build_probe_model(model_cfg, kinds, dtype, device, quantize, lora_kw or {})
    layer0 = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("model.layers.0.")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (B, T), generator=g)  # (B, T)
    n = max(1, min(labels, B * (T - 1)))
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    tgt[:, 1:] = torch.where(torch.arange(B * (T - 1)).view(B, T - 1) < n, ids[:, 1:], IGNORE)  # n labelled
    seg = torch.ones(B, T, dtype=torch.long)
    pos = torch.arange(T).expand(B, T).contiguous()
    if pack:  # two examples a row: the real forward then builds the packed rows' masks
        seg[:, T // 2 :] = 2
        pos[:, T // 2 :] -= T // 2
    batch = Batch(ids, tgt, torch.ones_like(ids), pos, seg, n).to(device)

    captured = []  # each block's (x, cos, sin, mask), as the real forward builds them
    hooks = [blk.register_forward_pre_hook(lambda m, a: captured.append(a[:4])) for blk in model.model.layers]
    with torch.no_grad():
        model(batch.input_ids, batch.position_ids, batch.attention_mask, batch.segment_ids, return_hidden=True)
    for h in hooks:
        h.remove()

    blocks, new_shape = [], 0.0  # new_shape: what the first micro-batch of a new (B, T) adds
    for (kind, mode), count in counts.items():
        j = kinds.index(kind)
        layer, (x0, cos, sin, mask) = model.model.layers[j], captured[j]
        x = torch.randn(x0.shape, generator=g).to(device, x0.dtype).requires_grad_()  # (B, T, D)
        gy = torch.randn(x0.shape, generator=g).to(device, x0.dtype) * 1e-3  # dL/dy, (B, T, D)

        keep_dequantized_weights(layer, mode.endswith(KEPT))

        def fwd_bwd(layer=layer, x=x, gy=gy, cos=cos, sin=sin, mask=mask, mode=mode.removesuffix(KEPT)):
            if mode == "off":  # as Transformer.forward runs a block that keeps its activations
                y = layer(x, cos, sin, mask, lean=model.lean_saves)
            else:  # as Transformer.forward checkpoints a block
                ctx = {"context_fn": selective_context} if mode == "selective" else {}
                y = checkpoint(layer, x, cos, sin, mask, use_reentrant=False, **ctx)
            y.backward(gy)

        def clear(x=x):
            x.grad = None
            for p in trainable:
                p.grad = None  # every step's backward allocates its gradients afresh (zero_grad set_to_none)

        t = clock.median(fwd_bwd, clear)
        blocks.append([kind, mode, count, t])
        if T > 1:  # the same block at T - 1 tokens a row: the first run at new shapes
            x1 = x[:, :-1].detach().clone().requires_grad_()  # (B, T-1, D)
            m1 = None if mask is None else mask[..., :-1, :-1]  # (B, 1, T-1, T-1)
            args = dict(x=x1, gy=gy[:, :-1], cos=cos[:, :-1], sin=sin[:, :-1], mask=m1)
            new_shape += max(0.0, clock.first(lambda: fwd_bwd(**args), lambda: clear(x1)) - t)

    reference_blocks = 0.0
    if reference:  # each block's forward, LoRA off, no grad, as many times as the run has such blocks
        for (kind, mode), count in counts.items():
            j = kinds.index(kind)
            x0, cos, sin, mask = captured[j]
            layer = model.model.layers[j]
            held = mode.endswith(KEPT)  # the run's reference forward reads the weights such a block holds
            keep_dequantized_weights(layer, held)
            if held:  # made by a training forward, as in the run
                layer(x0.detach().requires_grad_(), cos, sin, mask)

            def forward(layer=layer, x0=x0, cos=cos, sin=sin, mask=mask):
                with torch.no_grad(), lora_disabled(model):
                    layer(x0, cos, sin, mask)

            reference_blocks += count * clock.median(forward)

    # the rest: the real forward and loss without blocks; the embedding's output stands in for the last block's
    model.model.layers = torch.nn.ModuleList()
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())

    def rest(batch=batch):
        loss, count = chunked_lm_loss(model, batch, loss_chunk)
        (loss / count).backward()
        float(loss.detach())  # as the loop reads it

    t_rest = clock.median(rest)
    reference_rest = 0.0
    if reference:

        def reference_forward(batch=batch):
            with torch.no_grad(), lora_disabled(model):
                float(chunked_lm_loss(model, batch, loss_chunk)[0])

        reference_rest = clock.median(reference_forward)
    if T > 1:
        cut = [
            getattr(batch, k)[:, :-1] for k in ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")
        ]
        short = Batch(*cut, int((cut[1][:, 1:] != IGNORE).sum()))
        new_shape += max(0.0, clock.first(lambda: rest(short)) - t_rest)
    hook.remove()

    # the optimizer over L blocks' worth of LoRA parameters
    params = [torch.nn.Parameter(p.detach().clone()) for _ in range(L) for p in layer0]
    grads = [torch.randn(p.shape, generator=g).to(device) * 1e-4 for p in params]
    opt = PagedAdamW(params, lr=1e-4, weight_decay=0.0, state_bits=optimizer_bits, device_budget=optimizer_budget)

    def set_grads():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()

    def opt_step():
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_opt = clock.median(opt_step, set_grads)
    return StepTime(
        rows=B,
        length=T,
        labels=n,
        blocks=blocks,
        rest=t_rest,
        optimizer=t_opt,
        new_shape=new_shape,
        grad_accum=grad_accum,
        threads=torch.get_num_threads(),
        load=load,
        dtype=dtype_name(dtype),
        probe_seconds=time.perf_counter() - t_start,
        reference_blocks=reference_blocks,
        reference_rest=reference_rest,
    )


def main(argv=None) -> None:
    """The probe as steptime.predict starts it: one JSON argument in, one JSON line out."""
    from minilora.models.config import ModelConfig

    spec = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(spec.pop("threads"))
    cfg, device, dtype = ModelConfig(**spec.pop("model")), torch.device(spec.pop("device")), DTYPES[spec.pop("dtype")]
    try:
        out = {"step_time": asdict(probe_step(cfg, device, dtype, **spec))}
    except ProbeSkipped as e:
        out = {"skipped": str(e)}
    except Exception as e:  # reported, not raised: a prediction never stops the run
        out = {"failed": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
