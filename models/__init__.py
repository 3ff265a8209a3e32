"""Gemma 3 and Llama: config presets, one readable transformer, a safetensors loader, a tokenizer.

Import as `minilora.models` (or `models` from a checkout).
"""


def load_model(*args, **kwargs):
    """See `minilora.models.loader.load_model`."""
    from minilora.models.loader import load_model as _load_model

    return _load_model(*args, **kwargs)
