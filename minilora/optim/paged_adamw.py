"""PagedAdamW: torch.optim.AdamW's update with optimizer state kept in pages (minilora.optim.paging).

For a parameter p with gradient g at step t (lr, beta1, beta2, eps, weight decay wd), exactly
torch.optim.AdamW (decoupled weight decay, bias correction), element by element:

    p   <- p * (1 - lr * wd)
    m   <- lerp(m, g, 1 - beta1)                    = beta1 m + (1 - beta1) g
    v   <- beta2 v + (1 - beta2) g * g
    p   <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

With ``state_bits=32`` m and v are float32 and the operations are the ones torch's single-tensor
AdamW runs, in its order, so trajectories agree with ``torch.optim.AdamW(foreach=False)`` to the
last bit on the CPU (tests/test_paged_adamw.py). With ``state_bits=8`` m and v are stored as
blockwise 8-bit codes (minilora.quant.blockwise8: blocks of 256, signed dynamic map for m, unsigned for
v): each update dequantizes a page, applies the same update in float32 in the operation order of
bitsandbytes' 8-bit blockwise Adam (m = beta1 m + (1 - beta1) g; sqrt(1 - beta2^t) by math.sqrt),
and quantizes back. That is a quarter of the state memory (2 bytes + 8 bytes per 256 elements,
instead of 8 bytes per element). Unlike bitsandbytes, every parameter gets 8-bit states (its
``min_8bit_size`` is 4096: smaller tensors stay 32-bit there).

Paging (see minilora/optim/paging.py): ``device_budget`` bounds the device memory holding state pages:
None = unlimited (all state resident next to the parameters), an int = bytes, "auto" = derived
from free device memory, re-read every step. Only the state is paged; parameters and gradients
stay where they are. ``paging_stats()`` reports the copies, evictions and resident bytes.

Checkpoints: ``state_dict()`` returns CPU tensors (32-bit: ``exp_avg``/``exp_avg_sq`` shaped like
the parameter, the keys of torch's AdamW; 8-bit: codes and absmax). ``optimizer_state_to_safetensors``
turns it into (tensors, JSON metadata) for a safetensors file, without pickle.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from minilora.dtensor import local
from minilora.optim.paging import PageLayout, PagePool, PageTable, slice_views
from minilora.quant.blockwise8 import dequantize_blockwise8, num_blocks, quantize_blockwise8_

# Elements per foreach batch, by device type. CPU: ~2 MiB of float32 param + grad + m + v, so that
# the eight passes of the update stay in cache (one foreach over everything streams the whole state
# through memory eight times; measured 1.3x slower on the CPU benchmark). Elsewhere (CUDA) one batch
# per wave: each foreach op is a few kernel launches whatever its length, and a GPU's step is bound
# by launches (a Gemma 3 1B LoRA set in 64K-element batches is ~200 batches of nine ops). The batch
# size never changes the result: every op is elementwise.
_BATCH_ELEMS = {"cpu": 1 << 16}

_STATE_KEYS = {
    32: ("exp_avg", "exp_avg_sq"),
    8: ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"),
}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plain(method):
    """`method` without torch._disable_dynamo's wrapper while nothing is being compiled. torch.optim's
    Optimizer wraps add_param_group and zero_grad in it, and its first call imports torch._dynamo
    (about 150 MB resident) only to keep the compiler out of them; once torch._dynamo is loaded
    anyway, the wrapped method is used."""
    return method if "torch._dynamo" in sys.modules else getattr(method, "__wrapped__", method)


def _check_hparams(group: dict) -> None:
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not _number(lr) or lr < 0:
        raise ValueError(f"Invalid lr={lr!r}: the learning rate must be a finite float >= 0.")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas={betas!r}: pass two floats, each in [0, 1).")
    if not _number(eps) or eps < 0:
        raise ValueError(f"Invalid eps={eps!r}: eps must be a finite float >= 0.")
    if not _number(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay={wd!r}: weight decay must be a finite float >= 0.")


class _Item:
    """A parameter's flat elements [lo, lo + n), stored at offset off of one page."""

    __slots__ = ("param", "group", "page", "off", "lo", "n")

    def __init__(self, param, group, span):
        self.param, self.group = param, group
        self.page, self.off, self.lo, self.n = span.page, span.off, span.lo, span.n


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with paged (and optionally 8-bit) state. See the module docstring."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        state_bits=32,
        page_bytes=1 << 20,
        device_budget=None,
        amsgrad=False,
        maximize=False,
    ):
        if amsgrad:
            raise ValueError("PagedAdamW does not implement amsgrad=True; use torch.optim.AdamW for AMSGrad.")
        if maximize:
            raise ValueError("PagedAdamW does not implement maximize=True; negate the loss instead.")
        if not (
            device_budget is None
            or device_budget == "auto"
            or (isinstance(device_budget, int) and not isinstance(device_budget, bool) and device_budget >= 0)
        ):
            raise ValueError(
                f"Invalid device_budget={device_budget!r}: pass None (unlimited), 'auto', or a byte count >= 0."
            )
        self.layout = PageLayout(page_bytes, state_bits)  # raises ValueError for bad bits / page size
        self.state_bits, self.page_bytes, self.device_budget = state_bits, page_bytes, device_budget
        self._pools: dict[torch.device, PagePool] = {}
        self._tables: dict[torch.device, PageTable] = {}
        self._forward = True  # page walk direction, alternated every step (see minilora.optim.paging)
        super().__init__(
            params,
            dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay),
        )

    def add_param_group(self, param_group: dict) -> None:
        _plain(torch.optim.Optimizer.add_param_group)(self, param_group)
        _check_hparams(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        _plain(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    # ---- state ----------------------------------------------------------------------------------
    def _pool(self, device: torch.device) -> PagePool:
        if device not in self._pools:
            self._pools[device] = PagePool(self.layout, device, self.device_budget)
        return self._pools[device]

    def _table(self, device: torch.device) -> PageTable:
        if device not in self._tables:
            self._tables[device] = PageTable(self.layout)
        return self._tables[device]

    def _param_state(self, p: torch.Tensor, group: dict) -> dict:
        st = self.state[p]
        if "items" not in st:
            shard = local(p)  # pages cover this rank's elements only (each rank updates its own shard)
            if not shard.is_contiguous():
                raise ValueError(
                    f"PagedAdamW needs contiguous parameters; got one of shape {tuple(p.shape)} "
                    "that is not: make it contiguous (p.data = p.data.contiguous())."
                )
            if not shard.is_floating_point():
                raise ValueError(f"PagedAdamW updates real floating-point parameters only, got dtype {p.dtype}.")
            st["step"] = 0.0
            st["items"] = [_Item(p, group, span) for span in self._table(shard.device).alloc(shard.numel())]
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: dict[torch.device, list[_Item]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients; use torch.optim.SparseAdam.")
                st = self._param_state(p, group)
                st["step"] += 1.0
                work.setdefault(p.device, []).extend(st["items"])
        for device, items in work.items():
            if not self._forward:
                items.reverse()
            for wave in self._pool(device).waves(items):
                self._update(wave)
        self._forward = not self._forward
        return loss

    def _update(self, wave: list) -> None:
        """Apply the AdamW update to one wave of (item, lo, hi, state views), batched per group."""
        by_group: dict[int, list] = {}
        for entry in wave:
            by_group.setdefault(id(entry[0].group), []).append(entry)
        batches = []  # cache-sized batches on the CPU: all ops of a batch run while its pages are in cache
        for entries in by_group.values():
            start, elems = 0, 0
            limit = _BATCH_ELEMS.get(entries[0][0].param.device.type, float("inf"))
            for i, (_, lo, hi, _) in enumerate(entries):
                elems += hi - lo
                if elems >= limit or i == len(entries) - 1:
                    batches.append(entries[start : i + 1])
                    start, elems = i + 1, 0
        for entries in batches:
            group = entries[0][0].group
            params, grads, ms, vs, steps, writeback = [], [], [], [], [], []
            for item, lo, hi, views in entries:
                p = item.param
                a, b = item.lo + lo, item.lo + hi  # parameter elements of this entry
                pf = local(p).view(-1)[a:b]  # (hi - lo,)
                gf = local(p.grad).reshape(-1)[a:b]
                if pf.dtype != torch.float32:  # bf16/fp16 parameters: update a float32 copy
                    writeback.append((pf, len(params)))
                    pf = pf.float()
                params.append(pf)
                grads.append(gf if gf.dtype == torch.float32 else gf.float())
                if self.state_bits == 32:
                    ms.append(views["exp_avg"])
                    vs.append(views["exp_avg_sq"])
                else:
                    ms.append(dequantize_blockwise8(views["exp_avg_codes"], views["exp_avg_absmax"], True))
                    vs.append(dequantize_blockwise8(views["exp_avg_sq_codes"], views["exp_avg_sq_absmax"], False))
                steps.append(self.state[p]["step"])
            _adamw(params, grads, ms, vs, steps, group, bnb_order=self.state_bits == 8)
            for dst, i in writeback:
                dst.copy_(params[i])
            if self.state_bits == 8:
                for (item, lo, hi, views), m, v in zip(entries, ms, vs):
                    quantize_blockwise8_(m, views["exp_avg_codes"], views["exp_avg_absmax"], True)
                    quantize_blockwise8_(v, views["exp_avg_sq_codes"], views["exp_avg_sq_absmax"], False)

    def paging_stats(self) -> dict:
        """Copies and residency summed over devices: bytes_copied_in/out (host <-> device),
        evictions, resident_bytes, peak_resident_bytes, staging_bytes, budget_bytes."""
        out = dict(
            bytes_copied_in=0,
            bytes_copied_out=0,
            evictions=0,
            resident_bytes=0,
            peak_resident_bytes=0,
            staging_bytes=0,
            budget_bytes=None,
        )
        for pool in self._pools.values():
            for k, v in pool.stats.items():
                out[k] += v
            if pool.budget_bytes is not None:
                out["budget_bytes"] = (out["budget_bytes"] or 0) + pool.budget_bytes
        return out

    # ---- checkpoints ----------------------------------------------------------------------------
    def _indexed_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """{'state': {index: {...}}, 'param_groups': [...]}, with CPU tensors (see module doc)."""
        params = self._indexed_params()
        index = {id(p): i for i, p in enumerate(params)}
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = [index[id(p)] for p in g["params"]]
            groups.append(d)
        state = {}
        for p in params:
            st = self.state.get(p)
            if not st or "items" not in st:
                continue
            pool = self._pool(p.device)
            parts = [slice_views(pool.read(it.page), it.off, it.off + it.n) for it in st["items"]]
            out = {"step": torch.tensor(st["step"], dtype=torch.float32)}
            for key in _STATE_KEYS[self.state_bits]:
                out[key] = torch.cat([v[key] for v in parts]).cpu() if parts else torch.empty(0)
            if self.state_bits == 32:  # under FSDP: the shape of this rank's shard
                out["exp_avg"] = out["exp_avg"].view(local(p).shape)
                out["exp_avg_sq"] = out["exp_avg_sq"].view(local(p).shape)
            state[index[id(p)]] = out
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by ``state_dict`` (or torch AdamW's, 32-bit)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)
        ):
            raise ValueError(
                "The loaded optimizer state has different parameter groups (count or sizes) "
                "than this optimizer; build the optimizer over the same parameters."
            )
        params = self._indexed_params()
        for s, g in zip(saved, self.param_groups):
            for k, v in s.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
            _check_hparams(g)
        order = [i for s in saved for i in s["params"]]
        by_index = dict(zip(order, params))
        for device, table in self._tables.items():  # forget all state: the checkpoint replaces it
            for pg in table.pages:
                self._pool(device).drop(pg)
        self._tables.clear()
        for p in params:
            self.state.pop(p, None)
        for idx, src in sorted(state_dict["state"].items(), key=lambda kv: int(kv[0])):
            p = by_index[int(idx)]
            missing = [k for k in _STATE_KEYS[self.state_bits] if k not in src]
            if missing:
                raise ValueError(
                    f"Optimizer state for parameter {idx} lacks {missing}: it was saved with other "
                    f"state_bits than this optimizer's {self.state_bits}; use the same state_bits."
                )
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            st = self._param_state(p, group)
            st["step"] = float(src["step"])
            flat = {k: src[k].reshape(-1) for k in _STATE_KEYS[self.state_bits]}
            n = local(p).numel()
            for k, t in flat.items():
                want = num_blocks(n) if k.endswith("absmax") else n
                if t.numel() != want:
                    raise ValueError(
                        f"Optimizer state '{k}' for parameter {idx} has {t.numel()} values, "
                        f"expected {want}; the checkpoint belongs to a different model."
                    )
            pool = self._pool(p.device)
            for item in st["items"]:
                lo, hi = item.lo, item.lo + item.n
                part = {
                    k: (t[lo // 256 : lo // 256 + num_blocks(hi - lo)] if k.endswith("absmax") else t[lo:hi])
                    for k, t in flat.items()
                }
                pool.write(item, part)


def _adamw(params, grads, ms, vs, steps, group, bnb_order: bool) -> None:
    """The update of the module docstring on lists of float32 tensors (in place)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    if bnb_order:  # bitsandbytes' 8-bit kernel: m * beta1 + (1 - beta1) g
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1.0 - beta1)
    else:  # torch: m.lerp_(g, 1 - beta1)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    step_size = [-(lr / (1 - beta1**s)) for s in steps]
    # math.sqrt (bitsandbytes) and ** 0.5 (torch) round differently in about 1 case in 1000
    bc2_sqrt = [math.sqrt(1.0 - beta2**s) if bnb_order else (1 - beta2**s) ** 0.5 for s in steps]
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, ms, denom, step_size)


# ---- safetensors + JSON (no pickle) ---------------------------------------------------------------
_FORMAT = "minilora.optimizer/1"


def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """state_dict -> (tensors for safetensors, JSON-serializable metadata).

    Tensors are named ``state.<param index>.<key>``; hyperparameters (param_groups) and any
    non-tensor state go into the metadata. Tuples (betas) are restored by the inverse.
    """
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{int(idx)}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(int(idx)), {})[key] = v
    groups, tuple_keys = [], set()
    for g in state_dict["param_groups"]:
        d = {}
        for k, v in g.items():
            if isinstance(v, tuple):
                tuple_keys.add(k)
                v = list(v)
            if torch.is_tensor(v):
                raise ValueError(f"param group key '{k}' holds a tensor; store plain numbers in param groups.")
            d[k] = v
        groups.append(d)
    meta = {"format": _FORMAT, "param_groups": groups, "tuple_keys": sorted(tuple_keys), "scalars": scalars}
    json.dumps(meta)  # raises TypeError here, not at write time, if something is not JSON-able
    return tensors, meta


def optimizer_state_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_state_to_safetensors``."""
    if meta.get("format") != _FORMAT:
        raise ValueError(f"Not a minilora optimizer state (format {meta.get('format')!r}, expected {_FORMAT!r}).")
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, d in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(d)
    tk = set(meta["tuple_keys"])
    groups = [{k: tuple(v) if k in tk else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Write optimizer.state_dict() to a .safetensors file (metadata as JSON), atomically."""
    from safetensors.torch import save_file

    from minilora.fileio import write_file_atomic

    tensors, meta = optimizer_state_to_safetensors(optimizer.state_dict())
    write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"minilora_optimizer": json.dumps(meta)}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load a file written by ``save_optimizer_state`` into optimizer."""
    optimizer.load_state_dict(read_optimizer_state(path))


def read_optimizer_state(path: str) -> dict:
    """The state_dict in a file written by ``save_optimizer_state``."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"Optimizer state file {path} does not exist; check the checkpoint directory.")
    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get("minilora_optimizer")
        if meta is None:
            raise ValueError(f"{path} holds no minilora optimizer state (metadata key 'minilora_optimizer' missing).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return optimizer_state_from_safetensors(tensors, json.loads(meta))
