"""Vocabulary-parallel embedding, output head and cross-entropy, for --parallel fsdp.

Shape letters: W ranks, r this rank, V vocabulary, Vs = ceil(V / W) rows per rank, D model dim,
n this rank's rows (tokens or labelled positions), m the most rows any rank has, N all ranks' rows,
c rows in a chunk.

Rank r keeps rows [r Vs, min((r + 1) Vs, V)) of the embedding and of an untied head (a tied head
is the same rows); the last rank may hold fewer. No rank holds the whole matrix, not even while
loading (models/loader.py reads just these rows from safetensors). Ranks may bring batches of
different shapes, so every exchange first all-gathers the row counts and pads to m rows.

Embedding (frozen, no gradient): the ranks' token ids are all-gathered (W, m); each rank looks up
the ids in its rows and writes zeros for the others; a reduce-scatter sums over ranks and hands
each rank its own tokens. Exactly one rank contributes a non-zero row per token and x + 0 = x,
so the result equals a whole-table lookup bit for bit (Gemma's sqrt(D) scaling follows in
Transformer.forward, unchanged).

Cross-entropy (VocabParallelCrossEntropyFn): the labelled hidden states are all-gathered, (N, D),
and each rank computes the logits of its vocabulary slice s, l_s = cap tanh(h W_s^T / cap),
chunk by chunk. For a row with target y,

    lse = M + log sum_ranks sum_{v in s} exp(l_v - M),   M = max_ranks max_{v in s} l_v
    CE  = lse - l_y                                         (l_y from the one rank owning y)

one all-reduce MAX (M) and one all-reduce SUM (partial sum-exps and target logits) per chunk.
The gradient, as in loss.HeadCrossEntropyFn but per slice:

    dL/dh = sum_ranks (softmax(l)_s - e_y,s) * (1 - tanh^2(z_s / cap)) W_s        (c, Vs) @ (Vs, D)

where softmax(l)_s = exp(l_s - lse) needs only the global lse. Each rank computes its term for all
N rows in the forward pass; a reduce-scatter sums the terms over ranks and gives each rank its own
rows (n, D), which the backward scales by the incoming gradient (HeadCrossEntropyFn.backward).
The loss a rank returns is the sum over its own rows, so ranks sum to the global loss as before.
Preference objectives take each own row's CE instead (token_cross_entropy): the same terms, not summed,
and the same dL/dh rows, which the backward scales row by row (loss.TokenCrossEntropyFn).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.parallel.errors import ParallelError
from minilora.train.loss import HeadCrossEntropyFn, TokenCrossEntropyFn, _acc_dtype, head_grad, head_logits


def vocab_range(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the vocabulary rows rank `rank` of `world` keeps."""
    per = -(-vocab // world)  # Vs = ceil(V / W)
    return min(vocab, rank * per), min(vocab, (rank + 1) * per)


def check_vocab(vocab: int, world: int) -> None:
    """Every rank must own at least one row (a real vocabulary always does)."""
    if vocab_range(vocab, world, world - 1)[0] >= vocab:
        raise ParallelError(
            f"a vocabulary of {vocab} tokens cannot be split over {world} ranks (one would own no "
            "row); use fewer ranks or --parallel ddp."
        )


# ------------------------------------------------------------------------------------ collectives
def _collective(new: str, old: str):
    """torch.distributed's `new` name for a collective, else its older one (torch 2.4 lacks the new)."""
    import torch.distributed as dist

    return getattr(dist, new, None) or getattr(dist, old)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All ranks' x (n, ...) as (W, m, ...), each padded with zeros to m rows, and the W counts n."""
    import torch.distributed as dist

    W = dist.get_world_size()
    sizes = torch.empty(W, dtype=torch.int64, device=x.device)
    all_gather = _collective("all_gather_single", "all_gather_into_tensor")
    all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = sizes.tolist()
    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))  # (m, ...)
    padded[: x.shape[0]] = x
    out = x.new_empty((W * m, *x.shape[1:]))
    if m:  # every rank sees the same sizes, so all skip together
        all_gather(out, padded)
    return out.view(W, m, *x.shape[1:]), sizes  # (W, m, ...)


def sum_own_rows(parts: torch.Tensor, n: int) -> torch.Tensor:
    """(W, m, ...) this rank's contributions to every rank's rows -> (n, ...) its own rows summed
    over the ranks (reduce-scatter)."""
    W, m = parts.shape[:2]
    out = parts.new_empty(parts.shape[1:])  # (m, ...)
    if m:
        reduce_scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
        reduce_scatter(out, parts.reshape(W * m, *parts.shape[2:]).contiguous())  # summed over ranks
    return out[:n]


def _real_rows(sizes: list[int], device) -> torch.Tensor:
    """(W, m) bool: which padded slots hold real rows."""
    m = max(sizes)
    return torch.arange(m, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]


# ------------------------------------------------------------------------------------------ modules
class VocabParallelEmbedding(nn.Module):
    """nn.Embedding whose `weight` (Vs, D) holds rows [start, start + Vs) of the V x D table."""

    def __init__(self, weight: nn.Parameter, start: int, num_embeddings: int):
        super().__init__()
        self.weight = weight
        self.start, self.num_embeddings, self.embedding_dim = start, num_embeddings, weight.shape[1]

    @torch.no_grad()  # frozen under LoRA: nothing upstream of the embeddings needs a gradient
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        flat = ids.reshape(-1)  # (n,)
        everyone, _ = gather_rows(flat)  # (W, m)
        if everyone.numel() and (everyone.min() < 0 or everyone.max() >= self.num_embeddings):
            raise IndexError(
                f"token ids must lie in [0, {self.num_embeddings}); got {int(everyone.min())}..{int(everyone.max())}."
            )
        local = everyone - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])  # (W, m)
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (W, m, D)
        rows = rows.masked_fill(~mine[..., None], 0)
        return sum_own_rows(rows, flat.numel()).view(*ids.shape, self.embedding_dim)  # (B, T, D)


class VocabParallelHead(nn.Module):
    """The output head (nn.Linear(D, V, bias=False)) with this rank's rows `weight` (Vs, D).

    The loss calls `cross_entropy` (no whole logits anywhere); `forward` returns whole logits
    (..., V) for generation: the rows are all-gathered, each rank computes its slice's logits for
    all of them, and an all-to-all sends every rank its own rows' slices (_HeadLogitsFn)."""

    def __init__(self, weight: nn.Parameter, start: int, out_features: int):
        super().__init__()
        self.weight = weight
        self.start, self.out_features, self.in_features = start, out_features, weight.shape[1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
        return _HeadLogitsFn.apply(h, self)

    def cross_entropy(self, h: torch.Tensor, y: torch.Tensor, cap, chunk: int) -> torch.Tensor:
        """Summed CE of this rank's rows h (n, D) with targets y (n,): a collective, every rank calls it."""
        if torch.is_grad_enabled() and h.requires_grad:
            return VocabParallelCrossEntropyFn.apply(h, self, y, cap, chunk)
        return vocab_parallel_cross_entropy(h, self, y, cap, chunk, need_grad=False)[0]

    def token_cross_entropy(self, h: torch.Tensor, y: torch.Tensor, cap, chunk: int) -> torch.Tensor:
        """The CE of each of this rank's rows (n,): a collective, every rank calls it."""
        if torch.is_grad_enabled() and h.requires_grad:
            return VocabParallelTokenCrossEntropyFn.apply(h, self, y, cap, chunk)
        return vocab_parallel_cross_entropy(h, self, y, cap, chunk, need_grad=False, per_row=True)[0]


def vocab_parallel_cross_entropy(h, head: VocabParallelHead, y, cap, chunk: int, need_grad: bool, per_row=False):
    """(sum of CE over this rank's rows, or with per_row each row's CE (n,); dL/dh (n, D) or None);
    see the module docstring."""
    import torch.distributed as dist

    H, sizes = gather_rows(h)  # (W, m, D)
    Y, _ = gather_rows(y)  # (W, m)
    real = _real_rows(sizes, h.device)  # (W, m)
    H, Y = H[real], Y[real]  # (N, D), (N,) in rank order
    w, lo = head.weight, head.start
    Vs = w.shape[0]
    losses = torch.empty(H.shape[0], dtype=_acc_dtype(h.dtype), device=h.device)  # (N,)
    grad = torch.empty_like(H) if need_grad else None  # (N, D)
    for i in range(0, H.shape[0], chunk):  # the same chunks on every rank: N is global
        hc, yc = H[i : i + chunk], Y[i : i + chunk] - lo  # (c, D), (c,) target index within this slice
        z, t = head_logits(hc, w, cap)  # (c, Vs)
        top = z.amax(dim=-1)  # (c,)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)  # M
        mine = (yc >= 0) & (yc < Vs)  # (c,) targets in this slice
        target = z.gather(1, yc.clamp(0, Vs - 1)[:, None]).squeeze(1).masked_fill(~mine, 0)  # (c,)
        parts = torch.stack([torch.exp(z - top[:, None]).sum(-1), target])  # (2, c)
        dist.all_reduce(parts)  # sum-exp and l_y, summed over ranks
        lse = top + torch.log(parts[0])  # (c,)
        losses[i : i + chunk] = lse - parts[1]
        if need_grad:
            p = torch.exp(z - lse[:, None])  # (c, Vs) this slice of softmax(l)
            rows = torch.arange(len(yc), device=h.device)[mine]
            p[rows, yc[mine]] -= 1.0
            grad[i : i + chunk] = head_grad(p, t, w, h.dtype)  # (c, D) this slice's term
        z = t = p = None  # before the next chunk's logits exist: one chunk's buffers at a time
    r = dist.get_rank()
    first = sum(sizes[:r])
    own = losses[first : first + h.shape[0]]  # (n,)
    total = own if per_row else own.sum()
    if not need_grad:
        return total, None
    parts = H.new_zeros((len(sizes), max(sizes), H.shape[1]))  # (W, m, D)
    parts[real] = grad
    return total, sum_own_rows(parts, h.shape[0])  # (n, D)


class VocabParallelCrossEntropyFn(HeadCrossEntropyFn):
    """HeadCrossEntropyFn with a vocabulary-parallel head: forward as derived in the module
    docstring (dL/dh of this rank's rows computed there), backward inherited (dL/dh times g)."""

    @staticmethod
    def forward(ctx, h, head, y, cap, chunk):
        total, grad_h = vocab_parallel_cross_entropy(h, head, y, cap, chunk, need_grad=True)
        ctx.save_for_backward(grad_h)
        return total


class VocabParallelTokenCrossEntropyFn(TokenCrossEntropyFn):
    """TokenCrossEntropyFn with a vocabulary-parallel head: each own row's CE (n,), its dCE/dh rows
    computed in the forward; backward inherited (row i times g_i)."""

    @staticmethod
    def forward(ctx, h, head, y, cap, chunk):
        ce, grad_h = vocab_parallel_cross_entropy(h, head, y, cap, chunk, need_grad=True, per_row=True)
        ctx.save_for_backward(grad_h)
        return ce


class _HeadLogitsFn(torch.autograd.Function):
    """Whole logits z = h W^T (n, V) from vocabulary slices, with its backward.

    Forward: all-gather h -> (W, m, D); z_s = h W_s^T (W, m, Vs) for every rank's rows; all-to-all:
    rank q receives every slice of its own rows (W, m, Vs) -> (n, V).
    Backward (dL/dh = dL/dz W = sum_s dL/dz_s W_s): all-to-all the incoming (n, V) back by slice,
    each rank multiplies its slice for every rank's rows by W_s (W, m, D), a reduce-scatter sums
    over slices and returns each rank its own rows.
    """

    @staticmethod
    def forward(ctx, h, head):
        import torch.distributed as dist

        x = h.reshape(-1, h.shape[-1])  # (n, D)
        H, _ = gather_rows(x)  # (W, m, D)
        W, m = H.shape[:2]
        V, Vs, per = head.out_features, head.weight.shape[0], -(-head.out_features // W)
        z = H.new_zeros((W, m, per), dtype=head.weight.dtype)
        z[..., :Vs] = H @ head.weight.t()  # (W, m, D) @ (D, Vs) -> (W, m, Vs)
        got = torch.empty_like(z)  # (W, m, per): got[q] = rank q's slice of my rows
        if m:
            dist.all_to_all_single(got, z)
        ctx.head, ctx.n, ctx.m, ctx.shape = head, x.shape[0], m, h.shape
        logits = got.permute(1, 0, 2).reshape(m, W * per)[: x.shape[0], :V]  # (n, V)
        return logits.reshape(*h.shape[:-1], V)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        head, n, m = ctx.head, ctx.n, ctx.m
        W = dist.get_world_size()
        V, Vs, per = head.out_features, head.weight.shape[0], -(-head.out_features // W)
        gx = g.reshape(n, V)
        send = gx.new_zeros((m, W * per))
        send[:n, :V] = gx
        send = send.view(m, W, per).transpose(0, 1).contiguous()  # (W, m, per): slice q of my rows, for rank q
        got = torch.empty_like(send)  # got[q] = my slice of rank q's rows
        if m:
            dist.all_to_all_single(got, send)
        parts = got[..., :Vs].to(head.weight.dtype) @ head.weight  # (W, m, Vs) @ (Vs, D) -> (W, m, D)
        return sum_own_rows(parts, n).reshape(ctx.shape), None


# ------------------------------------------------------------------------------------ installing
def install(model: nn.Module, rows: dict[str, torch.Tensor], start: int) -> None:
    """Swap model.model.embed_tokens and model.lm_head for their vocabulary-parallel versions over
    this rank's rows {"model.embed_tokens.weight": (Vs, D), and "lm_head.weight" when untied}.
    Called after distributed.check_trainable_sharded, which refuses LoRA on the head."""
    cfg = model.config
    emb = nn.Parameter(rows["model.embed_tokens.weight"], requires_grad=False)
    model.model.embed_tokens = VocabParallelEmbedding(emb, start, cfg.vocab_size)
    head = emb if cfg.tie_word_embeddings else nn.Parameter(rows["lm_head.weight"], requires_grad=False)
    model.lm_head = VocabParallelHead(head, start, cfg.vocab_size)


def shard_vocab(model: nn.Module, rank: int, world: int) -> None:
    """install() this rank's rows of an already loaded model's embedding and head (the whole
    tables are dropped: the `tiny` preset is built whole before it is sharded)."""
    V = model.config.vocab_size
    check_vocab(V, world)
    lo, hi = vocab_range(V, world, rank)
    names = ["model.embed_tokens.weight"] + ([] if model.config.tie_word_embeddings else ["lm_head.weight"])
    whole = dict(model.named_parameters(remove_duplicate=False))
    install(model, {n: whole[n].detach()[lo:hi].clone() for n in names}, lo)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of embedding and head rows this rank holds (a tied head counted once)."""
    seen, total = set(), 0
    for mod in (model.model.embed_tokens, model.lm_head):
        w = mod.weight
        if id(w) not in seen:
            seen.add(id(w))
            total += w.numel() * w.element_size()
    return total
