"""generate(): greedy with and without the KV cache against transformers' generate, batched prompts
with left padding against one prompt at a time, EOS stopping, and top-p/temperature sampling
against transformers' logits processors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper  # noqa: E402

from minilora.models.config import FULL, SLIDING  # noqa: E402
from minilora.models.generate import KVCache, _nucleus_probs, generate  # noqa: E402
from minilora.models.loader import load_model  # noqa: E402


def _hf_model(family, seed, n_layers, hkv, rep, window):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=hkv * rep,
        num_key_value_heads=hkv,
        initializer_range=0.15,
        attn_implementation="eager",
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    if family == "gemma3":
        types = [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
        hf = Gemma3ForCausalLM(
            Gemma3TextConfig(
                **common, head_dim=8, sliding_window=window, layer_types=types, final_logit_softcapping=20.0
            )
        )
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return hf.eval()


def _ours(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    return load_model(str(tmp_path), quantize=None, dtype=torch.float32)[0]


@settings(max_examples=4)  # each example generates three ways: with and without the KV cache, and in transformers
@given(
    family=st.sampled_from(["gemma3", "llama"]),
    seed=st.integers(0, 1000),
    n_layers=st.integers(1, 2),
    hkv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2]),
    window=st.integers(2, 8),
    lens=st.lists(st.integers(1, 9), min_size=1, max_size=2),
)
def test_greedy_matches_transformers_with_and_without_cache(
    tmp_path_factory, family, seed, n_layers, hkv, rep, window, lens
):
    """30 greedy tokens: cached == uncached == transformers.generate (each prompt alone), and the
    left-padded batch equals each prompt alone. Generations run past the sliding window."""
    hf = _hf_model(family, seed, n_layers, hkv, rep, window)
    ours = _ours(hf, tmp_path_factory.mktemp("gen"))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in lens]
    batched = generate(ours, prompts, 30, use_cache=True)
    assert generate(ours, prompts, 30, use_cache=False) == batched
    for p, got in zip(prompts, batched):
        ref = hf.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=30,
            do_sample=False,
        )[0, len(p) :].tolist()
        assert got == ref
        assert generate(ours, [p], 30) == [got]


def test_eos_stops_each_row(tmp_path):
    hf = _hf_model("gemma3", 3, 2, 1, 2, 4)
    ours = _ours(hf, tmp_path)
    prompts = [[5, 6, 7], [9], [11, 12]]
    free = generate(ours, prompts, 12)
    eos = free[0][3]  # a token the first row emits at step 4
    stopped = generate(ours, prompts, 12, eos_ids=(eos,), pad_id=0)
    for row, full in zip(stopped, free):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert len(stopped[0]) <= 4


@settings(max_examples=8)  # each example runs transformers' logits processors beside ours
@given(V=st.integers(2, 40), temperature=st.floats(0.3, 2.0), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 99))
def test_nucleus_probs_match_transformers_warpers(V, temperature, top_p, seed):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed)) * 3
    ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    ref = torch.softmax(ref, dim=-1)
    torch.testing.assert_close(_nucleus_probs(logits, temperature, top_p), ref, rtol=1e-5, atol=1e-7)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tmp_path):
    hf = _hf_model("llama", 1, 2, 2, 1, 4)
    ours = _ours(hf, tmp_path)
    prompts = [[3, 4, 5], [8]]
    a = generate(ours, prompts, 10, temperature=1.5, seed=7)
    assert a == generate(ours, prompts, 10, temperature=1.5, seed=7)
    assert a == generate(ours, prompts, 10, temperature=1.5, seed=7, use_cache=False)
    assert a != generate(ours, prompts, 10, temperature=1.5, seed=8)  # 20 draws from ~97 tokens
    assert generate(ours, prompts, 10, temperature=1.0, top_p=1e-6, seed=1) == generate(ours, prompts, 10)


def test_generate_input_errors(tmp_path):
    model, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [[1]], 3, temperature=1.0, top_p=0.0)
    cache = KVCache(model.config, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 4 positions; 5 were requested"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_computes_logits_for_the_last_position_only(use_cache):
    """Every head call sees (B, D) hidden states: never the (B, T, V) logits of the whole prompt."""
    model, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    shapes = []
    head = model.logits_from_hidden
    model.logits_from_hidden = lambda h: shapes.append(tuple(h.shape)) or head(h)
    new = generate(model, [[5, 6, 7, 8, 9], [10, 11]], 4, use_cache=use_cache)
    assert shapes and all(s == (2, model.config.hidden_size) for s in shapes)
    del model.logits_from_hidden
    assert new == generate(model, [[5, 6, 7, 8, 9], [10, 11]], 4, use_cache=use_cache)  # same tokens


def test_generation_builds_no_autograd_graph(tmp_path):
    """generate() runs every forward without gradients, even for a model whose weights require them (a dense
    load, or LoRA in training): each call's graph and KV cache would otherwise stay alive with the outputs,
    and a server's memory grew by the model's activations on every request."""
    model = _ours(_hf_model("llama", 0, 2, 2, 1, 4), tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    generate(model, [[5, 6, 7], [8, 9]], 3)
    assert modes and not any(modes)
    assert torch.is_grad_enabled()  # and the caller's mode is back
