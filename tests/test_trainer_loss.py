"""The training loss: chunked cross-entropy through the frozen head vs plain autograd.

HeadCrossEntropyFn computes dL/dh inside its forward pass; torch autograd on full logits is the
reference, for drawn sizes, chunk sizes, soft-capping and dtypes. chunked_lm_loss on the tiny model
with LoRA equals packing.token_loss_sum, loss and LoRA gradients.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.trainer import HeadCrossEntropyFn, chunked_lm_loss


def reference(h, w, y, cap):
    z = (h @ w.t()).float()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, y, reduction="sum")


@given(n=st.integers(0, 40), d=st.integers(1, 24), v=st.integers(2, 300), chunk=st.sampled_from([1, 7, 16, 1024]),
       cap=st.sampled_from([None, 5.0, 30.0]), scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 10**6))
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


@settings(max_examples=5)
@given(seed=st.integers(0, 1000), chunk=st.sampled_from([5, 64, 1024]))
def test_chunked_lm_loss_equals_full_logits_loss(seed, chunk):
    from minilora.lora import apply_lora, lora_parameters
    from minilora.models.loader import load_model
    from minilora.packing import Batch, token_loss_sum

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
    ref = token_loss_sum(model(ids, position_ids=batch.position_ids, attention_mask=mask), labels)
    ref_grads = torch.autograd.grad(ref, params)
    assert n == batch.n_label_tokens
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, ref_grads):  # float32 sums over 40 tokens in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()) + 1e-7)
