"""The error the parallel modules raise for a --parallel choice or launch that cannot work. Its own
module, so vocab_parallel.py and distributed.py need not import each other for it."""


class ParallelError(ValueError):
    """A --parallel choice that cannot work with the given launch or flags (one clear sentence)."""
