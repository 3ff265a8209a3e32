"""models/config.py's FAMILIES is the one home of each family's traits, checked against transformers
(the oracle) family by family.

Per family, a tiny random transformers model of that family's class, built here (CLASSES below is
this test's own knowledge, not read from the table), with random norms and biases and the family's
own config keys set away from their defaults, saved with save_pretrained. `differences` lists what
we get wrong about it:
- config.json both ways: our ModelConfig parsed from its config.json is of that family;
  to_hf_config of it names transformers' class and model_type, and transformers reads that back to
  every field of the original config; parsed again, with and without `layer_types` (the
  transformers-4.x dialect, where each family's layer rule says which layers slide), it gives back
  the same ModelConfig;
- the block: our Transformer has transformers' parameter names and shapes, and its float32 logits
  equal transformers' within 1e-5 (rel), so each trait in the entry is the family's math.
GGUF: minilora.export.gguf.ARCHS takes the arch, q/k permutation and norm shift from the entry, and
gguf's own tensor map for that arch names every tensor of the family's model.

A family added to FAMILIES without its class here fails test_every_family_is_checked, and each check
can fail: test_a_broken_entry_is_caught changes one trait of one entry at a time and expects a
difference.
"""

import dataclasses
import json
import os

import pytest
import torch
import transformers

from minilora.models.config import FAMILIES, FULL, SLIDING
from minilora.models.hf_config import from_hf_config, to_hf_config
from minilora.models.loader import load_model
from minilora.models.transformer import Transformer

V, T = 97, 10  # T longer than the sliding window: a lost window changes the logits
CLASSES = {  # family -> transformers' *ForCausalLM class
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",  # Gemma's soft-capping needs it
)
KEYS = {  # each family's own config keys, away from their defaults so that one lost on the way shows
    "llama": dict(
        mlp_bias=True,
        attention_bias=True,
        head_dim=16,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "mistral": dict(sliding_window=4, head_dim=24),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2, head_dim=24, attention_bias=True),
    "gemma3": dict(
        layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        sliding_window=4,
        head_dim=16,
        query_pre_attn_scalar=12,
        final_logit_softcapping=30.0,  # (transformers' Gemma3Attention ignores attn_logit_softcapping)
        tie_word_embeddings=True,
        rope_parameters={
            FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
            SLIDING: {"rope_type": "default", "rope_theta": 1e3},
        },
    ),
}
NOT_MODEL = ("name", "hf_repo", "source_architecture")  # where a config came from, not the model


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (transformers model, its saved folder), built once per family."""
    built = {}

    def get(family: str):
        if family not in built:
            cls = getattr(transformers, CLASSES[family])
            torch.manual_seed(0)
            hf = cls(cls.config_class(**{**COMMON, **KEYS[family]}))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # norms start at the identity, biases at 0: a lost offset or bias would hide
                for n, p in hf.named_parameters():
                    if "norm" in n or n.endswith("bias"):
                        p.add_(torch.randn(p.shape, generator=g) * 0.3)
            path = str(tmp_path_factory.mktemp(family))
            hf.save_pretrained(path)
            built[family] = hf.eval(), path
        return built[family]

    return get


def differences(family: str, hf, path: str) -> list[str]:
    """What we get wrong about the transformers checkpoint `hf` saved at `path` (see the module docstring)."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    try:
        ours = from_hf_config(raw)
    except (ValueError, KeyError) as e:
        return [f"config.json is not read: {e!r}"]
    out = [] if ours.family == family else [f"config.json reads as {ours.family}"]
    fields = [f for f in ours.__dataclass_fields__ if f not in NOT_MODEL]
    # config.json written back: transformers reads every field of the original from it
    try:
        written = json.loads(json.dumps(to_hf_config(ours, None, torch.float32)))
    except ValueError as e:
        return out + [f"config.json is not written: {e!r}"]
    if written["architectures"] != [CLASSES[family]] or written["model_type"] != hf.config.model_type:
        out.append(f"config.json names {written['architectures']} / {written['model_type']}")
    try:
        back = transformers.CONFIG_MAPPING[written["model_type"]](**written).to_dict()
    except (KeyError, ValueError, TypeError) as e:
        back = {}
        out.append(f"transformers cannot read the config.json we write: {e!r}")
    for k, v in hf.config.to_dict().items():
        # private attributes and initialization-only or version keys are not the model
        if not k.startswith("_") and k not in ("initializer_range", "transformers_version") and back.get(k) != v:
            out.append(f"config.json {k}: transformers has {v!r}, ours gives back {back.get(k)!r}")
    # and read again by us, in both dialects
    t4 = {k: v for k, v in written.items() if k != "layer_types"}
    for dialect, c in (("as written", written), ("without layer_types", t4)):
        try:
            again = from_hf_config(c)
        except (ValueError, KeyError) as e:
            out.append(f"our config.json {dialect} is not read: {e!r}")
            continue
        out += [
            f"{f} {dialect}: {getattr(again, f)!r} != {getattr(ours, f)!r}"
            for f in fields
            if getattr(again, f) != getattr(ours, f)
        ]
    # the block: transformers' parameters, transformers' logits
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Transformer(ours).state_dict().items()}
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if names != want:
        return out + [f"parameters differ: {sorted(set(names) ^ set(want)) or 'shapes'}"]
    model = load_model(path, quantize=None, dtype=torch.float32)[0]
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(hf(input_ids=ids).logits, model(ids))
    return out + ([f"logits differ from transformers' by {err:.2g} (rel)"] if not err < 1e-5 else [])


def test_every_family_is_checked():
    """A family added to FAMILIES needs its transformers class (and its own keys) here."""
    assert sorted(CLASSES) == sorted(KEYS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_reads_writes_and_runs_as_transformers_does(family, checkpoint):
    assert differences(family, *checkpoint(family)) == []


# One trait of one entry changed at a time: each must show up as a difference.
BROKEN = [
    ("llama", dict(own_keys=())),  # mlp_bias no longer read or written
    ("llama", dict(hidden_act="gelu_pytorch_tanh")),
    ("mistral", dict(layer_rule="none")),  # the window no longer read
    ("qwen2", dict(qkv_bias=False)),
    ("qwen2", dict(architecture="Qwen2Model")),
    ("qwen3", dict(qk_norm=False)),
    ("qwen3", dict(layer_rule="all")),
    ("gemma3", dict(norm_offset=0.0)),
    ("gemma3", dict(sandwich_norms=False)),
    ("gemma3", dict(embedding_scale=False)),
    ("gemma3", dict(attn_scalar=False)),
    ("gemma3", dict(local_rope=False)),
    ("gemma3", dict(layer_rule="from_layer")),
    ("gemma3", dict(model_types=("gemma3_txt",))),
]


@pytest.mark.parametrize("family,change", BROKEN, ids=[f"{f}-{next(iter(c))}" for f, c in BROKEN])
def test_a_broken_entry_is_caught(family, change, checkpoint, monkeypatch):
    hf, path = checkpoint(family)
    monkeypatch.setitem(FAMILIES, family, dataclasses.replace(FAMILIES[family], **change))
    assert differences(family, hf, path) != []


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_layout_comes_from_the_family_entry(family, checkpoint):
    gguf = pytest.importorskip("gguf")
    from minilora.export.gguf import ARCHS

    fam, spec = FAMILIES[family], ARCHS[family]
    assert (spec.arch, spec.permute_qk, spec.norm_shift) == (fam.gguf_arch, fam.gguf_permute_qk, fam.norm_offset)
    # gguf knows the arch, and its tensor map for it names every tensor of this family's model
    cfg = load_model(checkpoint(family)[1], quantize=None, dtype=torch.float32)[0].config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.gguf_arch.upper()), cfg.num_hidden_layers)
    with torch.device("meta"):
        ours = Transformer(cfg).state_dict()
    assert [n for n in ours if names.get_name(n, try_suffixes=(".weight", ".bias")) is None] == []
