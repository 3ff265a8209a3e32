"""The LoRA term of a batch whose rows use different adapters, four ways (the BGMV of Punica, S-LoRA
and vLLM; PEFT's `adapter_names=` mixed batches). Where the adapters live, and which way a layer takes,
is minilora/lora/multi.py.

Letters: B rows, T tokens per row, N = B T, K in_features, M out_features, n adapters, r_i adapter
i's rank, R = max_i r_i.

Row b with adapter a = ids[b] computes

    y_b = W0 x_b + bias + s_a B_a A_a x_b,     A_a (r_a, K), B_a (M, r_a), s_a = alpha_a / r_a
                                               (alpha_a / sqrt(r_a) with rsLoRA), per layer

where the last term is 0 when a = -1 or adapter a does not target that layer. Four ways to compute
the LoRA term of a batch, all in float32 as LoRALinear's:

  mixed_reference  one (masked rows) matmul pair per distinct adapter in the batch; readable.
  mixed_grouped    the general one: mixed_reference with each adapter's rows found once per forward,
                   gathered (index_select) and added back (index_add_).
  mixed_gathered   every adapter padded to rank R, the base as an all-zero slot n; each row gathers its
                   (A, B, s) and two batched matmuls serve all rows at once (BGMV semantics):
                     h_b = A_pad[a] x_b      (R,)      y_b = s_a B_pad[a] h_b      (M,)
  mixed_stacked    the layer's named adapters stacked along the rank, Σ = sum_i r_i (NamedAdapters.stacks):
                   every row through every adapter's A, the other adapters' columns zeroed, one B:
                     H = x A_cat^T  (B, T, Σ)    H_b *= s_a [owner == a_b]    y_b = H_b B_cat^T  (M,)
                   two matmuls and a product per layer whatever the number of adapters, each adapter's
                   weights read once; it multiplies x by every adapter's A, so it is chosen for few tokens.

Why zero padding is exact. A_pad[a] = [A_a; 0] (R, K) and B_pad[a] = [B_a, 0] (M, R). Then
h_b = [A_a x_b; 0]: rows beyond r_a are sums of products 0 * x_k = 0 exactly (for finite x), and
B_pad[a] h_b = sum_{j<r_a} B_a[:, j] h_b[j] + sum_{j>=r_a} 0 * 0, where every added term of the second
sum is an exact zero, and v + 0 = v in floating point. So the padded products hold the same terms as the
unpadded ones plus exact zeros; only the order a matmul adds them in may differ (a different blocking
for a different R), which is rounding, not a change of value. The base slot (A = 0, B = 0, s = 0)
gives exactly 0, so a -1 row is y = W0 x + bias, bit for bit.

On CUDA, once they pass their self-check (kernels/dispatch.py), Triton kernels compute the two products
of mixed_gathered (kernels/lora_bgmv.py: segments of tokens that share an adapter, float32 as here).

The stacks (NamedAdapters.stacks, minilora/lora/multi.py) hold each adapter's weights once, and the
kernels read them in place (mixed_kernel_stacked): adapter a owns rank rows first_a .. first_a + r_a - 1
of A_cat (Σ, K) and of Bt_cat (Σ, M), and the kernels mask each adapter's tiles at its own rank, which is
the zero padding's arithmetic without the zeros. mixed_gathered instead pads copies on every call:
n R (K + M) copied numbers, and on a GPU some 3 n + 3 small launches a layer.

Why zeroing columns is exact as well. Column j of H belongs to adapter owner[j]; for row b the kept
columns are a_b's, h = A_a x_b computed as a dot product over K like single_delta's, and the zeroed ones
are exact zeros, so H_b B_cat^T adds the terms of B_a h plus exact zeros: the same value up to the order
of the additions. The kept columns are scaled by s_a before B, where single_delta scales the product
after it: the same bits when s is a power of two (alpha = 2r, the default, or alpha = r), else one more
rounding of h (relative 2^-24), in place of the one of the product.

Added where it goes. With every path, `out` (float32, the base's output W0 x + b) takes the term in
place: out += s H B^T is one addmm (index_add_ for the grouped rows), so the (N, M) term is never
written on its own, where computing it, scaling it and adding it passed over (N, M) three times or
more; at 64 tokens per row those passes cost more than the LoRA matmuls. multi.routed_forward does
so whenever the base's output is float32; the sum then holds R + 1 terms in the matmul's order, a
rounding, not a change of value; a row that adds exact zeros stays bit for bit the base's.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from minilora.kernels import dispatch

Slot = tuple[torch.Tensor, torch.Tensor, float]  # one adapter on one layer: (A (r, K), B (M, r), s)


def single_delta(x: torch.Tensor, slot: Slot, out: torch.Tensor | None = None) -> torch.Tensor:
    """s B A x for every row, float32 (..., M), the order LoRALinear and PEFT compute it in; with `out`
    (float32 (..., M), contiguous) the term is added into it in place, by one addmm (module docstring)."""
    A, B, s = slot
    h = F.linear(x.float(), A)  # (..., K) -> (..., r)
    if out is None:
        return F.linear(h, B) * s  # (..., r) -> (..., M)
    out.view(-1, B.shape[0]).addmm_(h.reshape(-1, A.shape[0]), B.t(), alpha=s)  # (N, M) += s (N, r) @ (r, M)
    return out


def mixed_reference(x: torch.Tensor, rows: torch.Tensor, slots: list[Slot | None], M: int) -> torch.Tensor:
    """s_a B_a A_a x_b for each row b (a = rows[b]), float32 (B, ..., M): one matmul pair per distinct
    adapter, on its rows only; rows of -1 or of an adapter without a slot here get 0."""
    delta = x.new_zeros(*x.shape[:-1], M, dtype=torch.float32)  # (B, ..., M)
    for a in rows.unique().tolist():
        if a >= 0 and slots[a] is not None:
            pick = rows == a  # (B,)
            delta[pick] = single_delta(x[pick], slots[a])
    return delta


def padded_stacks(slots: list[Slot | None], K: int, M: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every adapter zero-padded to rank R = max r_i, plus the base as a last all-zero slot:
    A (n+1, R, K), B (n+1, M, R), s (n+1,), float32. Zero padding is exact (module docstring)."""
    n = len(slots)
    R = max((A.shape[0] for A, _, _ in filter(None, slots)), default=1)
    A_all = torch.zeros(n + 1, R, K, device=device)
    B_all = torch.zeros(n + 1, M, R, device=device)
    s_all = torch.zeros(n + 1, device=device)
    for i, slot in enumerate(slots):
        if slot is not None:
            A, B, s = slot
            A_all[i, : A.shape[0]] = A
            B_all[i, :, : B.shape[1]] = B
            s_all[i] = s
    return A_all, B_all, s_all


_SEGMENTS = None  # (weakref to rows, rows._version, tokens per row, tok, segments) of the last token_segments call


def token_segments(rows: torch.Tensor, per_row: int):
    """(tok (B T,), its segments for the shrink/expand kernels) of rows (B,) (already checked), each row's
    adapter repeated for its per_row tokens. Finding the segments waits for the device (the grid needs
    their count and the longest); every layer of a forward passes the same rows tensor, so it is done
    once per forward: the last result is kept while rows is that same, unmodified tensor."""
    global _SEGMENTS
    last = _SEGMENTS
    if last is not None and last[0]() is rows and last[1] == rows._version and last[2] == per_row:
        return last[3], last[4]
    from minilora.kernels.lora_bgmv import segments

    tok = rows.repeat_interleave(per_row)  # (B T,) each token's adapter; -1: skipped
    segs = segments(tok)
    _SEGMENTS = (weakref.ref(rows), rows._version, per_row, tok, segs)
    return tok, segs


def mixed_gathered(
    x: torch.Tensor, rows: torch.Tensor, slots: list[Slot | None], M: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """mixed_reference's result, float32 (B, ..., M), added into `out` when given (in place), by gathering
    each row's padded (A, B, s) and two batched matmuls over all rows (BGMV semantics; module docstring)."""
    K = x.shape[-1]
    A_all, B_all, s_all = padded_stacks(slots, K, M, x.device)
    kernels = dispatch.bgmv_kernels(x)
    if kernels is not None:  # the same two products in Triton (kernels/lora_bgmv.py), per segment of tokens
        tok, segs = token_segments(rows, x.numel() // (x.shape[0] * K))
        return kernel_term(x, A_all, B_all, s_all, M, kernels, tok, segs, out)
    idx = torch.where(rows < 0, len(slots), rows)  # (B,): -1 -> the all-zero base slot
    xb = x.float().reshape(x.shape[0], -1, K)  # (B, T, K); a (B, K) input is T = 1
    h = torch.bmm(xb, A_all[idx].transpose(1, 2))  # (B, T, K) @ (B, K, R) -> (B, T, R)
    y = torch.bmm(h, B_all[idx].transpose(1, 2))  # (B, T, R) @ (B, R, M) -> (B, T, M)
    y = (y * s_all[idx][:, None, None]).reshape(*x.shape[:-1], M)  # scale after the matmuls, as single_delta
    return y if out is None else out.add_(y)  # (B, ..., M)


def mixed_kernel_stacked(x: torch.Tensor, rows: torch.Tensor, stacks, M: int, kernels, out: torch.Tensor | None = None):
    """mixed_stacked's result, float32 (B, ..., M), added into `out` when given (in place), by the Triton
    shrink and expand reading NamedAdapters.stacks() where they are (module docstring). The segments,
    found once per forward in the model's numbering, are renumbered to the stacks' positions
    (stack_segments); rows of an adapter not on this layer, or of -1, get 0."""
    A_cat, Bt_cat, layout = stacks
    tok, segs = token_segments(rows, x.numel() // (x.shape[0] * x.shape[-1]))
    segs, s, blocks = stack_segments(segs, layout)
    return kernel_term(x, A_cat, Bt_cat, s, M, kernels, tok, segs, out, blocks)


def kernel_term(x: torch.Tensor, A, B, s, M: int, kernels, tok, segs, out: torch.Tensor | None, blocks=None):
    """y = s_a B_a (A_a x) per token by the Triton shrink and expand, float32 (B, ..., M), added into `out`
    when given: A (L, R, K), B (L, M, R) padded, or with `blocks` the stacks A_cat (Σ, K) and Bt_cat (Σ, M);
    s (L,); each segment's adapter indexes them (-1: skipped)."""
    shrink, expand = kernels
    xt = x.reshape(-1, x.shape[-1])  # (B T, K) in x's dtype: the kernel widens it to float32 exactly
    h = shrink(xt, A, tok, segs=segs, blocks=blocks)  # (B T, R)
    y = torch.zeros(xt.shape[0], M, device=x.device) if out is None else out.view(-1, M)  # (B T, M)
    expand(y, h, B, s, tok, segs=segs, blocks=blocks)  # y += s B h in place
    return y.view(*x.shape[:-1], M)  # (B, ..., M)


def stack_segments(segs, layout):
    """(segs with each adapter renumbered to its position in a layer's stacks, -1 where the layer has no
    weights for it; the stacked adapters' scales (n,); where each one's rank rows sit in the stacks,
    kernels/lora_bgmv.py's Blocks) for a stacks layout (NamedAdapters.stacks). Computed once per segments
    object and layout, as row_masks: most layers share a layout."""
    from minilora.kernels.lora_bgmv import Blocks

    if _STACK_SEGMENTS.get("segs") is not segs:
        _STACK_SEGMENTS.clear()
        _STACK_SEGMENTS["segs"] = segs
    if layout not in _STACK_SEGMENTS:
        n_names, stacked = layout
        position = [-1] * n_names  # model index -> position in the stacks
        for p, (i, _, _) in enumerate(stacked):
            position[i] = p
        dev = segs.adapter.device
        renumbered = torch.tensor(position, dtype=torch.int32, device=dev)[segs.adapter.long()]  # (S,)
        s = torch.tensor([si for _, _, si in stacked], device=dev)  # (n,)
        ranks = [r for _, r, _ in stacked]
        first = torch.tensor([sum(ranks[:p]) for p in range(len(ranks))], dtype=torch.int64, device=dev)  # (n,)
        blocks = Blocks(first, torch.tensor(ranks, dtype=torch.int32, device=dev), max(ranks))
        _STACK_SEGMENTS[layout] = (segs._replace(adapter=renumbered), s, blocks)
    return _STACK_SEGMENTS[layout]


_STACK_SEGMENTS: dict = {}  # the last segments stack_segments saw, and their renumbering per layout


def row_groups(rows: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(adapter a, the indices of its rows (B_a,))] for rows (B,), -1 left out: computed once per adapter_ids
    tensor (every layer of a forward sees the same one), so the host sync of tolist() happens once."""
    if _GROUPS.get("rows") is not rows:  # holding `rows` keeps its identity from being reused
        order = rows.tolist()
        ids = {a: [b for b, x in enumerate(order) if x == a] for a in sorted(set(order)) if a >= 0}
        _GROUPS.update(rows=rows, groups=[(a, torch.tensor(i, device=rows.device)) for a, i in ids.items()])
    return _GROUPS["groups"]


_GROUPS: dict = {}  # the last adapter_ids tensor row_groups saw, and its groups


def mixed_grouped(
    x: torch.Tensor, rows: torch.Tensor, slots: list[Slot | None], M: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """mixed_reference's result, float32 (B, ..., M), added into `out` when given (in place): the rows of
    each adapter gathered once per forward (row_groups), one matmul pair per adapter on its rows, added
    back with index_add_ (scaled there, after the matmuls, as single_delta). Reads each used adapter's
    weights once and does exactly the LoRA flops, where mixed_gathered copies a padded (A, B) per row and
    rebuilds the padded stacks on every call."""
    out = x.new_zeros(*x.shape[:-1], M, dtype=torch.float32) if out is None else out  # (B, ..., M)
    for a, idx in row_groups(rows):
        if slots[a] is not None:
            A, B, s = slots[a]
            h = F.linear(x.index_select(0, idx).float(), A)  # (B_a, ..., K) -> (B_a, ..., r)
            out.index_add_(0, idx, F.linear(h, B), alpha=s)  # out[idx] += s (B_a, ..., M)
    return out


def mixed_stacked(x: torch.Tensor, rows: torch.Tensor, stacks, M: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """mixed_reference's result over the named adapters, float32 (B, ..., M), from NamedAdapters.stacks(),
    added into `out` when given (in place): every row through every adapter's A, the columns of the other
    adapters zeroed and its own scaled by s, then one B (module docstring). Rows of -1, or of an adapter
    without a slot here, get exactly 0."""
    A_cat, Bt_cat, layout = stacks
    K, S = x.shape[-1], A_cat.shape[0]
    h = x.float().reshape(-1, K) @ A_cat.t()  # (B T, K) @ (K, Σ) -> (B T, Σ)
    h = h.view(x.shape[0], -1, S).mul_(row_masks(rows, layout)).view(-1, S)  # (B, T, Σ) * (B, 1, Σ)
    if out is None:
        return (h @ Bt_cat).view(*x.shape[:-1], M)  # (B T, Σ) @ (Σ, M) -> (B, ..., M)
    out.view(-1, M).addmm_(h, Bt_cat)  # (B T, M) += (B T, Σ) @ (Σ, M)
    return out


def row_masks(rows: torch.Tensor, layout) -> torch.Tensor:
    """For rows (B,) and a stacks layout (NamedAdapters.stacks): (B, 1, Σ), s_a on the columns of row b's
    adapter a, 0 elsewhere (all 0 for -1 rows and adapters not stacked). Computed once per adapter_ids
    tensor and layout, as row_groups."""
    if _MASKS.get("rows") is not rows:
        _MASKS.clear()
        _MASKS["rows"] = rows
    if layout not in _MASKS:
        _, stacked = layout
        owner = torch.tensor([i for i, r, _ in stacked for _ in range(r)], device=rows.device)  # (Σ,)
        s = torch.tensor([si for _, r, si in stacked for _ in range(r)], device=rows.device)  # (Σ,)
        _MASKS[layout] = ((rows[:, None] == owner[None, :]) * s)[:, None, :]  # (B, 1, Σ)
    return _MASKS[layout]


_MASKS: dict = {}  # the last adapter_ids tensor row_masks saw, and its masks per layout
