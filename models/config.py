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
        """A preset by name (see PRESETS); raises ValueError listing the presets otherwise."""
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


# Keyword dicts in gpt-fast's `transformer_configs` style: the base dict of a family holds what all
# its sizes share, each preset adds its geometry. Values copied from each repo's config.json
# (transformers 4.x dialect on the hub); `hf_repo` names the repo a preset mirrors.
_GEMMA3 = dict(
    family="gemma3",
    head_dim=256,
    rms_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    query_pre_attn_scalar=256,
    bos_token_id=2,
    eos_token_ids=(1, 106),
    pad_token_id=0,
)
_GEMMA3_1B = dict(
    _GEMMA3,
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    layer_types=every_nth_full(26, 6),
    sliding_window=512,
    max_position_embeddings=32768,
)
_GEMMA3_4B = dict(
    _GEMMA3,
    vocab_size=262208,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    layer_types=every_nth_full(34, 6),
    sliding_window=1024,
    max_position_embeddings=131072,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
)
_LLAMA3 = dict(
    family="llama",
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_ids=(128001,),
)
_LLAMA3_SCALING = dict(
    rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_LLAMA32_1B = dict(
    _LLAMA3,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
)
# Qwen: <|endoftext|> = 151643 is BOS (and the base models' EOS), <|im_end|> = 151645 the chat EOS.
_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0, bos_token_id=151643)
_QWEN3 = dict(
    _QWEN, family="qwen3", head_dim=128, num_key_value_heads=8, max_position_embeddings=40960, eos_token_ids=(151645,)
)
_QWEN25 = dict(_QWEN, family="qwen2", qkv_bias=True, max_position_embeddings=32768)
_QWEN25_05B = dict(
    _QWEN25,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
_QWEN25_15B = dict(
    _QWEN25,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
_QWEN25_7B = dict(
    _QWEN25,
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
_MISTRAL7B = dict(
    family="mistral",
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(2,),
)

transformer_configs: dict[str, dict] = {
    # `tiny`: Gemma-3-shaped, random weights built locally (tests, offline demo). The loader sets
    # vocab_size to the bundled tokenizer's (examples/tokenizer/).
    "tiny": dict(
        family="gemma3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=10_000.0,
        rope_local_theta=10_000.0,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        sliding_window=64,
        query_pre_attn_scalar=16,
        bos_token_id=None,
        eos_token_ids=(),
        pad_token_id=0,
    ),
    "gemma-3-270m": dict(
        _GEMMA3,
        hf_repo="google/gemma-3-270m",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        layer_types=every_nth_full(18, 6),
        sliding_window=512,
        max_position_embeddings=32768,
    ),
    "gemma-3-1b": dict(_GEMMA3_1B, hf_repo="google/gemma-3-1b-pt"),
    "gemma-3-1b-it": dict(_GEMMA3_1B, hf_repo="google/gemma-3-1b-it"),
    "gemma-3-4b": dict(_GEMMA3_4B, hf_repo="google/gemma-3-4b-pt"),
    "gemma-3-4b-it": dict(_GEMMA3_4B, hf_repo="google/gemma-3-4b-it"),
    "llama-3.2-1b": dict(_LLAMA32_1B, hf_repo="meta-llama/Llama-3.2-1B"),
    "llama-3.2-1b-instruct": dict(
        _LLAMA32_1B, hf_repo="meta-llama/Llama-3.2-1B-Instruct", eos_token_ids=(128001, 128008, 128009)
    ),
    "llama-3.2-3b": dict(
        _LLAMA3,
        hf_repo="meta-llama/Llama-3.2-3B",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
    ),
    "llama-3.1-8b": dict(
        _LLAMA3,
        hf_repo="meta-llama/Llama-3.1-8B",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
    ),
    "smollm2-135m": dict(
        family="llama",
        hf_repo="HuggingFaceTB/SmolLM2-135M",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=0,
        eos_token_ids=(0,),
    ),
    # Qwen3 (dense; the hub checkpoints are the hybrid thinking models).
    "qwen3-0.6b": dict(
        _QWEN3,
        hf_repo="Qwen/Qwen3-0.6B",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        _QWEN3,
        hf_repo="Qwen/Qwen3-1.7B",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        _QWEN3,
        hf_repo="Qwen/Qwen3-4B",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _QWEN3,
        hf_repo="Qwen/Qwen3-8B",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    # Qwen2.5: base models stop on <|endoftext|>, instruct models on <|im_end|>.
    "qwen2.5-0.5b": dict(_QWEN25_05B, hf_repo="Qwen/Qwen2.5-0.5B", eos_token_ids=(151643,)),
    "qwen2.5-0.5b-instruct": dict(_QWEN25_05B, hf_repo="Qwen/Qwen2.5-0.5B-Instruct", eos_token_ids=(151645,)),
    "qwen2.5-1.5b": dict(
        _QWEN25_15B, hf_repo="Qwen/Qwen2.5-1.5B", eos_token_ids=(151643,), max_position_embeddings=131072
    ),
    "qwen2.5-1.5b-instruct": dict(_QWEN25_15B, hf_repo="Qwen/Qwen2.5-1.5B-Instruct", eos_token_ids=(151645,)),
    "qwen2.5-7b": dict(_QWEN25_7B, hf_repo="Qwen/Qwen2.5-7B", eos_token_ids=(151643,), max_position_embeddings=131072),
    "qwen2.5-7b-instruct": dict(_QWEN25_7B, hf_repo="Qwen/Qwen2.5-7B-Instruct", eos_token_ids=(151645,)),
    # Mistral 7B v0.3: no sliding window (config.json has sliding_window null).
    "mistral-7b-v0.3": dict(_MISTRAL7B, hf_repo="mistralai/Mistral-7B-v0.3"),
    "mistral-7b-v0.3-instruct": dict(_MISTRAL7B, hf_repo="mistralai/Mistral-7B-Instruct-v0.3"),
}

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(name=name, **kw) for name, kw in transformer_configs.items()}
