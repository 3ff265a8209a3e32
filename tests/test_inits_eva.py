"""EVA (--init eva, minilora/lora/eva.py) against PEFT's EVA on the same activations, and its incremental
SVD against the SVD of all rows at once (float64).

Equality with PEFT as shipped is impossible: PEFT's SVD hook fixes torch.svd_lowrank (a randomized SVD of
q = 2k columns, 4 power iterations, its own seed) on float32 inputs, where minilora takes the exact SVD in
float64; the two differ by the randomized SVD's approximation error, which has no bound that does not
depend on the spectrum. So the oracle is PEFT's own algorithm (get_eva_state_dict: its incremental PCA,
convergence test, rank redistribution and equal-input groups), run on minilora's model and batches, with
its IncrementalPCA made exact (lowrank off, float64 inputs): every rank PEFT assigns and every direction
must then equal minilora's, up to float64 rounding carried into a float32 A.
"""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import EvaConfig, LoraConfig
from peft.tuners.lora import eva as peft_eva
from peft.utils.incremental_pca import IncrementalPCA

from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE, batches
from minilora.lora import eva
from minilora.lora.layers import LoRALinear
from minilora.lora.surgery import apply_lora, lora_modules
from minilora.models.config import ModelConfig
from minilora.models.presets import PRESETS
from minilora.models.transformer import Transformer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# target sets whose layers all see different inputs: with rho > 1 the ranks go to the largest explained
# variance ratios over all layers, and layers that share inputs (q, k, v; gate, up) tie exactly, which
# PEFT breaks with an unstable argsort; these sets leave no ties to break
DISTINCT = [["q_proj", "o_proj", "down_proj"], ["v_proj", "up_proj"], ["k_proj", "o_proj", "gate_proj", "down_proj"]]


class ExactPCA(IncrementalPCA):
    """PEFT's IncrementalPCA with the exact SVD on float64 inputs (see the module docstring)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **{**kw, "lowrank": False})

    def partial_fit(self, X, check_input=True):
        return super().partial_fit(X.double(), check_input)


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**PRESETS["tiny"])).eval()


def train_batches(seed: int, n: int = 24, batch_size: int = 4) -> list:
    """Padded batches of random examples, a random prompt length masked out of the labels of each."""
    g = torch.Generator().manual_seed(seed)
    enc = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(1, 512, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        enc.append(EncodedExample(ids, [IGNORE] * prompt + ids[prompt:], False, "drawn"))
    kw = dict(batch_size=batch_size, pack=False, max_seq_len=64, shuffle=True, seed=seed, pad_id=0)
    return list(batches(enc, **kw))


def peft_eva_state(model, data, targets, r, rho, tau, monkeypatch) -> dict[str, torch.Tensor]:
    """PEFT's get_eva_state_dict on minilora's model and batches, its PCA exact."""
    monkeypatch.setattr(peft_eva, "IncrementalPCA", ExactPCA)
    cfg = LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))
    loader = [
        dict(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            labels=b.labels,
            position_ids=b.position_ids,
            segment_ids=b.segment_ids,
        )
        for b in data
    ]

    def forward(m, x):
        return m(
            x["input_ids"],
            position_ids=x["position_ids"],
            attention_mask=x["attention_mask"],
            segment_ids=x["segment_ids"],
            return_hidden=True,
        )

    return peft_eva.get_eva_state_dict(model, loader, peft_config=cfg, forward_fn=forward, show_progress_bar=False)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    r=st.integers(1, 6),
    spread=st.sampled_from([None, 1.5, 2.0, 3.0]),
    pick=st.integers(0, len(DISTINCT) - 1),
    tau=st.sampled_from([0.9, 0.99]),
    seed=st.integers(0, 2**16),
)
def test_eva_equals_peft_on_the_same_activations(monkeypatch, r, spread, pick, tau, seed):
    rho = spread or 1.0
    targets = ALL if spread is None else DISTINCT[pick]  # rho = 1: every layer takes exactly r, no ties
    model, data = tiny_model(seed), train_batches(seed)
    want = peft_eva_state(model, data, targets, r, rho, tau, monkeypatch)
    apply_lora(model, targets=targets, r=r, alpha=2 * r, dropout=0.0, init="eva", seed=0, verbose=False)
    got, ranks = eva.fit(model, data, r, rho, tau)
    assert set(got) == set(want) == set(lora_modules(model))
    assert ranks == {n: want[n].shape[0] for n in want}
    assert sum(ranks.values()) == r * len(ranks)  # the budget: r per layer
    for name, a in got.items():
        # float64 directions of norm 1, the same operations up to summation order: 1e-10 apart before the
        # cast; the float32 cast of each then rounds by at most 2^-24 of 1 (6e-8)
        torch.testing.assert_close(a, want[name].float(), rtol=0, atol=1.2e-7)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 6),
    extra=st.integers(0, 3),
    width=st.integers(8, 24),
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
@example(k=3, extra=0, width=8, sizes=[2, 1], offset=0.0, seed=0)  # a first batch with fewer rows than k
def test_incremental_svd_equals_the_svd_of_all_rows_when_they_span_at_most_k_directions(
    k, extra, width, sizes, offset, seed
):
    """Rows in a d <= k dimensional affine subspace: the kept rank-k part loses nothing, so after any
    split into batches the incremental state is the SVD of all rows at once, centred on their mean."""
    g = torch.Generator().manual_seed(seed)
    d = max(1, k - extra)
    rows = sum(sizes)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64) @ torch.randn(d, width, generator=g, dtype=torch.float64)
    x = x + offset * torch.randn(width, generator=g, dtype=torch.float64)  # a mean far from 0
    svd, start = eva.IncrementalSVD(k), 0
    for m in sizes:
        svd.update(x[start : start + m], tau=0.99)
        start += m
    centred = x - x.mean(0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    scale = float(S[0]) if S.numel() else 1.0
    kept = min(k, rows, width)
    torch.testing.assert_close(svd.singular[:kept], S[:kept], rtol=0, atol=1e-9 * scale)
    top = int((S[:kept] > 1e-9 * scale).sum())  # the directions the data has (d of them, fewer if rows < d)
    want = Vh[:top].T @ Vh[:top]  # (width, width) the projector onto the span: defined whatever the basis
    got = svd.components[:top].T @ svd.components[:top]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(svd.mean, x.mean(0), rtol=0, atol=1e-9 * (1 + abs(offset)))
    torch.testing.assert_close(svd.var, x.var(0, unbiased=False), rtol=1e-9, atol=1e-9 * scale**2 / rows)


def test_initialise_sets_orthonormal_a_zero_b_and_the_ranks_with_alpha_scaled():
    """rho > 1: layers get different ranks, alpha_l = alpha r_l / r keeps the scaling alpha / r; A's rows
    are orthonormal directions, B = 0, and a layer given rank 0 is the plain base again."""
    model, data = tiny_model(3), train_batches(3)
    apply_lora(model, targets=DISTINCT[0], r=4, alpha=8, dropout=0.0, init="eva", seed=0, verbose=False)
    ranks = eva.initialise(model, data, r=4, rho=3.0, tau=0.99)
    assert sum(ranks.values()) == 4 * len(ranks) and len(set(ranks.values())) > 1
    mods = lora_modules(model)
    for name, rl in ranks.items():
        if rl == 0:
            assert name not in mods and not isinstance(model.get_submodule(name), LoRALinear)
            continue
        m = mods[name]
        assert m.r == rl and m.alpha == 8 * rl / 4 and m.scaling == 2.0
        a = m.lora_A.weight.double()
        torch.testing.assert_close(a @ a.T, torch.eye(rl, dtype=torch.float64), rtol=0, atol=1e-6)
        assert not m.lora_B.weight.any()


def test_too_few_labelled_tokens_is_refused_in_one_sentence():
    model, data = tiny_model(0), train_batches(0, n=2, batch_size=1)
    apply_lora(model, targets=ALL, r=48, alpha=8, dropout=0.0, init="eva", seed=0, verbose=False)
    most = max(int(eva.label_mask(b).sum()) for b in data)
    with pytest.raises(eva.EvaError) as e:
        eva.fit(model, data, r=48, rho=1.0)
    msg = str(e.value)
    assert "needs a batch of at least 48 labelled tokens" in msg and f"the largest batch has {most}" in msg
    assert msg.endswith("raise --batch-size or lower --lora-r.") and "\n" not in msg
