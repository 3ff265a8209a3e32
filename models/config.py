"""ModelConfig, one dataclass for the dense decoder families, and FAMILIES, the one table of how the
families differ.

A family is the Llama block plus the traits its FAMILIES entry sets; models/transformer.py builds the
block from them, minilora/train/memory_plan.py counts its memory from them, models/hf_config.py reads
and writes config.json from them and minilora/export/gguf.py lays out the GGUF file from them.
Mixture-of-experts, fused-qkv and encoder-decoder architectures are not implemented.

Field names follow Hugging Face's config.json (hidden_size, num_attention_heads, ...) so a reader
can hold the two side by side. Shape letters used in the rest of models/: D = hidden_size,
H = num_attention_heads, Hkv = num_key_value_heads, hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from .attention_pattern import FULL, SLIDING, every_nth_full, every_nth_period  # noqa: F401 (models' names)
from .presets import PRESETS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# How a transformers-4.x config.json says which layers slide (transformers 5 lists `layer_types`);
# models/hf_config.py reads and writes each rule.
LAYER_RULES = {
    "none": "no key: every layer full attention",
    "all": "`sliding_window` set: every layer slides (Mistral)",
    "from_layer": "`use_sliding_window`: layers `max_window_layers`.. slide (Qwen)",
    "every_nth": "`sliding_window_pattern` n: every_nth_full(L, n) (Gemma 3)",
}


# ------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """What one model family is, as data: each trait at its default is the Llama block,

        h = x + attn(norm(x));   y = h + mlp(norm(h));   norm(x) = x / sqrt(mean(x^2) + eps) * w
        mlp(x) = down(act(gate(x)) * up(x));   attn: q, k, v projections, RoPE, softmax(q k^T / sqrt(hd)) v

    and each trait set away from its default names one thing the family does differently.
    """

    # --- the block's math: models/transformer.py, minilora/train/memory_plan.py
    hidden_act: str = "silu"  # act in the MLP (the only one this family's config.json may name)
    norm_offset: float = 0.0  # every RMSNorm scales by (norm_offset + w); 1: Gemma's, in float32 (models/ops.py)
    sandwich_norms: bool = False  # the attention and MLP outputs are normed too before the residual add
    qk_norm: bool = False  # q and k are RMSNormed per head (over hd) before RoPE
    qkv_bias: bool = False  # q, k and v projections carry a bias whatever attention_bias says (o_proj none)
    embedding_scale: bool = False  # token embeddings times sqrt(D), rounded to the weight dtype first
    attn_scalar: bool = False  # softmax scale query_pre_attn_scalar**-0.5 (default hd**-0.5) instead of hd**-0.5
    local_rope: bool = False  # sliding layers rotate with their own unscaled base, rope_local_theta
    # --- config.json: models/hf_config.py reads and writes these
    model_types: tuple[str, ...] = ()  # the model_type values read as this family; the first is written
    architecture: str = ""  # the *ForCausalLM class config.json names
    wrapper_model_type: str | None = None  # a multimodal model_type whose `text_config` is this family
    act_key: str = "hidden_act"  # the key that names hidden_act
    layer_rule: str = "none"  # how the transformers-4.x keys say which layers slide (LAYER_RULES)
    own_keys: tuple[str, ...] = ()  # keys only this family's config has, each a ModelConfig field of that name
    # {key: value} its transformers config class assumes for a missing key, where not hf_config.DEFAULTS
    defaults: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)  # {key: what a model with it set is}: variants not implemented
    # --- llama.cpp: minilora/export/gguf.py (None: no GGUF export)
    gguf_arch: str | None = None  # gguf's MODEL_ARCH name: general.architecture and the metadata key prefix
    gguf_permute_qk: bool = False  # llama.cpp's rope for that arch pairs dims (2i, 2i+1), not (i, i + hd/2)

    def __post_init__(self):
        if self.norm_offset not in (0.0, 1.0):  # the two norms models/ops.py implements
            raise ValueError(f"norm_offset must be 0 (Llama's norm) or 1 (Gemma's); got {self.norm_offset}.")
        if self.layer_rule not in LAYER_RULES:
            raise ValueError(f"layer_rule must be one of {', '.join(LAYER_RULES)}; got {self.layer_rule!r}.")


# The one table of family traits. Adding a family touches this table, and code only where its math
# is new: a trait models/transformer.py does not implement yet, a config.json key or layer rule
# models/hf_config.py does not read yet, a GGUF fact minilora/export/gguf.py does not know yet.
FAMILIES: dict[str, Family] = {
    # Llama 3.x and SmolLM2: the reference block, with an optional bias on every MLP linear.
    "llama": Family(
        model_types=("llama",),
        architecture="LlamaForCausalLM",
        own_keys=("mlp_bias",),
        gguf_arch="llama",
        gguf_permute_qk=True,
    ),
    # Mistral: one optional window for every layer. llama.cpp runs it as llama.
    "mistral": Family(
        model_types=("mistral",),
        architecture="MistralForCausalLM",
        layer_rule="all",
        defaults={"sliding_window": 4096},
        gguf_arch="llama",
        gguf_permute_qk=True,
    ),
    # Qwen2 and Qwen2.5: biases on q, k, v.
    "qwen2": Family(
        qkv_bias=True,
        model_types=("qwen2",),
        architecture="Qwen2ForCausalLM",
        layer_rule="from_layer",
        defaults={"max_window_layers": 28},
        gguf_arch="qwen2",
    ),
    # Qwen3 (dense): q/k norms, and a head_dim of its own (not D / H) when config.json omits it.
    "qwen3": Family(
        qk_norm=True,
        model_types=("qwen3",),
        architecture="Qwen3ForCausalLM",
        layer_rule="from_layer",
        defaults={"head_dim": 128, "max_window_layers": 28},
        gguf_arch="qwen3",
    ),
    # Gemma 3 (and the text tower of Gemma3ForConditionalGeneration).
    "gemma3": Family(
        hidden_act="gelu_pytorch_tanh",
        norm_offset=1.0,
        sandwich_norms=True,
        qk_norm=True,
        embedding_scale=True,
        attn_scalar=True,
        local_rope=True,
        model_types=("gemma3_text",),
        architecture="Gemma3ForCausalLM",
        wrapper_model_type="gemma3",
        act_key="hidden_activation",
        layer_rule="every_nth",
        own_keys=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
        defaults={
            "head_dim": 256,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "sliding_window": 4096,
            "sliding_window_pattern": 6,
            "query_pre_attn_scalar": 256,
            "tie_word_embeddings": True,
        },
        refused={"use_bidirectional_attention": "an embedding model"},
        gguf_arch="gemma3",
    ),
}
SUPPORTED = ", ".join(  # the model_type values from_hf_config reads, for error messages
    t for f in FAMILIES.values() for t in (*f.model_types, *([f.wrapper_model_type] if f.wrapper_model_type else []))
)


# ------------------------------------------------------------------------------- ModelConfig
@dataclass
class ModelConfig:
    family: str = "llama"  # a key of FAMILIES: the block's traits (`traits`)
    vocab_size: int = 32000
    hidden_size: int = 2048  # D
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # Hkv (GQA when < H)
    head_dim: int | None = None  # hd; None means D // H
    rms_norm_eps: float = 1e-5
    hidden_act: str | None = None  # "silu" or "gelu_pytorch_tanh"; None: the family's
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v and o projections (Llama/Qwen3 config key)
    mlp_bias: bool = False
    # RoPE. Layers use rope_theta with rope_scaling; sliding layers of a family with local_rope
    # (Gemma) use rope_local_theta with no scaling.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rope_local_theta: float | None = None
    # Attention pattern: per layer SLIDING or FULL; sliding layers see the last `sliding_window`
    # positions (query included).
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None  # attn_scalar families: softmax scale = this**-0.5
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
        if self.hidden_act is None:
            self.hidden_act = self.traits.hidden_act
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
        if self.traits.attn_scalar and self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def traits(self) -> Family:
        """The family's entry in FAMILIES."""
        return FAMILIES[self.family]

    @property
    def attn_scale(self) -> float:
        """Softmax scale: 1/sqrt(query_pre_attn_scalar) where the family has attn_scalar, else 1/sqrt(hd)."""
        s = self.query_pre_attn_scalar if self.traits.attn_scalar else self.head_dim
        return 1.0 / math.sqrt(s)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name (models/presets.py), a fresh copy; raises ValueError listing the presets otherwise."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        return cls(name=name, **copy.deepcopy(PRESETS[name]))
