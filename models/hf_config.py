"""config.json <-> ModelConfig: both directions, each read from the family's FAMILIES entry (models/config.py).

Two config.json dialects exist for the same models:
- transformers 4.x (what the hub checkpoints carry): `rope_theta` and `rope_scaling`, Gemma's
  `rope_local_base_freq` (its sliding layers), and per family keys that say which layers slide
  (config.LAYER_RULES: Mistral's `sliding_window`, Qwen's `use_sliding_window` + `max_window_layers`,
  Gemma's `sliding_window_pattern`);
- transformers 5: `rope_parameters` (one dict; Gemma: one dict per layer type, with `rope_theta`
  inside) and an explicit `layer_types` list.
`from_hf_config` reads both into ModelConfig's normalized form (`layer_types`, rope_theta,
rope_scaling, rope_local_theta). `to_hf_config` writes the 4.x dialect, plus `layer_types` where the
family's config class reads it; transformers 4.x and 5 both load that.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from minilora.dtypes import DTYPE_NAMES

from .config import (
    FAMILIES,
    FULL,
    LAYER_RULES,
    SLIDING,
    SUPPORTED,
    Family,
    ModelConfig,
    every_nth_full,
    every_nth_period,
)

# What transformers' Llama config classes assume for a missing key; a family's `defaults` override.
DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "rope_theta": 10_000.0,
    "sliding_window": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}


# ------------------------------------------------------------------------------- config.json -> ModelConfig
def from_hf_config(c: dict, name: str = "custom") -> ModelConfig:
    """ModelConfig of a parsed config.json, either dialect (the loader calls this for every checkpoint).

    Raises ValueError with one sentence for an architecture or variant this stack does not implement.
    """
    arch = (c.get("architectures") or [None])[0]
    wrapped = {f.wrapper_model_type: f.model_types[0] for f in FAMILIES.values() if f.wrapper_model_type}
    if c.get("model_type") in wrapped:  # a multimodal checkpoint: its language model is text_config
        text = dict(c.get("text_config") or {})
        text.setdefault("model_type", wrapped[c["model_type"]])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in c and k not in text:
                text[k] = c[k]
        return replace(from_hf_config(text, name), source_architecture=arch)
    model_type = c.get("model_type")
    family = next((key for key, f in FAMILIES.items() if model_type in f.model_types), None)
    if family is None:
        raise ValueError(
            f"model_type {model_type!r} (architectures {c.get('architectures')}) is not supported; minilora "
            f"implements the dense decoders {SUPPORTED}, not mixture-of-experts, fused-qkv or encoder-decoder models."
        )
    fam = FAMILIES[family]

    def get(key):
        return c.get(key, fam.defaults.get(key, DEFAULTS.get(key)))

    for key, what in fam.refused.items():
        if c.get(key):
            raise ValueError(f"{model_type} with {key} ({what}) is not supported.")
    act = c.get(fam.act_key, fam.hidden_act)
    if act != fam.hidden_act:
        raise ValueError(f"{model_type} {fam.act_key} {act!r} is not supported (only {fam.hidden_act}).")
    layer_types, window = _read_layer_types(c, fam, get)
    eos = c.get("eos_token_id")
    return ModelConfig(
        family=family,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=get("head_dim"),
        rms_norm_eps=get("rms_norm_eps"),
        hidden_act=act,
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=bool(get("attention_bias")),
        **_read_rope(c, fam, get),
        layer_types=layer_types,
        sliding_window=window,
        **{k: get(k) for k in fam.own_keys},
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        pad_token_id=c.get("pad_token_id"),
        name=name,
        source_architecture=arch,
    )


def _read_rope(c: dict, fam: Family, get) -> dict:
    """rope_theta, rope_scaling and (local_rope families) rope_local_theta, from either dialect."""
    rope, local = c.get("rope_parameters"), {}
    if rope is not None and FULL in rope:  # transformers 5, one dict per layer type (Gemma 3)
        full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        theta, local_theta = (
            full.pop("rope_theta", get("rope_theta")),
            local.pop("rope_theta", get("rope_local_base_freq")),
        )
        scaling = full
    elif rope is not None:  # transformers 5, one dict for every layer
        theta, local_theta = rope.get("rope_theta", get("rope_theta")), get("rope_local_base_freq")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    else:  # transformers 4.x
        theta, local_theta, scaling = get("rope_theta"), get("rope_local_base_freq"), c.get("rope_scaling")
    if local.get("rope_type", "default") != "default":
        raise ValueError("RoPE scaling on the sliding-window layers is not supported.")
    out = dict(rope_theta=float(theta), rope_scaling=scaling or None)
    if fam.local_rope:
        out["rope_local_theta"] = float(local_theta)
    return out


def _read_layer_types(c: dict, fam: Family, get) -> tuple[list[str], int | None]:
    """(layer_types, sliding_window): transformers 5's `layer_types`, else the family's 4.x rule."""
    n, window, layer_types = c["num_hidden_layers"], get("sliding_window"), c.get("layer_types")
    if fam.layer_rule == "none":  # the family's class has no sliding layers (and ignores layer_types)
        layer_types = [FULL] * n
    elif fam.layer_rule == "all":  # one window for every layer, when set
        layer_types = [SLIDING if window else FULL] * n
    elif layer_types is None and fam.layer_rule == "from_layer":
        window = window if c.get("use_sliding_window", False) else None
        first = get("max_window_layers")
        layer_types = [SLIDING if window and i >= first else FULL for i in range(n)]
    elif layer_types is None:  # every_nth
        period = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", get("sliding_window_pattern")))
        layer_types = every_nth_full(n, period)
    return list(layer_types), window if SLIDING in layer_types else None


# ------------------------------------------------------------------------------- ModelConfig -> config.json
def to_hf_config(cfg: ModelConfig, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A transformers config.json dict for `cfg`, the inverse of from_hf_config: from_hf_config of it
    gives back every model field of cfg.

    Token ids missing from the config (the `tiny` preset has none) come from the tokenizer.
    """
    fam = cfg.traits
    eos = list(cfg.eos_token_ids) or (list(tokenizer.eos_ids) if tokenizer is not None else [])
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else getattr(tokenizer, "bos_id", None)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(tokenizer, "pad_id", None)
    return {
        "architectures": [fam.architecture],
        "model_type": fam.model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        fam.act_key: cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        **({"rope_local_base_freq": cfg.rope_local_theta} if fam.local_rope else {}),
        **_write_layer_types(cfg, fam),
        **{k: getattr(cfg, k) for k in fam.own_keys},
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": pad,
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def _write_layer_types(cfg: ModelConfig, fam: Family) -> dict:
    """The keys that say which layers slide, by the family's rule (the inverse of _read_layer_types);
    raises ValueError for a pattern the family's config.json cannot say."""
    types, rule = cfg.layer_types, fam.layer_rule
    sliding = [i for i, t in enumerate(types) if t == SLIDING]
    fits = {
        "none": not sliding,
        "all": len(set(types)) == 1,
        "from_layer": sliding == list(range(sliding[0], len(types))) if sliding else True,
        "every_nth": True,  # layer_types is written as it is
    }[rule]
    if not fits:
        raise ValueError(
            f"{cfg.family}'s config.json says which layers slide only as {LAYER_RULES[rule]}; got {types}."
        )
    if rule == "none":
        return {}
    if rule == "all":
        return {"sliding_window": cfg.sliding_window}
    out = {"layer_types": list(types), "sliding_window": cfg.sliding_window}
    if rule == "from_layer":  # transformers 4.x: the window covers layers max_window_layers.. when switched on
        out.update(use_sliding_window=bool(sliding), max_window_layers=sliding[0] if sliding else len(types))
    elif (n := every_nth_period(types)) is not None:  # transformers < 4.53 derives the layer types from this key
        out["sliding_window_pattern"] = n
    return out
