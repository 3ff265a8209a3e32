"""One row per preference pair (data/pairs.py's SharedPairs): the prompt once, then the chosen and the
rejected answer, each attending to the prompt and to itself. Against TRL's layout (one row per answer,
the PairBatch's own rows, itself checked against TRL in test_pref_trl_oracle.py): the same per-answer
log-probabilities, losses and LoRA gradients, policy and reference alike, on a Llama and on a Gemma 3
whose sliding window is shorter than the rows (so the window must count positions, not slots).

Compared in float64, so that what is compared is the computation: the two layouts run the same
operations on the same inputs, but a matmul over other rows may block its sums otherwise, and the
shared prompt's states receive both answers' gradients already summed, where TRL's layout sums them
in the weight gradients. RMSNorm computes in float32 as transformers' does, even in a float64 model,
so there those differently ordered sums round to float32: DPO's gradient, a difference of two
answers' nearly equal gradients, then differs by 1e-7 of either answer's gradient. The tests swap in
a float64 norm (float64_norms) so that float64 is float64 throughout; the differences left are below
1e-12. A rejected answer that saw the chosen one, a position off by one, a window counted in slots, a
target taken from the wrong position or counted in the wrong answer changes a log-probability by
about its own size.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pair_split import float64_norms, loss_and_grads  # float64 RMSNorm; one objective call's loss, grads, metrics

from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import CHOSEN, PREFIX, REJECTED, EncodedPair, collate_pairs, common_prefix, shared_length
from minilora.lora.surgery import apply_lora, lora_parameters
from minilora.models.config import ModelConfig
from minilora.models.presets import PRESETS
from minilora.models.transformer import Transformer
from minilora.train.loss import sequence_logprobs
from minilora.train.objectives import make_objective
from minilora.train.reference import reference_logprobs

V = PRESETS["tiny"]["vocab_size"]


def model_of(family: str, seed: int, recompute: bool = False) -> Transformer:
    """A tiny model in float64 with a LoRA adapter that changes its outputs; Gemma 3 with a sliding
    window of 6 tokens, well inside the drawn rows."""
    cfg = {**PRESETS["tiny"], "sliding_window": 6}
    if family == "llama":
        cfg.update(family="llama", hidden_act="silu", query_pre_attn_scalar=None, final_logit_softcapping=None)
        cfg.update(layer_types=["full_attention"] * cfg["num_hidden_layers"])
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg))
    apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed, verbose=False)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    model.set_gradient_checkpointing(recompute)
    return model.double().train()


@st.composite
def pairs(draw):
    """Pairs sharing a prompt, answers that may begin alike (a common prefix past the prompt), some
    pairs with no prompt at all, some whose rejected sequence lost the prompt's first tokens (each
    sequence cut on its own, as --truncation left cuts them), of drawn lengths."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        ids = lambda n: draw(st.lists(st.integers(3, V - 1), min_size=n, max_size=n))
        prompt = ids(draw(st.integers(0, 14)))
        cut = draw(st.integers(0, 2))  # prompt tokens the rejected sequence lost
        same = ids(draw(st.integers(0, 3)))  # the answers' common start
        a_c, a_r = same + ids(draw(st.integers(0, 9))), same + ids(draw(st.integers(0, 9)))
        if a_c == a_r:
            a_r = a_r + [3]
        seq = lambda p, a: EncodedExample(p + a + [2], [IGNORE] * len(p) + a + [2])
        out.append(EncodedPair(seq(prompt, a_c), seq(prompt[cut:], a_r)))
    return out


def answer_logprobs(model, batch, shared: bool):
    """(2P,) log-probabilities and (2P,) token counts of each answer, policy then reference."""
    rows = batch.shared if shared else batch
    policy, counts = sequence_logprobs(model, rows, 3)
    return policy, counts, reference_logprobs(model, rows, 3)


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(["llama", "gemma3"]), encoded=pairs(), seed=st.integers(0, 2**16))
def test_shared_rows_give_each_answer_its_own_rows_log_probability(family, encoded, seed):
    model = model_of(family, seed)
    batch = collate_pairs([[i] for i in range(len(encoded))], encoded, 0)
    with float64_norms():
        want, want_n, want_ref = answer_logprobs(model, batch, shared=False)
        got, got_n, got_ref = answer_logprobs(model, batch, shared=True)
    assert torch.equal(got_n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_ref, want_ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, got_ref)  # the adapter changes them: policy and reference differ


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    name=st.sampled_from(["dpo", "ipo", "orpo"]),
    encoded=pairs(),
    recompute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shared_rows_give_the_same_loss_gradients_and_metrics(family, name, encoded, recompute, seed):
    model = model_of(family, seed, recompute)
    batch = collate_pairs([[i] for i in range(len(encoded))], encoded, 0)
    kw = {"dpo_loss": "ipo"} if name == "ipo" else {}
    objective = "orpo" if name == "orpo" else "dpo"
    with float64_norms():
        rows = loss_and_grads(model, make_objective(objective, 3, share_prompt=False, **kw), batch)
        shared = loss_and_grads(model, make_objective(objective, 3, **kw), batch)
        # The gradients are dL/dpi-weighted sums of the answers' own gradients, which may nearly cancel
        # (DPO on two alike answers): rounding scales with the answers' gradients (each pi weighted 1
        # here) times |dL/dpi| (at most beta = 0.1 for DPO, about 10 / n for IPO at tau = 5, below 2 for
        # ORPO), not with what is left after the cancellation.
        answers = loss_and_grads(model, lambda m, b: (sequence_logprobs(m, b, 3)[0].sum(), 0, {}), batch)
    scale = 20 * max(float(g.abs().max()) for g in answers[1])
    torch.testing.assert_close(shared[0], rows[0], rtol=1e-12, atol=1e-12)
    for g_shared, g_rows in zip(shared[1], rows[1]):
        torch.testing.assert_close(g_shared, g_rows, rtol=1e-9, atol=1e-12 * scale)
    for k in rows[2]:
        assert shared[2][k] == pytest.approx(rows[2][k], rel=1e-10, abs=1e-12), k


def test_the_layout_of_a_pair_row():
    """Prompt [5, 6], answers [7, 8] and [7, 9] (each + EOS 2): the common prefix runs into the answers,
    both branches' positions continue from it, and each labelled target names its predicting slot."""
    seq = lambda a: EncodedExample([5, 6] + a + [2], [IGNORE, IGNORE] + a + [2])
    pair = EncodedPair(seq([7, 8]), seq([7, 9]))
    s = collate_pairs([[0]], [pair], 0).shared
    assert common_prefix(pair.chosen.input_ids, pair.rejected.input_ids) == 3 == int(s.prefix_len[0])
    assert s.input_ids.tolist() == [[5, 6, 7, 8, 2, 9, 2]] and shared_length(pair) == 7
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    assert s.segment_ids.tolist() == [[PREFIX] * 3 + [CHOSEN] * 2 + [REJECTED] * 2]
    # chosen: 7 from slot 1, 8 from 2, EOS from 3; rejected: 7 from slot 1, 9 from 2 (the prefix), EOS from 5
    assert list(zip(s.src.tolist(), s.tgt.tolist(), s.row.tolist())) == [
        (1, 7, 0),
        (2, 8, 0),
        (3, 2, 0),
        (1, 7, 1),
        (2, 9, 1),
        (5, 2, 1),
    ]


def test_pairs_run_fewer_tokens_shared():
    """Four pairs of a 40-token prompt and 20-token answers: 4 rows of 80 tokens against 8 of 60."""
    seq = lambda a: EncodedExample(list(range(3, 43)) + a + [2], [IGNORE] * 40 + a + [2])
    encoded = [EncodedPair(seq([50 + i] * 19), seq([100 + i] * 19)) for i in range(4)]
    b = collate_pairs([[i] for i in range(4)], encoded, 0)
    assert tuple(b.input_ids.shape) == (8, 60) and tuple(b.shared.input_ids.shape) == (4, 80)


def test_a_shared_prompt_without_segments_or_positions_is_refused():
    model = model_of("llama", 0)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="prefix_len .* needs segment_ids and position_ids"):
        model(ids, prefix_len=torch.tensor([1]))
