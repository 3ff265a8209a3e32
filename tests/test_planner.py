"""minilora.train.memory_plan and planner: predicted vs measured peak memory, the activation formula vs what
autograd saves, the recompute choice, dtype auto.

Peak RSS is measured in a fresh subprocess per configuration (tests/planner_probe.py): RSS is per
process, and the test runner's own allocations would hide the peak. Tolerance 15%: the prediction
counts tensor bytes exactly, but RSS adds what the C allocator keeps after frees, which depends on
allocation history (the planner's 'allocator slack' is a measured fraction, not a derivation).
Layers are shortened (2 instead of 30 / 18) to keep this under half a minute on 2 shared cores; the
per-block tensor terms are checked exactly by the saved-tensor test below. The allocator slack
grows with depth; its fit was checked at 6 and 30 layers too, outside the suite (too slow here).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minilora.dtypes import auto_dtype
from minilora.models.config import FAMILIES, FULL, SLIDING, ModelConfig
from minilora.train.memory_plan import flops_per_token, linear_shapes, plan_memory
from minilora.train.planner import choose_checkpointing, choose_recompute

HERE = os.path.dirname(os.path.abspath(__file__))


def llama_135m(layers: int = 30) -> ModelConfig:
    """SmolLM-135M's geometry (a 135M-class Llama): vocab 49152, D 576, 9/3 heads, FFN 1536."""
    return ModelConfig(
        family="llama",
        name="llama-135m",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_local_theta=10000.0,
        layer_types=[FULL] * layers,
        sliding_window=None,
    )


def gemma3(layers: int = 18) -> ModelConfig:
    return dataclasses.replace(
        ModelConfig.from_name("gemma-3-270m"), num_hidden_layers=layers, layer_types=[SLIDING] * (layers - 1) + [FULL]
    )


def settings_measured(L: int) -> list[list[int]]:
    """[full, selective, reuse] block counts measured per geometry: full, selective, off, then off with
    every block keeping its dequantized weights (smallest plan first)."""
    return [[L, 0, 0], [0, L, 0], [0, 0, 0], [0, 0, L]]


def probe(cfg: ModelConfig, **spec) -> subprocess.Popen:
    """Start tests/planner_probe.py for cfg: one process per geometry, every recompute setting."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    spec = {
        "config": json.loads(json.dumps(fields, default=list)),
        "dtype": "float32",
        "r": 16,
        "optimizer_bits": 32,
        "steps": 2,
        "loss_chunk": 256,
        "recompute_blocks": settings_measured(cfg.num_hidden_layers),
        **spec,
    }
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "planner_probe.py"), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def choices_under_budgets(p: subprocess.Popen, budgets: list[int]) -> list[list[int]]:
    """Send budgets to a probe started with budgets=True: the [full, selective, reuse] settings it
    chose for each, each one's measured peak RSS asserted under its budget."""
    p.stdin.write(json.dumps(budgets) + "\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    m = json.loads(out.splitlines()[-1])
    for budget, measured in zip(budgets, m["peaks"]):
        assert measured <= budget
    return m["recompute_blocks"]


def test_predicted_peak_within_15_percent_of_measured_rss():
    """tiny, a 135M-class Llama and a Gemma 3 geometry with its 262k vocabulary; recompute full,
    selective and off, and off with the dequantized weights kept."""
    cases = {
        "tiny": (ModelConfig.from_name("tiny"), 4, 64),
        "llama-135m": (llama_135m(2), 4, 160),
        "gemma3-262k": (gemma3(2), 1, 32),
    }
    procs = {name: probe(cfg, batch=b, seq=t) for name, (cfg, b, t) in cases.items()}  # run side by side
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        m = json.loads(out.splitlines()[-1])
        cfg, b, t = cases[name]
        for (k, s, w), peak in zip(settings_measured(cfg.num_hidden_layers), m["peaks"]):
            plan = plan_memory(
                cfg,
                batch_size=b,
                seq_len=t,
                recompute_blocks=k,
                selective_blocks=s,
                reuse_blocks=w,
                runtime=m["runtime"],
            )
            assert plan.peak == pytest.approx(peak, rel=0.15), f"{name}, recompute {plan.recompute}:\n{plan.table()}"


def test_gradient_checkpointing_auto_goes_off_then_full_on_more_blocks_as_the_budget_shrinks():
    """Budgets from roomy to tight select: off; full recompute on 1, 2, then all 4 blocks, the rest
    keeping everything. The process that trains chooses from its own runtime (choose_checkpointing, as
    plan_run), and its measured peak stays under each budget."""
    from minilora.train.memory_plan import MARGIN

    cfg, B, T = llama_135m(4), 2, 128
    p = probe(cfg, batch=B, seq=T, budgets=True)
    runtime = json.loads(p.stdout.readline())["runtime"]

    def peak(full, selective):
        return plan_memory(
            cfg, batch_size=B, seq_len=T, recompute_blocks=full, selective_blocks=selective, runtime=runtime
        ).peak

    want = [[4, 0], [2, 0], [1, 0], [0, 0]]  # smallest plan first (see planner_probe)
    chosen = choices_under_budgets(p, [int(peak(*ks) / MARGIN) + 1 for ks in want])
    assert chosen == [ks + [0] for ks in want]  # no weight reuse: the probe's default
    # Too small even with full recompute: no choice, and plan_run's refusal names the largest part.
    assert choose_checkpointing(lambda k, s: peak(k, s) <= peak(4, 0) - 1, 4) is None


def test_weight_reuse_auto_keeps_weights_where_they_fit_and_goes_off_before_recompute():
    """--weight-reuse auto (choose_settings, as plan_run): a roomy budget keeps every block's
    dequantized weights; a tighter one keeps them in the last blocks only; tighter still, none, with
    no recompute; then recompute with no weights kept. Measured in the process that trains (bf16, the
    default dtype on these CPUs): the peak stays under each budget with reuse on, partly on and off."""
    from minilora.train.memory_plan import MARGIN

    cfg, B, T = llama_135m(4), 2, 128
    p = probe(cfg, batch=B, seq=T, budgets=True, reuse="auto", dtype="bfloat16")
    runtime = json.loads(p.stdout.readline())["runtime"]

    def peak(full, selective, reuse):
        return plan_memory(
            cfg,
            batch_size=B,
            seq_len=T,
            dtype=torch.bfloat16,
            recompute_blocks=full,
            selective_blocks=selective,
            reuse_blocks=reuse,
            runtime=runtime,
        ).peak

    # Smallest plan first (see planner_probe). A block's held weights cost more than its activations
    # here, so the budget that needs recompute on every block leaves reuse off.
    want = [[4, 0, 0], [0, 0, 0], [0, 0, 2], [0, 0, 4]]
    assert peak(0, 0, 0) < peak(0, 0, 2) < peak(0, 0, 4)  # the reuse term grows with the blocks that keep
    assert choices_under_budgets(p, [int(peak(*ks) / MARGIN) + 1 for ks in want]) == want


def test_choose_settings_turns_reuse_off_before_recompute_on():
    """A toy memory model (each recomputed block saves 10, selective 5, each kept block's weights cost
    3): auto reuse fills what the recompute choice leaves; on and off are fixed."""
    from minilora.train.planner import choose_settings

    def need(k, s, w):
        return 100 - 10 * k - 5 * s + 3 * w

    assert choose_settings(lambda k, s, w: need(k, s, w) <= 124, 8) == (0, 0, 8)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 110, 8) == (0, 0, 3)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 100, 8) == (0, 0, 0)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 92, 8) == (1, 0, 0)  # 90 + 3 > 92: no weights
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 93, 8) == (1, 0, 1)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 124, 8, reuse="off") == (0, 0, 0)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 124, 8, reuse="on") == (0, 0, 8)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 110, 8, reuse="on") == (2, 0, 8)  # recompute for it
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 110, 8, recompute=(0, 8)) == (0, 8, 8)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 110, 8, recompute=(8, 0)) == (8, 0, 8)
    assert choose_settings(lambda k, s, w: need(k, s, w) <= 19, 8, reuse="on") is None


def test_plan_refuses_a_run_that_does_not_fit_naming_the_part_and_flag(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(os.path.dirname(HERE), "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = ["--plan", "--model", "tiny", "--out", os.devnull + "-unused", "--gradient-checkpointing", "auto"]
    assert train.main(args + ["--memory-budget", str(10**12)]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "would not start" not in out and "optimizer states (32-bit)" in out
    assert train.main(args + ["--memory-budget", "1000"]) == 0
    out = capsys.readouterr().out
    assert "would not start: the run needs about" in out and "recompute full" in out
    # the runtime alone exceeds 1000 bytes: no flag helps (it used to name "allocator slack (0 MiB)")
    assert "the largest part is runtime" in out and "raise --memory-budget" in out


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 2**34), st.booleans()), min_size=2, max_size=8), st.integers(1, 2**34))
def test_a_plan_that_does_not_fit_names_its_real_largest_part(parts, budget):
    """Plan.too_big names the largest component, whether or not a flag lowers it; when none does, the
    largest a flag lowers follows; when the parts no flag lowers alone exceed the budget, no flag is
    offered. (A 724 MiB plan once named "allocator slack (3 MiB)" as its largest part.)"""
    from minilora.train.memory_plan import MARGIN, MiB, Plan

    comps = [(f"part{i}", b, f"--flag{i}" if shrink else "") for i, (b, shrink) in enumerate(parts)]
    plan = Plan(components=comps, peak=sum(b for _, b, _ in comps), num_layers=1)
    assume(plan.peak > budget * MARGIN)  # too_big describes a plan that does not fit
    msg = plan.too_big(budget)
    name, size, flag = max(comps, key=lambda c: c[1])
    assert f"the largest part is {name} ({size / MiB:,.0f} MiB)" in msg and msg.endswith(".")
    if sum(b for _, b, f in comps if not f) > budget * MARGIN:
        assert "raise --memory-budget" in msg and "lower it with" not in msg
    elif flag:
        assert f"lower it with {flag}," in msg
    else:
        name2, size2, flag2 = max((c for c in comps if c[2]), key=lambda c: c[1])
        assert f"which no flag lowers; the largest that one does is {name2}" in msg and f"with {flag2}," in msg


def block_saved_bytes(model, batch: int, seq: int, dtype, lean: bool) -> int:
    """Bytes of every distinct storage autograd saves in the forward of model's first block on (batch,
    seq) random hidden states: per-token tensors only (not parameters, the RoPE tables, or the 1-D
    (1 + w) a bf16 Gemma norm builds from its weight each call)."""
    from minilora.models.transformer import rope_cos_sin

    x = torch.randn(batch, seq, model.config.hidden_size).to(dtype).requires_grad_()
    cos, sin = rope_cos_sin(model.inv_freq_global, torch.arange(seq).expand(batch, seq), dtype)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and t.dim() >= 2:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, cos, sin, None, lean=lean)
    return sum(saved.values())


@settings(max_examples=8)  # each example builds a quantized block: a few are enough to vary every term
@given(
    family=st.sampled_from(["llama", "gemma3", "qwen3"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dropout=st.sampled_from([0.0, 0.1]),
    batch=st.integers(1, 3),
    seq=st.integers(8, 40),
)
def test_activation_formula_equals_what_autograd_saves(family, dtype, dropout, batch, seq):
    """The per-block activation term vs the bytes of every distinct storage autograd saves in one
    block as the forward runs it (lean saves), exactly: norms keep their input in its own dtype plus
    rstd, SDPA keeps k and v unrepeated, the MLP keeps gate and up, the LoRA paths their rank-r
    products and no input (rebuilt in backward); Qwen3's q/k norms counted."""
    from minilora.lora.surgery import apply_lora
    from minilora.models.loader import quantize_linears
    from minilora.models.transformer import Transformer

    qwen3 = dataclasses.replace(ModelConfig.from_name("qwen3-0.6b"), num_hidden_layers=1, layer_types=[FULL])
    base = {"llama": llama_135m(1), "gemma3": gemma3(1), "qwen3": qwen3}[family]
    cfg = dataclasses.replace(
        base, vocab_size=64, hidden_size=base.hidden_size // 4, intermediate_size=base.intermediate_size // 4
    )
    model = Transformer(cfg).to(dtype)
    quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, r=4, alpha=8, dropout=dropout, verbose=False)
    model.train()
    saved = block_saved_bytes(model, batch, seq, dtype, lean=True)  # as the forward runs it
    kwargs = {
        "batch_size": batch,
        "seq_len": seq,
        "dtype": dtype,
        "lora_r": 4,
        "lora_dropout": dropout,
        "loss_chunk": 1,
    }

    def activations(layers: int) -> int:
        plan = plan_memory(dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=[FULL] * layers), **kwargs)
        return next(b for name, b, _ in plan.components if name.startswith("activations"))

    per_block = activations(2) - activations(1)  # the second block adds exactly its activations
    assert per_block == saved


def test_choose_recompute_finds_the_fewest_blocks():
    need = [100 - 10 * k for k in range(9)]  # memory falls as k grows
    assert choose_recompute(lambda k: need[k] <= 100, 8) == 0
    assert choose_recompute(lambda k: need[k] <= 65, 8) == 4
    assert choose_recompute(lambda k: need[k] <= 20, 8) == 8
    assert choose_recompute(lambda k: need[k] <= 10, 8) is None


def test_choose_checkpointing_off_then_full_on_the_fewest_blocks():
    """need(full, selective): a selective block saves 5, a full one 8 (of 10 kept per block); auto
    never picks selective, even where it alone would fit."""

    def need(k, s):
        return 100 - 8 * k - 5 * s

    assert choose_checkpointing(lambda k, s: need(k, s) <= 100, 8) == (0, 0)
    assert choose_checkpointing(lambda k, s: need(k, s) <= 80, 8) == (3, 0)
    assert choose_checkpointing(lambda k, s: need(k, s) <= 60, 8) == (5, 0)
    assert choose_checkpointing(lambda k, s: need(k, s) <= 36, 8) == (8, 0)
    assert choose_checkpointing(lambda k, s: need(k, s) <= 35, 8) is None


@pytest.mark.parametrize(
    "mode,text", [("off", "recompute off"), ("selective", "recompute selective"), ("on", "recompute full")]
)
@pytest.mark.parametrize("reuse", ["auto", "off"])
def test_plan_names_the_recompute_mode(capsys, mode, text, reuse):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(os.path.dirname(HERE), "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = [
        "--plan",
        "--model",
        "tiny",
        "--out",
        os.devnull + "-unused",
        "--gradient-checkpointing",
        mode,
        "--memory-budget",
        str(10**12),
        "--weight-reuse",
        reuse,
    ]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert f", {text}, " in out and f"activations kept ({text})" in out, out
    kept = "on" if reuse == "auto" else "off"  # a roomy budget: auto keeps every block's weights
    assert f", dequantized weights kept {kept}, loss chunk " in out and f"dequantized weights kept ({kept})" in out, out


def test_flops_count_a_full_recompute_forward_but_only_the_lora_products_for_selective():
    cfg, T, r = llama_135m(3), 64, 8
    H, hd = cfg.num_attention_heads, cfg.head_dim
    shapes = linear_shapes(cfg).values()
    base, lora = sum(M * K for M, K in shapes), sum(r * (M + K) for M, K in shapes)

    def extra(k, s):
        return flops_per_token(cfg, T, r, recompute_blocks=k, selective_blocks=s) - flops_per_token(cfg, T, r)

    assert extra(0, 3) == 3 * 2 * lora
    assert extra(1, 2) == (2 * base + 2 * 2 * (T / 2) * H * hd + 2 * lora) + 2 * 2 * lora


@pytest.mark.parametrize(
    "avx512_bf16,amx,want",
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_dtype_auto_follows_the_cpu_bf16_units(monkeypatch, avx512_bf16, amx, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert auto_dtype(torch.device("cpu")) == want


@pytest.mark.parametrize("setting,want", [(False, 0), (True, 4), (2, 2), (9, 4)])
def test_set_gradient_checkpointing_recomputes_the_first_k_blocks(monkeypatch, setting, want):
    """The partial setting the planner picks: exactly the first k blocks go through checkpoint, and
    the gradients equal those without recompute."""
    from minilora.models import transformer

    torch.manual_seed(0)
    model = transformer.Transformer(ModelConfig.from_name("tiny")).double()
    ids = torch.randint(0, 512, (2, 12))
    ref = torch.autograd.grad(model(ids).sum(), list(model.parameters()))
    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda layer, *a, **kw: calls.append(layer) or real(layer, *a, **kw))
    model.set_gradient_checkpointing(setting)
    got = torch.autograd.grad(model(ids).sum(), list(model.parameters()))
    assert calls == list(model.model.layers[:want])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


_DYNAMO_PROBE = """
import sys, torch
from minilora.lora.surgery import apply_lora, lora_parameters
from minilora.train.loss import chunked_lm_loss
from minilora.models import load_model
from minilora.data.packing import Batch
from minilora.optim.paged_adamw import PagedAdamW
from minilora.train.process_memory import warm_runtime

recompute = sys.argv[1] == "1"
warm_runtime(torch.device("cpu"), torch.float32, recompute=recompute)
model, _ = load_model("tiny", quantize="nf4", dtype=torch.float32)
apply_lora(model, r=4, alpha=8, dropout=0.05, verbose=False)
model.set_gradient_checkpointing(recompute)
opt = PagedAdamW(lora_parameters(model), lr=1e-3)
ids = torch.randint(3, 200, (2, 16))
ones = torch.ones_like(ids)
loss, n = chunked_lm_loss(model, Batch(ids, ids, ones, torch.arange(16).expand(2, 16), ones, 30))
(loss / n).backward()
opt.step()
opt.zero_grad()
opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("recompute", [False, True])
def test_a_run_without_recompute_never_loads_torch_dynamo(recompute):
    """torch._dynamo costs about 150 MB of RSS. torch.optim.Optimizer's add_param_group and zero_grad
    load it on first call (PagedAdamW calls the plain methods underneath), and so does non-reentrant
    checkpointing (which recompute needs; warm_runtime(recompute=True) counts it)."""
    out = subprocess.run(
        [sys.executable, "-c", _DYNAMO_PROBE, str(int(recompute))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == str(recompute)


@pytest.mark.parametrize("given,device,want", [(0, "cpu", 64), (0, "cuda", 256), (100, "cpu", 100)])
def test_loss_chunk_zero_is_the_devices_default_and_is_recorded(monkeypatch, given, device, want):
    """--loss-chunk 0 resolves per device (loss.default_chunk); the plan counts and records that chunk."""
    from minilora.train import planner
    from minilora.train.config import TrainConfig

    monkeypatch.setattr(planner, "warm_runtime", lambda *a, **k: 0)  # no CUDA here: only the arithmetic
    monkeypatch.setattr(planner, "free_memory", lambda d: 1 << 40)
    cfg = llama_135m(2)
    plan, error = planner.plan_run(TrainConfig(loss_chunk=given), cfg, torch.device(device), torch.float32, (4, 160))
    assert error is None and plan.loss_chunk == want and plan.settings()["loss_chunk"] == want
    expect = plan_memory(cfg, batch_size=4, seq_len=160, loss_chunk=want, device_type=device)
    assert (
        dict((n, b) for n, b, _ in plan.components)["transient (loss chunk / block backward)"]
        == dict((n, b) for n, b, _ in expect.components)["transient (loss chunk / block backward)"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_bytes_equal_the_models_norm_parameters(family, dtype):
    """The plan's static norm bytes (per block 2 or 4 norms of width D, q/k norms of width hd where
    the family has them, the final norm) equal the bytes of the norm parameters of the model itself,
    built for a preset of every family."""
    from minilora.models.presets import PRESETS
    from minilora.models.transformer import Transformer

    preset = ModelConfig.from_name(next(name for name, kw in PRESETS.items() if kw["family"] == family))
    cfg = dataclasses.replace(preset, num_hidden_layers=2, layer_types=[FULL] * 2, vocab_size=8)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    want = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    plan = plan_memory(cfg, batch_size=1, seq_len=8, dtype=dtype)
    dense = dict((name, b) for name, b, _ in plan.components)["embeddings, head, norms"]
    e = torch.empty((), dtype=dtype).element_size()
    assert dense - cfg.vocab_size * cfg.hidden_size * e * (1 if cfg.tie_word_embeddings else 2) == want


@pytest.mark.parametrize(
    "family, layout, seq",
    [
        ("llama", "padded", 24),
        ("llama", "packed", 24),
        ("llama", "shared", 24),
        ("gemma3", "padded", 12),  # the sliding window (16 here) covers the rows: plain causal attention
        ("gemma3", "padded", 24),  # it does not: a mask for the sliding layers
        ("gemma3", "shared", 24),
    ],
)
def test_attention_masks_counted_are_the_masks_the_forward_keeps(family, layout, seq):
    """plan_memory's attention_masks x (B T^2 e) against the bytes of the (B, 1, T, T) masks autograd
    saves in a forward (each distinct storage once: the layers of a kind share their mask)."""
    from minilora.data.encode import EncodedExample
    from minilora.data.packing import IGNORE, collate
    from minilora.data.pairs import EncodedPair, collate_pairs
    from minilora.lora.surgery import apply_lora
    from minilora.models.transformer import Transformer
    from minilora.train.memory_plan import attention_mask_count

    base = {"llama": llama_135m(2), "gemma3": gemma3(2)}[family]
    kinds = [FULL, FULL] if family == "llama" else [SLIDING, FULL]
    cfg = dataclasses.replace(base, vocab_size=64, hidden_size=64, intermediate_size=128, layer_types=kinds)
    cfg = dataclasses.replace(cfg, sliding_window=16 if family == "gemma3" else None)
    model = Transformer(cfg)
    apply_lora(model, r=4, alpha=8, verbose=False)
    model.train()
    ex = lambda n, p=0: EncodedExample(list(range(3, 3 + n)), [IGNORE] * p + list(range(3 + p, 3 + n)))
    answer = lambda start, n: EncodedExample(
        list(range(3, 11)) + list(range(start, start + n)), [IGNORE] * 8 + list(range(start, start + n))
    )
    if layout == "shared":  # an 8-token prompt, answers of 8 and 8, and of 8 and 6: rows of 24 and 22 tokens
        pairs = [EncodedPair(answer(20, 8), answer(40, 8)), EncodedPair(answer(20, 8), answer(40, 6))]
        rows = collate_pairs([[0], [1]], pairs, 0).shared
    elif layout == "packed":
        rows = collate([[0, 1], [2]], [ex(10), ex(seq - 10), ex(seq)], 0)
    else:
        rows = collate([[0], [1]], [ex(seq), ex(seq - 5)], 0)
    B, T = rows.input_ids.shape
    shared = {"prefix_len": rows.prefix_len} if layout == "shared" else {}
    masks = {}

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (T, T) and t.shape[1] == 1:
            masks[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(rows.input_ids, rows.position_ids, rows.attention_mask, rows.segment_ids, return_hidden=True, **shared)
    count = attention_mask_count(cfg, T, layout in ("packed", "shared"))
    kw = {"batch_size": B, "seq_len": T, "dtype": torch.float32, "lora_r": 4}
    plans = [plan_memory(cfg, **kw, attention_masks=m) for m in (0, count)]
    kept = [next(b for name, b, _ in p.components if name.startswith("activations")) for p in plans]
    assert kept[1] - kept[0] == sum(masks.values()) == count * B * T * T * 4
    assert (count > 0) == (layout != "padded" or T > 16 and family == "gemma3")


def test_fsdp_plans_kept_weights_and_the_pair_split_recompute_as_fsdp_runs_them(monkeypatch):
    """Under FSDP (plan_run with 2 ranks) the codes are gathered anew each step, so nothing is held: a
    recomputed block's kept weights count one block's worth, transient, where one device holds them all
    for the step. And --pair-split's recompute there is a non-reentrant checkpoint, which saves without
    lean saves: the activations count as plan_memory's lean=False, where one device counts lean ones."""
    from minilora.train import memory_plan, planner
    from minilora.train.config import TrainConfig

    monkeypatch.setattr(planner, "warm_runtime", lambda *a, **k: 0)  # only the arithmetic
    cfg, B, T = llama_135m(6), 4, 96
    budget = str(64 << 30)

    def part(plan, name):
        return next(b for n, b, _ in plan.components if n.startswith(name))

    tc = TrainConfig(gradient_checkpointing="on", weight_reuse="on", memory_budget=budget)
    one, _ = planner.plan_run(tc, cfg, torch.device("cpu"), torch.bfloat16, (B, T))
    two, _ = planner.plan_run(tc, cfg, torch.device("cpu"), torch.bfloat16, (B, T), fsdp_ranks=2)
    block, first = (memory_plan.kept_weight_bytes(cfg, memory_plan.LINEARS, 2, f) for f in (False, True))
    assert part(one, "dequantized weights kept") == 5 * block + first
    assert part(two, "dequantized weights kept") == 0  # every block recomputes: none keeps them for the step

    kw = dict(objective="dpo", pair_split=True, gradient_checkpointing="off", weight_reuse="off", memory_budget=budget)
    tc = TrainConfig(**kw)
    one, _ = planner.plan_run(tc, cfg, torch.device("cpu"), torch.bfloat16, (B, T))
    two, _ = planner.plan_run(tc, cfg, torch.device("cpu"), torch.bfloat16, (B, T), fsdp_ranks=2)

    def activations(lean):
        p = plan_memory(cfg, batch_size=B // 2, seq_len=T, dtype=torch.bfloat16, lean=lean)
        return part(p, "activations kept")

    lean_saved = activations(False) - activations(True)  # 2eD + eF per token per block (test_lean_saves)
    assert lean_saved == B // 2 * T * cfg.num_hidden_layers * 2 * (2 * cfg.hidden_size + cfg.intermediate_size)
    assert part(two, "activations kept") - part(one, "activations kept") == lean_saved
