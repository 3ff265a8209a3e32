"""DPO, IPO, conservative DPO and ORPO against TRL's own loss code, on a tiny Llama and a tiny Gemma 3
with an NF4 base and LoRA: the same batch gives the same loss and the same LoRA gradients within
float32 rounding.

TRL's side is TRL + PEFT + bitsandbytes: the transformers model with every block linear swapped for a
bitsandbytes Linear4bit holding our very NF4 bytes, PEFT's LoRA (marked 4-bit, so PEFT's QLoRA layer)
holding our adapter weights, and a real DPOTrainer around it, whose compute_loss runs the policy
forward and the reference forward with PEFT's adapter disabled. The batch is handed to it in its
own layout (input_ids, attention_mask, completion_mask: chosen rows, then rejected rows); ours runs
either that layout or its default, one row per pair with the prompt shared (data/pairs.py's SharedPairs).

  - DPO (loss_type sigmoid) and IPO (ipo): DPOTrainer.compute_loss on several pairs at once.
  - conservative DPO (label smoothing eps): TRL 1.16's sigmoid loss has no label smoothing; its "aot"
    loss is -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d) with d computed from the batch
    sorted, which for a single pair is conservative DPO exactly, so each pair is one call.
  - ORPO: ORPOTrainer's get_batch_logps (length-normalized log-probs from full logits) and
    odds_ratio_loss. Its trainer adds an NLL over prompt and answer tokens; ours is the chosen answer's
    mean token NLL (orpo.py), which is -get_batch_logps(chosen), so the oracle is
    mean(-l_c) - mean(odds_ratio_loss).
"""

import os
import types

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (a TRL dependency)
from peft import LoraConfig, get_peft_model  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from minilora import EXAMPLES  # noqa: E402
from minilora.data.encode import EncodedExample  # noqa: E402
from minilora.data.packing import IGNORE  # noqa: E402
from minilora.data.pairs import EncodedPair, collate_pairs  # noqa: E402
from minilora.lora.surgery import apply_lora, lora_modules  # noqa: E402
from minilora.models.loader import load_model, set_module  # noqa: E402
from minilora.train.objectives import make_objective  # noqa: E402

V = 1024  # the bundled tokenizer's vocabulary: TRL tokenizes a one-row dataset with it when it starts
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=64,
            final_logit_softcapping=5.0,
        ),
    ),
}


def hf_model(family):
    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=V,
        hidden_size=128,  # every in_features a multiple of 128: bitsandbytes' CPU dequantize mis-scales others
        num_hidden_layers=2,
        initializer_range=0.2,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norms: their identity init would hide a mistake there
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf


def ours_model(family, tmp_path, seed=0):
    """Our NF4 base + LoRA (random non-zero B, so the policy differs from the reference), loaded from
    the transformers checkpoint saved in tmp_path."""
    hf_model(family).save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), quantize="nf4", dtype=torch.float32)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, verbose=False, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return ours.train()


def bnb_twin(ours, tmp_path):
    """The transformers model of tmp_path with each LoRA-targeted linear swapped for a bitsandbytes
    Linear4bit holding our NF4 bytes, marked 4-bit as transformers marks a BitsAndBytesConfig model (so
    PEFT uses its QLoRA layer); and the LoraConfig matching ours."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for name, m in lora_modules(ours).items():
        lin = m.base.to_bnb(torch.float32)
        lin.support_avx512bf16_for_cpu = False  # else bitsandbytes repacks for its bf16 CPU kernel (rounds)
        set_module(theirs, name, lin)
    theirs.is_loaded_in_4bit = True
    targets = sorted({n.rsplit(".", 1)[1] for n in lora_modules(ours)})
    return theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)


def copy_adapter(ours, pm) -> dict:
    """Put our A and B into PEFT's layers; {module: (PEFT's A, PEFT's B)}."""
    params = {}
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            layer = pm.base_model.model.get_submodule(name)
            assert type(layer).__module__ == "peft.tuners.lora.bnb"
            # .data, not copy_: DPOTrainer casts a QLoRA adapter to bf16 (the QLoRA paper's advice); ours stays
            # float32 as PEFT's default does, and the comparison is of the loss code, in float32
            layer.lora_A["default"].weight.data = m.lora_A.weight.detach().clone()
            layer.lora_B["default"].weight.data = m.lora_B.weight.detach().clone()
            params[name] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return params


def dpo_trainer(ours, tmp_path, **kw):
    """A real DPOTrainer training a fresh LoRA (peft_config: its reference is the base, adapters
    disabled) over the bitsandbytes twin, with our adapter weights copied in; and PEFT's A, B."""
    from transformers import AutoTokenizer

    theirs, lora_config = bnb_twin(ours, tmp_path)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        **kw,
    )
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    tok = AutoTokenizer.from_pretrained(os.path.join(EXAMPLES, "tokenizer"))
    trainer = DPOTrainer(model=theirs, args=args, train_dataset=data, processing_class=tok, peft_config=lora_config)
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # the reference: adapters off
    return trainer, copy_adapter(ours, trainer.model)


def make_batch(seed, n_pairs):
    g = torch.Generator().manual_seed(seed)
    tok = lambda k: torch.randint(3, V, (k,), generator=g).tolist()
    pairs = []
    for _ in range(n_pairs):
        prompt = [1] + tok(int(torch.randint(1, 6, (1,), generator=g)))
        enc = lambda a: EncodedExample(prompt + a + [2], [IGNORE] * len(prompt) + a + [2])
        lens = torch.randint(1, 7, (2,), generator=g).tolist()
        pairs.append(EncodedPair(enc(tok(lens[0])), enc(tok(lens[1]))))
    b = collate_pairs([[i] for i in range(n_pairs)], pairs, pad_id=0)
    trl_inputs = {
        "input_ids": b.input_ids,
        "attention_mask": b.attention_mask,
        "completion_mask": (b.labels != IGNORE).long(),  # the answer tokens (and EOS), aligned with input_ids
    }
    return b, trl_inputs


def ours_loss_and_grads(ours, objective, batch):
    for p in ours.parameters():
        p.grad = None
    loss_sum, n, metrics = objective(ours, batch)
    (loss_sum / n).backward()
    grads = {name: (m.lora_A.weight.grad, m.lora_B.weight.grad) for name, m in lora_modules(ours).items()}
    return loss_sum.detach() / n, grads, {k: v / n for k, v in metrics.items()}


def assert_grads_close(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        for a, b in zip(ours[name], theirs[name]):
            torch.testing.assert_close(a, b.grad, rtol=1e-3, atol=1e-4 * float(b.grad.abs().max()) + 1e-7)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family_model(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return ours_model(request.param, tmp), tmp


@settings(max_examples=4)  # a handful of batches per loss: each runs both stacks forward and backward
@given(
    seed=st.integers(0, 10**6),
    n_pairs=st.integers(1, 3),
    beta=st.floats(0.05, 1.0),
    loss=st.sampled_from(["sigmoid", "ipo"]),
    share=st.booleans(),
)
def test_dpo_and_ipo_equal_trl(family_model, seed, n_pairs, beta, loss, share):
    ours, tmp = family_model
    trainer, peft_params = dpo_trainer(ours, tmp, beta=beta, loss_type=[loss])
    batch, inputs = make_batch(seed, n_pairs)
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()
    got, grads, metrics = ours_loss_and_grads(
        ours, make_objective("dpo", 5, beta=beta, dpo_loss=loss, share_prompt=share), batch
    )
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, peft_params)
    logged = trainer._metrics["train"]
    for ours_key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected")]:
        assert metrics[ours_key] == pytest.approx(logged[trl_key][-1], rel=1e-4, abs=1e-5)
    assert metrics["margin"] == pytest.approx(logged["rewards/margins"][-1], rel=1e-4, abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(logged["rewards/accuracies"][-1], rel=1e-6)  # TRL: a float32 mean


@settings(max_examples=3)
@given(seed=st.integers(0, 10**6), beta=st.floats(0.05, 1.0), eps=st.floats(0.01, 0.45))
def test_conservative_dpo_equals_trl_per_pair(family_model, seed, beta, eps):
    ours, tmp = family_model
    trainer, peft_params = dpo_trainer(ours, tmp, beta=beta, loss_type=["aot"], label_smoothing=eps)
    batch, inputs = make_batch(seed, 1)  # one pair: aot's sort is the identity
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()
    got, grads, _ = ours_loss_and_grads(ours, make_objective("dpo", 5, beta=beta, label_smoothing=eps), batch)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, peft_params)


@settings(max_examples=4)
@given(seed=st.integers(0, 10**6), n_pairs=st.integers(1, 3), lam=st.floats(0.05, 2.0), share=st.booleans())
def test_orpo_equals_trl_odds_ratio_loss(family_model, seed, n_pairs, lam, share):
    ours, tmp = family_model
    theirs, lora_config = bnb_twin(ours, tmp)
    pm = get_peft_model(theirs, lora_config).train()
    peft_params = copy_adapter(ours, pm)
    batch, inputs = make_batch(seed, n_pairs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE)
    logits = pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # (2P, T, V)
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)  # (2P,) length-normalized
    l_c, l_r = logps.chunk(2)
    stub = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stub, l_c, l_r)
    want = (-l_c).mean() - losses.mean()
    want.backward()
    got, grads, metrics = ours_loss_and_grads(
        ours, make_objective("orpo", 5, orpo_lambda=lam, share_prompt=share), batch
    )
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, peft_params)
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-4, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(float(rejected_rewards.mean()), rel=1e-4, abs=1e-5)
