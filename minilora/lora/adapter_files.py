"""An adapter folder on disk, checked: its two files (adapter_config.json, adapter_model.safetensors),
PEFT's config fields with their defaults and the ones we refuse, reading both files with every field
and rank checked against the tensors, and where save_adapter may write one (minilora/lora/adapter.py
maps the tensors to a model's modules and back).
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from minilora.fileio import file_above, holds_the_current_folder, json_error_text, safetensors_problem
from minilora.lora.layers import AdapterError

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")

# Every field PEFT 0.21.2's LoraConfig writes, with its default (a LoRA adapter needs no other).

PEFT_DEFAULTS = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Fields that change what the adapter computes and that we do not implement: loading refuses them.
UNSUPPORTED = {
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_out_dir(out_dir) -> str:
    """The absolute folder to save an adapter to, or AdapterError when saving there could lose something:
    an empty path, the current folder or one above it, a link, a file, a path inside a file, or a folder
    holding anything but an earlier adapter's CONFIG_NAME and WEIGHTS_NAME (all save_adapter writes)."""
    out_dir = os.fspath(out_dir)
    if not out_dir.strip():
        raise AdapterError("The adapter folder path is empty; pass the folder to save the adapter to, such as adapter.")
    path = os.path.abspath(out_dir)
    real = os.path.realpath(path)
    if holds_the_current_folder(path):
        raise AdapterError(
            f"{out_dir} is the current folder or one above it, which save_adapter never replaces; pass a new "
            f"folder for the adapter, such as {os.path.join(out_dir, 'adapter')}."
        )
    if os.path.islink(path):  # replacing it would drop the link and leave its target as it was
        raise AdapterError(f"{out_dir} is a symbolic link; pass the folder it points to ({real}) or a new path.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterError(f"{path} exists and is not a directory; pass a directory path for the adapter.")
    blocker = file_above(path)
    if blocker is not None:
        raise AdapterError(f"{out_dir} lies inside the file {blocker}; pass a path in a folder.")
    if os.path.isdir(path):
        ours = (CONFIG_NAME, WEIGHTS_NAME)
        foreign = sorted(
            n
            for n in os.listdir(path)
            if n not in ours or os.path.islink(os.path.join(path, n)) or not os.path.isfile(os.path.join(path, n))
        )
        if foreign:
            raise AdapterError(
                f"{out_dir} holds {_few(foreign)}, which save_adapter did not write; pass a new or empty folder "
                f"(save_adapter replaces only an earlier adapter's folder, holding just {' and '.join(ours)})."
            )
    return path


def _check_folder(adapter_dir) -> str:
    """An adapter folder to read: AdapterError for an empty path or a file, FileNotFoundError (one sentence
    naming it) for a folder that does not exist."""
    adapter_dir = os.fspath(adapter_dir)
    if not adapter_dir.strip():
        raise AdapterError(f"The adapter folder path is empty; pass the folder holding {CONFIG_NAME}.")
    if os.path.isfile(adapter_dir):
        raise AdapterError(
            f"{adapter_dir} is a file; pass the adapter's folder (the one holding {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} does not exist; pass a folder written by save_adapter or PEFT's save_pretrained."
        )
    return adapter_dir


def _read(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    _check_folder(adapter_dir)
    cfg_path, w_path = os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} does not exist; pass a directory written by save_adapter or PEFT's save_pretrained."
            )
    check_weights_file(w_path)
    return read_adapter_config(adapter_dir), load_file(w_path)


def check_weights_file(path: str) -> None:
    """An AdapterError naming `path` when adapter_model.safetensors is empty, garbled or truncated."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise AdapterError(
            f"{path} is damaged or truncated (safetensors: {problem}); copy the adapter again or retrain it."
        )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_patterns(v, ok) -> bool:
    """None, or {pattern: value} with each value ok and each pattern a regex (_pattern_value's use of it)."""
    if v is None:
        return True
    if not isinstance(v, dict) or not all(isinstance(p, str) and ok(x) for p, x in v.items()):
        return False
    try:
        for p in v:
            re.compile(rf"(.*\.)?({p})$")
    except re.error:
        return False
    return True


# The fields loading computes with: what each must be, and its check (a missing one takes PEFT's default).
FIELDS = {
    "r": ("an integer >= 1", _is_rank),
    "lora_alpha": ("a number", _is_number),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_rslora": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "rank_pattern": ("an object of module name patterns to integer ranks >= 1", lambda v: _is_patterns(v, _is_rank)),
    "alpha_pattern": ("an object of module name patterns to numbers", lambda v: _is_patterns(v, _is_number)),
}


def config_fields(cfg: dict, adapter_dir: str) -> dict:
    """`cfg` with PEFT's LoraConfig default for each of FIELDS it lacks (PEFT reads a missing lora_alpha as 8,
    a missing lora_dropout as 0.0, ...), or AdapterError naming the file, the field and what it must be."""
    cfg = {**{k: PEFT_DEFAULTS[k] for k in FIELDS}, **cfg}
    for key, (what, ok) in FIELDS.items():
        if not ok(cfg[key]):
            raise AdapterError(
                f"{os.path.join(adapter_dir, CONFIG_NAME)} has {key}={cfg[key]!r}, but {key} must be {what}; "
                "correct the file or save the adapter again."
            )
    return cfg


def _check_config(cfg: dict, adapter_dir: str) -> dict:
    """`cfg` with its fields checked and defaults filled in (config_fields), or AdapterError when it is
    not a plain LoRA adapter minilora can load."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(
            f"{adapter_dir} holds a {cfg.get('peft_type')!r} adapter; only LoRA (peft_type LORA) loads here."
        )
    for key, ok in UNSUPPORTED.items():
        val = cfg.get(key, ok)
        if val not in (ok, None, {}, []) and val != ok:
            raise AdapterError(
                f"{adapter_dir}: adapter_config.json sets {key}={val!r}, which minilora does "
                f"not support; retrain the adapter with {key}={ok!r}."
            )
    return config_fields(cfg, adapter_dir)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", name):
            return v
    return default


def read_adapter_weights(adapter_dir: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config.json, {module path as saved: {suffix: tensor}}) of a PEFT-layout LoRA adapter;
    suffixes are SUFFIXES. Raises AdapterError for anything but a plain LoRA adapter."""
    cfg, tensors = _read(adapter_dir)
    cfg = _check_config(cfg, adapter_dir)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise AdapterError(
                f"{adapter_dir}: tensor {key!r} is not a LoRA weight (lora_A / lora_B / "
                "lora_magnitude_vector); minilora loads plain LoRA adapters only."
            )
        weights.setdefault(name[: -len(suffix)], {})[suffix] = t
    _check_ranks(cfg, {n: {k: tuple(t.shape) for k, t in p.items()} for n, p in weights.items()}, adapter_dir)
    return cfg, weights


def _check_ranks(cfg: dict, shapes: dict[str, dict[str, tuple[int, ...]]], adapter_dir: str) -> None:
    """Each module's lora_A (r, K) and lora_B (M, r) must have the rank adapter_config.json gives it (r,
    or its rank_pattern entry), as PEFT requires when it loads the adapter: the scale alpha / r is
    computed from that r, so a disagreement would load the weights with the wrong scale.
    `shapes`: {module path as saved: {suffix: shape}}."""
    r = cfg.get("r", PEFT_DEFAULTS["r"])  # PEFT's default for a missing r
    if not _is_rank(r):
        raise AdapterError(f"{adapter_dir}: adapter_config.json has r={r!r}; an adapter's rank r is an integer >= 1.")
    for name, parts in sorted(shapes.items()):
        want = _pattern_value(cfg.get("rank_pattern"), name, r)
        a, b = parts.get(".lora_A.weight", ()), parts.get(".lora_B.weight", ())
        have = ({a[0]} if len(a) == 2 else set()) | ({b[1]} if len(b) == 2 else set())
        if have and have != {want}:
            raise AdapterError(
                f"{adapter_dir}: adapter_config.json gives {name} rank {want} but its lora_A / lora_B have rank "
                f"{', '.join(map(str, sorted(have)))}; the config does not belong to these weights, so save the "
                "adapter again."
            )


def check_adapter_files(adapter_dir: str) -> None:
    """Everything about the adapter's two files that can be checked without a model, from the
    safetensors header alone: the weights file is whole, and the config's ranks match the tensors'."""
    from safetensors import safe_open

    path = os.path.join(_check_folder(adapter_dir), WEIGHTS_NAME)
    check_weights_file(path)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                shapes.setdefault(name[: -len(suffix)], {})[suffix] = tuple(f.get_slice(key).get_shape())
    _check_ranks(config_fields(read_adapter_config(adapter_dir), adapter_dir), shapes, adapter_dir)


def read_adapter_config(adapter_dir: str) -> dict:
    """The adapter_config.json of an adapter folder, as a dict (adapter_config() builds one from a model)."""
    path = os.path.join(_check_folder(adapter_dir), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; pass a directory written by save_adapter or PEFT's save_pretrained."
        )
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{path} is not valid JSON ({json_error_text(e)}); save the adapter again.") from None
    except UnicodeDecodeError:
        raise AdapterError(
            f"{path} is not UTF-8 text, so it is not an adapter config; save the adapter again."
        ) from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} holds a JSON {type(cfg).__name__}, not an adapter config; save the adapter again.")
    return cfg
