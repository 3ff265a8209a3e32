"""Training building blocks used by train.py's loop: schedule, checkpoints, signals, DDP.

Shape letters: B batch, T time, D model dim, V vocabulary, N labelled tokens in a chunk.

Loss. For a step made of micro-batches m = 1..M (gradient accumulation, and every rank under
DDP), with L_m the summed token cross-entropy of micro-batch m and n_m its labelled tokens:

    loss_step = (sum_m L_m) / (sum_m n_m)

Each micro-batch backpropagates L_m / n_total with n_total counted over the whole step (and
all-reduced over ranks), so long and short micro-batches weigh by their tokens, exactly as
one big batch would. DDP averages gradients over W ranks, so each rank scales by W.
The chunked loss itself lives in minilora/loss.py.
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
                    adapter_meta: dict, keep: int = 2) -> str:
    """Write checkpoints/step_XXXXXXX atomically: build it in a temp dir, fsync, rename, then
    point checkpoints/latest at it (also by rename). A kill at any moment leaves the previous
    checkpoint complete and `latest` naming a complete one."""
    from safetensors.torch import save_file

    from minilora.adapter import save_adapter
    from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions, write_json, write_text_atomic
    from minilora.paged_adamw import save_optimizer_state

    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = temp_dir_for(final)
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


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the saved train state."""
    from safetensors.torch import load_file

    from minilora.adapter import load_adapter
    from minilora.paged_adamw import load_optimizer_state

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


# ------------------------------------------------------------------------------------ distributed
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


def all_reduce_sum(x: float | int, world: int) -> float:
    if world <= 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


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
