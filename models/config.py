"""ModelConfig: one dataclass for Llama and Gemma 3, named presets, and config.json parsing.

Field names follow Hugging Face's config.json (hidden_size, num_attention_heads, ...) so a reader
can hold the two side by side. Shape letters used in the rest of models/: D = hidden_size,
H = num_attention_heads, Hkv = num_key_value_heads, hd = head_dim, V = vocab_size.

Two config.json dialects exist for the same models:
- transformers 4.x (what the hub checkpoints carry): `rope_theta`, `rope_scaling` (global layers),
  Gemma's `rope_local_base_freq` (sliding layers) and `sliding_window_pattern` (every Nth layer is
  full attention);
- transformers 5: `rope_parameters` (Llama: one dict; Gemma: one dict per layer type, with
  `rope_theta` inside) and an explicit `layer_types` list.
`from_hf_config` reads both; `layer_types` and the RoPE fields below are the normalized form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    family: str = "llama"  # "llama" or "gemma3": picks norms, MLP activation, embedding scale
    vocab_size: int = 32000
    hidden_size: int = 2048  # D
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # Hkv (GQA when < H)
    head_dim: int | None = None  # hd; None means D // H
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"  # "silu" (Llama) or "gelu_pytorch_tanh" (Gemma)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    # RoPE. Global (full-attention) layers use rope_theta with rope_scaling; Gemma's sliding layers
    # use rope_local_theta with no scaling.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rope_local_theta: float | None = None
    # Attention pattern: per layer SLIDING or FULL; sliding layers see the last `sliding_window`
    # positions (query included).
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale = query_pre_attn_scalar**-0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = "custom"
    hf_repo: str | None = None  # the Hugging Face repo this config mirrors (presets)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.family not in ("llama", "gemma3"):
            raise ValueError(f"family must be 'llama' or 'gemma3', got {self.family!r}.")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.layer_types is None:
            self.layer_types = [FULL] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers."
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unsupported layer types {bad}; expected {SLIDING!r} or {FULL!r}.")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding-attention layers need a positive sliding_window.")
        if self.rope_local_theta is None:
            self.rope_local_theta = self.rope_theta
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"RoPE scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
                )
            scaling = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_theta")}
            self.rope_scaling = {**scaling, "rope_type": kind}
            if kind == "default":
                self.rope_scaling = None
        if self.family == "gemma3" and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def attn_scale(self) -> float:
        """Softmax scale: 1/sqrt(hd) for Llama, 1/sqrt(query_pre_attn_scalar) for Gemma."""
        s = self.query_pre_attn_scalar if self.family == "gemma3" else self.head_dim
        return 1.0 / math.sqrt(s)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A preset by name (see PRESETS); raises ValueError listing the presets otherwise."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        return replace(PRESETS[name], layer_types=list(PRESETS[name].layer_types))

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "custom") -> "ModelConfig":
        """Build from a parsed config.json (llama, gemma3_text, or the text part of gemma3).

        Raises ValueError with one sentence for an architecture this stack does not implement.
        """
        model_type = cfg.get("model_type")
        if model_type == "gemma3":  # multimodal checkpoint: the language model is text_config
            text = dict(cfg.get("text_config") or {})
            text.setdefault("model_type", "gemma3_text")
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if k in cfg and k not in text:
                    text[k] = cfg[k]
            return cls.from_hf_config(text, name)
        if model_type == "llama":
            return cls._from_llama(cfg, name)
        if model_type == "gemma3_text":
            return cls._from_gemma3(cfg, name)
        raise ValueError(
            f"model_type {model_type!r} (architectures {cfg.get('architectures')}) is not supported; "
            "minilora implements llama, gemma3_text and gemma3 (text part)."
        )

    @classmethod
    def _from_llama(cls, c: dict, name: str) -> "ModelConfig":
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {c['hidden_act']!r} is not supported (only silu).")
        rope = c.get("rope_parameters")  # transformers 5: {"rope_type", "rope_theta", ...}
        if rope is not None:
            theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        else:  # transformers 4.x
            theta = c.get("rope_theta", 10000.0)
            scaling = c.get("rope_scaling")
        return cls(
            family="llama",
            hidden_act="silu",
            rope_theta=float(theta),
            rope_scaling=scaling or None,
            mlp_bias=bool(c.get("mlp_bias", False)),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            name=name,
            **_common(c),
        )

    @classmethod
    def _from_gemma3(cls, c: dict, name: str) -> "ModelConfig":
        n_layers = c["num_hidden_layers"]
        layer_types = c.get("layer_types")
        if layer_types is None:  # transformers 4.x: every `pattern`-th layer is global
            pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        rope = c.get("rope_parameters")
        if rope is not None and FULL in rope:  # transformers 5: one dict per layer type
            full = dict(rope.get(FULL) or {})
            local = dict(rope.get(SLIDING) or {})
            theta = full.pop("rope_theta", 1_000_000.0)
            local_theta = local.pop("rope_theta", 10_000.0)
            if local.get("rope_type", "default") != "default":
                raise ValueError("RoPE scaling on Gemma's sliding-window layers is not supported.")
            scaling = full or None
        else:  # transformers 4.x
            theta = c.get("rope_theta", 1_000_000.0)
            local_theta = c.get("rope_local_base_freq", 10_000.0)
            scaling = c.get("rope_scaling")
        if c.get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported.")
        act = c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma 3 activation {act!r} is not supported (only gelu_pytorch_tanh).")
        return cls(
            family="gemma3",
            hidden_act=act,
            rope_theta=float(theta),
            rope_local_theta=float(local_theta),
            rope_scaling=scaling or None,
            layer_types=list(layer_types),
            sliding_window=c.get("sliding_window", 4096),
            query_pre_attn_scalar=c.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=c.get("attn_logit_softcapping"),
            final_logit_softcapping=c.get("final_logit_softcapping"),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            name=name,
            **_common(c),
        )


def _common(c: dict) -> dict:
    """Keys shared by both families."""
    eos = c.get("eos_token_id")
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    return dict(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=c.get("head_dim"),
        max_position_embeddings=c.get("max_position_embeddings", 8192),
        attention_bias=bool(c.get("attention_bias", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=c.get("pad_token_id"),
    )


def _gemma3(name, repo, vocab, D, inter, L, H, Hkv, window, max_pos, scaling=None, eos=(1, 106)):
    return ModelConfig(
        family="gemma3", name=name, hf_repo=repo, vocab_size=vocab, hidden_size=D,
        intermediate_size=inter, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hkv,
        head_dim=256, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", max_position_embeddings=max_pos,
        tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=scaling,
        layer_types=[SLIDING if (i + 1) % 6 else FULL for i in range(L)], sliding_window=window,
        query_pre_attn_scalar=256, bos_token_id=2, eos_token_ids=eos, pad_token_id=0,
    )  # fmt: skip


_LLAMA3_SCALING = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)  # fmt: skip


def _llama(name, repo, vocab, D, inter, L, H, Hkv, theta, tie, scaling, eos, bos, eps=1e-5, max_pos=131072):
    return ModelConfig(
        family="llama", name=name, hf_repo=repo, vocab_size=vocab, hidden_size=D, intermediate_size=inter,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hkv, rms_norm_eps=eps,
        max_position_embeddings=max_pos, tie_word_embeddings=tie, rope_theta=theta, rope_scaling=scaling,
        bos_token_id=bos, eos_token_ids=eos,
    )  # fmt: skip


# Geometry copied from each repo's config.json (transformers 4.x dialect on the hub).
PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # `tiny`: Gemma-3-shaped, random weights built locally (tests, offline demo). The loader
        # sets vocab_size to the bundled tokenizer's (examples/tokenizer/).
        ModelConfig(family="gemma3", name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=10_000.0, rope_local_theta=10_000.0,
                    layer_types=[SLIDING, SLIDING, SLIDING, FULL], sliding_window=64,
                    query_pre_attn_scalar=16, bos_token_id=None, eos_token_ids=(), pad_token_id=0),
        _gemma3("gemma-3-270m", "google/gemma-3-270m", 262144, 640, 2048, 18, 4, 1, 512, 32768),
        _gemma3("gemma-3-1b", "google/gemma-3-1b-pt", 262144, 1152, 6912, 26, 4, 1, 512, 32768),
        _gemma3("gemma-3-1b-it", "google/gemma-3-1b-it", 262144, 1152, 6912, 26, 4, 1, 512, 32768),
        _gemma3("gemma-3-4b", "google/gemma-3-4b-pt", 262208, 2560, 10240, 34, 8, 4, 1024, 131072,
                scaling={"rope_type": "linear", "factor": 8.0}),
        _gemma3("gemma-3-4b-it", "google/gemma-3-4b-it", 262208, 2560, 10240, 34, 8, 4, 1024, 131072,
                scaling={"rope_type": "linear", "factor": 8.0}),
        _llama("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 500000.0, True,
               {**_LLAMA3_SCALING, "factor": 32.0}, (128001,), 128000),
        _llama("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", 128256, 2048, 8192, 16, 32, 8,
               500000.0, True, {**_LLAMA3_SCALING, "factor": 32.0}, (128001, 128008, 128009), 128000),
        _llama("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, 500000.0, True,
               {**_LLAMA3_SCALING, "factor": 32.0}, (128001,), 128000),
        _llama("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 500000.0, False,
               {**_LLAMA3_SCALING, "factor": 8.0}, (128001,), 128000),
        _llama("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 100000.0, True,
               None, (0,), 0, max_pos=8192),
    ]
}
