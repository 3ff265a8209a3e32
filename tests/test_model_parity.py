"""Our Transformer against transformers (the oracle): tiny random models built here, saved with
save_pretrained (single file or sharded), loaded by our loader; float32 logits must agree to a
relative error < 1e-5: every family over drawn config fields that differ between families
(head_dim, kv heads, sliding window, bias flags, tying), and Gemma 3 and Llama in depth. Also:
both config.json dialects, padded and packed batches, return_hidden/logits_from_hidden, gradient
checkpointing.
"""

import copy
import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_families import V as FAMILY_VOCAB
from test_families import family_configs, hf_logits, make_hf, ours_from
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from minilora.models.config import FULL, SLIDING, ModelConfig  # noqa: E402
from minilora.models.hf_config import from_hf_config  # noqa: E402
from minilora.models.loader import load_model  # noqa: E402
from minilora.models.transformer import causal_is_exact  # noqa: E402


def rel_err(a, b):
    """Largest difference relative to a's largest magnitude (0 when both are all zeros)."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def _randomize_norms(hf):
    """transformers initializes norms to the identity; random norms make the test able to fail."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(
                    torch.randn(p.shape, generator=g) * 0.3 + (0.0 if "gemma" in type(hf).__name__.lower() else 1.0)
                )
    return hf


@st.composite
def gemma_configs(draw):
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2, 4]))  # GQA when > 1
    n_layers = draw(st.integers(2, 4))
    types = draw(st.lists(st.sampled_from([SLIDING, FULL]), min_size=n_layers, max_size=n_layers))
    if SLIDING not in types:
        types[0] = SLIDING
    return dict(
        vocab_size=draw(st.sampled_from([61, 128])),
        hidden_size=draw(st.sampled_from([32, 64])),
        intermediate_size=draw(st.sampled_from([48, 96])),
        num_hidden_layers=n_layers,
        num_attention_heads=h,
        num_key_value_heads=hkv,
        head_dim=draw(st.sampled_from([8, 16])),
        layer_types=types,
        sliding_window=draw(st.integers(2, 6)),
        query_pre_attn_scalar=draw(st.sampled_from([8, 16, 24])),
        final_logit_softcapping=draw(st.sampled_from([None, 3.0])),
        rope_scaling=draw(st.sampled_from([None, {"rope_type": "linear", "factor": 4.0}])),
        max_position_embeddings=256,
        initializer_range=0.1,
    )


@st.composite
def llama_configs(draw):
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2, 4]))
    scaling = draw(
        st.sampled_from(
            [
                None,
                dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                ),
            ]
        )
    )
    return dict(
        vocab_size=draw(st.sampled_from([61, 128])),
        hidden_size=h * draw(st.sampled_from([8, 16])),
        intermediate_size=draw(st.sampled_from([48, 96])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=h,
        num_key_value_heads=hkv,
        tie_word_embeddings=draw(st.booleans()),
        rope_scaling=scaling,
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )


def save_and_load(hf, tmp_path, sharded):
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    hf.save_pretrained(tmp_path, max_shard_size=max(1, total // 3) if sharded else "5GB")  # bytes: 3+ shards
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model, tok = load_model(str(tmp_path), quantize=None, dtype=torch.float32)
    assert tok is None
    return model


def make_gemma(kw):
    torch.manual_seed(0)
    return _randomize_norms(Gemma3ForCausalLM(Gemma3TextConfig(**kw, attn_implementation="eager")).eval())


def make_llama(kw):
    torch.manual_seed(0)
    return _randomize_norms(LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="eager")).eval())


# ------------------------------------------------------------------------------- logits
@settings(deadline=None)
@given(fk=family_configs(), T=st.integers(1, 12), seed=st.integers(0, 1000))
def test_logits_match_transformers(tmp_path_factory, fk, T, seed):
    family, kw = fk
    hf = make_hf(family, kw, seed)
    ours = ours_from(hf, tmp_path_factory.mktemp(family))
    assert ours.config.family == family
    if family == "llama":
        assert ours.config.layer_types == [FULL] * kw["num_hidden_layers"]
    elif family == "mistral":  # one window on every layer, or none
        assert ours.config.layer_types == [SLIDING if kw["sliding_window"] else FULL] * kw["num_hidden_layers"]
    else:
        assert ours.config.layer_types == list(hf.config.layer_types)
    ids = torch.randint(0, FAMILY_VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    ref = hf_logits(hf, ids)
    assert rel_err(ref, hf_logits(ours, ids)) < 1e-5


@settings(max_examples=6)  # each example saves a random checkpoint and runs transformers beside it
@given(kw=gemma_configs(), T=st.integers(7, 24), sharded=st.booleans(), seed=st.integers(0, 2**16))
def test_gemma3_logits_match_transformers(tmp_path_factory, kw, T, sharded, seed):
    """Mixed sliding/full layers with T longer than the window, GQA, q/k norms, local vs global RoPE
    base, linear RoPE scaling, final soft-capping on and off."""
    hf = make_gemma(kw)
    ours = save_and_load(hf, tmp_path_factory.mktemp("g"), sharded)
    ids = torch.randint(0, kw["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours(ids)) < 1e-5


@settings(max_examples=8)  # each example saves a random checkpoint and runs transformers beside it
@given(kw=llama_configs(), T=st.integers(1, 40), sharded=st.booleans(), seed=st.integers(0, 2**16))
def test_llama_logits_match_transformers(tmp_path_factory, kw, T, sharded, seed):
    """GQA, tied and untied embeddings, llama3 RoPE scaling (positions past original_max 16)."""
    hf = make_llama(kw)
    ours = save_and_load(hf, tmp_path_factory.mktemp("l"), sharded)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == kw["tie_word_embeddings"]
    ids = torch.randint(0, kw["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours(ids)) < 1e-5


def test_attention_softcapping_matches_reference_formula(tmp_path, monkeypatch):
    """transformers' Gemma3Attention does not pass `attn_logit_softcapping` to its attention function
    (no Gemma 3 checkpoint sets it); its eager function implements it (Gemma 2 semantics), so we
    hand the config value to that function and compare."""
    import transformers.models.gemma3.modeling_gemma3 as mg

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        layer_types=[SLIDING, FULL],
        attn_logit_softcapping=0.5,
        query_pre_attn_scalar=8,
        initializer_range=0.3,
    )
    monkeypatch.setattr(mg, "eager_attention_forward", functools.partial(mg.eager_attention_forward, softcap=0.5))
    hf = make_gemma(kw)
    ours = save_and_load(hf, tmp_path, False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
        assert rel_err(a, b) < 1e-5
        ours.config.attn_logit_softcapping = None  # the cap must matter at this scale
        for layer in ours.model.layers:
            layer.self_attn.softcap = None
        assert rel_err(a, ours(ids)) > 1e-3


@settings(max_examples=4)  # each example runs every sequence alone, padded and packed, in both libraries
@given(kw=gemma_configs(), lens=st.lists(st.integers(1, 14), min_size=2, max_size=4), seed=st.integers(0, 99))
def test_padded_batch_and_packed_rows_equal_single_sequences(tmp_path_factory, kw, lens, seed):
    """Left-padded batch (an explicit mask) and right-padded batch (plain causal attention, as
    training batches take it) == each sequence alone == transformers on it alone; a row packing the
    same sequences with segment_ids gives each piece's logits as if run alone."""
    hf = make_gemma(kw)
    ours = save_and_load(hf, tmp_path_factory.mktemp("p"), False)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, kw["vocab_size"], (n,), generator=g) for n in lens]
    P = max(lens)
    ids = torch.zeros(len(seqs), P, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s) :], mask[i, P - len(s) :] = s, 1
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)  # right padding, as training batches
    for i, s in enumerate(seqs):
        right_ids[i, : len(s)], right_mask[i, : len(s)] = s, 1
    packed = torch.cat(seqs)[None]  # (1, sum(lens))
    segs = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    # which batches may use plain causal attention (SDPA is_causal) instead of an explicit mask
    assert not causal_is_exact(mask.bool(), None) or len(set(lens)) == 1
    assert causal_is_exact(right_mask.bool(), None) and causal_is_exact(right_mask.bool(), right_mask)
    assert not causal_is_exact(torch.ones_like(segs, dtype=torch.bool), segs)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
        right = ours(right_ids, attention_mask=right_mask, segment_ids=right_mask)
        packed_logits = ours(packed, segment_ids=segs)[0]
        start = 0
        for i, s in enumerate(seqs):
            alone = hf(s[None]).logits[0]  # (n, V)
            assert rel_err(alone, batched[i, P - len(s) :]) < 1e-5
            assert rel_err(alone, right[i, : len(s)]) < 1e-5
            assert rel_err(alone, packed_logits[start : start + len(s)]) < 1e-5
            start += len(s)


def test_return_hidden_and_gradient_checkpointing(tmp_path):
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        final_logit_softcapping=2.0,
        layer_types=[SLIDING, FULL, SLIDING],
        initializer_range=0.1,
    )
    ours = save_and_load(make_gemma(kw), tmp_path, False).train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    h = ours(ids, return_hidden=True)
    assert h.shape == (2, 9, 32)
    torch.testing.assert_close(ours.logits_from_hidden(h), ours(ids), rtol=0, atol=0)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.set_gradient_checkpointing(ckpt)
        ours(ids).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7)


# --- config.json dialects -----------------------------------------------------------------------

GEMMA_V4 = {  # shaped like google/gemma-3-1b-pt's config.json (transformers 4.50)
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}
LLAMA_V4 = {  # shaped like meta-llama/Llama-3.2-1B's config.json
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def _strip(cfg: ModelConfig):
    d = dict(vars(cfg))
    for k in ("name", "hf_repo", "source_architecture"):  # where the config came from, not the model
        d.pop(k)
    return d


@pytest.mark.parametrize("raw,cls", [(GEMMA_V4, Gemma3TextConfig), (LLAMA_V4, LlamaConfig)])
def test_both_config_dialects_give_the_same_config(raw, cls):
    """A transformers-4 config.json, and the transformers-5 one the oracle writes for the same model
    (rope_parameters, layer_types), parse to the same ModelConfig."""
    raw = copy.deepcopy(raw)  # the oracle's config classes mutate nested dicts they are given
    v5 = json.loads(cls(**copy.deepcopy({k: v for k, v in raw.items() if k != "architectures"})).to_json_string())
    assert "rope_parameters" in v5 and "rope_theta" not in v5
    a, b = from_hf_config(raw), from_hf_config(v5)
    assert _strip(a) == _strip(b)
    if raw == GEMMA_V4:
        assert a.layer_types == v5["layer_types"]
        assert (a.rope_theta, a.rope_local_theta, a.sliding_window) == (1e6, 1e4, 512)
        assert a.layer_types.count(FULL) == 4 and a.eos_token_ids == (1, 106)
        mm = {"model_type": "gemma3", "text_config": dict(raw), "eos_token_id": [1, 106]}
        assert _strip(from_hf_config(mm)) == _strip(a)
    preset = ModelConfig.from_name("gemma-3-1b" if raw == GEMMA_V4 else "llama-3.2-1b")
    assert _strip(preset) == {**_strip(a), "rope_scaling": preset.rope_scaling, "pad_token_id": preset.pad_token_id}


def test_unsupported_architecture_and_unknown_preset():
    for model_type in ("mixtral", "qwen3_moe", "phi3", "t5"):  # MoE, fused qkv, encoder-decoder
        with pytest.raises(ValueError, match=f"'{model_type}'.*not supported.*llama, mistral, qwen2.*qwen3.*gemma3"):
            from_hf_config({"model_type": model_type, "architectures": ["X"]})
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'.*gemma-3-1b"):
        ModelConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        from_hf_config({**LLAMA_V4, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_a_cast_model_keeps_its_rope_frequencies_in_float32(cast):
    """model.to(torch.bfloat16) rounded the RoPE frequency buffers to 8 significant bits (0.316228 became
    0.316406), which no config or exported file can say: every reader computes them in float32, and the
    demo's 4-bit export failed its read-back by that much. A cast now moves them and keeps their bits."""
    from minilora.models.loader import build_tiny, tiny_config
    from minilora.models.transformer import rope_inv_freq

    model = build_tiny()
    model = {"to": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half()}[
        cast
    ](model)
    cfg = tiny_config(None)
    assert next(model.parameters()).dtype != torch.float32
    assert model.inv_freq_global.dtype == torch.float32
    assert torch.equal(model.inv_freq_global, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    assert torch.equal(model.inv_freq_local, rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, None))
