"""DPO, conservative DPO, IPO and ORPO against a float64 reference written from their definitions.

The reference takes each row's full (T, V) logits in float64 (a Python loop over labelled positions,
no chunking), the reference policy from a copy of the model made before LoRA surgery (not through
lora_disabled), and the losses as written in the papers (log sigmoid as log(1 / (1 + e^-z)), odds as
p / (1 - p)). hypothesis draws beta, label smoothing, lambda, the number of pairs, prompt and answer
lengths (so rows are padded differently), the loss chunk and the family (Llama; Gemma 3 with
soft-capping). The per-token head function is checked against autograd on full logits.
"""

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs
from minilora.lora.surgery import apply_lora, lora_modules, lora_parameters
from minilora.models.config import FULL, SLIDING, ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.transformer import Transformer
from minilora.train.loss import TokenCrossEntropyFn
from minilora.train.objectives import make_objective

V = 97


@functools.cache
def models(family: str):
    """(the NF4 base before LoRA, the same base with LoRA of random non-zero B), float32."""
    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny"), vocab_size=V, hidden_size=32, num_hidden_layers=2, layer_types=[SLIDING, FULL]
    )
    if family == "llama":
        cfg = dataclasses.replace(
            cfg, family="llama", hidden_act="silu", query_pre_attn_scalar=None, final_logit_softcapping=None
        )
    else:
        cfg = dataclasses.replace(cfg, final_logit_softcapping=3.0)  # small: the cap bends these logits
    torch.manual_seed(0)
    base = Transformer(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3)
    base.tie_weights()
    quantize_linears(base, compute_dtype=torch.float32)
    model = copy.deepcopy(base)
    apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return base.train(), model.train()


def row_logprobs64(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens, from full float64 log-softmax."""
    logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (R, T, V)
    out = []
    for r in range(batch.input_ids.shape[0]):
        targets = [(t, int(batch.labels[r, t + 1])) for t in range(batch.input_ids.shape[1] - 1)]
        out.append(torch.stack([logp[r, t, y] for t, y in targets if y != IGNORE]).sum())
    return torch.stack(out)


def reference_loss(name, pi, rho, n, beta, eps, lam):
    """The mean per-pair loss in float64 from the definitions (pi, rho, n: (2P,) chosen then rejected)."""
    P = pi.shape[0] // 2
    pc, pr, rc, rr, nc, nr = pi[:P], pi[P:], rho[:P], rho[P:], n[:P].double(), n[P:].double()
    sig = lambda x: 1 / (1 + torch.exp(-x))
    if name == "dpo":
        z = beta * ((pc - rc) - (pr - rr))
        return (-(1 - eps) * torch.log(sig(z)) - eps * torch.log(sig(-z))).mean()
    if name == "ipo":
        return (((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2).mean()
    lc, lr = pc / nc, pr / nr
    p_c, p_r = torch.exp(lc), torch.exp(lr)
    log_or = torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    return (-lc - lam * torch.log(sig(log_or))).mean()


@st.composite
def pair_batches(draw):
    P = draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    tok = lambda k: torch.randint(3, V, (k,), generator=g).tolist()
    pairs = []
    for _ in range(P):
        prompt = [1] + tok(draw(st.integers(0, 5)))
        c, r = tok(draw(st.integers(1, 6))), tok(draw(st.integers(1, 6)))
        enc = lambda a: EncodedExample(prompt + a + [2], [IGNORE] * len(prompt) + a + [2])
        pairs.append(EncodedPair(enc(c), enc(r)))
    return collate_pairs([[i] for i in range(P)], pairs, pad_id=0)


@settings(max_examples=25)
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    name=st.sampled_from(["dpo", "ipo", "orpo"]),
    batch=pair_batches(),
    beta=st.floats(0.01, 2.0),
    eps=st.floats(0.0, 0.49),  # 0.0 (plain DPO) is a boundary hypothesis draws often
    lam=st.floats(0.01, 2.0),
    chunk=st.sampled_from([1, 3, 64]),
)
def test_pair_losses_and_gradients_equal_a_float64_reference(family, name, batch, beta, eps, lam, chunk):
    base, model = models(family)
    kw = dict(beta=beta, label_smoothing=0.0 if name == "ipo" else eps, orpo_lambda=lam)
    objective = make_objective(
        "orpo" if name == "orpo" else "dpo", chunk, dpo_loss="ipo" if name == "ipo" else "sigmoid", **kw
    )
    params = lora_parameters(model)
    loss_sum, n, metrics = objective(model, batch)
    grads = torch.autograd.grad(loss_sum / n, params)

    n_tok = (batch.labels[:, 1:] != IGNORE).sum(1)
    with torch.no_grad():
        rho = row_logprobs64(base, batch)
    ref = reference_loss(name, row_logprobs64(model, batch), rho, n_tok, beta, kw["label_smoothing"], lam)
    ref_grads = torch.autograd.grad(ref, params)
    assert n == batch.n_pairs
    torch.testing.assert_close((loss_sum / n).double(), ref, rtol=2e-5, atol=2e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6)
    if name != "orpo":  # the logged rewards: beta (pi - rho) per answer, summed over pairs
        with torch.no_grad():
            pi = row_logprobs64(model, batch)
        P = batch.n_pairs
        want = beta * (pi - rho)
        assert abs(metrics["rewards/chosen"] - float(want[:P].sum())) < 1e-4 * (1 + float(want.abs().max()))
        assert abs(metrics["rewards/rejected"] - float(want[P:].sum())) < 1e-4 * (1 + float(want.abs().max()))
        assert metrics["accuracy"] == float((want[:P] > want[P:]).sum())


@settings(max_examples=25)
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 16),
    v=st.integers(2, 200),
    chunk=st.sampled_from([1, 7, 1024]),
    cap=st.sampled_from([None, 5.0]),
    seed=st.integers(0, 10**6),
)
def test_token_cross_entropy_equals_autograd(n, d, v, chunk, cap, seed):
    """Per-row CE and its gradient under a different incoming gradient for every row."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    h2 = h.detach().clone().requires_grad_()
    ours = TokenCrossEntropyFn.apply(h, w, y, cap, chunk)
    z = h2 @ w.t()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (ours * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)
