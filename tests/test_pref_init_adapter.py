"""--init-adapter: DPO from an SFT run's adapter. The policy starts as base + that adapter and the reference
is base + that adapter, frozen: the first step's rewards are 0 (to float32 rounding) and its loss log 2; the reference
log-probabilities equal the SFT model's bit for bit however far training moved the LoRA weights, which
come back exactly; a resume is bitwise from the run folder's own copy (the SFT run deleted); eval.py
reports base, initial adapter and fine-tuned; an adapter of another base or rank is one sentence, nothing
written."""

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch
from cli_runs import ROOT, metrics, one_sentence, train, train_here

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE
from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs
from minilora.lora.adapter import load_adapter
from minilora.lora.surgery import apply_lora, lora_parameters
from minilora.models.loader import load_model
from minilora.train import init_adapter
from minilora.train.loss import sequence_logprobs
from minilora.train.reference import reference_logprobs

DPO = ["--objective", "dpo", "--log-every", "1", "--save-every", "0", "--eval-every", "0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert train(out, "--max-steps", "6", "--save-every", "0").returncode == 0
    return out


def test_first_step_has_zero_rewards_and_loss_log_2(tmp_path, sft_run):
    p = train(tmp_path / "dpo", *DPO, "--init-adapter", str(sft_run), "--max-steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    first = next(r for r in metrics(tmp_path / "dpo") if r.get("step") == 1 and "loss" in r)
    # 0 up to float32 rounding: the policy's forward with grad takes the fused NF4 + LoRA function, the
    # reference's without grad the unfused LoRA layer (equal within rounding, tests/test_lora.py)
    for k in ("rewards/chosen", "rewards/rejected", "margin"):
        assert abs(first[k]) < 1e-5, (k, first[k])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    kept = tmp_path / "dpo" / "init_adapter" / "adapter_model.safetensors"
    assert kept.read_bytes() == (sft_run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_reference_is_the_sft_model_bit_for_bit_and_the_trained_weights_come_back(sft_run):
    def sft_model():
        model, _ = load_model("tiny", quantize="nf4", dtype=torch.float32)
        apply_lora(model, r=16, alpha=32, dropout=0.1, verbose=False)
        return model

    model = sft_model()
    frozen = init_adapter.load(model, str(sft_run / "adapter"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training" moved every LoRA weight
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trained = [p.detach().clone() for p in lora_parameters(model)]
    enc = lambda n, k: EncodedExample([1] + list(range(5, 5 + n)), [IGNORE] + [k] * n)
    batch = collate_pairs([[0], [1]], [EncodedPair(enc(4, 9), enc(6, 11)), EncodedPair(enc(7, 12), enc(3, 13))], 0)
    got = reference_logprobs(model.train(), batch, 4, frozen)
    want_model = sft_model()
    load_adapter(want_model, str(sft_run / "adapter"))
    with torch.no_grad():
        want, _ = sequence_logprobs(want_model.eval(), batch, 4)
    assert torch.equal(got, want)
    assert all(torch.equal(p, t) for p, t in zip(lora_parameters(model), trained)) and model.training


def test_resume_from_the_runs_own_copy_is_bitwise(tmp_path, sft_run):
    sft = tmp_path / "sft"
    shutil.copytree(sft_run, sft)
    args = [*DPO, "--init-adapter", str(sft), "--max-steps", "6", "--lora-dropout", "0.1", "--batch-size", "4"]
    assert train(tmp_path / "full", *args).returncode == 0
    assert train(tmp_path / "cut", *args, "--debug-interrupt-at-step", "3").returncode == EXIT_INTERRUPTED
    shutil.rmtree(sft)  # the run folder holds what the resume needs
    p = train(tmp_path / "cut", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb")} for r in rows]
    assert strip(metrics(tmp_path / "cut")) == strip(metrics(tmp_path / "full"))
    adapter = os.path.join("adapter", "adapter_model.safetensors")
    assert (tmp_path / "cut" / adapter).read_bytes() == (tmp_path / "full" / adapter).read_bytes()


def test_eval_reports_base_initial_and_fine_tuned(tmp_path, sft_run, capsys):
    out = tmp_path / "dpo"
    args = ["--init-adapter", str(sft_run), "--max-steps", "4", "--eval-generate", "20", "--dtype", "float32"]
    assert train(out, *DPO, *args).returncode == 0
    spec = importlib.util.spec_from_file_location("minilora_eval_cli_init", os.path.join(ROOT, "eval.py"))
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    assert eval_cli.main(["--adapter", str(out), "--limit", "20", "--generations", "1", "--max-new-tokens", "4"]) == 0
    m = json.loads((out / "eval.json").read_text())["metrics"]
    s = json.loads((out / "summary.json").read_text())
    assert list(m) == ["base", "initial", "fine_tuned"] and m["initial"]["margin"] == 0.0
    assert m["initial"]["pref_accuracy"] == s["heldout_before"]["pref_accuracy"]  # the run's own starting point
    assert m["fine_tuned"]["margin"] == pytest.approx(s["heldout_after"]["margin"], rel=1e-5)  # against base + SFT
    assert "initial adapter:" in (out / "report.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize(
    "edit, flags, message",
    [
        ({"base_model_name_or_path": "org/other"}, [], "was trained on 'org/other', not on --model tiny; pass"),
        (
            {},
            ["--lora-r", "8"],
            "has r 16 but this run has --lora-r 8; train with the adapter's settings (--lora-r 16).",
        ),
        ({}, ["--lora-targets", "q_proj,v_proj"], "adapts 28 modules and --lora-targets q_proj,v_proj selects 8"),
    ],
)
def test_an_adapter_that_does_not_fit_is_one_sentence_and_nothing_written(
    tmp_path, sft_run, capsys, edit, flags, message
):
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_run / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    code, _, err = train_here(capsys, tmp_path / "r", *DPO, "--init-adapter", str(adapter), *flags)
    assert code == EXIT_USAGE and message in one_sentence(err)
    assert not (tmp_path / "r").exists()
