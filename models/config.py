"""ModelConfig: one dataclass for the dense decoder families, named presets, and config.json parsing.

Families (what differs from the Llama block is all there is to each):
  llama    the reference block: RMSNorm, SiLU-gated MLP, GQA attention with RoPE
  mistral  Llama plus an optional sliding window on every layer (`sliding_window`)
  qwen2    Llama with a bias on the q/k/v projections (Qwen2 and Qwen2.5; o_proj has none)
  qwen3    Llama with per-head RMSNorm on q and k before RoPE (`q_norm`, `k_norm`) and an explicit
           head_dim independent of D / H
  gemma3   (1 + w) RMSNorms, four norms per block, GELU-tanh MLP, q/k norms, sqrt(D) embedding
           scale, alternating sliding/full layers with their own RoPE bases, optional soft-capping
Supported model_type values: llama, mistral, qwen2, qwen3, gemma3_text and gemma3 (the text tower
of Gemma3ForConditionalGeneration). Mixture-of-experts, fused-qkv and encoder-decoder
architectures are not implemented.

Field names follow Hugging Face's config.json (hidden_size, num_attention_heads, ...) so a reader
can hold the two side by side. Shape letters used in the rest of models/: D = hidden_size,
H = num_attention_heads, Hkv = num_key_value_heads, hd = head_dim, V = vocab_size.

Two config.json dialects exist for the same models:
- transformers 4.x (what the hub checkpoints carry): `rope_theta`, `rope_scaling` (global layers),
  Gemma's `rope_local_base_freq` (sliding layers) and `sliding_window_pattern` (every Nth layer is
  full attention), Qwen's `use_sliding_window` + `max_window_layers`;
- transformers 5: `rope_parameters` (one dict; Gemma: one dict per layer type, with
  `rope_theta` inside) and an explicit `layer_types` list.
`from_hf_config` reads both; `layer_types` and the RoPE fields below are the normalized form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SUPPORTED = "llama, mistral, qwen2 (Qwen2/Qwen2.5), qwen3 (dense), gemma3_text and gemma3 (text tower)"


@dataclass
class ModelConfig:
    family: str = "llama"  # one of FAMILIES: picks norms, q/k norms, biases, MLP activation, embedding scale
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
    attention_bias: bool = False  # bias on q, k, v and o projections (Llama/Qwen3 config key)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2/Qwen2.5, always on there)
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
    # The checkpoint's own class and where its text tower lives, so adapters and merged exports
    # carry its module paths (loader.checkpoint_name): "model." for *ForCausalLM, or a multimodal
    # prefix such as "language_model.model." (transformers 4) / "model.language_model." (5).
    source_architecture: str | None = None
    source_prefix: str = "model."

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {self.family!r}.")
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
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers.")
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
    def qk_norm(self) -> bool:
        """Whether attention normalizes q and k per head before RoPE (Gemma 3, Qwen3)."""
        return self.family in ("gemma3", "qwen3")

    @property
    def attn_scale(self) -> float:
        """Softmax scale: 1/sqrt(query_pre_attn_scalar) for Gemma, 1/sqrt(hd) for the others."""
        s = self.query_pre_attn_scalar if self.family == "gemma3" else self.head_dim
        return 1.0 / math.sqrt(s)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name (models/presets.py); raises ValueError listing the presets otherwise."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        preset = PRESETS[name]
        return replace(
            preset,
            layer_types=list(preset.layer_types),
            rope_scaling=dict(preset.rope_scaling) if preset.rope_scaling else None,
        )

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "custom") -> ModelConfig:
        """Build from a parsed config.json (see the module docstring for the model types read).

        Raises ValueError with one sentence for an architecture this stack does not implement.
        """
        arch = (cfg.get("architectures") or [None])[0]
        model_type = cfg.get("model_type")
        if model_type == "gemma3":  # multimodal checkpoint: the language model is text_config
            text = dict(cfg.get("text_config") or {})
            text.setdefault("model_type", "gemma3_text")
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if k in cfg and k not in text:
                    text[k] = cfg[k]
            return replace(cls.from_hf_config(text, name), source_architecture=arch)
        if model_type in ("llama", "mistral", "qwen2", "qwen3"):
            out = cls._from_llama(cfg, name, model_type)
        elif model_type == "gemma3_text":
            out = cls._from_gemma3(cfg, name)
        else:
            raise ValueError(
                f"model_type {model_type!r} (architectures {cfg.get('architectures')}) is not supported; "
                f"minilora implements the dense decoders {SUPPORTED}, not mixture-of-experts, fused-qkv "
                "or encoder-decoder models."
            )
        out.source_architecture = arch
        return out

    @classmethod
    def _from_llama(cls, c: dict, name: str, family: str) -> ModelConfig:
        """The Llama-block families: llama, mistral, qwen2, qwen3."""
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{family} hidden_act {c['hidden_act']!r} is not supported (only silu).")
        rope = c.get("rope_parameters")  # transformers 5: {"rope_type", "rope_theta", ...}
        if rope is not None:
            theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        else:  # transformers 4.x
            theta = c.get("rope_theta", 10000.0)
            scaling = c.get("rope_scaling")
        n_layers, window = c["num_hidden_layers"], c.get("sliding_window")
        layer_types = c.get("layer_types")
        if family == "mistral":  # one window for every layer, when set
            layer_types = [SLIDING if window else FULL] * n_layers
        elif family in ("qwen2", "qwen3") and layer_types is None:
            # transformers 4.x: the window applies from layer max_window_layers on, if switched on.
            window = window if c.get("use_sliding_window", False) else None
            first = c.get("max_window_layers", n_layers)
            layer_types = [SLIDING if window and i >= first else FULL for i in range(n_layers)]
        if layer_types is None or SLIDING not in layer_types:
            window = None
        if family == "qwen3" and c.get("head_dim") is None:
            c = {**c, "head_dim": 128}  # transformers' Qwen3Config default, independent of D / H
        return cls(
            family=family,
            hidden_act="silu",
            rope_theta=float(theta),
            rope_scaling=scaling or None,
            qkv_bias=family == "qwen2",
            mlp_bias=bool(c.get("mlp_bias", False)),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            layer_types=layer_types,
            sliding_window=window,
            name=name,
            **_common(c),
        )

    @classmethod
    def _from_gemma3(cls, c: dict, name: str) -> ModelConfig:
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
    """Keys shared by every family."""
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


def every_nth_full(n_layers: int, n: int) -> list[str]:
    """Gemma 3's attention pattern: every n-th layer full attention, the others sliding."""
    return [SLIDING if (i + 1) % n else FULL for i in range(n_layers)]


def __getattr__(name: str):
    """`PRESETS` (models/presets.py) as an attribute of this module too. The presets are ModelConfigs,
    so presets.py imports this module; importing it back here on first use keeps that one-way."""
    if name == "PRESETS":
        from .presets import PRESETS

        return PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
