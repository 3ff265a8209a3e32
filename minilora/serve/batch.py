"""The running batch of a server: one KV cache whose rows are requests that joined at different times.

Shape letters: B rows (requests), S cache columns, Hkv kv heads, hd head dim, L layers, n_b the tokens
(prompt + generated) row b holds.

generate() (models/generate.py) left-pads a batch so that every row's newest token sits in the same
column; one forward of the (B, 1) newest tokens then serves every row. A server keeps that layout while
rows come and go: each row's keys and values are right-aligned, column S - n_b to S - 1, and the columns
before them are padding the mask hides (key_valid False). That is all a row needs to compute what it
computes alone:

  - positions are per row (cache.next_positions), so RoPE sees 0 .. n_b - 1 whatever column a key is in;
  - a row's real keys are contiguous and end at the last column, so column distance is position distance
    and the sliding-window mask (query column - key column < window) holds;
  - masked keys get exp(-inf) = 0 in the softmax, so the padding adds exact zeros (only the summation
    order differs from the row alone: rounding, not value).

`splice` builds that cache from any rows of any caches: the rows still running, plus each newcomer's own
one-row cache from its prefill. It copies 2 L n_b Hkv hd numbers per row, about what one decode step reads
from the cache, and runs only when the batch changes (a join, a finish, a full cache).
"""

from __future__ import annotations

from minilora.models.generate import KVCache

HEADROOM = 32  # free columns after a splice: decode steps before the next copy when no row joins or leaves


def row_tokens(cache: KVCache, row: int) -> int:
    """n_b: the real tokens row `row` holds (its keys are the last n_b filled columns)."""
    return int(cache.key_valid[row, : cache.length].sum())


def splice(config, parts: list[tuple[KVCache, int]], dtype, device, headroom: int = HEADROOM) -> KVCache:
    """One KVCache whose row b is row parts[b][1] of cache parts[b][0], right-aligned, with `headroom`
    empty columns after S = max_b n_b."""
    lengths = [row_tokens(c, r) for c, r in parts]
    S = max(lengths)
    out = KVCache(config, len(parts), S + headroom, dtype, device)
    for b, ((src, r), n) in enumerate(zip(parts, lengths)):
        lo = src.length - n  # the row's first real column in its source
        for layer in range(config.num_hidden_layers):
            out.k[layer][b, :, S - n : S] = src.k[layer][r, :, lo : src.length]  # (Hkv, n, hd)
            out.v[layer][b, :, S - n : S] = src.v[layer][r, :, lo : src.length]
        out.key_valid[b, S - n : S] = True
        out.next_positions[b] = src.next_positions[r]
    out.length = S
    return out
