"""Which layers attend through a sliding window: the two layer kinds, as config.json's `layer_types`
spells them, and Gemma 3's rule that every n-th layer is full attention and the others slide.
The family table, the presets, the config.json reader and writer and the GGUF export all use it."""

from __future__ import annotations

SLIDING = "sliding_attention"
FULL = "full_attention"


def every_nth_full(n_layers: int, n: int) -> list[str]:
    """Gemma 3's attention pattern: every n-th layer (n-1, 2n-1, ...) full attention, the others sliding."""
    return [SLIDING if (i + 1) % n else FULL for i in range(n_layers)]


def every_nth_period(layer_types: list[str]) -> int | None:
    """The n with every_nth_full(L, n) == layer_types (the inverse of every_nth_full), or None."""
    L = len(layer_types)
    return next((n for n in range(1, L + 1) if every_nth_full(L, n) == list(layer_types)), None)
