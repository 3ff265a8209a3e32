"""The loader: multimodal Gemma 3 prefixes, quantize-on-load == quantize-after-load (NF4 bytes),
the `tiny` preset, hub download arguments, and one clear sentence for every user error."""

import json
import os

import huggingface_hub  # noqa: E402
import pytest
import torch
from huggingface_hub import errors as hub_errors  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (  # noqa: E402  # noqa: E402
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from minilora.models.config import FULL, SLIDING  # noqa: E402
from minilora.models.loader import ModelLoadError, load_model, quantize_linears  # noqa: E402
from minilora.models.presets import PRESETS  # noqa: E402

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


def _read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    hf.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("layout", ["transformers-4 (language_model.model.)", "transformers-5 (model.language_model.)"])
def test_gemma3_multimodal_checkpoint_loads_text_part(tmp_path, layout):
    torch.manual_seed(0)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = Gemma3Config(
        text_config=TEXT,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=290,
        eoi_token_index=291,
        image_token_index=292,
    )
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = _read_all(path)
    assert any(k.startswith("vision_tower.") for k in tensors)  # vision tensors must be skipped
    if layout.startswith("transformers-5"):
        ren = {
            "language_model.model.": "model.language_model.",
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        }
        out = {}
        for k, v in tensors.items():
            for old, new in ren.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            out[k] = v
        save_file(out, path)
    ours, _ = load_model(str(tmp_path), quantize=None, dtype=torch.float32)
    ids = torch.randint(0, 290, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert ((ref - ours(ids)).abs().max() / ref.abs().max()).item() < 1e-5


@settings(max_examples=5)  # each example writes a checkpoint and loads it twice, quantizing every linear
@given(blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans(), sharded=st.booleans())
def test_quantize_on_load_equals_quantize_after_full_load(tmp_path_factory, blocksize, double_quant, sharded):
    tmp = tmp_path_factory.mktemp("q")
    torch.manual_seed(1)
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**TEXT)).to(torch.bfloat16)
    hf.save_pretrained(tmp, max_shard_size="20KB" if sharded else "5GB")
    streamed, _ = load_model(
        str(tmp), quantize="nf4", dtype=torch.bfloat16, blocksize=blocksize, double_quant=double_quant
    )
    dense, _ = load_model(str(tmp), quantize=None, dtype=torch.bfloat16)
    after = quantize_linears(dense, blocksize, double_quant)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    n_packed = 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        n_packed += k.endswith("weight_packed")
    assert n_packed == 7 * TEXT["num_hidden_layers"]  # q k v o gate up down, every layer
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16  # not quantized
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids), after(ids), rtol=0, atol=0)


def test_tiny_is_seeded_and_matches_the_bundled_tokenizer():
    a, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    b, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    if tok is not None:
        assert a.config.vocab_size == tok.vocab_size and a.config.eos_token_ids == tuple(tok.eos_ids)
    state = torch.random.get_rng_state()
    load_model("tiny", quantize="nf4")
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_preset_downloads_only_needed_files_with_token(monkeypatch, llama_dir):
    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    model, _ = load_model("llama-3.2-1b", quantize=None, dtype=torch.float32)
    assert seen["repo_id"] == "meta-llama/Llama-3.2-1B" and seen["token"] == "hf_test"
    assert set(seen["allow_patterns"]) == {"*.safetensors", "*.json", "tokenizer*", "*.jinja"}
    assert model.config.num_hidden_layers == 2  # the downloaded config.json wins over the preset


def _hub_error(cls, msg):
    try:
        import httpx

        return cls(msg, response=httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/x")))
    except Exception:  # constructor signatures differ across huggingface_hub versions
        e = cls.__new__(cls)
        Exception.__init__(e, msg)
        return e


@pytest.mark.parametrize(
    "exc,pattern",
    [
        (
            lambda: _hub_error(hub_errors.GatedRepoError, "403 gated"),
            r"'google/gemma-3-1b-pt' is a gated model: accept its license on "
            r"https://huggingface.co/google/gemma-3-1b-pt and set HF_TOKEN",
        ),
        (lambda: _hub_error(hub_errors.RepositoryNotFoundError, "404"), r"was not found on the Hugging Face hub"),
        (
            lambda: hub_errors.LocalEntryNotFoundError("offline"),
            r"is not in the local cache .* could not be downloaded \(no network, or HF_HUB_OFFLINE=1\)",
        ),
        (lambda: ConnectionError("unreachable"), r"downloading 'google/gemma-3-1b-pt' .* check the network connection"),
    ],
)
def test_hub_errors_become_one_sentence(monkeypatch, exc, pattern):
    def fake(repo_id, **kw):
        raise exc()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model("gemma-3-1b")
    assert info.value.__cause__ is None and str(info.value).count(". ") == 0


def test_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    """Real huggingface_hub call in offline mode (conftest sets HF_HUB_OFFLINE=1), empty cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="is not in the local cache"):
        load_model("someone/some-model")


def test_unknown_name_lists_presets():
    with pytest.raises(ModelLoadError, match="'not a model' is neither a local folder.*") as info:
        load_model("not a model")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(ModelLoadError, match="quantize='int8' is not supported"):
        load_model("tiny", quantize="int8")


def _rewrite(path, fn):
    tensors = _read_all(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_unexpected_and_misshaped_tensors_are_named(llama_dir):
    path = str(llama_dir / "model.safetensors")
    original = _read_all(path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"is missing tensors model.layers.1.mlp.up_proj.weight; download"):
        load_model(str(llama_dir), quantize=None)
    save_file({**original, "model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelLoadError, match=r"tensors this llama model does not use: model.layers.0.mlp.extra_proj"):
        load_model(str(llama_dir), quantize=None)
    save_file(original, path)
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(
        ModelLoadError,
        match=r"tensor model.layers.0.mlp.down_proj.weight in model.safetensors has "
        r"shape \(32, 48\) but config.json implies \(32, 40\)",
    ):
        load_model(str(llama_dir), quantize=None)
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    with pytest.raises(ModelLoadError, match=r"config.json: model_type 'mixtral' .* is not supported"):
        load_model(str(llama_dir))


@pytest.mark.parametrize("damage", ["truncate", "garbage header", "empty"])
def test_truncated_or_corrupt_safetensors(llama_dir, damage):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) - 100], "garbage header": b"\xff" * 16 + data[16:], "empty": b""}[damage]
    )
    with pytest.raises(ModelLoadError, match=r"model.safetensors is truncated or corrupt .*; delete it and download"):
        load_model(str(llama_dir), quantize=None)


def test_missing_files(llama_dir, tmp_path_factory):
    os.remove(llama_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"has no \*.safetensors weights"):
        load_model(str(llama_dir))
    os.remove(llama_dir / "config.json")
    with pytest.raises(ModelLoadError, match=r"has no config.json"):
        load_model(str(llama_dir))
    sharded = tmp_path_factory.mktemp("s")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    ).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[1]
    os.remove(sharded / shard)
    with pytest.raises(ModelLoadError, match=f"shard .*{shard} listed in .*index.json is missing"):
        load_model(str(sharded))


def test_loaded_model_does_not_depend_on_the_checkpoint_file(llama_dir):
    """Kept tensors are copied out of the file mapping: rewriting the file in place (same inode,
    as saving over it does) must not crash (SIGBUS) or change a loaded model."""
    model, _ = load_model(str(llama_dir), quantize=None, dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        with open(llama_dir / "model.safetensors", "r+b") as f:
            f.truncate(0)
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
