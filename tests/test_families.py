"""Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma 3's multimodal checkpoints against transformers, PEFT and
bitsandbytes (the oracles), with tiny random models built here and saved with save_pretrained.

Per family (each family's logits: tests/test_model_parity.py): greedy generation with and without
the KV cache equal to transformers.generate; NF4 quantize-on-load bytes equal to
bitsandbytes' quantize_4bit; our adapter loaded by PEFT and PEFT's loaded by us (equal logits);
the merged export loaded by transformers (equal logits). Gemma3ForConditionalGeneration in both key
layouts: our adapter applies with PEFT to the multimodal model, and the merged export loads as the
multimodal class with its vision tower unchanged.
"""

import json
import os

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open
from safetensors.torch import save_file

import minilora.export.merge as E  # noqa: E402
from minilora.export.hf_checkpoint import write_checkpoint  # noqa: E402
from minilora.lora.adapter import load_adapter, save_adapter  # noqa: E402
from minilora.lora.surgery import apply_lora, lora_modules  # noqa: E402
from minilora.models.config import FULL, SLIDING  # noqa: E402
from minilora.models.generate import generate  # noqa: E402
from minilora.models.hf_config import from_hf_config  # noqa: E402
from minilora.models.loader import load_model  # noqa: E402
from minilora.quant.linear import NF4Linear  # noqa: E402

V = 97
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@st.composite
def family_configs(draw, family=None):
    """The config fields that differ between the families, drawn on purpose."""
    family = family or draw(st.sampled_from(sorted(CLASSES)))
    hkv = draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(1, 3))
    kw = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=draw(st.sampled_from([40, 64])),
        num_hidden_layers=n_layers,
        num_attention_heads=hkv * draw(st.sampled_from([1, 2])),
        num_key_value_heads=hkv,
        tie_word_embeddings=draw(st.booleans()),
        initializer_range=0.15,
        rope_theta=draw(st.sampled_from([100.0, 1e4, 1e6])),
        rms_norm_eps=1e-6,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        attn_implementation="eager",
    )
    window = draw(st.one_of(st.none(), st.integers(2, 6)))
    if family == "llama":  # the reference block, with its optional biases
        kw.update(
            attention_bias=draw(st.booleans()),
            mlp_bias=draw(st.booleans()),
            head_dim=draw(st.sampled_from([None, 8, 24])),
        )
    elif family == "mistral":
        kw.update(sliding_window=window, head_dim=draw(st.sampled_from([None, 8, 24])))
    else:  # Qwen: the window covers layers max_window_layers.. (transformers 4.x keys)
        kw.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=draw(st.integers(0, n_layers)),
        )
    if family == "qwen3":  # head_dim independent of D / H; attention_bias on all four projections
        kw.update(head_dim=draw(st.sampled_from([8, 16, 24])), attention_bias=draw(st.booleans()))
    return family, kw


def make_hf(family, kw, seed=0):
    """A transformers model with random norms and biases (their inits are 1 and 0: a bug there would hide)."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    torch.manual_seed(seed)
    hf = model_cls(cfg_cls(**kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf.eval()


def ours_from(hf, path):
    hf.save_pretrained(path)
    return load_model(str(path), quantize=None, dtype=torch.float32)[0]


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "logits", out)


# ------------------------------------------------------------------------------- generation
@settings(max_examples=6, deadline=None)  # 30-token generations, three ways each: about 1 s an example
@given(fk=family_configs(), seed=st.integers(0, 1000), n=st.integers(1, 8))
def test_greedy_generation_with_and_without_cache_equals_transformers(tmp_path_factory, fk, seed, n):
    family, kw = fk
    hf = make_hf(family, kw, seed)
    ours = ours_from(hf, tmp_path_factory.mktemp("gen"))
    prompt = torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    cached = generate(ours, [prompt], 30, use_cache=True)
    assert generate(ours, [prompt], 30, use_cache=False) == cached
    ref = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, n, dtype=torch.long), max_new_tokens=30, do_sample=False
    )[0, n:].tolist()
    assert cached == [ref]


# ------------------------------------------------------------------------------- presets
HUB_CONFIGS = {  # the hub's config.json (transformers 4.x dialect) of the repos two presets mirror
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_presets_equal_the_hub_config_they_mirror(name):
    from dataclasses import asdict

    from minilora.models.config import ModelConfig

    def model_fields(cfg):
        return {k: v for k, v in asdict(cfg).items() if k not in ("name", "hf_repo", "source_architecture")}

    assert model_fields(ModelConfig.from_name(name)) == model_fields(from_hf_config(HUB_CONFIGS[name]))


# ------------------------------------------------------------------------------- NF4 on load
@pytest.mark.parametrize("family", sorted(CLASSES))
def test_nf4_quantize_on_load_bytes_equal_bitsandbytes(tmp_path, family):
    import bitsandbytes.functional as bnbf

    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        initializer_range=0.15,
    )  # 96 * 64: blocks span rows
    hf = make_hf(family, kw, seed=3)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), quantize="nf4", dtype=torch.float32)
    dense = dict(hf.named_parameters())
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 7 * hf.config.num_hidden_layers
    for name, mod in quantized.items():
        packed, state = mod.weight_nf4.to_bnb()
        ref, ref_state = bnbf.quantize_4bit(
            dense[name + ".weight"].detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(packed, ref), name
        assert torch.equal(state.absmax, ref_state.absmax) and state.offset.item() == ref_state.offset.item()
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        if mod.bias is not None:  # biases (Qwen2's q/k/v) stay dense
            assert torch.equal(mod.bias, dense[name + ".bias"])


# ------------------------------------------------------------------------------- adapters both ways
def _randomize_lora_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


@settings(max_examples=6, deadline=None)  # each example saves, loads and exports in three libraries: about 1 s
@given(fk=family_configs(), r=st.integers(1, 4), seed=st.integers(0, 100))
def test_adapters_both_ways_and_merged_export(tmp_path_factory, fk, r, seed):
    family, kw = fk
    tmp = tmp_path_factory.mktemp("ad")
    hf = make_hf(family, kw, seed)
    ours = ours_from(hf, tmp / "base")
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))
    # ours -> PEFT
    apply_lora(ours, "all-linear", r=r, alpha=2 * r, dropout=0.0, verbose=False)
    _randomize_lora_b(ours, seed)
    want = hf_logits(ours, ids)
    save_adapter(ours, str(tmp / "ours"), str(tmp / "base"))
    peft = PeftModel.from_pretrained(make_hf(family, kw, seed), str(tmp / "ours")).eval()
    assert rel_err(want, hf_logits(peft, ids)) < 1e-5
    # PEFT -> ours
    pm = get_peft_model(
        make_hf(family, kw, seed), LoraConfig(r=r, lora_alpha=3, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    pm.save_pretrained(str(tmp / "peft"))
    fresh = load_model(str(tmp / "base"), quantize=None, dtype=torch.float32)[0]
    load_adapter(fresh, str(tmp / "peft"))
    assert rel_err(hf_logits(pm, ids), hf_logits(fresh, ids)) < 1e-5
    # merged export -> transformers, as the family's own class
    E.merge_to_dense(ours, torch.float32)
    out = str(tmp / "merged")
    write_checkpoint(out, E.dense_tensors(ours, torch.float32), E.to_hf_config(ours.config, None, torch.float32))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == CLASSES[family][1]
    assert rel_err(want, hf_logits(back, ids)) < 1e-5


# ------------------------------------------------------------------------------- Gemma 3 multimodal
TEXT = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=4,
    layer_types=[SLIDING, FULL],
    initializer_range=0.1,
)
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
V5 = {
    "language_model.model.": "model.language_model.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "language_model.lm_head.": "lm_head.",
}


def _read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def multimodal_checkpoint(path, layout):
    """A tiny Gemma3ForConditionalGeneration saved in the transformers-4 or the transformers-5 key layout."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(
        text_config=TEXT,
        vision_config=VISION,
        mm_tokens_per_image=4,
        boi_token_index=290,
        eoi_token_index=291,
        image_token_index=292,
    )
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(path)
    tensors = _read_all(os.path.join(path, "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in tensors)  # what save_pretrained writes
    if layout == "v5":
        renamed = {}
        for k, v in tensors.items():
            old = next((o for o in V5 if k.startswith(o)), None)
            renamed[V5[old] + k[len(old) :] if old else k] = v
        save_file(renamed, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return _read_all(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_gemma3_multimodal_adapter_applies_in_peft_and_export_stays_multimodal(tmp_path, layout):
    base = str(tmp_path / "base")
    source = multimodal_checkpoint(base, layout)
    ours, _ = load_model(base, quantize=None, dtype=torch.float32)
    prefix = "language_model.model." if layout == "v4" else "model.language_model."
    assert ours.config.source_prefix == prefix
    apply_lora(ours, "all-linear", r=2, alpha=4, dropout=0.0, verbose=False)
    _randomize_lora_b(ours, 1)
    ids = torch.randint(0, 290, (2, 9), generator=torch.Generator().manual_seed(0))
    want = hf_logits(ours, ids)
    adapter = str(tmp_path / "adapter")
    save_adapter(ours, adapter, base)
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model." + prefix + "layers.") for k in f.keys())
    # PEFT applies it to the original multimodal model: the text logits equal ours
    mm = transformers.Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    plain = hf_logits(mm, ids)
    peft = PeftModel.from_pretrained(mm, adapter).eval()
    wrapped = [n for n, m in peft.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 7 * TEXT["num_hidden_layers"] and not any("vision" in n for n in wrapped)
    got = hf_logits(peft, ids)
    assert rel_err(plain, got) > 1e-3  # the adapter did change the model
    assert rel_err(want, got) < 1e-5
    # and we load it back onto a fresh model, and PEFT's own adapter for the multimodal model too
    fresh = load_model(base, quantize=None, dtype=torch.float32)[0]
    load_adapter(fresh, adapter)
    assert rel_err(want, hf_logits(fresh, ids)) < 1e-5
    mm = transformers.Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(
        mm,
        LoraConfig(
            r=2, lora_alpha=3, target_modules=r".*language_model.*\.(q_proj|down_proj)", init_lora_weights=False
        ),
    ).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = load_model(base, quantize=None, dtype=torch.float32)[0]
    load_adapter(fresh, str(tmp_path / "peft"))
    assert rel_err(hf_logits(pm, ids), hf_logits(fresh, ids)) < 1e-5
    # merged export: the multimodal class, vision tower and projector byte-identical, text logits equal
    out = str(tmp_path / "merged")
    E.export_adapter(adapter, out, dtype="float32", model_name=base, merge_base="original", log=lambda *a: None)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Gemma3ForConditionalGeneration"]
    exported = _read_all(os.path.join(out, "model.safetensors"))
    vision = [k for k in source if "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and all(torch.equal(exported[k], source[k]) for k in vision)
    assert set(exported) == set(source)  # the source's own layout, nothing lost or added
    back = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Gemma3ForConditionalGeneration"
    assert rel_err(want, hf_logits(back, ids)) < 1e-5
