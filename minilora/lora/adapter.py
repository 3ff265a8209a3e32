"""Save and load LoRA adapters in PEFT's on-disk layout, so PEFT (and vLLM) read ours and we read theirs.

An adapter directory holds two files:
  adapter_config.json        PEFT 0.21's LoraConfig fields (peft_type "LORA", task_type "CAUSAL_LM",
                             r, lora_alpha, lora_dropout, target_modules, use_rslora, use_dora, ...)
  adapter_model.safetensors  float32 tensors keyed as PEFT saves them (the in-memory adapter name
                             ".default" dropped):
                               base_model.model.<module path>.lora_A.weight          (r, K)
                               base_model.model.<module path>.lora_B.weight          (M, r)
                               base_model.model.<module path>.lora_magnitude_vector  (M,)  DoRA only
Our parameter names are exactly `<module path>.lora_A.weight` etc. (see minilora/lora/layers.py), and the
module path is written as the source checkpoint names it (models.loader.checkpoint_name): for a
Gemma3ForConditionalGeneration checkpoint our `model.layers.0...` is saved as its
`language_model.model.layers.0...` (transformers 4 layout) or `model.language_model.layers.0...`
(transformers 5), so PEFT and vLLM apply the adapter to that checkpoint. Loading maps either
layout back (models.loader.our_name) when the path is not a module of the model as it is.

PiSSA and OLoRA (minilora/lora/inits.py) train against a changed base; save_adapter writes by default
the rank-2r adapter that applies to the original weights (r, lora_alpha and the patterns doubled, as
PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes it); convert=False keeps
the rank-r adapter on the changed base (what a checkpoint holds).

Writes are atomic: both files go to a temporary directory beside `out_dir`, which replaces
`out_dir` only once complete; an existing adapter survives any failure before that. Only an earlier
adapter's folder is replaced (one holding nothing but those two files): an empty path, the current folder
or one above it, a link, a file and a folder holding anything else are refused before anything is written.

Loading checks the config's fields (a missing one takes PEFT's LoraConfig default) and every tensor's shape
against the model before it changes the model, so a refused adapter leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import torch
import torch.nn as nn

import minilora.lora.inits as inits
from minilora.dtensor import local, local_region
from minilora.fileio import swap_into_place, temp_dir_for, usual_permissions
from minilora.lora.adapter_files import (
    CONFIG_NAME,
    PEFT_DEFAULTS,
    PREFIX,
    WEIGHTS_NAME,
    _check_out_dir,
    _pattern_value,
    read_adapter_config,
    read_adapter_weights,
)
from minilora.lora.layers import AdapterError, LoRALinear, lora_scaling
from minilora.lora.mixed_term import Slot
from minilora.lora.multi import DEFAULT, NamedLoRALinear
from minilora.lora.named import adapter_table, add_adapter
from minilora.lora.surgery import apply_lora, lora_modules, lora_state_dict
from minilora.quant.linear import NF4Linear

__all__ = [
    "AdapterError",
    "save_adapter",
    "load_adapter",
    "adapter_config",
    "read_adapter_config",
    "check_adapter_fits",
]


def _source_prefix(model: nn.Module) -> str:
    """Where the model's source checkpoint keeps our `model.` (ModelConfig.source_prefix; "model." else)."""
    prefix = getattr(getattr(model, "config", None), "source_prefix", None)
    return prefix if isinstance(prefix, str) else "model."


def _source_path(model: nn.Module, path: str) -> str:
    """Our module path -> the path the model's source checkpoint uses (identity for other models)."""
    from minilora.models.loader import checkpoint_name

    return checkpoint_name(path, _source_prefix(model))


def module_path(model: nn.Module, path: str) -> str:
    """A module path as an adapter stores it -> the model's own (undoes _source_path)."""
    from minilora.models.loader import our_name

    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        return our_name(path) or path


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT target_modules for the LoRA modules `names`: their leaf names when those select exactly
    these modules (e.g. ["q_proj", "v_proj"]), else the full module paths (as PEFT 0.21 writes)."""
    leaves = sorted({n.split(".")[-1] for n in names})
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear, NF4Linear))]
    linears = [n for n in linears if not n.endswith(".base")]
    if sorted(n for n in linears if n.split(".")[-1] in leaves) == sorted(names):
        return leaves
    return sorted(names)


def _source_targets(model: nn.Module, targets: list[str]) -> list[str] | str:
    r"""target_modules for the source checkpoint. A multimodal source gets a regex (PEFT full-matches
    a string) confined to its language model in either key layout, `(.*\.)?language_model\.(model\.)?(...)`,
    so that PEFT does not also wrap the vision tower's q/k/v_proj."""
    if _source_prefix(model) == "model.":
        return targets
    leaves = all("." not in t for t in targets)
    alts = "|".join(rf"layers\.\d+\..*\.{t}" if leaves else re.escape(t[len("model.") :]) for t in targets)
    return rf"(.*\.)?language_model\.(model\.)?({alts})"


def adapter_config(model: nn.Module, base_model_name_or_path: str | None, config: dict | None = None) -> dict:
    """The adapter_config.json dict for the LoRA layers in `model`; `config` overrides fields."""
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("The model has no LoRA layers to save; call apply_lora(model, ...) first.")
    kinds = {(m.use_rslora, m.use_dora, m.init, m.dropout_p) for m in mods.values()}
    if len(kinds) > 1:
        raise AdapterError(
            "The model's LoRA layers mix rsLoRA/DoRA/init/dropout settings, which one "
            "PEFT adapter_config.json cannot express; use one setting for all layers."
        )
    use_rslora, use_dora, init, dropout = kinds.pop()
    r = _most_common([m.r for m in mods.values()])
    alpha = _most_common([m.alpha for m in mods.values()])
    cfg = dict(PEFT_DEFAULTS)
    cfg.update(
        base_model_name_or_path=base_model_name_or_path,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        # LoftQ's base is NF4 of W (one iteration), what any QLoRA loader builds: PEFT's LoftQ recipe saves
        # such an adapter with init_lora_weights true, since "loftq" makes PEFT's loader run LoftQ again
        init_lora_weights=True if init in ("default", "loftq") else init,
        target_modules=_source_targets(model, _target_modules(model, list(mods))),
        rank_pattern={_source_path(model, n): m.r for n, m in mods.items() if m.r != r},
        alpha_pattern={_source_path(model, n): m.alpha for n, m in mods.items() if m.alpha != alpha},
    )
    cfg.update(config or {})
    return cfg


def save_adapter(
    model: nn.Module,
    out_dir: str,
    base_model_name_or_path: str | None,
    config: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
    convert: bool = True,
) -> str:
    """Write `out_dir`/adapter_config.json + adapter_model.safetensors (PEFT layout), atomically; an existing
    `out_dir` is replaced only when it is an earlier adapter's folder (module docstring), else refused.
    `state`: the LoRA tensors to write instead of the model's (FSDP: gathered from the shards).
    convert: layers whose init changed the base (PiSSA, OLoRA) are written as the rank-2r adapter on
    the original weights (module docstring); False writes them as trained, on the changed base."""
    from safetensors.torch import save_file

    cfg = adapter_config(model, base_model_name_or_path, config)
    state = lora_state_dict(model) if state is None else state
    mods = lora_modules(model)
    if convert and any(getattr(m, "lora_A0", None) is not None for m in mods.values()):
        state, cfg = inits.converted_state(mods, state), inits.converted_config(cfg)
    tensors = {PREFIX + _source_path(model, k): v.detach().float().contiguous().cpu() for k, v in state.items()}
    out_dir = _check_out_dir(out_dir)  # before anything is written
    tmp = temp_dir_for(out_dir)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        usual_permissions(tmp)
        _check_out_dir(out_dir)  # again: something may have appeared there meanwhile
        swap_into_place(tmp, out_dir)  # an earlier adapter is replaced only now, and restored on failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _alpha(model: nn.Module, cfg: dict, path: str) -> float:
    """lora_alpha of module `path` (our path): its alpha_pattern entry, which may name the module by our
    path or by the source checkpoint's, else lora_alpha."""
    patterns = cfg.get("alpha_pattern")
    alpha = cfg.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
    return _pattern_value(patterns, path, _pattern_value(patterns, _source_path(model, path), alpha))


def _check_modules(model: nn.Module, saved: dict[str, dict], adapter_dir: str, base) -> None:
    """The adapter must change what it claims to: it has weights, each of its modules is a linear layer of
    `model` (or one already carrying LoRA), and each has both lora_A and lora_B. An adapter for another
    base would otherwise load partly or not at all and silently serve (some of) the base's output."""
    if not saved:
        raise AdapterError(
            f"{adapter_dir} holds no LoRA weights, so it would leave the model unchanged (it names its base as "
            f"{base}); save the adapter again from the trained model."
        )
    have = dict(model.named_modules())
    kinds = (nn.Linear, NF4Linear, LoRALinear, NamedLoRALinear)
    unmatched = [n for n in sorted(saved) if not isinstance(have.get(module_path(model, n)), kinds)]
    if unmatched:
        first = ", ".join(repr(n) for n in unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise AdapterError(
            f"{adapter_dir} has weights for {len(unmatched)} of its {len(saved)} modules that are not linear "
            f"layers of this model ({first}); the adapter was trained on a different base ({base}), so load it "
            "on that one."
        )
    for n in sorted(saved):
        half = [s for s in (".lora_A.weight", ".lora_B.weight") if s not in saved[n]]
        if half:
            raise AdapterError(
                f"{adapter_dir} has no {half[0][1:]} for {n!r}, so that module would keep the base's output; "
                "the file is incomplete, save the adapter again."
            )


def _named_slots(model: nn.Module, cfg: dict, weights: dict[str, dict], adapter_dir: str, base) -> dict[str, Slot]:
    """{our module path: (A (r, K), B (M, r), s)} of an adapter loaded by name, checked against the model."""
    if cfg.get("use_dora"):
        raise AdapterError(
            f"{adapter_dir} is a DoRA adapter, which cannot sit beside others (its magnitude rescales whole rows "
            "of W0, not a per-row LoRA term); load it alone, without a name."
        )
    slots = {}
    for path, parts in sorted(weights.items()):
        A, B = parts[".lora_A.weight"], parts[".lora_B.weight"]  # (r, K), (M, r)
        layer = model.get_submodule(path)
        want = {".lora_A.weight": (A.shape[0], layer.in_features), ".lora_B.weight": (layer.out_features, A.shape[0])}
        for suffix, t in ((".lora_A.weight", A), (".lora_B.weight", B)):
            if tuple(t.shape) != want[suffix]:
                raise AdapterError(
                    f"{adapter_dir}: {path}{suffix} has shape {tuple(t.shape)} but this model needs {want[suffix]}; "
                    f"the adapter was trained on a different base ({base})."
                )
        slots[path] = (A, B, lora_scaling(A.shape[0], _alpha(model, cfg, path), bool(cfg.get("use_rslora", False))))
    return slots


def _wanted_shapes(model: nn.Module, mods: dict, weights: dict[str, dict], cfg: dict) -> dict[str, tuple[int, ...]]:
    """{LoRA weight name: the shape the model takes it in}: its LoRA layers' own when it has some, else those
    load_adapter's apply_lora will give it (the adapter's ranks on each module's in / out features)."""
    if mods:
        return {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    want = {}
    for path, parts in weights.items():
        layer, r = model.get_submodule(path), parts[".lora_A.weight"].shape[0]
        want[path + ".lora_A.weight"] = (r, layer.in_features)  # (r, K)
        want[path + ".lora_B.weight"] = (layer.out_features, r)  # (M, r)
        if cfg.get("use_dora"):
            want[path + ".lora_magnitude_vector"] = (layer.out_features,)  # (M,)
    return want


def _check_shapes(want: dict, mods: dict, weights: dict[str, dict], adapter_dir: str, base) -> None:
    """Every adapter tensor has a LoRA weight of its shape in the model (`want`), or one AdapterError saying
    which does not and why: another base (in / out features differ), another rank, no LoRA layer there, or
    DoRA on one side only."""
    rank_dim = {".lora_A.weight": 0, ".lora_B.weight": 1}
    for path, parts in sorted(weights.items()):
        for suffix, t in sorted(parts.items()):
            key, have = path + suffix, tuple(t.shape)
            if key not in want:
                if mods and path not in mods:
                    raise AdapterError(
                        f"{adapter_dir} has weights for {path}, which has no LoRA layer in this model; load the "
                        "adapter into a model without LoRA layers (load_adapter then applies them where the adapter "
                        "has weights), or beside this one with load_adapter(..., name=...)."
                    )
                if suffix == ".lora_magnitude_vector" and mods:
                    raise AdapterError(
                        f"{adapter_dir} is a DoRA adapter ({key}) but this model's LoRA layer on {path} is not; load "
                        "it into a model without LoRA layers, or into one given LoRA by apply_lora(..., use_dora=True)."
                    )
                if suffix == ".lora_magnitude_vector":
                    raise AdapterError(
                        f"{adapter_dir} has {key!r} but its {CONFIG_NAME} sets use_dora false; the config does not "
                        "belong to these weights, so save the adapter again."
                    )
                raise AdapterError(
                    f"{adapter_dir} has {key!r} but the model has no such LoRA weight; the adapter was trained on a "
                    f"different base ({base}) or LoRA setup."
                )
            need = want[key]
            if have == need:
                continue
            d = rank_dim.get(suffix)
            if d is not None and len(have) == len(need) == 2 and have[1 - d] == need[1 - d]:
                raise AdapterError(
                    f"{adapter_dir}: {path} has rank {have[d]} in the adapter but rank {need[d]} in this model's "
                    "LoRA layer; load the adapter into a model without LoRA layers (load_adapter then applies "
                    "LoRA with the adapter's ranks), or beside this one with load_adapter(..., name=...)."
                )
            raise AdapterError(
                f"{adapter_dir}: {key} has shape {have} but this model needs {need}; the adapter was trained on "
                f"a different base ({base})."
            )


def load_adapter(model: nn.Module, adapter_dir: str, strict: bool = True, name: str | None = None) -> dict:
    """Load a PEFT-layout LoRA adapter into `model` (in place) and return its config.

    A model without LoRA layers gets them first (apply_lora on exactly the modules the adapter has
    weights for, with its r / lora_alpha / rank_pattern / alpha_pattern / use_rslora / use_dora /
    lora_dropout). With strict=True every LoRA layer of the model must receive weights.

    name: load it as a named adapter beside the model's others (PEFT's adapter_name; minilora/lora/named.py),
    frozen, with its own ranks, alphas and target modules, used through set_adapter or adapter_ids;
    None or "default" is the default adapter above (strict applies to it only)."""
    cfg, saved = read_adapter_weights(adapter_dir)
    base = cfg.get("base_model_name_or_path")
    _check_modules(model, saved, adapter_dir, base)
    weights = {module_path(model, path): w for path, w in saved.items()}
    if name is not None and name != DEFAULT:
        add_adapter(model, name, _named_slots(model, cfg, weights, adapter_dir, base))
        return cfg
    mods = lora_modules(model)
    if not mods and adapter_table(model) is not None:
        raise AdapterError(
            f"{adapter_dir}: the model has named adapters but no default one, which must come first; load the "
            "default adapter (no name) before the named ones."
        )
    # every tensor's place and shape is checked before the model changes at all: a refused adapter leaves it as it was
    _check_shapes(_wanted_shapes(model, mods, weights, cfg), mods, weights, adapter_dir, base)
    missing = sorted(set(mods) - set(weights))
    if strict and missing:
        raise AdapterError(
            f"{adapter_dir} has no weights for LoRA layer(s) {missing[:3]}{'...' if len(missing) > 3 else ''} "
            "of this model; pass strict=False to load a partial adapter."
        )
    if not mods:
        names = sorted(weights)
        ranks = {n: int(weights[n][".lora_A.weight"].shape[0]) for n in names}
        alphas = {n: _alpha(model, cfg, n) for n in names}
        init = cfg.get("init_lora_weights", True)
        # PiSSA / OLoRA as trained (not converted): the base becomes the residual again, as PEFT's loader
        # does; other inits only set A and B, which the saved weights replace
        init = init if isinstance(init, str) and (init == "gaussian" or inits.changes_base(init)) else "default"
        apply_lora(
            model,
            names,
            r=int(cfg["r"]),
            alpha=cfg["lora_alpha"],
            dropout=float(cfg["lora_dropout"]),
            init=init,
            use_rslora=bool(cfg["use_rslora"]),
            use_dora=bool(cfg["use_dora"]),
            verbose=False,
            ranks=ranks,
            alphas=alphas,
        )
    params = lora_state_dict(model)
    with torch.no_grad():
        for path, parts in weights.items():
            for suffix, t in parts.items():
                key = path + suffix
                local(params[key]).copy_(t[local_region(params[key])])  # FSDP: this rank's rows
    return cfg


# ------------------------------------------------------------------------------- runs on disk


def check_adapter_fits(model, adapter_dir: str, model_name: str) -> None:
    """Raise one sentence when the adapter's LoRA shapes do not fit `model` (an adapter for another base).

    lora_A (r, K) must match the module's in_features K and lora_B (M, r) its out_features M.
    """
    from safetensors import safe_open

    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path") or "another model"
    prefix = "base_model.model."
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            for part, dim, attr in ((".lora_A.weight", 1, "in_features"), (".lora_B.weight", 0, "out_features")):
                if not key.endswith(part):
                    continue
                path = key[len(prefix) :] if key.startswith(prefix) else key
                path = module_path(model, path[: -len(part)])
                want = f.get_slice(key).get_shape()[dim]
                try:
                    have = getattr(model.get_submodule(path), attr, None)
                except AttributeError:
                    have = None
                if have != want:
                    what = f"has no {path}" if have is None else f"has {attr} {have} in {path}"
                    raise ValueError(
                        f"The adapter in {adapter_dir} was trained on {trained_on!r} and does not fit {model_name!r} "
                        f"(the adapter expects {attr} {want} in {path}, the model {what}); pass the --model it "
                        "was trained on."
                    )
