"""The reference policy is the frozen base: inside lora_disabled(model) a LoRA model's logits equal
the base model's (a copy taken before apply_lora) bit for bit, for NF4 and dense bases, Llama and
Gemma 3, float32 and bf16, LoRA and DoRA, with dropout, in train mode, with and without grad; and so
do the reference log-probabilities DPO uses. The adapter is back on after the block, also after an
exception; a merged adapter is refused.
"""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs
from minilora.lora.layers import AdapterError
from minilora.lora.surgery import apply_lora, lora_disabled, lora_modules, merge_lora
from minilora.models.config import FULL, SLIDING, ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.transformer import Transformer
from minilora.train.loss import sequence_logprobs
from minilora.train.reference import reference_logprobs

V = 61


def base_and_lora(family, dtype, nf4, dora, dropout, seed):
    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny"), vocab_size=V, hidden_size=32, num_hidden_layers=2, layer_types=[SLIDING, FULL]
    )
    if family == "llama":
        cfg = dataclasses.replace(
            cfg, family="llama", hidden_act="silu", query_pre_attn_scalar=None, final_logit_softcapping=None
        )
    torch.manual_seed(seed)
    base = Transformer(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3)
    base.tie_weights()
    base = base.to(dtype)
    if nf4:
        quantize_linears(base, compute_dtype=dtype)
    model = copy.deepcopy(base)
    apply_lora(model, r=4, alpha=8, dropout=dropout, use_dora=dora, verbose=False, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B = 0 would make the adapter a no-op and the test vacuous
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return base.train(), model.train()


@settings(max_examples=12)
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    nf4=st.booleans(),
    dora=st.booleans(),
    dropout=st.sampled_from([0.0, 0.2]),
    grad=st.booleans(),
    seed=st.integers(0, 1000),
    T=st.integers(1, 9),
)
def test_logits_with_lora_disabled_equal_the_base_bit_for_bit(family, dtype, nf4, dora, dropout, grad, seed, T):
    base, model = base_and_lora(family, dtype, nf4, dora, dropout, seed)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.set_grad_enabled(grad):
        want = base(ids)
        with lora_disabled(model):
            got = model(ids)
        adapted = model(ids)
    assert torch.equal(got, want)
    assert not torch.equal(adapted, want)  # the adapter is on again after the block


@settings(max_examples=6)
@given(family=st.sampled_from(["llama", "gemma3"]), seed=st.integers(0, 1000), chunk=st.sampled_from([1, 4, 64]))
def test_reference_logprobs_equal_the_base_models_bit_for_bit(family, seed, chunk):
    base, model = base_and_lora(family, torch.float32, True, False, 0.1, seed)
    g = torch.Generator().manual_seed(seed)
    enc = lambda n: EncodedExample([1] + torch.randint(3, V, (n,), generator=g).tolist(), [IGNORE] + [5] * n)
    pairs = [EncodedPair(enc(3), enc(5)), EncodedPair(enc(6), enc(2))]
    batch = collate_pairs([[0], [1]], pairs, pad_id=0)
    with torch.no_grad():
        want, _ = sequence_logprobs(base, batch, chunk)
    assert torch.equal(reference_logprobs(model, batch, chunk), want)


def test_adapter_back_on_after_an_exception_and_merged_refused():
    base, model = base_and_lora("llama", torch.float32, False, False, 0.0, 0)
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids)
        with pytest.raises(RuntimeError), lora_disabled(model):
            raise RuntimeError("boom")
        assert torch.equal(model(ids), adapted)
    merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge"), lora_disabled(model):
        pass
