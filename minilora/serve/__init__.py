"""Serving several adapters on one base (serve.py): OpenAI request bodies (api.py), the running batch's
cache (batch.py), the continuous-batching scheduler (scheduler.py), and which adapter folders may join a
base (here).

    adapter_source("runs/a", "tiny")   # -> (adapter folder, its run's config.json or {}); ValueError if it
                                       #    was trained on another base
"""

from __future__ import annotations

import os

from minilora.models.presets import PRESETS


def base_key(name: str) -> str:
    """What two names of one base share: a preset's Hugging Face repo, then the last path component,
    lower-cased ("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct" and a local folder of that name agree)."""
    repo = (PRESETS.get(name) or {}).get("hf_repo") or name
    return os.path.basename(os.path.normpath(os.path.expanduser(repo))).lower()


def adapter_source(path: str, base: str) -> tuple[str, dict]:
    """(the adapter folder, its run's config.json as a dict or {}) for a run directory or an adapter
    folder; ValueError in one sentence when it is not there or names another base than `base`."""
    from minilora.lora.adapter import read_adapter_config
    from minilora.train.rundir import find_run

    adapter_dir, _, run_cfg = find_run(path)
    trained_on = run_cfg.get("model") or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if trained_on and base_key(trained_on) != base_key(base):
        raise ValueError(
            f"The adapter in {adapter_dir} was trained on {trained_on!r}, not on the served base {base!r}; "
            f"serve it with --model {trained_on}."
        )
    return adapter_dir, run_cfg
