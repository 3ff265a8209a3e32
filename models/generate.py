"""Autoregressive generation with a KV cache: greedy, temperature and top-p sampling, EOS stop,
batched prompts with left padding.

Shape letters: B batch, P padded prompt length, S cached positions, Hkv kv heads, hd head dim, V vocab.

Left padding keeps every row's newest token in the same column, so one forward per step serves
the whole batch; the model derives position ids from the padding mask (cumsum - 1), and the cache
remembers which cached slots are padding, so a padded row computes what it would alone.
"""

from __future__ import annotations

import math

import torch

from .transformer import adapters_per_row


class KVCache:
    """Preallocated keys/values for every layer: (B, Hkv, max_len, hd) each.

    Sliding-window layers keep the full history too (the attention mask hides what is outside the
    window); a ring buffer would save memory for long generations but costs readability.
    The model calls `append_mask` once per forward, `update` once per layer, `advance` at the end.
    """

    def __init__(self, config, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled so far
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.next_positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    def append_mask(self, valid: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' padding mask (B, T); return the mask of all keys (B, S)."""
        T = valid.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length + T} were requested.")
        self.key_valid[:, self.length : self.length + T] = valid
        last = torch.where(valid, position_ids, -1).max(dim=1).values + 1  # (B,)
        self.next_positions = torch.where(valid.any(dim=1), last, self.next_positions)
        return self.key_valid[:, : self.length + T]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write this call's k, v (B, Hkv, T, hd); return all keys and values (B, Hkv, S, hd)."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, T: int):
        self.length += T


def _nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top-p nucleus and renormalized, (B, V).

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p: a token is
    dropped when the tokens strictly more likely than it already hold >= top_p (the top token
    always survives).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, V)
    return kept / kept.sum(dim=-1, keepdim=True)


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """Next token per row from logits (B, V): argmax when temperature <= 0, else a nucleus sample."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)  # (B,)
    return torch.multinomial(_nucleus_probs(logits, temperature, top_p), 1, generator=gen).squeeze(-1)  # (B,)


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, P) and mask (B, P) of prompts padded on the left to the longest P, so that every row's
    last token sits in the last column (1 real, 0 padding; the padding ids are pad_id, hidden by the mask)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p) :] = 1
    return ids, mask


def check_request(prompts, max_new_tokens, temperature, pad_id: int, vocab_size: int) -> None:
    """ValueError, one sentence, for what generate cannot serve: prompts that are not a non-empty list of
    non-empty lists of token ids below vocab_size, a max_new_tokens that is not a whole number >= 0, a
    temperature that is not a finite number >= 0, a pad_id outside the vocabulary."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise ValueError(
            f"prompts must be a list of token-id lists, not a {type(prompts).__name__}; pass [tok.encode(text)] "
            "(a tensor of ids: ids.tolist())."
        )
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
    if not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("prompts must be a list of token-id lists, one per prompt; for one prompt pass [ids].")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token.")
    ids = [t for p in prompts for t in p]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompts must hold integer token ids (the tokenizer's encode gives them).")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    where = f"the prompts hold token id {bad}, which is" if bad is not None else f"pad_id {pad_id} is"
    if bad is not None or not 0 <= pad_id < vocab_size:
        raise ValueError(
            f"{where} outside the model's vocabulary of {vocab_size} (0 to {vocab_size - 1}); use this model's "
            "tokenizer and its pad id."
        )
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number of tokens, 0 or more, got {max_new_tokens!r}.")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number, 0 (greedy) or more, got {temperature!r}.")


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids=(),
    pad_id: int = 0,
    use_cache: bool = True,
    seed: int | None = None,
    adapter_ids=None,
) -> list[list[int]]:
    """New tokens for each prompt (the prompt excluded), stopped after the first EOS (EOS included).

    use_cache=False recomputes the whole sequence each step (slow; a reference for the cache).
    seed makes sampling reproducible (a private torch.Generator; the global RNG is untouched).
    adapter_ids (B,): with several LoRA adapters loaded, the one each prompt uses (-1: the base alone).
    """
    eos_ids = (eos_ids,) if isinstance(eos_ids, int) else eos_ids  # one EOS id, as transformers accepts it
    check_request(prompts, max_new_tokens, temperature, pad_id, model.config.vocab_size)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    dev = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev).manual_seed(seed)
    ids, mask = left_padded(prompts, pad_id, dev)  # (B, P)
    B, P = ids.shape
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []

    cache = None
    if use_cache and max_new_tokens > 0:
        dtype = model.model.embed_tokens.weight.dtype
        cache = KVCache(model.config, B, P + max_new_tokens, dtype, dev)
    step_ids, step_mask = ids, mask
    for _ in range(max_new_tokens):
        with adapters_per_row(adapter_ids, B, dev):  # lm_head may carry adapters too
            h = model(step_ids, attention_mask=step_mask, cache=cache, return_hidden=True)[:, -1]  # (B, D)
            logits = model.logits_from_hidden(h)  # (B, V): the last position only, never (B, T, V)
        nxt = pick_token(logits, temperature, top_p, gen)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        if cache is not None:  # feed only the new token; finished rows keep running harmlessly
            step_ids, step_mask = nxt[:, None], torch.ones(B, 1, dtype=torch.long, device=dev)
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, P + n)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
            step_ids, step_mask = ids, mask
    result = []
    toks = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]  # (B, n)
    eos_set = set(int(e) for e in eos_ids)
    for row in toks:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result
