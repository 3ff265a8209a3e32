"""LoRA+ (minilora/lora/plus.py) against PEFT 0.21's create_loraplus_optimizer: the same parameter groups
with the same learning rates and weight decay; a PagedAdamW step over our groups is torch AdamW's step
over PEFT's; the schedule and a resume scale each group by its ratio."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.lora.plus import learning_rates, lora_param_groups
from minilora.lora.surgery import apply_lora, lora_state_dict
from minilora.optim.paged_adamw import PagedAdamW
from minilora.train.checkpoint import apply_hyperparameters
from minilora.train.schedule import cosine_with_warmup


def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def ours_name(peft_name: str) -> str:
    """PEFT's in-memory parameter name -> ours (= its saved key without base_model.model.)."""
    n = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return n.removesuffix(".weight") if n.endswith("lora_magnitude_vector.weight") else n


def as_named(groups, names_of):
    """[(lr, weight_decay, sorted parameter names)] of the non-empty groups."""
    return [(g["lr"], g["weight_decay"], sorted(names_of[id(p)] for p in g["params"])) for g in groups if g["params"]]


@given(
    lr=st.sampled_from([1e-5, 2e-4, 3e-3]),
    ratio=st.sampled_from([1.0, 2.0, 16.0, 0.5]),
    wd=st.sampled_from([0.0, 0.01]),
    dora=st.booleans(),
    targets=st.sampled_from([["q_proj", "v_proj"], "all-linear", ["down_proj"]]),
)
def test_groups_match_create_loraplus_optimizer(lr, ratio, wd, dora, targets):
    hf = tiny_llama()
    pm = get_peft_model(
        copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    )
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd)
    theirs = as_named(opt.param_groups, {id(p): ours_name(n) for n, p in pm.named_parameters()})
    ours = copy.deepcopy(hf)
    apply_lora(ours, targets, r=4, alpha=8, use_dora=dora, verbose=False)
    mine = as_named(lora_param_groups(ours, lr, ratio, wd), {id(p): n for n, p in lora_state_dict(ours).items()})
    assert mine == theirs
    assert learning_rates(lr, ratio) == {"lora_A": theirs[0][0], "lora_B": theirs[1][0]}


def test_a_step_over_our_groups_is_adamw_over_peft_groups():
    """The groups drive the update: PagedAdamW over lora_param_groups equals torch AdamW over
    create_loraplus_optimizer's groups, bit for bit (PagedAdamW is torch's single-tensor AdamW)."""
    hf = tiny_llama()
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "o_proj"]))
    ours = copy.deepcopy(hf)
    apply_lora(ours, ["q_proj", "o_proj"], r=4, alpha=8, verbose=False)
    g = torch.Generator().manual_seed(3)
    theirs_p = {ours_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in lora_state_dict(ours).items():
            p.copy_(torch.randn(p.shape, generator=g))
            theirs_p[name].copy_(p)
    opt_t = create_loraplus_optimizer(
        pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, foreach=False
    )
    opt_o = PagedAdamW(lora_param_groups(ours, 1e-2, 16.0, 0.1), lr=1e-2)
    for _ in range(3):
        for name, p in lora_state_dict(ours).items():
            p.grad = torch.randn(p.shape, generator=g)
            theirs_p[name].grad = p.grad.clone()
        opt_t.step()
        opt_o.step()
    for name, p in lora_state_dict(ours).items():
        assert torch.equal(p, theirs_p[name]), name


@pytest.mark.parametrize("step", [0, 4, 11])
def test_schedule_and_resume_keep_the_ratio(step):
    """LambdaLR scales each group's peak (lr, R x lr); a resume with the same flags restores every
    group's rate bit for bit, and a new --lr moves both groups with B staying R times A."""
    p = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))]

    def fresh():
        groups = [
            {"params": [p[0]], "lr": 2e-4, "weight_decay": 0.0, "lr_ratio": 1.0},
            {"params": [p[1]], "lr": 2e-4 * 16, "weight_decay": 0.0, "lr_ratio": 16.0},
        ]
        opt = PagedAdamW(groups, lr=2e-4)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(3, 12, 0.1))

    opt, sched = fresh()
    for _ in range(step):
        for q in p:
            q.grad = torch.ones(2, 2)
        opt.step()
        sched.step()
    f = cosine_with_warmup(3, 12, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-4 * f(step), 16 * 2e-4 * f(step)])
    restored, restored_sched = fresh()
    restored.load_state_dict(opt.state_dict())
    restored_sched.load_state_dict(sched.state_dict())
    apply_hyperparameters(restored, restored_sched, 2e-4, 0.0)
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in opt.param_groups]  # bitwise
    apply_hyperparameters(restored, restored_sched, 1e-3, 0.0)
    assert [g["lr"] for g in restored.param_groups] == pytest.approx([1e-3 * f(step), 16e-3 * f(step)])
