"""Named adapters on one model, as PEFT's adapter_name: several loaded beside each other over one base,
one active at a time, or one per row of a batch (PEFT's mixed batches).

    load_adapter(model, "runs/a/adapter", name="a")    # minilora/lora/adapter.py; no name: the default
    load_adapter(model, "runs/b/adapter", name="b")
    adapter_names(model)              # ["default", "a", "b"]: adapter_ids index this list, -1 the base
    model(ids, adapter_ids=[1, 2, -1])                 # row 0 through a, row 1 through b, row 2 the base
    generate(model, prompts, n, adapter_ids=[1, 2, -1])
    set_adapter(model, "b"); model(ids)                # every row through b ("default" switches back)
    delete_adapter(model, "a")        # the indices after it shift down by one

The default adapter stays what it always was (a LoRALinear's own weights, which training writes and
save_adapter saves); the named ones are inference-only, frozen. How a layer holds and applies them is
minilora/lora/multi.py.
"""

from __future__ import annotations

import re

import torch.nn as nn

from minilora.lora.layers import AdapterError, LoRALinear
from minilora.lora.mixed_term import Slot
from minilora.lora.multi import DEFAULT, AdapterSlot, AdapterTable, NamedAdapters, NamedLoRALinear
from minilora.lora.surgery import adapter_table, hosts, lora_modules
from minilora.models.loader import set_module
from minilora.quant.linear import NF4Linear

NAME = re.compile(r"[A-Za-z0-9_-]+")  # an adapter name becomes part of parameter names (no dots)


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters in adapter_ids order: "default" first when the model has LoRA layers of its own."""
    table = adapter_table(model)
    if table is not None:
        return list(table.names)
    return [DEFAULT] if lora_modules(model) else []


def active_adapter(model: nn.Module) -> str:
    """The adapter a call without adapter_ids uses ("default": the model's own, or the base without one)."""
    table = adapter_table(model)
    return DEFAULT if table is None else table.active


def add_adapter(model: nn.Module, name: str, slots: dict[str, Slot]) -> None:
    """Put adapter `name` on the layers `slots` names ({our module path: (A (r, K), B (M, r), s)}, shapes
    already checked against the model): beside a LoRALinear's default adapter, or on a base linear
    wrapped by a NamedLoRALinear. Every check runs before the model changes."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterError(
            f"Adapter name {name!r} cannot be used; pass letters, digits, '_' or '-' (it becomes part of "
            "parameter names)."
        )
    if name in adapter_names(model):
        raise AdapterError(
            f"An adapter named {name!r} is already loaded; call delete_adapter(model, {name!r}) first or pass "
            "another name."
        )
    for path in slots:
        if not isinstance(model.get_submodule(path), (nn.Linear, NF4Linear, LoRALinear, NamedLoRALinear)):
            raise AdapterError(f"{path} is not a linear layer of this model; an adapter can only target linear layers.")
    table = adapter_table(model) or AdapterTable([DEFAULT] if lora_modules(model) else [])
    for path, (A, B, s) in slots.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, (LoRALinear, NamedLoRALinear)):
            layer = NamedLoRALinear(layer, table)
            set_module(model, path, layer)
        if layer.adapters is None:
            layer.adapters = NamedAdapters(table)
        dev = (layer.base.weight_packed if isinstance(layer.base, NF4Linear) else layer.base.weight).device
        layer.adapters[name] = AdapterSlot(A.to(dev), B.to(dev), s)
    for layer in hosts(model).values():  # every layer reads the one table: an index names one adapter everywhere
        if layer.adapters is None:
            layer.adapters = NamedAdapters(table)
    table.names.append(name)


def _unknown(model: nn.Module, name: str) -> AdapterError:
    return AdapterError(
        f"No adapter named {name!r} is loaded (the model has {adapter_names(model)}); "
        f"load it with load_adapter(model, adapter_dir, name={name!r}) first."
    )


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter every row uses in calls without adapter_ids; "default" switches back to the
    model's own adapter, or to the base alone on a model that has none (PEFT's name for the first adapter)."""
    if name != DEFAULT and name not in adapter_names(model):
        raise _unknown(model, name)
    if name != DEFAULT and any(m.merged for m in lora_modules(model).values()):
        raise AdapterError(
            f"set_adapter(model, {name!r}) needs the default adapter unmerged (merge_lora folded it into the base "
            "weights every adapter computes on); call unmerge_lora(model) first."
        )
    table = adapter_table(model)
    if table is not None:  # without a table the default adapter is the only one, and already active
        table.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the named adapter `name` from every layer; a base linear left with no adapter is unwrapped.
    The indices after it shift down by one; when it was active, "default" becomes active."""
    if name == DEFAULT:
        raise AdapterError(
            "The default adapter is the model's own LoRA layers (what training writes) and is not deleted here; "
            "compute without it inside lora_disabled(model), or load the base again."
        )
    if name not in adapter_names(model):
        raise _unknown(model, name)
    table = adapter_table(model)
    for path, layer in hosts(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
        if isinstance(layer, NamedLoRALinear) and len(layer.adapters) == 0:
            set_module(model, path, layer.base)
    table.names.remove(name)
    table.checked = None  # an adapter_ids tensor checked against the longer list is checked again
    if table.active == name:
        table.active = DEFAULT
    if table.names in ([], [DEFAULT]):  # the last named adapter: the layers are as before the first one
        for layer in hosts(model).values():
            del layer.adapters
            layer.adapters = None
    for layer in hosts(model).values():  # the others' weights out of stacks that still hold the deleted one's
        if layer.adapters is not None:
            layer.adapters.stacks()
