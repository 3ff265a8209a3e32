"""Several adapters on one base: a mixed batch (one adapter per row, -1 the base) gives each row what its
adapter gives alone, and what PEFT's mixed batch (`adapter_names=`) gives on the same checkpoint; greedy
generation in a mixed batch equals each adapter's own; the gathered (BGMV) path equals the reference
loop; the default adapter's keys and saved files do not change; one clear sentence per misuse.

Tolerances. Two float32 computations of the same dot product of length n, in different orders, are each
within gamma_n * sum|a_i b_i| of the exact value (gamma_n = n u / (1 - n u), u = 2^-24; any order, FMA
or not), so they differ by at most twice that. For the LoRA term z = s B (A x) (A (r, K), B (M, r)):
|z_hat - z| <= s (gamma_K + gamma_R + 3u) |B| |A| |x| elementwise, with R >= r the padded rank (the
zero terms the padding adds are exact). `lora_bound` is twice that. Through the tiny models here (hidden
32, 2 layers, every block input RMS-normalized, so a block passes a relative difference on with a gain
near 1) the logits of two orders differ by at most the sum of those per-projection bounds, each at most
2 (K + R + 3) u of the activations' scale: with K <= 48, R <= 8 and 2 layers x 7 projections + lm_head,
15 * 2 * 59 * u = 1.1e-4 relative to the largest logit. LOGITS_RTOL is that number.
"""

import copy
import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from test_adapter import randomize_params, tiny_llama

import minilora.lora.mixed_term as term
import minilora.lora.multi as multi
from minilora.lora import adapter_names, delete_adapter, load_adapter, save_adapter, set_adapter
from minilora.lora.adapter import AdapterError
from minilora.lora.mixed_term import mixed_gathered, mixed_reference
from minilora.lora.multi import NamedLoRALinear
from minilora.lora.surgery import apply_lora, lora_disabled, lora_state_dict
from minilora.models.generate import generate
from minilora.models.loader import load_model
from minilora.quant.linear import NF4Linear

U = 2.0**-24  # float32 unit roundoff
LOGITS_RTOL = 15 * 2 * (48 + 8 + 3) * U  # module docstring

# The adapters: different ranks, alphas, rsLoRA, rank/alpha patterns and target modules.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(
        r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, rank_pattern={"up_proj": 2}, alpha_pattern={}
    ),
    "c": dict(r=2, lora_alpha=16, target_modules=["k_proj", "down_proj"], alpha_pattern={"layers.1.mlp.down_proj": 3}),
}
IDS = torch.tensor(
    [
        [1, 5, 9, 33, 2, 60, 17],
        [4, 4, 8, 15, 16, 23, 42],
        [7, 3, 3, 50, 11, 2, 9],
        [30, 31, 32, 33, 34, 35, 36],
        [12, 40, 6, 6, 18, 29, 1],
    ]
)
ROWS = [0, 1, 2, -1, 1]  # with names ["default"(a), "b", "c"]


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A transformers Llama saved as a checkpoint, and three PEFT adapters for it on disk."""
    tmp = tmp_path_factory.mktemp("multi")
    hf = tiny_llama(hidden=32)
    hf.save_pretrained(str(tmp / "base"))
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", **kw))
        randomize_params([p for p in pm.parameters() if p.requires_grad], 10 + i)
        pm.save_pretrained(str(tmp / name))
        dirs[name] = str(tmp / name)
    return hf, str(tmp / "base"), dirs


def ours(base_dir, dirs, default=True, quantize=None):
    """Our model from the checkpoint with a as the default adapter (or named "a"), b and c by name."""
    model = load_model(base_dir, quantize=quantize, dtype=torch.float32)[0]
    load_adapter(model, dirs["a"], name=None if default else "a")
    load_adapter(model, dirs["b"], name="b")
    load_adapter(model, dirs["c"], name="c")
    return model  # in eval mode, as load_model returns it: new LoRA layers take their base's mode


@torch.no_grad()
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_batch_equals_each_adapter_alone(setup, quantize):
    """On a dense and on an NF4 base (where the LoRA term is cast before it is added, as on one adapter)."""
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, quantize=quantize)
    assert isinstance(
        model.get_submodule("model.layers.0.self_attn.k_proj").base, NF4Linear if quantize else torch.nn.Linear
    )
    names = adapter_names(model)
    assert names == ["default", "b", "c"]
    mixed = model(IDS, adapter_ids=ROWS)
    alone = {}
    for i, name in enumerate(names):
        set_adapter(model, name)
        alone[i] = model(IDS)
    set_adapter(model, "default")
    with lora_disabled(model):
        alone[-1] = model(IDS)
    for b, a in enumerate(ROWS):
        assert rel_err(alone[a][b], mixed[b]) < LOGITS_RTOL, (b, a)
    # a base row adds exact zeros: bit for bit the base, as in a batch without adapters
    assert torch.equal(mixed[3], alone[-1][3])
    # and the adapters really differ from each other and from the base
    for i in range(3):
        assert rel_err(alone[-1], alone[i]) > 1e-2
    assert rel_err(alone[1], alone[2]) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("default", [True, False])
def test_mixed_batch_equals_peft_mixed_batch(setup, default):
    """PEFT's PeftModel with a, b, c loaded by name and `adapter_names=` per row, on the transformers model
    our model was loaded from: the same logits. Without a default, every adapter is a named one."""
    hf, base_dir, dirs = setup
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), dirs["a"], adapter_name="a")
    pm.load_adapter(dirs["b"], adapter_name="b")
    pm.load_adapter(dirs["c"], adapter_name="c")
    pm.eval()
    peft_names = ["a", "b", "c", "__base__", "b"]
    theirs = pm(IDS, adapter_names=peft_names).logits
    model = ours(base_dir, dirs, default=default)
    assert adapter_names(model) == (["default", "b", "c"] if default else ["a", "b", "c"])
    mine = model(IDS, adapter_ids=ROWS)
    assert rel_err(theirs, mine) < LOGITS_RTOL
    with pm.disable_adapter():
        base = pm(IDS).logits
    assert rel_err(theirs[:3], base[:3]) > 1e-2  # the oracle applies the adapters


@torch.no_grad()
def test_gathered_path_equals_reference_loop_on_the_model(setup, monkeypatch):
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, default=False)
    grouped = model(IDS, adapter_ids=ROWS)  # routed_forward's path
    monkeypatch.setattr(multi, "mixed_grouped", term.mixed_gathered)
    gathered = model(IDS, adapter_ids=ROWS)
    monkeypatch.setattr(multi, "mixed_grouped", mixed_reference)
    assert rel_err(model(IDS, adapter_ids=ROWS), grouped) < LOGITS_RTOL
    assert rel_err(gathered, grouped) < LOGITS_RTOL


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts the calls of multi.mixed_stacked (.n)."""
    real = multi.mixed_stacked

    def counted(*args):
        counted.n += 1
        return real(*args)

    counted.n = 0
    monkeypatch.setattr(multi, "mixed_stacked", counted)
    return counted


@torch.no_grad()
@pytest.mark.parametrize("default", [True, False])
def test_greedy_generation_in_a_mixed_batch_equals_each_alone(setup, default, stacked_calls):
    """With a default adapter the mixed steps take the grouped path; with named adapters only, the stacked
    one (few tokens per row)."""
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, default=default)
    prompts = [[1, 5, 9], [4, 4, 8, 15, 16, 23], [7], [30, 31, 32, 33], [12, 40]]  # left padding differs per row
    mixed = generate(model, prompts, 8, adapter_ids=ROWS)
    for p, a, got in zip(prompts, ROWS, mixed):
        if a < 0:
            with lora_disabled(model):
                want = generate(model, [p], 8)[0]
        else:
            set_adapter(model, adapter_names(model)[a])
            want = generate(model, [p], 8)[0]
            set_adapter(model, adapter_names(model)[0])
        assert got == want
    if not default:
        assert stacked_calls.n > 0  # the path this parametrization is for ran
    assert len({tuple(t) for t in generate(model, [prompts[1]] * 4, 8, adapter_ids=[-1, 0, 1, 2])}) > 1


@torch.no_grad()
@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("default", [True, False])
def test_a_batch_on_one_adapter_is_that_adapter_alone(setup, quantize, default):
    """adapter_ids naming one adapter for every row (a server whose requests all ask for it) give what
    set_adapter gives, bit for bit: that adapter's own matmuls, not the mixed paths (the default adapter
    alone runs LoRALinear's own forward); all -1 is the base."""
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, default=default, quantize=quantize)
    for i, name in enumerate(adapter_names(model)):
        set_adapter(model, name)
        alone, alone_1 = model(IDS), model(IDS[:, :1])  # prefill-like and decode-like rows
        set_adapter(model, adapter_names(model)[0])
        assert torch.equal(model(IDS, adapter_ids=[i] * len(IDS)), alone), name
        assert torch.equal(model(IDS[:, :1], adapter_ids=[i] * len(IDS)), alone_1), name
    with lora_disabled(model):
        base = model(IDS)
    assert torch.equal(model(IDS, adapter_ids=[-1] * len(IDS)), base)


@torch.no_grad()
def test_stacked_path_only_when_the_batch_uses_most_adapters(setup, stacked_calls):
    """Decoding rows (one token each) over a, b and c take the stacked path where a layer holds two of
    them and the batch uses both; over a and c only, each layer holding a or c holds b too, which the
    stacked path would read for nothing, so the grouped path runs. Both equal each adapter alone within
    the rounding bound."""
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, default=False)
    x = IDS[:, :1]
    alone = {}
    for i, name in enumerate(adapter_names(model)):
        set_adapter(model, name)
        alone[i] = model(x)
    set_adapter(model, "a")
    for rows, stacked in (([0, 1, 2, -1, 1], True), ([0, 2, 0, -1, 2], False)):
        stacked_calls.n = 0
        mixed = model(x, adapter_ids=rows)
        assert (stacked_calls.n > 0) == stacked, rows
        for b, a in enumerate(rows):
            if a >= 0:
                assert rel_err(alone[a][b], mixed[b]) < LOGITS_RTOL, (rows, b)


def lora_bound(x, slots, rows, M, into=None):
    """Twice the elementwise rounding bound of s B (A x) for each row's adapter (module docstring). With
    `into`, of into + s B (A x) computed in one addmm: the sum then has R + 1 terms (into's among them,
    in whatever order the matmul adds), so gamma_{R+1} replaces gamma_R and into's own size joins the
    magnitude."""
    K = x.shape[-1]
    R = max((A.shape[0] for A, _, _ in filter(None, slots)), default=1) + (into is not None)
    gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
    out = torch.zeros(*x.shape[:-1], M, dtype=torch.float64)
    for b, a in enumerate(rows.tolist()):
        if a >= 0 and slots[a] is not None:
            A, B, s = (t.double() if torch.is_tensor(t) else t for t in slots[a])
            mag = abs(s) * (x[b].double().abs() @ A.abs().T @ B.abs().T)  # s |B| |A| |x|
            if into is not None:
                mag = mag + into[b].double().abs()
            out[b] = 2 * (gamma(K) + gamma(R) + 3 * U) * mag
    return out + 1e-35  # no subnormal products at the magnitudes drawn


@given(
    n=st.integers(1, 4),
    ranks=st.lists(st.integers(1, 8), min_size=4, max_size=4),
    targeted=st.lists(st.booleans(), min_size=4, max_size=4),
    rows=st.lists(st.integers(-1, 3), min_size=1, max_size=7),
    K=st.integers(1, 24),
    M=st.integers(1, 24),
    T=st.integers(1, 3),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_gathered_equals_reference(n, ranks, targeted, rows, K, M, T, scale, seed):
    """Drawn adapter counts, ranks (padding to the largest), untargeted adapters, row orders and -1 rows."""
    g = torch.Generator().manual_seed(seed)
    slots = [
        (torch.randn(ranks[i], K, generator=g), torch.randn(M, ranks[i], generator=g), float(i + 0.5))
        if targeted[i]
        else None
        for i in range(n)
    ]
    rows = torch.tensor([min(r, n - 1) for r in rows])
    x = torch.randn(len(rows), T, K, generator=g) * scale
    ref, got = mixed_reference(x, rows, slots, M), mixed_gathered(x, rows, slots, M)
    assert ((ref.double() - got.double()).abs() <= lora_bound(x, slots, rows, M)).all()
    nothing = torch.tensor([r < 0 or slots[r] is None for r in rows.tolist()])
    assert (got[nothing] == 0).all() and (ref[nothing] == 0).all()  # exactly the base
    single = torch.stack([term.single_delta(x[b], slots[r]) if not nothing[b] else ref[b] for b, r in enumerate(rows)])
    assert ((single.double() - got.double()).abs() <= lora_bound(x, slots, rows, M)).all()
    assert mixed_gathered(x[:, 0], rows, slots, M).shape == (len(rows), M)  # (B, K) inputs: generate's lm_head
    grouped = term.mixed_grouped(x, rows, slots, M)
    assert ((ref.double() - grouped.double()).abs() <= lora_bound(x, slots, rows, M)).all()
    assert (grouped[nothing] == 0).all() and term.mixed_grouped(x[:, 0], rows, slots, M).shape == (len(rows), M)
    adapters = named_adapters(slots)
    stacks = adapters.stacks()
    assert (stacks is None) == all(slot is None for slot in slots)
    if stacks is not None:
        stacked = term.mixed_stacked(x, rows, stacks, M)
        assert ((ref.double() - stacked.double()).abs() <= lora_bound(x, slots, rows, M)).all()
        assert (stacked[nothing] == 0).all() and term.mixed_stacked(x[:, 0], rows, stacks, M).shape == (len(rows), M)
    # added in place into a base output (routed_forward's float32 path): the base plus the reference's term
    base = torch.randn(len(rows), T, M, generator=g) * scale * 4
    want = base.double() + ref.double()
    paths = {
        "grouped": lambda out: term.mixed_grouped(x, rows, slots, M, out),
        "gathered": lambda out: mixed_gathered(x, rows, slots, M, out),
        "single": lambda out: torch.stack(
            [
                term.single_delta(x[b : b + 1], slots[r], out[b : b + 1].clone())[0] if not nothing[b] else out[b]
                for b, r in enumerate(rows)
            ]
        ),
    }
    if stacks is not None:
        paths["stacked"] = lambda out: term.mixed_stacked(x, rows, stacks, M, out)
    for name, path in paths.items():
        out = base.clone()
        got = path(out)
        assert got.data_ptr() == out.data_ptr() or name == "single", name  # in place, not a new tensor
        assert ((want - got.double()).abs() <= lora_bound(x, slots, rows, M, into=base)).all(), name
        assert torch.equal(got[nothing], base[nothing]), name  # the base's rows untouched, bit for bit


def named_adapters(slots):
    """A NamedAdapters container holding `slots` (None: an adapter that does not target the layer)."""
    table = multi.AdapterTable([f"x{i}" for i in range(len(slots))])
    adapters = multi.NamedAdapters(table)
    for i, slot in enumerate(slots):
        if slot is not None:
            adapters[f"x{i}"] = multi.AdapterSlot(*slot)
    return adapters


def named_layer(slots, K: int, M: int):
    """(a NamedLoRALinear over an nn.Linear(K, M) holding `slots` as named adapters, in eval mode; its
    NamedAdapters)."""
    adapters = named_adapters(slots)
    layer = multi.NamedLoRALinear(torch.nn.Linear(K, M), adapters.table).eval()
    layer.adapters = adapters
    return layer, adapters


def test_stacks_hold_the_only_copy_and_follow_deletes():
    """After stacking, each slot's A and B are views into the stacks (an adapter's weights live once);
    deleting an adapter or moving a slot's weights elsewhere builds the stacks again, with the indices
    shifted, and the stacked path still equals the reference."""
    g = torch.Generator().manual_seed(0)
    K, M = 12, 10
    slots = [(torch.randn(r, K, generator=g), torch.randn(M, r, generator=g), r + 0.5) for r in (3, 5, 2)]
    adapters = named_adapters(slots)
    A_cat, Bt_cat, _ = adapters.stacks()
    assert A_cat.shape == (10, K) and Bt_cat.shape == (10, M)
    for slot, (A, B, _) in zip(adapters.values(), slots):
        assert slot.lora_A.untyped_storage().data_ptr() == A_cat.untyped_storage().data_ptr()
        assert slot.lora_B.untyped_storage().data_ptr() == Bt_cat.untyped_storage().data_ptr()
        assert torch.equal(slot.lora_A, A) and torch.equal(slot.lora_B, B)
    x, rows = torch.randn(4, 1, K, generator=g), torch.tensor([1, 0, 2, 1])
    del adapters["x0"]
    adapters.table.names.remove("x0")  # what delete_adapter does: x1 is index 0 now, x2 index 1
    left = slots[1:]
    stacked = term.mixed_stacked(x, torch.tensor([0, -1, 1, 0]), adapters.stacks(), M)
    want = mixed_reference(x, torch.tensor([0, -1, 1, 0]), left, M)
    assert adapters.stacks()[0].shape == (7, K)
    assert ((want.double() - stacked.double()).abs() <= lora_bound(x, left, torch.tensor([0, -1, 1, 0]), M)).all()
    adapters["x2"].lora_A.data = adapters["x2"].lora_A.data.clone() * 2  # a slot's weights replaced (as .to() does)
    doubled = term.mixed_stacked(x, rows.clamp(max=1), adapters.stacks(), M)
    left[1] = (left[1][0] * 2, left[1][1], left[1][2])
    assert (
        (mixed_reference(x, rows.clamp(max=1), left, M).double() - doubled.double()).abs()
        <= lora_bound(x, left, rows.clamp(max=1), M)
    ).all()
    left[0] = (left[0][0], -left[0][1], left[0][2])
    adapters["x1"] = multi.AdapterSlot(*left[0])  # a slot replaced under the same name
    flipped = term.mixed_stacked(x, rows.clamp(max=1), adapters.stacks(), M)
    assert (
        (mixed_reference(x, rows.clamp(max=1), left, M).double() - flipped.double()).abs()
        <= lora_bound(x, left, rows.clamp(max=1), M)
    ).all()


@torch.no_grad()
def test_delete_adapter_frees_its_weights_from_the_stacks(setup):
    """After a stacked forward the slots are views into each layer's stacks; deleting an adapter builds
    the stacks again from the others, so no storage keeps the deleted adapter's weights."""
    from minilora.lora.named import hosts

    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs, default=False)
    model(IDS[:, :1], adapter_ids=[0, 1, 2, -1, 1])  # one token per row: the stacked path
    delete_adapter(model, "b")
    for layer in hosts(model).values():
        slots = list(layer.adapters.values())
        for slot in slots:
            A_bytes = sum(s.lora_A.numel() * 4 for s in slots)
            assert slot.lora_A.untyped_storage().nbytes() == A_bytes  # the stack of "a" and "c" only
    mixed = model(IDS[:, :1], adapter_ids=[0, 1, -1, 1, 0])
    for i, name in enumerate(["a", "c"]):
        set_adapter(model, name)
        alone = model(IDS[:, :1])
        rows = [b for b, a in enumerate([0, 1, -1, 1, 0]) if a == i]
        assert rel_err(alone[rows], mixed[rows]) < LOGITS_RTOL


def test_named_adapters_leave_the_default_adapter_as_it_was(setup, tmp_path):
    """The default adapter's parameter names and its saved files are unchanged by named adapters beside it;
    deleting them restores the model's modules; set_adapter / lora_disabled switch as PEFT's do."""
    hf, base_dir, dirs = setup
    model = load_model(base_dir, quantize=None, dtype=torch.float32)[0]
    load_adapter(model, dirs["a"])
    model.eval()
    keys, modules = list(lora_state_dict(model)), [n for n, _ in model.named_modules()]
    save_adapter(model, str(tmp_path / "before"), "x")
    with torch.no_grad():
        before = model(IDS)
    load_adapter(model, dirs["b"], name="b")
    load_adapter(model, dirs["c"], name="c")
    assert list(lora_state_dict(model)) == keys
    save_adapter(model, str(tmp_path / "after"), "x")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes()
    assert "model.layers.0.self_attn.q_proj.adapters.b.lora_A" in model.state_dict()
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), NamedLoRALinear)  # a has no k_proj
    with torch.no_grad():
        assert torch.equal(model(IDS), before)  # the default stays active
        set_adapter(model, "c")
        only_c = model(IDS)
        with lora_disabled(model):
            base = model(IDS)
        assert torch.equal(model(IDS, adapter_ids=[-1] * 5), base)
        stale = torch.tensor([2] * 5)
        model(IDS, adapter_ids=stale)
        delete_adapter(model, "b")
        assert adapter_names(model) == ["default", "c"]
        with pytest.raises(ValueError, match="indices 0 to 1"):  # the same tensor is checked again
            model(IDS, adapter_ids=stale)
        assert rel_err(only_c, model(IDS, adapter_ids=[1] * 5)) < LOGITS_RTOL  # c moved from index 2 to 1
        delete_adapter(model, "c")
        assert adapter_names(model) == ["default"]
        assert [n for n, _ in model.named_modules()] == modules
        assert torch.equal(model(IDS), before)  # deleting the active c switched back to the default


def _one_sentence(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")


def _write(tmp_path, name, tensors, base="org/other-model"):
    """An adapter folder written by hand: the config of a plain LoRA adapter and `tensors`."""
    d = tmp_path / name
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": base}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return str(d)


def test_adapter_that_matches_nothing_or_half_is_refused(setup, tmp_path):
    """Loading must never leave a model that silently serves (part of) the base: no weights, modules the
    model lacks (a GPT-2 adapter on a Llama), or a lora_A without its lora_B, by name or as the default."""
    hf, base_dir, dirs = setup
    A, B = torch.randn(4, 32), torch.randn(32, 4)
    gpt2 = {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{x}.weight": {"A": A, "B": B}[x].clone()
        for i in range(3)
        for x in "AB"
    }
    bad = {
        "empty": ({}, "holds no LoRA weights"),
        "gpt2": (gpt2, r"3 of its 3 modules .*'transformer\.h\.0\.attn\.c_attn'.*different base \(org/other-model\)"),
        "half": ({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": A}, "no lora_B.weight.*incomplete"),
    }
    for name, (tensors, pattern) in bad.items():
        path = _write(tmp_path, name, tensors)
        for as_name in (None, "x"):
            model = load_model(base_dir, quantize=None, dtype=torch.float32)[0]
            with pytest.raises(AdapterError, match=pattern) as e:
                load_adapter(model, path, name=as_name)
            _one_sentence(e)
    # partly matching: layers 0 and 1 exist, layer 2 does not
    partial = tiny_llama(layers=3)
    apply_lora(partial, ["q_proj"], r=4, verbose=False)
    save_adapter(partial, str(tmp_path / "three"), "tiny-3")
    with pytest.raises(AdapterError, match=r"1 of its 3 modules .*layers\.2.*different base \(tiny-3\)") as e:
        load_adapter(load_model(base_dir, quantize=None, dtype=torch.float32)[0], str(tmp_path / "three"), name="t")
    _one_sentence(e)


def test_misuse_is_one_clear_sentence(setup, tmp_path):
    hf, base_dir, dirs = setup
    model = ours(base_dir, dirs)
    cases = [
        (lambda: load_adapter(model, dirs["b"], name="b"), AdapterError, "already loaded.*delete_adapter"),
        (lambda: load_adapter(model, dirs["b"], name="x.y"), AdapterError, "cannot be used"),
        (lambda: model(IDS, adapter_ids=[0, 1]), ValueError, r"shape \(2,\) but the batch has 5 rows"),
        (lambda: model(IDS, adapter_ids=[0, 1, 3, 0, 0]), ValueError, r"indices 0 to 2.*-1 for the base"),
        (lambda: model(IDS, adapter_ids=[0, 1, -2, 0, 0]), ValueError, "indices 0 to 2"),
        (lambda: generate(model, [[1, 2]], 2, adapter_ids=[0, 1]), ValueError, "batch has 1 rows"),
        (lambda: set_adapter(model, "zz"), AdapterError, "No adapter named 'zz'.*load_adapter"),
        (lambda: delete_adapter(model, "zz"), AdapterError, "No adapter named 'zz'"),
        (lambda: delete_adapter(model, "default"), AdapterError, "not deleted here"),
    ]
    for call, kind, pattern in cases:
        with torch.no_grad(), pytest.raises(kind, match=pattern) as e:
            call()
        _one_sentence(e)
    model.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)") as e:
        model(IDS, adapter_ids=ROWS)
    _one_sentence(e)
    model.eval()
    # DoRA: refused by name; as the default it serves alone but not in a mixed batch
    pm = get_peft_model(
        copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], use_dora=True)
    )
    pm.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(AdapterError, match="DoRA.*without a name") as e:
        load_adapter(model, str(tmp_path / "dora"), name="d")
    _one_sentence(e)
    dora = load_model(base_dir, quantize=None, dtype=torch.float32)[0]
    load_adapter(dora, str(tmp_path / "dora"))
    load_adapter(dora, dirs["b"], name="b")
    dora.eval()
    with torch.no_grad():
        dora(IDS, adapter_ids=[1, 1, -1, 1, -1])  # rows that do not touch the DoRA adapter are fine
        with pytest.raises(ValueError, match="DoRA") as e:
            dora(IDS, adapter_ids=[0, 1, -1, 1, -1])
    _one_sentence(e)
    # a default adapter after named ones would need the named-only layers rebuilt: refused
    named_only = load_model(base_dir, quantize=None, dtype=torch.float32)[0]
    load_adapter(named_only, dirs["b"], name="b")
    with pytest.raises(AdapterError, match="before the named ones") as e:
        load_adapter(named_only, dirs["a"])
    _one_sentence(e)
    assert os.path.isdir(dirs["a"])
