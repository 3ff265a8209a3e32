"""Named presets: ModelConfig keyword dicts for the models minilora is tried on, each mirroring one
Hugging Face repo's config.json (`hf_repo`), and `tiny`, built locally for tests and the offline demo.

`PRESETS` maps each name to its keyword dict; `ModelConfig.from_name(name)` builds a fresh ModelConfig
from one.
"""

from __future__ import annotations

from .attention_pattern import FULL, SLIDING, every_nth_full

# Keyword dicts in gpt-fast's `transformer_configs` style: the base dict of a family holds what all
# its sizes share, each preset adds its geometry. Values copied from each repo's config.json
# (transformers 4.x dialect on the hub); `hf_repo` names the repo a preset mirrors.
_GEMMA3 = dict(
    family="gemma3",
    head_dim=256,
    rms_norm_eps=1e-6,
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
_QWEN25 = dict(_QWEN, family="qwen2", max_position_embeddings=32768)
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

PRESETS: dict[str, dict] = {
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
