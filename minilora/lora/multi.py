"""Several LoRA adapters on one base layer, and batches whose rows use different ones (PEFT's
`adapter_names=` mixed batches): where the adapters live, and which way of computing a mixed batch's
LoRA term (minilora/lora/mixed_term.py) a layer takes.

Letters: B rows, T tokens per row, N = B T, K in_features, M out_features, n adapters, r_i adapter
i's rank, R = max_i r_i.

Where the adapters live. The default adapter is a LoRALinear's own lora_A / lora_B (the one training
writes and save_adapter saves, its keys unchanged). Named adapters sit beside it in a NamedAdapters
container (`<path>.adapters.<name>.lora_A`); a base linear that only named adapters target is wrapped
by NamedLoRALinear, which has no default adapter. One AdapterTable, shared by every layer, numbers
the model's adapters: adapter_ids index `table.names`, and -1 is the base alone. The model-level
calls (load by name, set_adapter, delete_adapter) are in minilora/lora/named.py.

Row b with adapter a = ids[b] computes y_b = W0 x_b + bias + s_a B_a A_a x_b (minilora/lora/mixed_term.py
has the letters and the four ways to compute the last term), 0 when a = -1 or a does not target the layer.

Which one runs (mixed_delta): a batch whose rows all name one adapter is that adapter alone
(single_delta, as set_adapter computes it); on CUDA the Triton kernels (over the stacks in place, or
padded copies); few tokens per row over most of a layer's adapters, mixed_stacked; else mixed_grouped
(bench/multi_adapter.py measured the CPU's crossovers).

mixed_stacked's stacks are built once, as vLLM preallocates its own: each AdapterSlot's lora_A and
lora_B are then views into them, so the stacks cost no memory of their own; the Triton kernels read
them in place too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minilora.kernels import dispatch
from minilora.lora.mixed_term import (
    Slot,
    mixed_gathered,
    mixed_grouped,
    mixed_kernel_stacked,
    mixed_stacked,
    row_groups,
    single_delta,
)
from minilora.models.transformer import adapter_rows
from minilora.quant.linear import NF4Linear

DEFAULT = "default"  # the adapter in LoRALinear's own lora_A / lora_B (PEFT's default adapter name)


class AdapterTable:
    """The model's adapters in index order (adapter_ids index `names`; -1 is the base alone) and the
    active one (used when a call gives no adapter_ids). One object shared by every layer's container,
    so that the order has one home."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.active = DEFAULT  # a model without a default adapter then computes its base
        self.checked = None  # the last adapter_ids tensor whose range was checked (once per forward)


class AdapterSlot(nn.Module):
    """One named adapter on one layer: A (r, K), B (M, r) float32, frozen, and its scale s."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        self.lora_A = nn.Parameter(A.detach().float().clone(), requires_grad=False)  # (r, K)
        self.lora_B = nn.Parameter(B.detach().float().clone(), requires_grad=False)  # (M, r)
        self.scaling = float(scaling)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class NamedAdapters(nn.ModuleDict):
    """name -> AdapterSlot: the named adapters of one layer, and the model's AdapterTable."""

    def __init__(self, table: AdapterTable):
        super().__init__()
        self.table = table
        self._stacks = None  # (table names, [(parameter, its data_ptr)], A_cat, Bt_cat, layout) when built

    def __setitem__(self, name: str, slot: nn.Module) -> None:
        self._stacks = None  # a slot added or replaced: stacked again on the next call
        super().__setitem__(name, slot)

    def __delitem__(self, name: str) -> None:
        self._stacks = None
        super().__delitem__(name)

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
        """This layer's named adapters stacked along the rank in table order, for mixed_stacked:
        A_cat (Σ, K), Bt_cat (Σ, M) (B_cat transposed, so each B_i^T is a block of rows), and the layout
        (n, ((table index, r, s) of each stacked adapter, in order)). None when no named adapter targets
        the layer.

        Built again whenever a slot, the table's order or a slot's storage changed (a load, a delete, a
        .to()); the slots' lora_A / lora_B then become views into the stacks, so that the weights live
        once. Asked on every layer of every forward, so the check is cheap: the names, and one pointer per
        weight."""
        names = self.table.names
        last = self._stacks
        if last is not None and last[0] == names and all(p.data_ptr() == ptr for p, ptr in last[1]):
            return last[2:]
        here = [(i, self[name]) for i, name in enumerate(names) if name in self]
        if not here:
            return None
        A_cat = torch.cat([sl.lora_A.detach() for _, sl in here])  # (Σ, K)
        Bt_cat = torch.cat([sl.lora_B.detach().t() for _, sl in here])  # (Σ, M)
        start = 0
        for _, sl in here:
            r = sl.lora_A.shape[0]
            sl.lora_A.data, sl.lora_B.data = A_cat[start : start + r], Bt_cat[start : start + r].t()
            start += r
        # which adapter owns each row of the stacks and its scale: equal on most layers, so that
        # mixed_stacked builds its masks once per forward for all of them (row_masks)
        layout = (len(names), tuple((i, sl.lora_A.shape[0], sl.scaling) for i, sl in here))
        weights = [(p, p.data_ptr()) for _, sl in here for p in (sl.lora_A, sl.lora_B)]
        self._stacks = (list(names), weights, A_cat, Bt_cat, layout)
        return self._stacks[2:]


class NamedLoRALinear(nn.Module):
    """A base linear (nn.Linear or NF4Linear) that only named adapters target: y = W0 x + b, plus
    s_a B_a A_a x for the rows of an adapter a that targets it."""

    def __init__(self, base: nn.Module, table: AdapterTable):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = NamedAdapters(table)
        self.merged = False  # it has no default adapter to merge
        self.disabled = False  # inside lora_disabled(model): the base alone
        self.train(base.training)  # loaded into a model in eval mode, it stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routed_forward(self, x, adapter_rows())


def layer_slot(layer: nn.Module, name: str) -> Slot | None:
    """(A, B, s) of adapter `name` as this layer holds it; None where it does not target the layer.
    `layer` is a LoRALinear or a NamedLoRALinear."""
    if name == DEFAULT:
        own = getattr(layer, "lora_A", None)  # a LoRALinear's default adapter; a NamedLoRALinear has none
        return None if own is None else (own.weight, layer.lora_B.weight, layer.scaling)
    if layer.adapters is None or name not in layer.adapters:
        return None
    slot = layer.adapters[name]
    return slot.lora_A, slot.lora_B, slot.scaling


def layer_slots(layer: nn.Module) -> list[Slot | None]:
    """layer_slot of every adapter of the model, in table order."""
    names = [DEFAULT] if layer.adapters is None else layer.adapters.table.names
    return [layer_slot(layer, name) for name in names]


STACKED_MAX_TOKENS = 16  # tokens per row up to which mixed_stacked beats mixed_grouped on the CPU (bench/README.md)
STACKED_MIN_SHARE = 2 / 3  # and the share of the layer's adapters the batch must use: below, grouped reads less


def _check_rows(layer: nn.Module, x: torch.Tensor, rows: torch.Tensor, n: int) -> None:
    """One clear sentence for adapter_ids this layer cannot serve; the range is checked once per tensor."""
    if layer.training:
        raise ValueError(
            "adapter_ids (one adapter per row) are for inference: they skip LoRA dropout; call model.eval() first."
        )
    if layer.merged:
        raise ValueError(
            "adapter_ids need the default adapter unmerged (merge_lora folded it into the base every row "
            "shares); call unmerge_lora(model) first."
        )
    if x.shape[0] != rows.shape[0]:
        raise ValueError(
            f"adapter_ids has {rows.shape[0]} entries but the layer input has {x.shape[0]} rows; pass one "
            "adapter index per row."
        )
    table = layer.adapters.table if layer.adapters is not None else None
    if table is not None and table.checked is rows:
        return
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= n):
        names = table.names if table is not None else [DEFAULT]
        raise ValueError(
            f"adapter_ids holds {rows.tolist()} but the model's adapters are {names} (indices 0 to {n - 1}); "
            "pass an index below that, or -1 for the base alone."
        )
    if table is not None:
        table.checked = rows


def mixed_delta(
    layer: nn.Module, x: torch.Tensor, rows: torch.Tensor, names: list[str], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The LoRA term of a mixed batch (B, ..., M) float32, added into `out` when given, by the path that
    suits it: when every row is on one adapter, that adapter alone as set_adapter computes it (the same
    bits, and only its weights read); the Triton shrink/expand where dispatch allows them (CUDA), over
    the stacks in place when every row's adapter is a named one, else over padded copies; the stacked
    matmuls for few tokens per row (decoding) when every row's adapter is a named one and the batch uses
    most of the layer's adapters (the stacked path reads them all); else the grouped matmuls
    (bench/multi_adapter.py measured both against the PyTorch gather on the CPU)."""
    M = layer.out_features
    groups = row_groups(rows)
    one = len(groups) == 1 and groups[0][1].shape[0] == rows.shape[0]
    slot = layer_slot(layer, names[groups[0][0]]) if one else None
    if slot is not None:
        return single_delta(x, slot, out)

    def nothing() -> torch.Tensor:  # a zero term: out unchanged, or zeros
        return x.new_zeros(*x.shape[:-1], M, dtype=torch.float32) if out is None else out

    if one or not groups:  # one adapter that does not target this layer, or every row on the base
        return nothing()
    default = names.index(DEFAULT) if DEFAULT in names and getattr(layer, "lora_A", None) is not None else None
    named_only = layer.adapters is not None and all(a != default for a, _ in groups)
    stacks = layer.adapters.stacks() if named_only else None
    if named_only and stacks is None:  # no named adapter targets this layer
        return nothing()
    kernels = dispatch.bgmv_kernels(x)
    if kernels is not None:
        if stacks is not None:
            return mixed_kernel_stacked(x, rows, stacks, M, kernels, out)
        return mixed_gathered(x, rows, layer_slots(layer), M, out)
    tokens = x.numel() // (x.shape[0] * x.shape[-1])  # per row
    if tokens <= STACKED_MAX_TOKENS and stacks is not None:
        stacked = {i for i, _, _ in stacks[2][1]}  # the adapters on this layer, whose weights it reads
        if sum(a in stacked for a, _ in groups) > STACKED_MIN_SHARE * len(stacked):
            return mixed_stacked(x, rows, stacks, M, out)
    return mixed_grouped(x, rows, layer_slots(layer), M, out)


def routed_forward(layer: nn.Module, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """y = base(x) + the LoRA term of each row's adapter (rows (B,), -1 the base alone), or with rows None
    of the active adapter on every row; combined with the base as LoRALinear combines them (dense: add
    in float32, then cast; NF4: cast, then add). A float32 base output takes the term in place: the
    (N, M) term is then never written on its own: one pass over the output, not three or more."""
    if layer.disabled:
        return layer.base(x)
    names = [DEFAULT] if layer.adapters is None else layer.adapters.table.names
    if rows is None:
        if layer.merged:  # the base weight holds the default adapter, which the active one would add to
            raise ValueError(
                f"Adapter {layer.adapters.table.active!r} is active but merge_lora folded the default adapter into "
                "the base weights it computes on; call unmerge_lora(model) first."
            )
        slot = layer_slot(layer, layer.adapters.table.active)
        if slot is None:  # the active adapter does not target this layer
            return layer.base(x)
    else:
        _check_rows(layer, x, rows, len(names))
        if getattr(layer, "use_dora", False) and bool((rows == names.index(DEFAULT)).any()):
            raise ValueError(
                "adapter_ids cannot route rows through a DoRA adapter (its magnitude rescales whole rows "
                "of W0, not a per-row LoRA term); serve a DoRA adapter alone, without adapter_ids."
            )
    result = layer.base(x)  # (..., M) in the base's dtype
    into = result if result.dtype == torch.float32 and result.is_contiguous() else None
    delta = single_delta(x, slot, into) if rows is None else mixed_delta(layer, x, rows, names, into)
    if into is not None:
        return result  # the term already added
    if isinstance(layer.base, NF4Linear):
        return result + delta.to(result.dtype)
    return (result + delta).to(result.dtype)
