"""Model surgery: which linear layers of a model get LoRA (targets, per-module ranks and alphas),
putting LoRALinear layers there (minilora/lora/layers.py), freezing the rest, and the model-wide
switches over them: merge and unmerge, LoRA off (the base alone), and the adapter's parameters and
state dict. Every check runs before the model is changed, so a refused call leaves it as it was.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

import minilora.lora.inits as inits
from minilora.lora.layers import (
    AdapterError,
    LoRALinear,
    check_alpha,
    check_rank,
    check_settings,
)
from minilora.lora.multi import DEFAULT, AdapterTable, NamedAdapters, NamedLoRALinear
from minilora.lora.nf4_fused import (  # noqa: F401  (LORA_SLICE_BYTES, _row_slices re-exported)
    LORA_SLICE_BYTES,
    _LoRANF4AutocastFn,
    _LoRANF4Fn,
    _LoRANF4FusedFn,
    _row_slices,
)
from minilora.models.loader import set_module
from minilora.quant.linear import NF4Linear


def hosts(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer that carries adapters (LoRALinear, NamedLoRALinear), by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, NamedLoRALinear))}


def adapter_table(model: nn.Module) -> AdapterTable | None:
    """The model's AdapterTable (lora/multi.py), or None while it has no named adapter."""
    return next((m.adapters.table for m in hosts(model).values() if m.adapters is not None), None)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by name: nn.Linear / NF4Linear, and a layer that carries adapters as one
    module, never the linears inside it (its base, an adapter's lora_A / lora_B)."""
    inside = tuple(n + "." for n in hosts(model))
    kinds = (nn.Linear, NF4Linear, LoRALinear, NamedLoRALinear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not n.startswith(inside)}


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return name.split(".")[-1] == "lm_head" or (head is not None and module is head)


def select_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear modules `targets` selects ("all-linear", a regex string, or a list of
    module-name suffixes as PEFT's target_modules); an AdapterError when one selects nothing."""
    linears = _linear_modules(model)
    if targets == "all-linear":
        names = [n for n, m in linears.items() if not _is_output_head(model, n, m)]
    elif isinstance(targets, str):
        try:
            names = [n for n in linears if re.fullmatch(targets, n)]
        except re.error as e:
            raise AdapterError(
                f"LoRA targets {targets!r} is not a valid regular expression ({e}); fix it or pass a list of "
                "module names."
            ) from None
    else:
        if not isinstance(targets, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(
                f"LoRA targets={targets!r} is invalid; pass 'all-linear', a regular expression, or a list of module "
                "names such as ['q_proj', 'v_proj']."
            )
        targets = list(targets)
        names = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            have = sorted({n.split(".")[-1] for n in linears})
            raise AdapterError(
                f"LoRA target(s) {missing} match no linear module in the model; the linear module names are {have}."
            )
    if not names:
        have = sorted({n.split(".")[-1] for n in linears})
        raise AdapterError(
            f"LoRA targets {targets!r} match no linear module in the model; the linear module names are {have}."
        )
    return names


def check_targets(
    model_cfg, targets, flag: str = "--lora-targets", init: str = "default", r: int = 1, rho: float = 1.0
) -> list[str]:
    """select_targets on the model `model_cfg` describes, built on the meta device (no weights, no
    memory): the AdapterError apply_lora would raise, prefixed with `flag`, before anything is loaded
    or written; and for a weight-aware `init`, that rank r fits every target (inits.why_not)."""
    from minilora.models.loader import no_random_init
    from minilora.models.transformer import Transformer

    with torch.device("meta"), no_random_init():
        model = Transformer(model_cfg)
    model.tie_weights()
    try:
        names = select_targets(model, targets)
    except AdapterError as e:
        raise AdapterError(f"{flag}: {e}") from None
    for name in names:
        why = inits.why_not(init, r, model.get_submodule(name), rho=rho)
        if why is not None:
            raise AdapterError(f"--init {init} --lora-r {r} on {name}: {why}; lower --lora-r.")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) as PEFT's get_nb_trainable_parameters: parameters once each, and an NF4
    weight at its logical size (PEFT counts a bitsandbytes Params4bit as 2 x its packed bytes); an
    NF4Linear's bias is a buffer here but a frozen parameter in bitsandbytes, so it counts too."""
    trainable = total = 0
    for _, prm in model.named_parameters():
        total += prm.numel()
        trainable += prm.numel() if prm.requires_grad else 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.out_features * m.in_features + (0 if m.bias is None else m.bias.numel())
    return trainable, total


def trainable_report(model: nn.Module) -> dict:
    trainable, total = parameter_counts(model)
    pct = 100 * trainable / total if total else 0.0
    msg = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    return {"trainable": trainable, "total": total, "percent": pct, "message": msg}


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_overrides(overrides, label: str, names: list[str]) -> dict:
    """`ranks` / `alphas` as a dict whose keys are targeted module names ({} for None)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise AdapterError(f"LoRA {label}={overrides!r} is invalid; pass a dict {{module name: value}} or None.")
    targeted = set(names)
    stray = [k for k in overrides if k not in targeted]
    if stray:
        raise AdapterError(
            f"LoRA {label} names {stray[:3]}, which are not among the targeted modules; key {label} by the full "
            f"name of a targeted module, such as {names[0]!r}."
        )
    return dict(overrides)


def apply_lora(
    model: nn.Module,
    targets="all-linear",
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    init: str = "default",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
    verbose: bool = True,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    loftq_iters: int = 1,
    lora_compute: str = "fused",
) -> dict:
    """Replace the targeted linears by LoRALinear in place, freeze everything else, and return
    {"trainable", "total", "percent", "message", "modules"} (message printed as PEFT prints it).
    `ranks` / `alphas` override r / alpha per module name (used when loading PEFT's rank_pattern).
    A weight-aware `init` (pissa, olora, loftq) needs dense targets: apply it before quantizing.

    On a model that has LoRA layers already, a second call adds LoRA to other modules (such as lm_head)
    with the same use_rslora / use_dora / init / dropout, so that one adapter holds them all; the LoRA
    weights already there keep their values and requires_grad. Named adapters (lora/named.py) stay as
    they are; the default adapter must come before them. Every check runs before the model changes."""
    check_settings(r, alpha, dropout, init, lora_compute, loftq_iters)
    names = select_targets(model, targets)
    ranks, alphas = _check_overrides(ranks, "ranks", names), _check_overrides(alphas, "alphas", names)
    layers = dict(model.named_modules())
    adapted = [n for n in names if isinstance(layers[n], LoRALinear)]
    if adapted:
        raise AdapterError(
            f"The model already has LoRA layers on {_few(adapted)}; target only modules without LoRA, or load "
            "the base model again to start over."
        )
    existing, table = lora_modules(model), adapter_table(model)
    if table is not None and not existing:
        raise AdapterError(
            f"The model holds named adapters {table.names} but no default adapter, which must come first; call "
            "apply_lora before load_adapter(..., name=...), or delete_adapter the named ones first."
        )
    kinds = {(m.use_rslora, m.use_dora, m.init, m.dropout_p) for m in existing.values()}
    want = (bool(use_rslora), bool(use_dora), init, float(dropout))
    if kinds and kinds != {want}:
        rs, dora, ini, p = kinds.pop()
        raise AdapterError(
            f"The model's LoRA layers have use_rslora={rs}, use_dora={dora}, init={ini!r}, dropout={p}; pass the "
            "same to add LoRA to more modules (one adapter_config.json holds one setting of each)."
        )
    for name in names:
        if name in ranks:
            check_rank(ranks[name], f"ranks[{name!r}]")
        if name in alphas:
            check_alpha(alphas[name], f"alphas[{name!r}]")
        layer = layers[name]
        base = layer.base if isinstance(layer, NamedLoRALinear) else layer
        why = inits.why_not(init, ranks.get(name, r), base, use_dora)
        if why is not None:
            raise AdapterError(f"LoRA on {name}: {why}.")
    keep = {id(prm) for prm in lora_parameters(model)}  # the default adapter already there trains on as it did
    for prm in model.parameters():
        if id(prm) not in keep:
            prm.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            host = layers[name]
            base = host.base if isinstance(host, NamedLoRALinear) else host
            rr, aa = ranks.get(name, r), alphas.get(name, alpha)
            layer = LoRALinear(base, rr, aa, dropout, init, use_rslora, use_dora, loftq_iters, lora_compute)
            if table is not None:  # every layer reads the model's one table; a NamedLoRALinear's adapters stay
                layer.adapters = host.adapters if isinstance(host, NamedLoRALinear) else NamedAdapters(table)
            set_module(model, name, layer)
    report = trainable_report(model)
    report["modules"] = names
    if verbose:
        print(report["message"])
    return report


def merge_lora(model: nn.Module) -> None:
    """Fold the default adapter into the base weight of every LoRA layer (LoRALinear.merge)."""
    table = adapter_table(model)
    if table is not None and table.active != DEFAULT and lora_modules(model):
        raise AdapterError(
            f"merge_lora folds the default adapter into the base weights, which the active adapter "
            f"{table.active!r} would then compute on top of; call set_adapter(model, 'default') first."
        )
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A.weight": A, "<path>.lora_B.weight": B, ["<path>.lora_magnitude_vector": m]}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(lora_state_dict(model).values())


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Inside the block every LoRA layer computes its frozen base alone, y = W0 x + b, the very call
    the model made before apply_lora (so its outputs equal the base model's bit for bit): with QLoRA
    the NF4 base is the reference policy DPO needs, and no second model is loaded (TRL's
    disable_adapter()). Named adapters (lora/multi.py) are off too. Restored on exit, also after an
    exception; a merged adapter is refused (its base weight holds the adapter)."""
    mods = [m for m in model.modules() if isinstance(m, (LoRALinear, NamedLoRALinear))]
    if any(m.merged for m in mods):
        raise AdapterError(
            "lora_disabled needs the adapter unmerged (merge_lora folded it into the base); unmerge it first."
        )
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d
