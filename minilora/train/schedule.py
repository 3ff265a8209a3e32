"""Training building blocks used by train.py's loop: schedule, batch stream, loss plot.
(The loss: minilora/train/loss.py; checkpoints, RNG state and signals: minilora/train/checkpoint.py; the run
folder: minilora/train/rundir.py; several processes, DDP and FSDP: minilora/parallel/distributed.py.)

Shape letters: B batch, T time, D model dim, V vocabulary, N labelled tokens in a chunk.

Loss. For a step made of micro-batches m = 1..M (gradient accumulation, and every rank under
DDP), with L_m the summed token cross-entropy of micro-batch m and n_m its labelled tokens:

    loss_step = (sum_m L_m) / (sum_m n_m)

Each micro-batch backpropagates L_m / n_total with n_total counted over the whole step (and
all-reduced over ranks), so long and short micro-batches weigh by their tokens, exactly as
one big batch would. DDP averages gradients over W ranks, so each rank scales by W.
The chunked loss itself lives in minilora/train/loss.py.
"""

from __future__ import annotations

import json
import math
import os


# -------------------------------------------------------------------------------------- schedule
def cosine_with_warmup(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> min_ratio at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------------ data stream
class BatchStream:
    """Endless micro-batches over epochs, with a position (epoch, index) a checkpoint can store;
    Batches of examples, or PairBatches of preference pairs (data/pairs.py)."""

    def __init__(self, encoded, batch_kw: dict, epoch: int = 0, index: int = 0):
        from minilora.data.packing import batches, num_batches
        from minilora.data.pairs import EncodedPair, pair_batches

        self.encoded, self.kw = encoded, batch_kw
        self.per_epoch = num_batches(encoded, **batch_kw)
        self._batches = pair_batches if encoded and isinstance(encoded[0], EncodedPair) else batches
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
