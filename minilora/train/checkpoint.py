"""Checkpoints of a training run: RNG state, atomic save, newest-complete lookup, load; and the
signal handler that turns SIGINT/SIGTERM into "finish this step, checkpoint, exit".

A checkpoint is checkpoints/step_XXXXXXX/ in the run directory:
  adapter/                  the LoRA weights (PEFT layout)
  optimizer.safetensors     PagedAdamW state (FSDP: optimizer_shards/, each rank's rows of it,
                            minilora/parallel/sharded_checkpoint.py; every mode reads both)
  rng.safetensors           torch / numpy / python (/ cuda) generator states, as uint8 tensors; under
                            torchrun every rank's (rank k's keys prefixed "rank<k>/")
  state.json                step, data position, validation history, scheduler, and the length
                            of metrics.jsonl when it was written (so a resume drops replayed lines)
checkpoints/latest names the newest one. Everything is safetensors or JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import numpy as np
import torch

OPTIMIZER_FILE = "optimizer.safetensors"  # one process or DDP: the whole optimizer state
SHARDS_DIR = "optimizer_shards"  # FSDP: index.json + one rank_XXXXX.safetensors per rank
OLD_DCP_DIR = "dcp"  # earlier versions' FSDP checkpoints, through torch.distributed.checkpoint (a pickle)


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG the run draws from, as tensors (saved with safetensors, no pickle)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
        "python": torch.from_numpy(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _py_state():
    v, inner, g = random.getstate()
    return [v, list(inner), g]


def every_rank_rng_state() -> dict[str, torch.Tensor]:
    """rng_state() of every rank, for rank 0 to save (every rank calls it): rank 0's under the plain
    keys, rank k's as "rank<k>/<key>". Ranks draw different dropout masks (train.py seeds rank k with
    seed + k), so each must resume its own."""
    from safetensors.torch import load, save

    from minilora.parallel import distributed as D

    state = rng_state()
    for k, blob in enumerate(D.gather_bytes(save({n: t.contiguous() for n, t in state.items()}))):
        if k > 0:
            state.update({f"rank{k}/{n}": t for n, t in load(blob).items()})
    return state


def own_rng_state(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's states out of a checkpoint's rng.safetensors (every_rank_rng_state's keys); rank 0's
    where the checkpoint holds none for `rank` (it was written by fewer ranks)."""
    prefix = f"rank{rank}/"
    mine = {n[len(prefix) :]: t for n, t in saved.items() if n.startswith(prefix)}
    return mine or {n: t for n, t in saved.items() if "/" not in n}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    s = json.loads(bytes(state["numpy"].numpy()).decode())
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    v, inner, g = json.loads(bytes(state["python"].numpy()).decode())
    random.setstate((v, tuple(inner), g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    run_dir: str,
    step: int,
    model,
    optimizer,
    scheduler,
    train_state: dict,
    adapter_meta: dict,
    keep: int = 2,
    write_state=None,
    rng: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write checkpoints/step_XXXXXXX atomically: build it in a temp dir, fsync, rename, then
    point checkpoints/latest at it (also by rename). A kill at any moment leaves the previous
    checkpoint complete and `latest` naming a complete one. `write_state(tmp)` writes the adapter
    and optimizer state instead of this process (FSDP: minilora.parallel.sharded_checkpoint). `rng`: the
    RNG states to save (every_rank_rng_state under torchrun), by default this process's."""
    from safetensors.torch import save_file

    from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions, write_json, write_text_atomic
    from minilora.lora.adapter import save_adapter
    from minilora.optim.paged_adamw import save_optimizer_state

    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = temp_dir_for(final)
    try:
        if write_state is not None:
            write_state(tmp)
        else:
            # as trained (PiSSA / OLoRA: rank r on the residual), not converted for the original weights
            save_adapter(model, os.path.join(tmp, "adapter"), convert=False, **adapter_meta)
            save_optimizer_state(optimizer, os.path.join(tmp, OPTIMIZER_FILE))
        rng = rng_state() if rng is None else rng
        save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(tmp, "rng.safetensors"))
        state = {**train_state, "step": step, "scheduler": scheduler.state_dict()}
        write_json(os.path.join(tmp, "state.json"), state, fsync=True)
        usual_permissions(tmp)
        swap_into_place(tmp, final)
    except OSError as e:  # a full disk, a quota: the half-written folder goes (finally), the previous one stays
        from minilora.cli import UsageError

        last = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint was written"
        raise UsageError(
            f"could not write checkpoint {final} ({e.strerror or e}), so it was removed and {kept}; free disk "
            f"space, then continue with `train.py --out {run_dir} --resume`."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once renamed into place
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


def check_checkpoint(path: str) -> dict:
    """The train state (state.json) of the checkpoint folder `path`, after checking that every file a
    resume reads is whole: state.json parses and names its step, and the safetensors files (RNG state,
    adapter, optimizer state or its FSDP shards) have intact headers and lengths.
    Raises UsageError naming the damaged file, before the resumed run writes anything."""
    from minilora.cli import UsageError
    from minilora.fileio import json_error_text, safetensors_problem

    root = os.path.dirname(path)
    older = [d for d in sorted(os.listdir(root)) if d.startswith("step_") and d < os.path.basename(path)]
    fix = (
        f"delete {path} to resume from {os.path.join(root, older[-1])}, or start a new run in another --out"
        if older
        else "start a new run in another --out"
    )
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, RecursionError, OSError) as e:
        why = json_error_text(e) if not isinstance(e, OSError) else (e.strerror or str(e))
        raise UsageError(f"{state_path} is damaged ({why}), so the run cannot resume from it; {fix}.") from None
    if not (
        isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("scheduler"), dict)
    ):
        raise UsageError(f"{state_path} lacks the step or scheduler state a resume needs; {fix}.")
    files = ["rng.safetensors", os.path.join("adapter", "adapter_model.safetensors")]
    shards = os.path.join(path, SHARDS_DIR)
    if os.path.isdir(shards):  # FSDP: each rank's rows; index.json is checked where it is read
        files += [os.path.join(SHARDS_DIR, f) for f in sorted(os.listdir(shards)) if f.endswith(".safetensors")]
    elif not os.path.lexists(os.path.join(path, OLD_DCP_DIR)):  # the old format is refused unopened on load
        files.append(OPTIMIZER_FILE)
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UsageError(f"{file} is missing, so the run cannot resume from {path}; {fix}.")
        problem = safetensors_problem(file)
        if problem is not None:
            raise UsageError(f"{file} is damaged or truncated (safetensors: {problem}); {fix}.")
    return state


def load_checkpoint(path: str, model, optimizer, scheduler, read_state=None) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the saved train state.
    `read_state(path)` restores the adapter and optimizer instead (minilora.parallel.sharded_checkpoint)."""
    from safetensors.torch import load_file

    from minilora.lora.adapter import load_adapter
    from minilora.optim.paged_adamw import load_optimizer_state

    if read_state is not None:
        read_state(path)
    else:
        load_adapter(model, os.path.join(path, "adapter"))
        load_optimizer_state(optimizer, os.path.join(path, OPTIMIZER_FILE))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    scheduler.load_state_dict(state.pop("scheduler"))
    from minilora.parallel import distributed as D

    set_rng_state(own_rng_state(load_file(os.path.join(path, "rng.safetensors")), D.rank()))
    return state


def apply_hyperparameters(optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """Put this invocation's --lr and --weight-decay into a restored optimizer and LambdaLR (the
    checkpoint restored the values the run started with). The multiplier is re-evaluated at the
    restored step, so with unchanged flags this recomputes exactly the restored learning rate.
    A group's `lr_ratio` (LoRA+: R for lora_B, minilora/lora/plus.py) scales its peak rate."""
    peaks = [lr * g.get("lr_ratio", 1.0) for g in optimizer.param_groups]
    scheduler.base_lrs = list(peaks)
    for group, f, peak in zip(optimizer.param_groups, scheduler.lr_lambdas, peaks):
        group["initial_lr"], group["weight_decay"] = peak, weight_decay
        group["lr"] = peak * f(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# --------------------------------------------------------------------------------------- signals
class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits with
    cli.EXIT_INTERRUPTED. A second signal stops at once (KeyboardInterrupt)."""

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
