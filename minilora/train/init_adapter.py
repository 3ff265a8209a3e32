"""--init-adapter RUN: start training from another run's adapter (typically SFT, then DPO on preferences).

The adapter is checked before the first write (the base it was trained on, its rank, alpha, rsLoRA,
DoRA and modules must be this run's), copied into the run folder (RUN/init_adapter/, so a resume does
not depend on the other run still being there), and loaded into the LoRA layers before the optimizer
is built: the policy starts as base + that adapter.

DPO's reference is then the base plus that adapter, frozen (the model before preference tuning). It is
kept as a second copy of the LoRA weights, `frozen` (a few MB: rank-r matrices), which the reference
forward puts in place of the trained ones (reference.lora_weights_swapped); no second model exists.
"""

from __future__ import annotations

import os
import shutil

import torch

from minilora.cli import UsageError

FOLDER = "init_adapter"  # in the run folder


def check(cfg, model_cfg, targets) -> str:
    """The adapter folder --init-adapter names, after checking that it fits this run; UsageError otherwise."""
    from minilora.lora.adapter_files import read_adapter_config, read_adapter_weights
    from minilora.lora.surgery import check_targets
    from minilora.train.rundir import find_run

    try:
        adapter_dir = find_run(cfg.init_adapter)[0]
    except FileNotFoundError as e:
        raise UsageError(f"--init-adapter: {e}") from None
    acfg = read_adapter_config(adapter_dir)
    base = acfg.get("base_model_name_or_path")
    if base != cfg.model:
        raise UsageError(
            f"--init-adapter {cfg.init_adapter} was trained on {base!r}, not on --model {cfg.model}; pass "
            f"--model {base} or an adapter trained on {cfg.model}."
        )
    flags = [("--lora-r", "r", cfg.lora_r), ("--lora-alpha", "lora_alpha", cfg.lora_alpha)]
    flags += [("--use-rslora", "use_rslora", cfg.use_rslora), ("--use-dora", "use_dora", cfg.use_dora)]
    for flag, key, ours in flags:
        theirs = acfg.get(key, False)
        if theirs != ours and not (isinstance(ours, float) and float(theirs) == ours):
            raise UsageError(
                f"--init-adapter {cfg.init_adapter} has {key} {theirs} but this run has {flag} {ours}; "
                f"train with the adapter's settings ({flag} {theirs})."
            )
    modules = set(read_adapter_weights(adapter_dir)[1])
    ours = set(check_targets(model_cfg, targets))
    if modules != ours:
        raise UsageError(
            f"--init-adapter {cfg.init_adapter} adapts {len(modules)} modules and --lora-targets "
            f"{cfg.lora_targets} selects {len(ours)} others; pass the --lora-targets it was trained with."
        )
    return adapter_dir


def copy_into_run(adapter_dir: str, out: str) -> str:
    """RUN/init_adapter/: the adapter's two files, copied (whole files, atomically)."""
    from minilora.fileio import write_file_atomic

    dest = os.path.join(out, FOLDER)
    os.makedirs(dest, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        src = os.path.join(adapter_dir, name)
        write_file_atomic(os.path.join(dest, name), lambda tmp, src=src: shutil.copyfile(src, tmp))
    return dest


def load(model, adapter_dir: str) -> list[torch.Tensor]:
    """Load the adapter into the model's LoRA layers; return a frozen copy of those weights, in
    lora_parameters order (DPO's reference)."""
    from minilora.lora.adapter import load_adapter
    from minilora.lora.surgery import lora_parameters

    load_adapter(model, adapter_dir)
    return [p.detach().clone() for p in lora_parameters(model)]
