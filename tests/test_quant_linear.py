"""NF4Linear: forward and backward against dequantize-then-linear and against bitsandbytes'
Linear4bit (nf4, double quant) holding the same bytes; and no dequantized weight alive between
forward and backward (saved tensors counted, and every tensor the forward creates tracked).

in_features is drawn from sizes bitsandbytes' CPU dequantize handles correctly (see test_lora.py).
"""

import gc
import sys
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lora import bnb_linear4bit
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minilora.quant.linear import NF4Linear, dequantize_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fwd_bwd(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad


@settings(max_examples=12)  # each example quantizes with both libraries and runs forward and backward
@given(
    k=st.integers(1, 200),
    m=st.integers(1, 64),
    blocksize=st.sampled_from([32, 64, 128]),
    dq=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_matches_dequantize_then_linear(k, m, blocksize, dq, bias, dtype, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias).to(dtype)
    nl = NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=dq)
    x = torch.randn(*batch, k, generator=gen).to(dtype)
    g = torch.randn(*batch, m, generator=gen).to(dtype)
    w = dequantize_nf4(nl.weight_nf4, dtype)  # (M, K)
    y, gx = fwd_bwd(nl, x, g)
    want = F.linear(x, w)
    if bias:
        want = want + lin.bias.detach()
    assert torch.equal(y, want)
    assert torch.equal(gx, g @ w)  # (..., M) @ (M, K)
    assert not any(t.requires_grad for t in nl.buffers())


@settings(max_examples=10)  # each example quantizes with both libraries and runs forward and backward
@given(
    k=st.sampled_from([100, 128, 256]),
    m=st.integers(1, 64),
    blocksize=st.sampled_from([32, 64, 128]),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_matches_bitsandbytes_linear4bit(k, m, blocksize, bias, dtype, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias).to(dtype)
    nl = NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=True)
    ref = bnb_linear4bit(nl)
    x = torch.randn(*batch, k, generator=gen).to(dtype)
    g = torch.randn(*batch, m, generator=gen).to(dtype)
    (y, gx), (y_ref, gx_ref) = fwd_bwd(nl, x, g), fwd_bwd(ref, x, g)
    assert torch.equal(gx, gx_ref)
    if bias and dtype != torch.float32:
        # bitsandbytes adds the bias inside F.linear, NF4Linear after it: one 16-bit rounding apart.
        torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=2**-7 * y_ref.abs().max().item())
    else:
        assert torch.equal(y, y_ref)


def test_compute_dtype_matches_bitsandbytes():
    """float32 input, bf16 compute: both cast x to bf16, multiply there and return float32."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=False)
    nl = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    ref = bnb_linear4bit(nl)
    ref.compute_dtype = torch.bfloat16
    x, g = torch.randn(6, 128), torch.randn(6, 40)
    (y, gx), (y_ref, gx_ref) = fwd_bwd(nl, x, g), fwd_bwd(ref, x, g)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


class AliveTracker(TorchDispatchMode):
    """Weak references to every tensor an op creates inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out

    def alive(self):
        gc.collect()
        return [r() for r in self.refs if r() is not None]


def kept_between_forward_and_backward(forward, x, m, k):
    """(bytes saved for backward, tensors of >= M*K elements created in forward and still alive)."""
    saved = []
    tracker = AliveTracker()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with tracker:
            y = forward(x)
    big = [t for t in tracker.alive() if t.numel() >= m * k]
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    y.float().sum().backward()
    return nbytes, big


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_dequantized_weight_alive_between_forward_and_backward(dtype):
    m, k = 96, 256  # (M, K) weight; x has fewer elements than W so a W-sized tensor is the weight
    nl = NF4Linear.from_linear(nn.Linear(k, m).to(dtype))
    x = torch.randn(4, k, dtype=dtype, requires_grad=True)
    nbytes, big = kept_between_forward_and_backward(nl, x, m, k)
    assert nbytes == 0 and big == [], [(t.shape, t.dtype) for t in big]
    assert x.grad is not None
    # The detector does see a weight kept alive: dequantize-then-F.linear saves W for dL/dx.
    naive_bytes, naive_big = kept_between_forward_and_backward(
        lambda z: F.linear(z, nl.dequantized_weight(dtype)), x, m, k
    )
    assert naive_bytes >= m * k * x.element_size() and len(naive_big) >= 1


def test_to_bnb_without_bitsandbytes_says_what_to_install(monkeypatch):
    """bitsandbytes is an interop/test dependency only: without it, one sentence naming the fix."""
    nl = NF4Linear.from_linear(nn.Linear(64, 8))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        nl.to_bnb()
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        nl.weight_nf4.to_bnb()
