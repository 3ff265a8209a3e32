"""Training building blocks used by train.py's loop: loss, schedule, batch stream, loss plot.
(Checkpoints, RNG state and signals: minilora/checkpoint.py; the run folder: minilora/rundir.py;
several processes, DDP and FSDP: minilora/distributed.py.)

Shape letters: B batch, T time, D model dim, V vocabulary, N labelled tokens in a chunk.

Loss. For a step made of micro-batches m = 1..M (gradient accumulation, and every rank under
DDP), with L_m the summed token cross-entropy of micro-batch m and n_m its labelled tokens:

    loss_step = (sum_m L_m) / (sum_m n_m)

Each micro-batch backpropagates L_m / n_total with n_total counted over the whole step (and
all-reduced over ranks), so long and short micro-batches weigh by their tokens, exactly as
one big batch would. DDP averages gradients over W ranks, so each rank scales by W.

Chunked cross-entropy. Only labelled positions need logits. The final hidden states of those
positions are gathered (N, D) and pushed through the frozen output head in chunks of `chunk` rows;
each chunk's gradient with respect to the hidden states is computed right away (HeadCrossEntropyFn),
so at most (chunk, V) float32 logits exist at a time and none are kept for backward: Gemma's 262k
vocabulary never materializes (B, T, V) float32 logits.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


# ------------------------------------------------------------------------------------------ loss
class HeadCrossEntropyFn(torch.autograd.Function):
    """L = sum_i CE(l_i, y_i) over N rows, l_i = cap tanh(z_i / cap) (or z_i), z_i = h_i W^T,
    with the frozen output head W (V, D), computed chunk by chunk.

    Backward, derived here and evaluated in the forward pass, chunk by chunk:
        dL/dl_i = softmax(l_i) - e_{y_i}                              (c, V)
        dl/dz   = 1 - tanh^2(z / cap)         (1 without soft-capping)
        dL/dh_i = (dL/dl_i * dl/dz) W                                 (c, V) @ (V, D) -> (c, D)
    Only dL/dh (N, D) is kept; the backward scales it by the incoming gradient. No (N, V) logits
    outlive their chunk and none are recomputed: one vocabulary matmul forward, one for dL/dh.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cap, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)  # (N, D)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]  # (c, D), (c,)
            z = (hc @ weight.t()).float()  # (c, D) @ (D, V) -> (c, V), as logits_from_hidden computes it
            if cap is not None:
                t = torch.tanh(z / cap)
                z = cap * t
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            p = torch.exp(z - lse[:, None])  # (c, V) softmax
            p[rows[: len(yc)], yc] -= 1.0
            if cap is not None:
                p *= 1 - t * t
            grad_h[i : i + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)  # (c, V) @ (V, D) -> (c, D)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None, None


def _chunk_ce(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model.logits_from_hidden(h).float()  # (chunk, V)
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_lm_loss(model, batch, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over labelled positions, their count) for one Batch."""
    h = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
              segment_ids=batch.segment_ids, return_hidden=True)  # (B, T, D)
    targets = batch.labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE
    h_sel = h[:, :-1][keep]  # (N, D)
    y_sel = targets[keep]  # (N,)
    head = getattr(model.lm_head, "weight", None)
    if torch.is_grad_enabled() and head is not None and not head.requires_grad:  # LoRA: frozen head
        cap = model.config.final_logit_softcapping
        return HeadCrossEntropyFn.apply(h_sel, head, y_sel, cap, chunk), int(y_sel.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y_sel.numel(), chunk):  # a trainable head, or no grad: plain chunks
        hc, yc = h_sel[i : i + chunk], y_sel[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, model, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(model, hc, yc)
    return total, int(y_sel.numel())


class LossModule(torch.nn.Module):
    """Wraps the model so that DDP sees the whole loss computation as one forward."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch):
        return chunked_lm_loss(self.model, batch, self.chunk)


# -------------------------------------------------------------------------------------- schedule
def cosine_with_warmup(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> min_ratio at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f




# ---------------------------------------------------------------------------------------- logging
def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # VmHWM: this process's own peak RSS (ru_maxrss carries a parent's peak over fork + exec)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------ data stream
class BatchStream:
    """Endless micro-batches over epochs, with a position (epoch, index) a checkpoint can store."""

    def __init__(self, encoded, batch_kw: dict, epoch: int = 0, index: int = 0):
        from minilora.packing import batches, num_batches

        self.encoded, self.kw = encoded, batch_kw
        self.per_epoch = num_batches(encoded, **batch_kw)
        self._batches = batches
        self.epoch, self.index = epoch, index
        self._it = None

    def next(self):
        while True:
            if self._it is None:
                self._it = self._batches(self.encoded, epoch=self.epoch, start_step=self.index, **self.kw)
            b = next(self._it, None)
            if b is not None:
                self.index += 1
                return b
            self.epoch, self.index, self._it = self.epoch + 1, 0, None

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def plot_loss_curve(run_dir: str) -> str | None:
    """loss.png from metrics.jsonl when matplotlib is installed (the optional `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from minilora.fileio import write_file_atomic

    train, val = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            (train if "loss" in r else val if "val_loss" in r else []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per label token)")
    ax.legend()
    path = os.path.join(run_dir, "loss.png")
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
