"""apply_lora, merge_lora and set_adapter refuse what would leave a broken or silently wrong model, in one
sentence and before the model changes: LoRA applied again on modules that have it, settings no layer can
take (checked for every target first), a default adapter after named ones, merging while a named adapter
is active. What they accept keeps working: a second apply_lora adds LoRA to new modules and leaves the
first adapter's weights (and named adapters) as they were; new LoRA layers take the model's
train / eval mode; set_adapter(model, "default") switches back on a model with named adapters only.

The references are independent computations on the same weights: the model before the call, the base
under lora_disabled, one adapter loaded alone as the default.
"""

import math

import pytest
import torch

from minilora.lora import (
    adapter_names,
    apply_lora,
    load_adapter,
    lora_disabled,
    merge_lora,
    save_adapter,
    set_adapter,
)
from minilora.lora.layers import AdapterError, LoRALinear
from minilora.lora.multi import NamedLoRALinear
from minilora.lora.surgery import lora_modules, parameter_counts, select_targets, unmerge_lora
from minilora.models import load_model

IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
LORA = dict(r=4, alpha=8, dropout=0.0, seed=0, verbose=False)


def tiny(targets="all-linear", **kw):
    """The tiny preset in float32, in eval mode (as load_model returns it), with LoRA on `targets` (None: none)."""
    model = load_model("tiny", quantize=None, dtype=torch.float32)[0]
    if targets is not None:
        apply_lora(model, targets, **{**LORA, **kw})
    return model


def randomize(model, seed):
    """Nonzero LoRA weights (B starts at zero), so that every adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def adapter_dir(tmp_path, name, targets="all-linear", seed=1, **kw):
    model = tiny(targets, **kw)
    randomize(model, seed)
    return save_adapter(model, str(tmp_path / name), "tiny")


def snapshot(model):
    """Everything a refused call must leave as it was: modules, parameters and their requires_grad, modes."""
    return (
        [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for n, (t, grad) in before[1].items():
        assert torch.equal(t, after[1][n][0]) and grad == after[1][n][1], n


def one_sentence(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg


def out(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw)


# --- apply_lora twice ----------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"], r".*\.v_proj", ["model.layers.1.mlp.up_proj"]])
def test_lora_again_on_adapted_modules_is_refused_and_changes_nothing(targets):
    model = tiny()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"already has LoRA layers on model\.layers\.") as e:
        apply_lora(model, targets, **LORA)
    one_sentence(e)
    assert_unchanged(before, snapshot(model))
    assert out(model).isfinite().all()  # before the fix the model's own lora_A / lora_B were wrapped


def test_linear_selection_never_includes_an_adapters_own_linears():
    model = tiny()
    names = select_targets(model, ".*")
    assert len(names) == 29 and "lm_head" in names  # 28 LoRA layers (one module each) and the head
    assert not [n for n in names if n.split(".")[-1] in ("lora_A", "lora_B", "base")]
    with pytest.raises(AdapterError, match=r"\['lora_A'\] match no linear module") as e:
        apply_lora(model, ["lora_A"], **LORA)
    assert "lora_A" not in str(e.value).split("names are ")[1]  # the names it lists are the model's


def test_lora_on_new_modules_keeps_the_first_adapter_training(tmp_path):
    model = tiny()
    randomize(model, 1)
    first = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable = parameter_counts(model)[0]
    logits = out(model)
    report = apply_lora(model, ["lm_head"], **LORA)
    assert report["modules"] == ["lm_head"]
    head = model.lm_head
    assert report["trainable"] == trainable + head.lora_A.weight.numel() + head.lora_B.weight.numel()
    for n, p in model.named_parameters():  # the first adapter's weights: the same values, still trained
        if n in first:
            assert p.requires_grad and torch.equal(p, first[n]), n
    assert torch.equal(out(model), logits)  # the new B is zero
    randomize(model, 2)
    want = out(model)
    again = tiny(None)
    load_adapter(again, save_adapter(model, str(tmp_path / "both"), "tiny"))
    assert torch.equal(out(again), want)


def test_lora_on_new_modules_with_other_settings_is_refused():
    """One adapter_config.json holds one dropout / rsLoRA / DoRA / init: save_adapter would refuse later."""
    model = tiny()
    before = snapshot(model)
    for kw in (dict(dropout=0.1), dict(use_rslora=True), dict(use_dora=True), dict(init="gaussian")):
        with pytest.raises(AdapterError, match="dropout=0.0; pass the same") as e:
            apply_lora(model, ["lm_head"], **{**LORA, **kw})
        one_sentence(e)
        assert_unchanged(before, snapshot(model))


def test_lora_on_modules_that_only_named_adapters_target(tmp_path):
    """The host keeps its named adapters and takes the default adapter beside them."""
    model = tiny(["q_proj"])
    randomize(model, 3)
    load_adapter(model, adapter_dir(tmp_path, "a"), name="a")
    host = "model.layers.0.self_attn.k_proj"
    assert isinstance(model.get_submodule(host), NamedLoRALinear)
    rows = [1, -1]
    want = {"default": out(model), "mixed": out(model, adapter_ids=rows)}
    set_adapter(model, "a")
    want["a"] = out(model)
    set_adapter(model, "default")

    apply_lora(model, ["k_proj"], **LORA)
    layer = model.get_submodule(host)
    assert isinstance(layer, LoRALinear) and "a" in layer.adapters and not layer.training
    assert adapter_names(model) == ["default", "a"]
    assert len(lora_modules(model)) == 8
    assert torch.equal(out(model), want["default"])  # the new B is zero
    assert torch.equal(out(model, adapter_ids=rows), want["mixed"])
    set_adapter(model, "a")
    assert torch.equal(out(model), want["a"])
    mixed_new = out(model, adapter_ids=[0, 0])  # every layer reads the one table, new ones too
    set_adapter(model, "default")
    assert torch.equal(mixed_new, want["default"])


def test_default_adapter_after_named_ones_is_refused(tmp_path):
    """Its keys would be the wrapper's inner `.base` linears, which no loader reads."""
    model = tiny(None)
    load_adapter(model, adapter_dir(tmp_path, "a"), name="a")
    before = snapshot(model)
    with pytest.raises(
        AdapterError, match=r"named adapters \['a'\] but no default adapter, which must come first"
    ) as e:
        apply_lora(model, **LORA)
    one_sentence(e)
    assert_unchanged(before, snapshot(model))
    assert not [n for n, _ in model.named_modules() if n.endswith(".base.lora_A")]


# --- train / eval mode -----------------------------------------------------------------------------------
def test_new_lora_layers_take_the_models_mode(tmp_path):
    assert not any(m.training for m in lora_modules(tiny()).values())
    model = load_model("tiny", quantize=None, dtype=torch.float32)[0].train()
    apply_lora(model, **LORA)
    assert all(m.training for m in lora_modules(model).values())
    # through load_adapter, with LoRA dropout: a model in eval mode computes the same twice
    model = tiny(None)
    load_adapter(model, adapter_dir(tmp_path, "drop", dropout=0.1))
    assert not model.model.layers[0].self_attn.q_proj.training
    assert torch.equal(out(model), out(model))


# --- merge with named adapters -----------------------------------------------------------------------------
@pytest.fixture()
def two_adapters(tmp_path):
    """A model with a default adapter and "a" by name, and the logits of "a" loaded alone."""
    model = tiny()
    randomize(model, 4)
    path = adapter_dir(tmp_path, "a", seed=5)
    load_adapter(model, path, name="a")
    alone = tiny(None)
    load_adapter(alone, path)
    return model, out(alone)


def test_merge_then_named_adapter_is_refused(two_adapters):
    model, want_a = two_adapters
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(
        AdapterError, match=r"set_adapter\(model, 'a'\) needs the default adapter unmerged.*unmerge_lora"
    ) as e:
        set_adapter(model, "a")
    one_sentence(e)
    assert_unchanged(before, snapshot(model))
    set_adapter(model, "default")  # the merged adapter itself stays usable
    unmerge_lora(model)
    set_adapter(model, "a")
    torch.testing.assert_close(out(model), want_a, rtol=1e-5, atol=1e-5)


def test_named_adapter_then_merge_is_refused(two_adapters):
    model, want_a = two_adapters
    set_adapter(model, "a")
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"active adapter 'a'.*set_adapter\(model, 'default'\) first") as e:
        merge_lora(model)
    one_sentence(e)
    assert_unchanged(before, snapshot(model))
    assert not any(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(out(model), want_a, rtol=1e-5, atol=1e-5)
    # a layer merged on its own: the forward refuses rather than add a to the merged default
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match=r"Adapter 'a' is active but merge_lora folded.*unmerge_lora") as e:
        out(model)
    one_sentence(e)


# --- every argument checked before any change -------------------------------------------------------------
LAST = "model.layers.3.mlp.down_proj"  # the last target: before the fix 27 layers changed first
BAD = [
    (dict(ranks={LAST: 0}), r"ranks\['model\.layers\.3\.mlp\.down_proj'\]=0 is invalid"),
    (dict(ranks={LAST: 2.5}), r"ranks\[.*\]=2\.5 is invalid"),
    (dict(ranks={"down_proj": 2}), r"ranks names \['down_proj'\].*full name"),
    (dict(ranks=8), "ranks=8 is invalid"),
    (dict(alphas={LAST: "x"}), r"alphas\['model\.layers\.3\.mlp\.down_proj'\]='x' is invalid"),
    (dict(alphas={LAST: math.inf}), r"alphas\[.*\]=inf is invalid"),
    (dict(alpha=math.nan), "alpha=nan is invalid; pass a finite number"),
    (dict(alpha="32"), "alpha='32' is invalid"),
    (dict(dropout=1.0), r"dropout=1\.0 is invalid"),
    (dict(dropout=math.nan), "dropout=nan is invalid"),
    (dict(dropout="0.1"), "dropout='0.1' is invalid"),
    (dict(r=0), "r=0 is invalid"),
    (dict(lora_compute="bf16"), "lora_compute='bf16' is invalid"),
    (dict(init="nope"), "init='nope' is unknown"),
    (dict(init="loftq", loftq_iters=0), "loftq_iters=0 is invalid"),
    (dict(init="pissa", ranks={LAST: 1000}), r"LoRA on model\.layers\.3\.mlp\.down_proj: init 'pissa'.*at most"),
    (dict(targets=None), "targets=None is invalid; pass 'all-linear'"),
    (dict(targets=3), "targets=3 is invalid"),
    (dict(targets=["q_proj", 3]), r"targets=\['q_proj', 3\] is invalid"),
    (dict(targets="(q_proj"), "not a valid regular expression"),
    (dict(targets=["nope"]), r"\['nope'\] match no linear module"),
]


@pytest.mark.parametrize("kw, pattern", BAD, ids=[str(kw) for kw, _ in BAD])
def test_apply_lora_checks_everything_before_it_changes_the_model(kw, pattern):
    model = tiny(None)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=pattern) as e:
        apply_lora(model, **{**LORA, **kw})
    one_sentence(e)
    assert_unchanged(before, snapshot(model))


# --- the documented API -----------------------------------------------------------------------------------
def test_unmerge_lora_is_exported_where_the_messages_point():
    import minilora.lora

    assert getattr(minilora.lora, "unmerge_lora", None) is unmerge_lora and "unmerge_lora" in minilora.lora.__all__


def test_set_adapter_default_switches_back_to_the_base_without_a_default_adapter(tmp_path):
    model = tiny(None)
    base = out(model)
    load_adapter(model, adapter_dir(tmp_path, "a"), name="a")
    set_adapter(model, "a")
    assert not torch.equal(out(model), base)
    set_adapter(model, "default")  # PEFT's name for the model's own adapter; here: the base alone
    assert torch.equal(out(model), base)
    with lora_disabled(model):
        assert torch.equal(out(model), base)
    with pytest.raises(AdapterError, match="No adapter named 'b'"):
        set_adapter(model, "b")
