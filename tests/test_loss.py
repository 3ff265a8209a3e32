"""minilora.train.loss, the one chunked loss: training, validation and perplexity vs full logits.

HeadCrossEntropyFn computes dL/dh inside its forward pass; torch autograd on full logits is the
reference, for drawn sizes, chunk sizes, soft-capping and dtypes. chunked_lm_loss on the tiny model
with LoRA equals the full-logits loss, loss and LoRA gradients. Validation / perplexity
(evaluate.completion_loss) equals an unchunked float64 reference (each example alone, full
logits), and on a 262k-vocabulary model its peak memory stays far below its (B, T, V) logits.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.train.loss import IGNORE, HeadCrossEntropyFn, chunked_lm_loss


def full_logits_loss(logits, labels):
    """Unchunked reference: sum_t CE(logits[:, t], labels[:, t+1]) from (B, T, V) logits, float64."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].double().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def reference(h, w, y, cap):
    z = (h @ w.t()).float()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, y, reduction="sum")


@given(
    n=st.integers(0, 40),
    d=st.integers(1, 24),
    v=st.integers(2, 300),
    chunk=st.sampled_from([1, 7, 16, 1024]),
    cap=st.sampled_from([None, 5.0, 30.0]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 10**6),
)
def test_head_cross_entropy_equals_autograd(n, d, v, chunk, cap, scale, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).requires_grad_()
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    h2 = h.detach().clone().requires_grad_()
    ours = HeadCrossEntropyFn.apply(h, w, y, cap, chunk)
    ref = reference(h2, w, y, cap)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    (ours * 0.7).backward()
    (ref * 0.7).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)


def test_head_cross_entropy_bf16_close_to_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(500, 32, generator=g) * 0.2).bfloat16()
    y = torch.randint(0, 500, (64,), generator=g)
    h2 = h.detach().clone().requires_grad_()
    ours = HeadCrossEntropyFn.apply(h, w, y, None, 16)
    ref = reference(h2, w, y, None)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    ours.backward()
    ref.backward()
    assert h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-3)


@settings(max_examples=5)  # each example builds a model and a full-vocabulary reference
@given(seed=st.integers(0, 1000), chunk=st.sampled_from([5, 64, 1024]))
def test_chunked_lm_loss_equals_full_logits_loss(seed, chunk):
    from minilora.data.packing import Batch
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.loader import load_model

    model, _ = load_model("tiny", quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, dropout=0.0, init="gaussian", verbose=False, seed=seed)
    for m in model.modules():  # non-zero B so the LoRA gradients are all informative
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 12:] = -100
    mask = torch.ones_like(ids)
    batch = Batch(ids, labels, mask, torch.arange(17).expand(3, 17), mask.clone(), int((labels[:, 1:] != -100).sum()))
    params = lora_parameters(model)
    loss, n = chunked_lm_loss(model, batch, chunk)
    grads = torch.autograd.grad(loss, params)
    ref = full_logits_loss(model(ids, position_ids=batch.position_ids, attention_mask=mask), labels).float()
    ref_grads = torch.autograd.grad(ref, params)
    assert n == batch.n_label_tokens
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, ref_grads):  # float32 sums over 40 tokens in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()) + 1e-7)


# ------------------------------------------------------------------------- validation / perplexity
def _model(family: str, vocab: int, dtype, seed: int, hidden: int = 64, layers: int = 2):
    import dataclasses

    from minilora.models.config import FULL, SLIDING, ModelConfig
    from minilora.models.transformer import Transformer

    cfg = ModelConfig.from_name("tiny")
    cfg = dataclasses.replace(
        cfg,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        layer_types=[SLIDING, FULL][:layers] if layers <= 2 else cfg.layer_types,
    )
    if family == "llama":
        cfg = dataclasses.replace(
            cfg, family="llama", hidden_act="silu", query_pre_attn_scalar=None, final_logit_softcapping=None
        )
    else:
        cfg = dataclasses.replace(cfg, final_logit_softcapping=30.0)
    torch.manual_seed(seed)
    model = Transformer(cfg).to(dtype)
    for p in model.parameters():  # random norm weights too, so every path is exercised
        torch.nn.init.normal_(p, std=0.5 if p.ndim == 1 else 0.3)
    model.tie_weights()
    return model


@given(
    family=st.sampled_from(["gemma3", "llama"]),
    seed=st.integers(0, 10**6),
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=6),
    batch_size=st.integers(1, 4),
    chunk=st.sampled_from([1, 3, 16, 256]),
    data=st.data(),
)
def test_completion_loss_equals_unchunked_float64_reference(family, seed, lengths, batch_size, chunk, data):
    from minilora.data.encode import EncodedExample
    from minilora.eval.evaluate import completion_loss

    model = _model(family, 97, torch.float64, seed)
    g = torch.Generator().manual_seed(seed)
    encoded = []
    for L in lengths:
        ids = torch.randint(1, 97, (L,), generator=g).tolist()
        labelled = data.draw(st.lists(st.booleans(), min_size=L, max_size=L))
        encoded.append(EncodedExample(ids, [t if keep else IGNORE for t, keep in zip(ids, labelled)]))
    with torch.no_grad():
        ref = sum(
            float(full_logits_loss(model(torch.tensor([e.input_ids])), torch.tensor([e.labels]))) for e in encoded
        )
    total, count = completion_loss(model, encoded, batch_size, pad_id=0, chunk=chunk)
    assert count == sum(sum(t != IGNORE for t in e.labels[1:]) for e in encoded)
    assert total == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert model.training  # completion_loss restores the mode it found


# Peak memory is measured in a fresh subprocess (RSS is per process; the test runner's own history
# would hide the peak). /proc/self/clear_refs "5" resets VmHWM (the peak RSS) once the model is
# built; VmHWM after validation minus VmRSS before it is the peak that validation itself added.
_PEAK_SCRIPT = """
import torch
torch.set_num_threads(1)
from test_loss import _model  # the subprocess runs in tests/
from minilora.data.encode import EncodedExample
from minilora.eval.evaluate import completion_loss

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

model = _model("gemma3", {V}, torch.float32, 0, hidden=8, layers=1)
g = torch.Generator().manual_seed(0)
enc = [EncodedExample(ids, ids) for ids in torch.randint(1, {V}, ({B}, {T}), generator=g).tolist()]
completion_loss(model, enc[:1], 1, chunk={chunk})  # warm-up: allocator pools, lazy inits
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
completion_loss(model, enc, {B}, chunk={chunk})
print(kib("VmHWM:") - before)
"""


def test_validation_peak_stays_far_below_full_logits_on_a_262k_vocabulary():
    V, B, T, chunk = 262144, 4, 128, 32
    logits_bytes = B * T * V * 4  # the float32 (B, T, V) logits the old path materialized: 512 MiB
    script = _PEAK_SCRIPT.format(V=V, B=B, T=T, chunk=chunk)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    # chunked: about three (chunk, V) float32 buffers of 32 MiB (logits, log-softmax, a temporary) and
    # the activations; a third of the full logits leaves room for the allocator's variance
    assert peak < logits_bytes / 3, (
        f"validation added {peak / 2**20:.0f} MiB; full logits are {logits_bytes / 2**20:.0f} MiB"
    )
