"""Training building blocks used by train.py's loop: loss, schedule, checkpoints, signals.
(Several processes, DDP and FSDP: minilora/distributed.py.)

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
import random
import shutil
import signal
import time

import numpy as np
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


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG the run draws from, as tensors (saved with safetensors, no pickle)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
             "python": torch.from_numpy(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _py_state():
    v, inner, g = random.getstate()
    return [v, list(inner), g]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    s = json.loads(bytes(state["numpy"].numpy()).decode())
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    v, inner, g = json.loads(bytes(state["python"].numpy()).decode())
    random.setstate((v, tuple(inner), g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, train_state: dict,
                    adapter_meta: dict, keep: int = 2, write_state=None) -> str:
    """Write checkpoints/step_XXXXXXX atomically: build it in a temp dir, fsync, rename, then
    point checkpoints/latest at it (also by rename). A kill at any moment leaves the previous
    checkpoint complete and `latest` naming a complete one. `write_state(tmp)` writes the adapter
    and optimizer state instead of this process (FSDP: minilora.sharded_checkpoint)."""
    from safetensors.torch import save_file

    from minilora.adapter import save_adapter
    from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions, write_json, write_text_atomic
    from minilora.paged_adamw import save_optimizer_state

    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = temp_dir_for(final)
    if write_state is not None:
        write_state(tmp)
    else:
        save_adapter(model, os.path.join(tmp, "adapter"), **adapter_meta)
        save_optimizer_state(optimizer, os.path.join(tmp, "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng_state().items()}, os.path.join(tmp, "rng.safetensors"))
    write_json(os.path.join(tmp, "state.json"), {**train_state, "step": step, "scheduler": scheduler.state_dict()},
               fsync=True)
    usual_permissions(tmp)
    swap_into_place(tmp, final)
    write_text_atomic(os.path.join(root, "latest"), name, fsync=True)
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    root = os.path.join(run_dir, "checkpoints")
    ptr = os.path.join(root, "latest")
    if os.path.isfile(ptr):
        with open(ptr) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    done = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    for d in reversed(done):  # `latest` missing: fall back to the newest complete folder
        if os.path.isfile(os.path.join(root, d, "state.json")):
            return os.path.join(root, d)
    return None


def load_checkpoint(path: str, model, optimizer, scheduler, read_state=None) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the saved train state.
    `read_state(path)` restores the adapter and optimizer instead (minilora.sharded_checkpoint)."""
    from safetensors.torch import load_file

    from minilora.adapter import load_adapter
    from minilora.paged_adamw import load_optimizer_state

    if read_state is not None:
        read_state(path)
    else:
        load_adapter(model, os.path.join(path, "adapter"))
        load_optimizer_state(optimizer, os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(load_file(os.path.join(path, "rng.safetensors")))
    return state


# --------------------------------------------------------------------------------------- signals
class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits 0."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def __bool__(self):
        return self.signum is not None


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


class Progress:
    """A one-line progress bar on stderr (no dependency): step/total, loss, lr, tok/s, peak mem."""

    def __init__(self, total: int, enabled: bool = True, width: int = 24):
        self.total, self.enabled, self.width = total, enabled, width
        self.t0 = time.time()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        import sys

        done = int(self.width * step / max(1, self.total))
        bar = "#" * done + "." * (self.width - done)
        end = "\n" if step >= self.total or not sys.stderr.isatty() else ""
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} {text}" + end)
        sys.stderr.flush()


class MetricsWriter:
    """metrics.jsonl in the run directory: one JSON object per event, flushed as written."""

    def __init__(self, path: str, append: bool):
        self.f = open(path, "a" if append else "w")

    def write(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


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
