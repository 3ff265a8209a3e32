"""Adapters in PEFT's layout: ours load in PEFT (same logits), PEFT's load here (same logits), on a
transformers Llama and on minilora's own model loaded from the same save_pretrained folder; atomic
writes; one clear error per misfit."""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import minilora.lora.adapter as adapter_mod
from minilora.lora.adapter import AdapterError, load_adapter, save_adapter
from minilora.lora.adapter_files import PEFT_DEFAULTS
from minilora.lora.surgery import apply_lora, lora_modules, lora_state_dict


def tiny_llama(layers=2, hidden=32, seed=0):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def randomize_params(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)  # B != 0: the adapter changes the logits


IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 17], [4, 4, 8, 15, 16, 23, 42]])


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


CASES = [
    dict(targets="all-linear"),
    dict(targets=["q_proj", "v_proj"], use_rslora=True),
    dict(targets=["o_proj", "down_proj"], use_dora=True),
    dict(targets="all-linear", use_dora=True, init="gaussian"),
]


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft(tmp_path, case):
    hf = tiny_llama()
    ours = copy.deepcopy(hf)
    kw = dict(case)
    apply_lora(ours, kw.pop("targets"), r=4, alpha=8, dropout=0.05, verbose=False, **kw)
    randomize_params(lora_state_dict(ours).values(), 1)
    ours.eval()
    save_adapter(ours, str(tmp_path / "ad"), "tiny-llama")
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm), logits(ours), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(pm), logits(hf), atol=1e-3)  # the adapter is really applied
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    assert cfg["init_lora_weights"] == ("gaussian" if kw.get("init") == "gaussian" else True)


def test_config_has_every_field_peft_writes(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "p"))
    theirs = json.load(open(tmp_path / "p" / "adapter_config.json"))
    assert set(theirs) - {"peft_version"} == set(PEFT_DEFAULTS)
    ours = tiny_llama()
    apply_lora(ours, ["q_proj"], r=4, alpha=8, dropout=0.0, verbose=False)
    save_adapter(ours, str(tmp_path / "o"), None)
    mine = json.load(open(tmp_path / "o" / "adapter_config.json"))
    assert {k: v for k, v in theirs.items() if k != "peft_version"} == mine  # the same file, field by field


@pytest.mark.parametrize(
    "kw",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=["q_proj", "k_proj", "gate_proj"], use_dora=True),
        dict(
            target_modules=["q_proj", "up_proj"],
            use_rslora=True,
            rank_pattern={"up_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        ),
    ],
)
def test_peft_adapter_loads_here(tmp_path, kw):
    hf = tiny_llama()
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, **kw))
    randomize_params([p for p in pm.parameters() if p.requires_grad], 2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(hf)
    load_adapter(ours, str(tmp_path / "p"))
    ours.eval()
    torch.testing.assert_close(logits(ours), logits(pm), rtol=1e-5, atol=1e-5)
    if "rank_pattern" in kw:
        mods = lora_modules(ours)
        assert mods["model.layers.0.mlp.up_proj"].r == 2 and mods["model.layers.1.self_attn.q_proj"].alpha == 3


def test_load_into_model_that_already_has_lora(tmp_path):
    src = tiny_llama()
    apply_lora(src, ["q_proj", "v_proj"], r=4, verbose=False)
    randomize_params(lora_state_dict(src).values(), 3)
    save_adapter(src, str(tmp_path / "a"), "x")
    dst = tiny_llama()
    apply_lora(dst, ["q_proj", "v_proj"], r=4, verbose=False)
    load_adapter(dst, str(tmp_path / "a"))
    a, b = lora_state_dict(src), lora_state_dict(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _minilora_model(tmp_path, hf):
    from minilora.models import loader

    hf.save_pretrained(str(tmp_path / "base"))
    model, _ = loader.load_model(str(tmp_path / "base"), quantize=None, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_minilora_model_adapter_round_trip_with_peft(tmp_path, use_dora):
    """Adapter trained on minilora's model -> PEFT on the transformers model: same logits; and back."""
    hf = tiny_llama()
    ours = _minilora_model(tmp_path, hf)
    torch.testing.assert_close(logits(ours), logits(hf), rtol=1e-5, atol=1e-5)  # same base
    apply_lora(ours, "all-linear", r=4, alpha=8, use_dora=use_dora, verbose=False)
    randomize_params(lora_state_dict(ours).values(), 4)
    ours.eval()
    save_adapter(ours, str(tmp_path / "ours"), str(tmp_path / "base"))
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(pm), logits(ours), rtol=1e-5, atol=1e-5)

    pm2 = get_peft_model(
        copy.deepcopy(hf),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=use_dora),
    )
    randomize_params([p for p in pm2.parameters() if p.requires_grad], 5)
    pm2.eval()
    pm2.save_pretrained(str(tmp_path / "theirs"))
    ours2 = _minilora_model(tmp_path, hf)
    load_adapter(ours2, str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(ours2.eval()), logits(pm2), rtol=1e-5, atol=1e-5)


def _saved(tmp_path, name="a", **kw):
    m = tiny_llama(**kw)
    apply_lora(m, ["q_proj", "v_proj"], r=4, verbose=False)
    return m, save_adapter(m, str(tmp_path / name), "tiny")


def test_atomic_write_keeps_old_adapter_on_failure(tmp_path, monkeypatch):
    m, out = _saved(tmp_path)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    randomize_params(lora_state_dict(m).values(), 6)

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(m, out, "tiny")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind
    monkeypatch.undo()
    save_adapter(m, out, "tiny")  # a successful save replaces it
    assert open(os.path.join(out, "adapter_model.safetensors"), "rb").read() != before["adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["a"]


def _one_sentence(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")


def test_shape_mismatch_is_one_clear_error(tmp_path):
    _, out = _saved(tmp_path, hidden=48)
    with pytest.raises(AdapterError, match="shape") as e:
        load_adapter(tiny_llama(hidden=32), out)
    _one_sentence(e)


def test_module_the_model_lacks_is_one_clear_error(tmp_path):
    _, out = _saved(tmp_path, layers=3)
    with pytest.raises(AdapterError, match="model.layers.2.*different base \\(tiny\\)") as e:
        load_adapter(tiny_llama(layers=2), out)
    _one_sentence(e)


def test_strict_missing_layers_and_partial_load(tmp_path):
    _, out = _saved(tmp_path)
    m = tiny_llama()
    apply_lora(m, "all-linear", r=4, verbose=False)
    with pytest.raises(AdapterError, match="strict=False") as e:
        load_adapter(m, out)
    _one_sentence(e)
    load_adapter(m, out, strict=False)


def test_bad_adapter_files(tmp_path):
    _, out = _saved(tmp_path)
    cfg_path = os.path.join(out, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    for key, val, pattern in [("peft_type", "IA3", "only LoRA"), ("bias", "all", "bias='all'")]:
        json.dump({**cfg, key: val}, open(cfg_path, "w"))
        with pytest.raises(AdapterError, match=pattern) as e:
            load_adapter(tiny_llama(), out)
        _one_sentence(e)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist; pass a folder"):
        load_adapter(tiny_llama(), str(tmp_path / "nowhere"))
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(tiny_llama(), str(tmp_path / "b"), None)
    assert adapter_mod.AdapterError is AdapterError and issubclass(AdapterError, ValueError)


@pytest.mark.parametrize("key, value", [("r", 8), ("rank_pattern", {"q_proj": 2})])
def test_config_rank_that_disagrees_with_the_tensors_is_refused_as_peft_refuses_it(tmp_path, key, value):
    """adapter_config.json says r=8 (or a rank_pattern) but lora_A / lora_B have rank 4: PEFT refuses to
    load it; we used to load it silently, scaling by alpha / 4 against a config that says alpha / 8."""
    hf = tiny_llama()
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    pm.save_pretrained(str(tmp_path / "p"))
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(Exception, match="size mismatch"):  # the oracle
        PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "p"))
    with pytest.raises(AdapterError, match=r"rank [28] but its lora_A / lora_B have rank 4") as e:
        load_adapter(copy.deepcopy(hf), str(tmp_path / "p"))
    _one_sentence(e)
