"""The one next-token loss of the project: training, validation and eval.py perplexity all call
`chunked_lm_loss`; no (B, T, V) logits exist anywhere.

Shape letters: B batch, T time, D model dim, V vocabulary, N labelled tokens, c rows in a chunk.

Labels are aligned with input_ids (not shifted); IGNORE marks positions without loss, and

    L = sum_t CE(logits[:, t], labels[:, t + 1])      over labelled targets.

Only labelled positions need logits. The final hidden states of those positions are gathered
(N, D) and pushed through the output head in chunks of `chunk` rows, so at most (chunk, V)
logits (in float32, or float64 for a float64 model) exist at a time:

- training a frozen head (LoRA): HeadCrossEntropyFn computes each chunk's gradient with respect to
  the hidden states right away and keeps none of the logits for backward;
- a trainable head: each chunk is checkpointed (its logits are recomputed in backward);
- no grad (validation, perplexity): plain chunks, each chunk's logits freed before the next.
- under --parallel fsdp the head is vocabulary-parallel (minilora/parallel/vocab_parallel.py): each rank
  holds V/W rows of it, and the head computes the loss itself (`cross_entropy`), with or without grad.

Gemma 3's 262k vocabulary at 16 x 1024 tokens would be 16 GiB of float32 logits; here it is
chunk x V x 4 bytes (256 MiB at the default chunk of 256).

Preference objectives (DPO, ORPO: minilora/train/dpo.py, orpo.py) need each sequence's own sum,
log pi(y | x) = -sum_{t in answer} CE_t, not one sum over the batch. `sequence_logprobs` takes the
same path with per-token CE: TokenCrossEntropyFn is HeadCrossEntropyFn returning the N terms
(its saved dL/dh_i is row i's own, so the backward scales row i by its own incoming gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minilora.data.packing import IGNORE
from minilora.data.pairs import SharedPairs

CHUNK_ROWS = {"cpu": 64, "cuda": 256}  # rows per chunk for --loss-chunk 0 (auto): see default_chunk


def default_chunk(device: torch.device) -> int:
    """Rows per loss chunk when the run leaves it to us. Every chunk multiplies its rows by the whole
    head (V x D). A CPU's GEMM is bound by arithmetic already at 64 rows, so fewer rows cost no time
    and keep the chunk's (c, V) float32 buffers small; a GPU reads the head faster than it multiplies
    only from about 256 rows on, so fewer rows there would leave it waiting on memory."""
    return CHUNK_ROWS.get(device.type, CHUNK_ROWS["cuda"])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """log-softmax over a large vocabulary needs at least float32 accumulation; float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def head_logits(h: torch.Tensor, weight: torch.Tensor, cap):
    """(l, t) for rows h (c, D) and head rows weight (V', D): the logits l = cap tanh(z / cap) (or z),
    z = h W^T, in the accumulation dtype, and t = tanh(z / cap) for the gradient (None without cap)."""
    z = (h @ weight.t()).to(_acc_dtype(h.dtype))  # (c, D) @ (D, V') -> (c, V'), as logits_from_hidden computes it
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return cap * t, t


def head_grad(p: torch.Tensor, t, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dh = (dL/dl * dl/dz) W for dL/dl = p (c, V') (softmax - one-hot; scaled in place by
    dl/dz = 1 - t^2 under soft-capping) and head rows weight (V', D): (c, V') @ (V', D) -> (c, D)."""
    if t is not None:
        p *= 1 - t * t
    return (p.to(weight.dtype) @ weight).to(dtype)


class HeadCrossEntropyFn(torch.autograd.Function):
    """L = sum_i CE(l_i, y_i) over N rows, l_i = cap tanh(z_i / cap) (or z_i), z_i = h_i W^T,
    with the frozen output head W (V, D), computed chunk by chunk.

    Backward, derived here and evaluated in the forward pass, chunk by chunk:
        dL/dl_i = softmax(l_i) - e_{y_i}                              (c, V)
        dl/dz   = 1 - tanh^2(z / cap)         (1 without soft-capping)
        dL/dh_i = (dL/dl_i * dl/dz) W                                 (c, V) @ (V, D) -> (c, D)
    Only dL/dh (N, D) is kept; the backward scales it by the incoming gradient. No (N, V) logits
    outlive their chunk and none are recomputed: one vocabulary matmul forward, one for dL/dh.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cap, chunk: int):
        total = torch.zeros((), dtype=_acc_dtype(h.dtype), device=h.device)
        grad_h = torch.empty_like(h)  # (N, D)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]  # (c, D), (c,)
            z, t = head_logits(hc, weight, cap)  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            p = torch.exp(z - lse[:, None])  # (c, V) softmax
            p[rows[: len(yc)], yc] -= 1.0
            grad_h[i : i + chunk] = head_grad(p, t, weight, h.dtype)
            del z, p  # before the next chunk's logits exist: one chunk's buffers at a time
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None, None


class TokenCrossEntropyFn(torch.autograd.Function):
    """ce_i = CE(l_i, y_i) for each of N rows, (N,), with the frozen head W, chunk by chunk.

    Each ce_i depends on h_i alone, so the Jacobian is block diagonal and the backward of an upstream
    gradient g (N,) is row by row, with dce_i/dh_i derived in HeadCrossEntropyFn:
        dL/dh_i = g_i (softmax(l_i) - e_{y_i}) * dl/dz W                      (c, V) @ (V, D) -> (c, D)
    The forward keeps dce_i/dh_i (N, D), as HeadCrossEntropyFn keeps dL/dh; no logits outlive their chunk.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cap, chunk: int):
        ce = torch.empty(h.shape[0], dtype=_acc_dtype(h.dtype), device=h.device)  # (N,)
        grad_h = torch.empty_like(h)  # (N, D)
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]  # (c, D), (c,)
            z, t = head_logits(hc, weight, cap)  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            ce[i : i + chunk] = lse - z.gather(1, yc[:, None]).squeeze(1)
            p = torch.exp(z - lse[:, None])  # (c, V) softmax
            p[rows[: len(yc)], yc] -= 1.0
            grad_h[i : i + chunk] = head_grad(p, t, weight, h.dtype)
            del z, p
        ctx.save_for_backward(grad_h)
        return ce

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype)[:, None], None, None, None, None


def _chunk_ce(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model.logits_from_hidden(h)  # (c, V)
    return F.cross_entropy(logits.to(_acc_dtype(logits.dtype)), y, reduction="sum")


def chunked_lm_loss(model, batch, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over labelled positions, their count) for one packing.Batch."""
    h = model(
        batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        segment_ids=batch.segment_ids,
        return_hidden=True,
    )  # (B, T, D)
    targets = batch.labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE
    h_sel = h[:, :-1][keep]  # (N, D)
    y_sel = targets[keep]  # (N,)
    cap = model.config.final_logit_softcapping
    if hasattr(model.lm_head, "cross_entropy"):  # --parallel fsdp: a vocabulary-parallel head (vocab_parallel.py)
        return model.lm_head.cross_entropy(h_sel, y_sel, cap, chunk), int(y_sel.numel())
    head = getattr(model.lm_head, "weight", None)
    if torch.is_grad_enabled() and head is not None and not head.requires_grad:  # LoRA: frozen head
        return HeadCrossEntropyFn.apply(h_sel, head, y_sel, cap, chunk), int(y_sel.numel())
    total = h.new_zeros((), dtype=_acc_dtype(h.dtype))
    for i in range(0, y_sel.numel(), chunk):  # a trainable head, or no grad: plain chunks
        hc, yc = h_sel[i : i + chunk], y_sel[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, model, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(model, hc, yc)
    return total, int(y_sel.numel())


def _chunk_token_ce(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model.logits_from_hidden(h)  # (c, V)
    return F.cross_entropy(logits.to(_acc_dtype(logits.dtype)), y, reduction="none")  # (c,)


def labelled_states(batch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(h_sel (N, D), y (N,), row (N,), R): the final hidden state that predicts each labelled target,
    the target, and the row (of R) whose sum it joins. A Batch: position t predicts labels[t + 1], row
    by row in order. SharedPairs (data/pairs.py): each target names its predicting position (src) and
    its answer's row."""
    if isinstance(batch, SharedPairs):
        return h.flatten(0, 1).index_select(0, batch.src), batch.tgt, batch.row, batch.n_rows
    targets = batch.labels[:, 1:]  # (R, T-1)
    keep = targets != IGNORE
    row = keep.nonzero()[:, 0]  # (N,) the row of each labelled token, in row-major order
    return h[:, :-1][keep], targets[keep], row, keep.shape[0]


def sequence_logprobs(model, batch, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi of each row's labelled tokens, summed (R,), and their count (R,)) for a Batch of R rows
    (or SharedPairs, R = 2P answers): log pi(row) = -sum_t CE(logits[r, t], labels[r, t + 1]) over the
    row's labelled targets, from the chunked head (no (R, T, V) logits), with gradient when grad is
    enabled."""
    shared = {"prefix_len": batch.prefix_len} if isinstance(batch, SharedPairs) else {}
    h = model(
        batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        segment_ids=batch.segment_ids,
        return_hidden=True,
        **shared,
    )  # (B, T, D)
    h_sel, y_sel, row, R = labelled_states(batch, h)  # (N, D), (N,), (N,)
    cap = model.config.final_logit_softcapping
    head = getattr(model.lm_head, "weight", None)
    if hasattr(model.lm_head, "token_cross_entropy"):  # --parallel fsdp: the vocabulary-parallel head
        ce = model.lm_head.token_cross_entropy(h_sel, y_sel, cap, chunk)
    elif torch.is_grad_enabled() and head is not None and not head.requires_grad:  # LoRA: frozen head
        ce = TokenCrossEntropyFn.apply(h_sel, head, y_sel, cap, chunk)
    else:
        parts = []
        for i in range(0, y_sel.numel(), chunk):  # a trainable head, or no grad: plain chunks
            hc, yc = h_sel[i : i + chunk], y_sel[i : i + chunk]
            grad = torch.is_grad_enabled()
            parts.append(
                checkpoint(_chunk_token_ce, model, hc, yc, use_reentrant=False)
                if grad
                else _chunk_token_ce(model, hc, yc)
            )
        ce = torch.cat(parts) if parts else h.new_zeros(0, dtype=_acc_dtype(h.dtype))
    logp = -ce.new_zeros(R).index_add(0, row, ce)  # (R,) summed per row
    return logp, torch.bincount(row, minlength=R)


@torch.no_grad()
def loss_over(model, batches, chunk: int = 256, progress=None) -> tuple[float, int]:
    """(summed CE, labelled tokens) over an iterable of Batches, in eval mode, without grad."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b in batches:
            s, n = chunked_lm_loss(model, b.to(dev), chunk)
            total, count = total + float(s), count + n
            if progress is not None:
                progress(b.input_ids.shape[0])
    finally:
        model.train(was_training)
    return total, count


class LossModule(torch.nn.Module):
    """Wraps the model so that DDP sees the whole loss computation as one forward."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch):
        return chunked_lm_loss(self.model, batch, self.chunk)
