"""Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma 3: config presets, one readable transformer, a
safetensors loader, a tokenizer. Import as `minilora.models`.
"""


def load_model(*args, **kwargs):
    """See `minilora.models.loader.load_model`."""
    from .loader import load_model as _load_model

    return _load_model(*args, **kwargs)
