"""Serving several adapters on one base (serve.py): OpenAI request bodies (api.py), the running batch's
cache (batch.py), the continuous-batching scheduler (scheduler.py), and which adapter folders may join a
base (here).

    adapter_source("runs/a", "tiny")   # -> (adapter folder, its run's config.json or {}); ValueError if it
                                       #    was trained on another base
    parse_adapters(["a=runs/a"], "tiny")   # serve.py's --adapter NAME=PATH flags -> {name: adapter_source}
    dora_adapter(adapters)             # the one DoRA adapter among them (served as the model's own), or None
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
    from minilora.lora.adapter_files import read_adapter_config
    from minilora.train.rundir import find_run

    adapter_dir, _, run_cfg = find_run(path)
    trained_on = run_cfg.get("model") or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if trained_on and base_key(trained_on) != base_key(base):
        raise ValueError(
            f"The adapter in {adapter_dir} was trained on {trained_on!r}, not on the served base {base!r}; "
            f"serve it with --model {trained_on}."
        )
    return adapter_dir, run_cfg


def check_name(name: str, base: str) -> None:
    """ValueError unless `name` can name a served adapter: a parameter-name word, not 'default' or the base."""
    from minilora.lora.named import NAME

    if not NAME.fullmatch(name) or name in ("default", base):
        raise ValueError(
            f"The adapter name {name!r} cannot be served; use letters, digits, '_' or '-', other than 'default' "
            "and the base's id."
        )


def parse_adapters(specs: list[str], base: str) -> dict[str, tuple[str, dict]]:
    """{name: (adapter folder, run config)} from --adapter NAME=PATH flags, every check before loading."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec} is not NAME=PATH; pass e.g. --adapter sql=runs/sql.")
        check_name(name, base)
        if name in out:
            raise ValueError(f"--adapter {name} is given twice; give each adapter its own name.")
        out[name] = adapter_source(path, base)
    return out


def is_dora(adapter_dir: str) -> bool:
    """Whether the adapter folder holds a DoRA adapter (use_dora in its adapter_config.json)."""
    from minilora.lora.adapter_files import read_adapter_config

    return bool(read_adapter_config(adapter_dir).get("use_dora"))


def dora_adapter(adapters: dict[str, tuple[str, dict]]) -> str | None:
    """The name of the DoRA adapter among `adapters` (parse_adapters' dict), None without one. serve.py
    loads it as the model's own adapter, since its magnitude rescales whole rows of W0 and cannot be
    applied per row beside others; a model has one own adapter, so two DoRA adapters are a ValueError."""
    dora = [name for name, (folder, _) in adapters.items() if is_dora(folder)]
    if len(dora) > 1:
        raise ValueError(
            f"--adapter {dora[0]} and --adapter {dora[1]} are both DoRA adapters, and a server runs one (as "
            "the model's own adapter); serve the other from a second serve.py on another --port."
        )
    return dora[0] if dora else None
