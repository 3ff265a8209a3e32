"""--pair-split (pair_objective.PairObjective.logprobs): the rejected and then the chosen halves of a pair
batch backpropagate one after the other, the chosen half recomputing its forward. The same loss and LoRA
gradients as the joint forward (up to the rounding of a P-row matmul against a 2P-row one), a step's peak
memory that of one half: about an SFT step's on the chosen answers, where the joint step holds both
halves, and one more forward of the P chosen rows only.

Peak memory is read from torch.profiler's allocation records (profile_memory=True): each op's own
allocations minus frees, summed in the order the ops started; the largest running sum is the step's
peak above what existed before it, deterministic for a given model, batch and build.
"""

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs
from minilora.lora.surgery import apply_lora, lora_parameters
from minilora.models.config import ModelConfig
from minilora.models.presets import PRESETS
from minilora.models.transformer import RMSNorm, Transformer
from minilora.train.objectives import make_objective
from minilora.train.pair_objective import rows_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_model(seed: int, hidden: int = 64, ffn: int = 128, recompute: bool = False) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**PRESETS["tiny"], "hidden_size": hidden, "intermediate_size": ffn}))
    apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed, verbose=False)
    with torch.no_grad():  # B = 0 would leave the policy at the reference: give the adapter an effect
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    model.set_gradient_checkpointing(recompute)
    return model.train()


def float64_norms():
    """RMSNorm in its input's dtype, the same formula otherwise: the model's norm computes in float32
    even in a float64 model (as transformers'), which would leave float32 rounding in a float64 test."""

    def forward(self, x):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return n * (1.0 + self.weight) if self.gemma else self.weight * n

    return mock.patch.object(RMSNorm, "forward", forward)


def pair_batch(seed: int, lengths: list[tuple[int, int]], prompt: int = 5):
    g = torch.Generator().manual_seed(seed)

    def answer(n):
        ids = torch.randint(1, 512, (n,), generator=g).tolist()
        return EncodedExample(ids, [IGNORE] * prompt + ids[prompt:], False, "drawn")

    pairs = [EncodedPair(answer(c), answer(r)) for c, r in lengths]
    return collate_pairs([[i] for i in range(len(pairs))], pairs, 0)


def loss_and_grads(model, objective, batch):
    for p in lora_parameters(model):
        p.grad = None
    s, n, metrics = objective(model, batch)
    s.backward()
    return s.detach(), [p.grad.clone() for p in lora_parameters(model)], metrics


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(["dpo", "ipo", "orpo"]),
    lengths=st.lists(st.tuples(st.integers(7, 30), st.integers(7, 30)), min_size=1, max_size=4),
    recompute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_split_equals_the_joint_forward(name, lengths, recompute, seed):
    """In float64, so that what is compared is the computation, not the rounding: the halves' matmuls
    may sum in another order than the joint one's (a P-row against a 2P-row product), and DPO's
    gradient is a difference of the chosen and rejected answers' gradients, which cancels; in float32
    that left 5e-6 of the largest gradient on some drawn batches, in float64 below 1e-15 (a wrong
    coefficient or a missing half would move them by their own size). With float64 norms
    (float64_norms): the model's float32 norms left 2e-8 on some drawn batches."""
    model, batch = lora_model(seed, recompute=recompute).double(), pair_batch(seed, lengths)
    kw = {"dpo_loss": "ipo"} if name == "ipo" else {}
    objective = "orpo" if name == "orpo" else "dpo"
    with float64_norms():
        joint = loss_and_grads(model, make_objective(objective, 16, **kw), batch)
        split = loss_and_grads(model, make_objective(objective, 16, pair_split=True, **kw), batch)
    assert split[0].dtype == joint[0].dtype == torch.float64
    torch.testing.assert_close(split[0], joint[0], rtol=1e-12, atol=1e-12)
    for g_split, g_joint in zip(split[1], joint[1]):
        torch.testing.assert_close(g_split, g_joint, rtol=1e-10, atol=1e-12 * float(g_joint.abs().max()))
    assert split[2].keys() == joint[2].keys()
    for k in joint[2]:  # the logged rewards, margins and accuracies: Python floats from the same sums
        assert split[2][k] == pytest.approx(joint[2][k], rel=1e-12, abs=1e-12), k


def step_peak_bytes(model, objective, batch) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s, _, _ = objective(model, batch)
        s.backward()
    for p in lora_parameters(model):
        p.grad = None
    running = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def test_split_step_peak_is_one_halfs_about_the_sft_step_on_the_chosen_answers():
    model = lora_model(0, hidden=128, ffn=512)
    batch = pair_batch(1, [(200, 190)] * 4, prompt=40)
    sft = step_peak_bytes(model, make_objective("sft", 64), rows_of(batch, slice(0, 4)))
    joint = step_peak_bytes(model, make_objective("dpo", 64, share_prompt=False), batch)
    split = step_peak_bytes(model, make_objective("dpo", 64, pair_split=True), batch)
    print(f"step peak: SFT {sft / 2**20:.1f} MiB, DPO joint {joint / 2**20:.1f} MiB, split {split / 2**20:.1f} MiB")
    assert split <= 1.25 * sft  # the preference-tuning target: at most 1.25x SFT's step
    assert joint >= 1.6 * split  # the joint step holds both halves


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_split_step_forwards_the_chosen_half_once_more_and_nothing_else(objective):
    """Rows through the first block in one step: the joint step's in TRL's layout (the policy's 2P, and
    DPO's reference forward of 2P with the adapter off), plus the P chosen rows' recompute in backward."""
    model, P = lora_model(0), 3
    batch = pair_batch(2, [(12, 9), (8, 15), (10, 10)])
    rows = []
    hook = model.model.layers[0].register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        counts = []
        for split in (False, True):
            rows.clear()
            loss_and_grads(model, make_objective(objective, 16, pair_split=split, share_prompt=False), batch)
            counts.append(sum(rows))
    finally:
        hook.remove()
    assert counts[1] == counts[0] + P


def test_pair_split_with_sft_is_refused_in_one_sentence(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--pair-split", "--out", str(out), "--max-steps", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line == "error: --pair-split applies to --objective dpo or orpo; drop it or pass --objective dpo or orpo."
    assert not out.exists()
