"""The run directory (--out) as a contract, and metrics.jsonl.

train.py writes only into a folder that does not exist yet, an empty folder, or a folder it wrote
before (recognized by the config.json it writes there); anything else is refused before a byte
is written. A folder holding checkpoints is continued only with --resume, and --resume compares
the flags given on its command line with the run's config.json:

  ADAPTER_FIELDS  define the adapter the checkpoints hold: a change is refused
  OBJECTIVE_FIELDS define what the adapter is trained toward (the objective and its hyperparameters;
                  the optimizer state was accumulated on that loss): a change is refused
  STREAM_FIELDS   define the data order and the optimizer state (the checkpoint stores a position
                  in that stream): a change is refused
  every other field may change: the new value is applied for real and recorded, with the old one,
                  in config.json's "resumes" history
Flags not given take the run's recorded values, so `train.py --out RUN --resume` continues RUN
exactly as it was started.

metrics.jsonl is append-only during a run; each checkpoint stores its length at that moment, and a
resume cuts the file back to it, so the steps logged after the checkpoint (which the resumed run
logs again) appear once. Temp folders a kill left behind are removed at the next start.

The folder belongs to one train.py at a time (minilora.fileio.lock_folder): check_run_folder refuses a
folder another process holds, and claim takes the lock, just before the first write, and checks
under it that the folder is still as check_run_folder found it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from minilora.cli import UsageError
from minilora.fileio import LOCK_NAME, FolderBusy, FolderLock, check_unlocked, file_above, lock_folder
from minilora.lora.adapter_files import check_adapter_files

ADAPTER_FIELDS = (
    "model",
    "quantize",
    "dtype",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "use_rslora",
    "use_dora",
    "init",
    "loftq_iters",
    "eva_rho",  # the ranks EVA gives each layer (kept in RUN/eva_ranks.json)
    "eva_tau",
    "init_adapter",  # the weights it started from (and DPO's reference): kept in RUN/init_adapter/
)
OBJECTIVE_FIELDS = (
    "objective",
    "beta",
    "label_smoothing",
    "dpo_loss",
    "orpo_lambda",
    "precompute_reference",
    "pair_split",  # the same values up to rounding, and its own dropout draws per half
    "share_prompt",  # the same values up to rounding
)
# What a run ran with before its config.json recorded the field (a resume keeps it, so it stays bitwise).
UNRECORDED = {"share_prompt": False}
STREAM_FIELDS = (
    "data",
    "val_data",
    "format",
    "template",
    "train_on_all",
    "max_seq_len",
    "truncation",
    "pack",
    "dedup",
    "near_threshold",
    "val_fraction",
    "seed",
    "batch_size",
    "grad_accum",
    "optimizer_bits",
    "lora_plus_ratio",  # the optimizer's parameter groups and their learning rates
)
CHANGEABLE_FIELDS = (
    "eval_data",
    "allow_contamination",
    "skip_bad_lines",
    "device",
    "lora_dropout",
    "gradient_checkpointing",
    "weight_reuse",  # the same numbers either way (bit for bit), only time and memory differ
    "tf32",
    "lora_compute",  # the precision of the LoRA products, as tf32 is of the base's
    "loss_chunk",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "optimizer_budget",
    "epochs",
    "max_steps",
    "max_grad_norm",
    "eval_every",
    "early_stopping",
    "eval_generate",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "threads",
    "parallel",
    "memory_budget",
)
NOT_INHERITED = ("out", "resume", "plan", "debug_nan_at_step", "debug_interrupt_at_step")  # this invocation's own
PATH_FIELDS = ("data", "val_data", "eval_data", "init_adapter")
# keys every config.json train.py writes has (a model folder's config.json has none of them)
_RUN_KEYS = {"model", "data", "out", "lora_r", "lora_alpha", "save_every"}
# what fileio's temp helpers name their files and folders: .NAME.tmp-XXXX, .NAME.old-XXXX, .NAME.XXXX.tmp
_TEMP = re.compile(r"^\..+\.(tmp|old)-[^.]+$|^\..+\.tmp$")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_config_json(folder: str) -> dict | None:
    """The JSON object in `folder`/config.json, or None when there is none (or it holds no object);
    a UsageError naming the file when it is there but damaged (not JSON)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError:  # none there (or a folder by that name): not a run of train.py
        return None
    except (ValueError, RecursionError) as e:  # not JSON: damaged, whoever wrote it
        from minilora.fileio import json_error_text

        raise UsageError(
            f"{path} is damaged ({json_error_text(e)}), so the run in {folder} cannot be read; restore that "
            "file (train.py wrote it), or train into another --out."
        ) from None
    return cfg if isinstance(cfg, dict) else None


def read_run_config(folder: str) -> dict | None:
    """The config.json train.py wrote in `folder`, or None when there is none (or it is another's,
    e.g. a model's config.json); a UsageError naming the file when it is damaged."""
    cfg = read_config_json(folder)
    return cfg if cfg is not None and _RUN_KEYS <= set(cfg) else None


def find_run(path: str) -> tuple[str, str, dict]:
    """(adapter folder, run directory, the run's TrainConfig as a dict or {}) for a run directory
    written by train.py (holding adapter/) or for an adapter folder itself."""
    path = os.path.normpath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Adapter folder {path} does not exist; pass the run directory train.py wrote "
            "(e.g. runs/mytask) or its adapter/ folder."
        )
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        adapter = path
        parent = os.path.dirname(os.path.abspath(path))
        run = parent if os.path.isfile(os.path.join(parent, "config.json")) else path
    elif os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")):
        adapter, run = os.path.join(path, "adapter"), path
    else:
        raise FileNotFoundError(
            f"{path} holds no adapter (no adapter_config.json there or in {path}/adapter); "
            "pass a run directory whose training finished, or a PEFT adapter folder."
        )
    if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
        raise FileNotFoundError(
            f"{adapter} has adapter_config.json but no adapter_model.safetensors; the "
            "adapter was not fully written, so train again or copy the weights file."
        )
    check_adapter_files(adapter)  # before any model is loaded
    run_config = (read_config_json(run) if run != adapter else None) or {}  # tests and hand-made runs: any keys
    return adapter, run, run_config


def _busy(out: str, e: FolderBusy) -> UsageError:
    who = f"pid {e.pid}" if e.pid is not None else "a process whose pid could not be read"
    return UsageError(
        f"--out {out} is in use by another process ({who}: a train.py running there, or an eval.py writing its "
        "report); wait for it to end, or choose another --out."
    )


def check_run_folder(out: str, resume: bool) -> tuple[str | None, dict | None]:
    """(newest checkpoint, the run's recorded config) of --out, after checking that train.py may
    write there; raises UsageError (nothing written) when it may not: a file, a folder under a file,
    another program's folder, a damaged run config, checkpoints without --resume, or a folder another
    process holds (its lock)."""
    if not os.path.exists(out):
        blocker = file_above(out)
        if blocker is not None:
            raise UsageError(f"--out {out} is inside {blocker}, which is a file; pass a folder path.")
        return None, None
    if not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder; pass a new folder path (train.py creates it).")
    try:
        check_unlocked(out)
    except FolderBusy as e:
        raise _busy(out, e) from None
    return _check_contents(out, resume)


def _check_contents(out: str, resume: bool) -> tuple[str | None, dict | None]:
    from minilora.train.checkpoint import latest_checkpoint

    if not [name for name in os.listdir(out) if name != LOCK_NAME]:
        return None, None
    old = read_run_config(out)
    if old is None:
        raise UsageError(
            f"--out {out} already holds files that train.py did not write (no run config.json "
            "there), so it was left untouched; choose a new or empty folder."
        )
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise UsageError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out.")
    return ckpt, old


def claim(out: str, resume: bool, seen: tuple[str | None, dict | None]) -> FolderLock:
    """Take --out for this process (creating it) just before the first write, and check under the lock
    that it is still what check_run_folder saw (`seen`). The lock is this process's until it releases it or
    exits; raises UsageError (the holder's pid, or what changed, or why the folder cannot be written)."""
    try:
        lock = lock_folder(out, create=True)
    except FolderBusy as e:
        raise _busy(out, e) from None
    except OSError as e:  # read-only, no permission, a file in the way
        why = e.strerror or str(e)
        raise UsageError(f"--out {out} cannot be written ({why}); choose a folder you can write to.") from None
    try:
        now = _check_contents(out, resume)
    except UsageError:
        lock.release()
        raise
    if now != seen:
        lock.release()
        raise UsageError(f"--out {out} changed while this run was starting (another process wrote there); run again.")
    return lock


def _same(name: str, a, b) -> bool:
    """Whether a flag's value on --resume is the run's: paths (and a model given as a local folder)
    compared as the files they name, so that a relative and an absolute spelling agree."""
    local_model = name == "model" and isinstance(a, str) and os.path.isdir(os.path.expanduser(a))
    if (name in PATH_FIELDS or local_model) and a is not None and b is not None:
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def merge_resume(
    cfg, given: set[str], old: dict, resolve_dtype, step: int, world: int = 1, resolve_template=None
) -> dict:
    """Fill `cfg` for a resumed run: fields not in `given` take the run's recorded values; given
    fields that differ from them are refused (ADAPTER_FIELDS, OBJECTIVE_FIELDS, STREAM_FIELDS: UsageError naming each)
    or applied. `resolve_dtype(name) -> str` resolves --dtype auto on this machine; the dtype
    compared is the resolved one. So is the template: `resolve_template(name) -> str` resolves
    --template auto for the run's tokenizer (without it, the names are compared). --grad-accum may
    change with the number of ranks `world` as long as grad_accum x world, the micro-batches a step
    takes from the data stream, stays the same (a 2-rank run resumes on 1 process with twice the
    accumulation); a `world` that cannot keep it is refused with the launch that can. Returns
    {field: [old, new]} of the applied changes, and appends it to cfg's resume history (written by
    `config_json`)."""
    from minilora.data.encode import run_template

    old_dtype = old.get("resolved_dtype") or resolve_dtype(old.get("dtype", "auto"))
    recorded = {"dtype": old_dtype, "template": run_template(old)}
    refused, changed = [], {}
    for name in (f.name for f in dataclasses.fields(cfg)):
        if name not in old and name in UNRECORDED and name not in given:
            setattr(cfg, name, UNRECORDED[name])
        if name in NOT_INHERITED or name not in old:
            continue
        if name == "grad_accum":
            _merge_grad_accum(cfg, name in given, old, world, refused, changed)
            continue
        if name not in given:
            setattr(cfg, name, recorded.get(name, old[name]))  # dtype, template: what the run resolved
            continue
        new, was = getattr(cfg, name), old[name]
        if name == "dtype":
            new, was = resolve_dtype(new), old_dtype
        elif name == "template" and resolve_template is not None:
            new, was = resolve_template(new), recorded["template"]
        if _same(name, new, was):
            continue
        if name in ADAPTER_FIELDS or name in OBJECTIVE_FIELDS or name in STREAM_FIELDS:
            refused.append(f"{flag(name)} {new} (the run has {was})")
        else:
            changed[name] = [was, new]
    if refused:
        raise UsageError(
            f"--resume cannot change {', '.join(refused)}: these define the adapter, its objective or the "
            "data order its checkpoints hold; drop them to continue the run, or start a new run in "
            "another --out."
        )
    cfg.resumes = [*old.get("resumes", []), {"step": step, "changed": changed}]
    return changed


def _merge_grad_accum(cfg, given: bool, old: dict, world: int, refused: list, changed: dict) -> None:
    old_world = old.get("world_size", 1)
    micro = old["grad_accum"] * old_world  # micro-batches per step: what the checkpoint's data position counts
    if micro % world:  # no --grad-accum can keep the data order: name the launch that can
        ranks = max(n for n in range(1, world + 1) if micro % n == 0)
        launch = "python train.py" if ranks == 1 else f"torchrun --nproc_per_node {ranks} train.py"
        raise UsageError(
            f"--out {cfg.out} takes {_count(micro, 'micro-batch')} per step ({old['grad_accum']} per process "
            f"on {_count(old_world, 'process')}), which {world} processes cannot share evenly; resume it "
            f"with `{launch} --out {cfg.out} --resume`."
        )
    accum = cfg.grad_accum if given else micro // world
    if accum * world != micro:
        refused.append(
            f"{flag('grad_accum')} {accum} (the run has {old['grad_accum']} on {old_world} process(es), "
            f"this is {world}: grad-accum x processes must stay {micro})"
        )
    elif accum != old["grad_accum"]:
        changed["grad_accum"] = [old["grad_accum"], accum]
    cfg.grad_accum = accum


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es")  # micro-batch(es), process(es)


def config_json(cfg, resolved_dtype: str, world: int = 1, resolved: dict | None = None) -> str:
    """config.json of a run: every TrainConfig field, the dtype --dtype resolved to, the number of
    processes, the settings the planner resolved, and the history of resumes ({step, changed:
    {field: [old, new]}})."""
    d = json.loads(cfg.to_json())
    d["resolved_dtype"] = resolved_dtype
    d["world_size"] = world
    if resolved is not None:
        d["resolved"] = resolved
    d["resumes"] = getattr(cfg, "resumes", [])
    return json.dumps(d, indent=2)


def remove_stale_temps(run_dir: str) -> list[str]:
    """Delete the temp files and folders a killed run left in run_dir and run_dir/checkpoints."""
    import shutil

    removed = []
    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if _TEMP.match(name):
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    return removed


def cut_metrics(path: str, state: dict) -> None:
    """Cut metrics.jsonl back to what it held when the checkpoint `state` was written: its stored
    length, or (a checkpoint written before lengths were stored) the records up to its step."""
    if not os.path.isfile(path):
        return
    if "metrics_bytes" in state:
        if os.path.getsize(path) > state["metrics_bytes"]:
            os.truncate(path, state["metrics_bytes"])
        return
    from minilora.fileio import write_text_atomic

    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= state["step"]:
                    keep.append(line)
            except (ValueError, KeyError):  # a line torn by the kill
                pass
    write_text_atomic(path, "".join(keep))


class MetricsWriter:
    """metrics.jsonl in the run directory: one JSON object per event, flushed as written."""

    def __init__(self, path: str, append: bool):
        self.f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def tell(self) -> int:
        """Bytes written so far (stored in each checkpoint, see cut_metrics)."""
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
