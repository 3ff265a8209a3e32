"""The step time the plan predicts is measured, not derived from a GEMM rate: a probe of one block, the
head/loss and the optimizer (minilora/train/steptime.py) predicts a real training step within 25%,
`--plan` prints the prediction (or, where the probe cannot run, says so and prints no time), and a run
records it in config.json and compares it with its own steps in the summary.

conftest.py sets MINILORA_STEP_PROBE=0 for the other tests (the probe would add seconds to every
train.py they start); the tests here set it themselves.
"""

import json
import re
import statistics
import time
from dataclasses import replace

import pytest
import torch
from cli_runs import train_here

from minilora.data.packing import IGNORE, Batch
from minilora.dtypes import auto_dtype
from minilora.lora.surgery import apply_lora, lora_parameters
from minilora.models.config import ModelConfig
from minilora.models.loader import quantize_linears
from minilora.models.transformer import Transformer
from minilora.optim.paged_adamw import PagedAdamW
from minilora.train.loss import chunked_lm_loss

TOLERANCE = 0.25


def train_py(monkeypatch, capsys, out, *args, probe="30") -> str:
    """train.py's main() in this process with the probe's budget `probe` (MINILORA_STEP_PROBE); its stdout."""
    monkeypatch.setenv("MINILORA_STEP_PROBE", probe)
    capsys.readouterr()
    code, stdout, err = train_here(capsys, out, *args)
    assert code == 0, stdout[-2000:] + err[-3000:]
    return stdout


def real_model(cfg, dtype, recompute, lora):
    """The model as train.py builds it (random weights instead of a checkpoint's), built here on its own,
    not by the probe's builder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(cfg)
        with torch.no_grad():  # transformers' init (std 0.02): the logits of a real model's spread, see step_probe
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else None
        model.to(dtype)
    quantize_linears(model, compute_dtype=dtype)
    apply_lora(model, **lora, verbose=False)
    model.set_gradient_checkpointing(recompute[0], selective=recompute[1])
    return model.train()


def real_batch(cfg, B, T):
    """B rows of T tokens, the second half of each row labelled (a prompt and its completion)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 2] = IGNORE
    ones = torch.ones_like(ids)
    return Batch(ids, labels, ones, torch.arange(T).expand(B, T), ones.clone(), int((labels[:, 1:] != IGNORE).sum()))


def median_step(model, opt, batch, chunk, steps=3) -> float:
    """train.py's step (loss, backward, clip, optimizer step, zero_grad): the median of `steps` after one warm-up."""
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        s, n = chunked_lm_loss(model, batch, chunk)
        (s / max(1, n)).backward()
        float(s.detach())
        torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def tiny():
    return ModelConfig.from_name("tiny")


def smollm2_4_layers():
    cfg = ModelConfig.from_name("smollm2-135m")
    return replace(cfg, num_hidden_layers=4, layer_types=cfg.layer_types[:4])


@pytest.mark.parametrize(
    "geometry,dtype,shape,recompute",
    [
        # all three recompute modes, and rows longer than the sliding window (sliding and full layers differ)
        (tiny, torch.float32, (4, 96), (1, 1)),
        # a 135M-class block at the machine's default dtype, half of the blocks recomputed selectively
        (smollm2_4_layers, auto_dtype(torch.device("cpu")), (2, 128), (0, 2)),
    ],
    ids=["tiny", "smollm2-135m-4-layers"],
)
def test_probe_predicts_a_measured_training_step_within_25_percent(geometry, dtype, shape, recompute):
    """The probe times the same kernels at the same shapes as the step (one block per layer kind and
    recompute mode, the head/loss, the optimizer), so what separates the sum from a whole step is the
    allocator, Python overhead between the pieces and, above all, noise from other processes on a
    shared 2-core machine (single runs of the same step vary by 1.5x there). 25% allows that noise.
    To keep the noise out of the comparison, prediction and measurement alternate in the same process,
    up to three rounds, and the best (least disturbed) of each side is compared: the rounds stop as
    soon as the two best times agree."""
    from minilora.train.step_probe import probe_step

    cfg, lora = geometry(), dict(r=8, alpha=16, dropout=0.05)
    B, T = shape
    model = real_model(cfg, dtype, recompute, lora)
    opt = PagedAdamW(lora_parameters(model), lr=1e-4, weight_decay=0.0)
    batch = real_batch(cfg, B, T)
    measured, predicted = [], []
    for _ in range(3):
        measured.append(median_step(model, opt, batch, chunk=64))
        p = probe_step(cfg, torch.device("cpu"), dtype, B, T, batch.n_label_tokens, lora_kw=lora, recompute=recompute)
        predicted.append(p.step)
        ratio = min(measured) / min(predicted)
        if abs(ratio - 1) <= TOLERANCE:
            break
    assert sum(n for _, _, n, _ in p.blocks) == cfg.num_hidden_layers
    assert {mode for _, mode, _, _ in p.blocks} == {m for m, n in zip(("full", "selective"), recompute) if n} | {"off"}
    assert abs(ratio - 1) <= TOLERANCE, f"measured {measured} s, predicted {predicted} s: ratio {ratio:.2f}"


def pair_batch(cfg, P: int):
    """P preference pairs: a prompt of 48-64 tokens and two answers of 20-40, the PairBatch train.py runs."""
    from minilora.data.encode import EncodedExample
    from minilora.data.pairs import EncodedPair, collate_pairs

    g = torch.Generator().manual_seed(2)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for _ in range(P):
        prompt = ids(draw(48, 64))
        seq = lambda answer: EncodedExample(prompt + answer, [IGNORE] * len(prompt) + answer)  # noqa: E731
        pairs.append(EncodedPair(seq(ids(draw(20, 40))), seq(ids(draw(20, 40)))))
    return collate_pairs([[i] for i in range(P)], pairs, 0)


@pytest.mark.parametrize(
    "geometry,dtype,objective",
    [
        (tiny, torch.float32, "dpo"),
        (smollm2_4_layers, auto_dtype(torch.device("cpu")), "dpo"),
        (tiny, torch.float32, "orpo"),
    ],
    ids=["tiny-dpo", "smollm2-135m-4-layers-dpo", "tiny-orpo"],
)
def test_probe_predicts_a_measured_preference_step_within_25_percent(geometry, dtype, objective):
    """A DPO step is the policy's forward and backward over the rows the objective forwards (one per pair,
    the prompt shared: masked rows, timed as packed rows are), both answers' tokens at the head, and the
    reference forward (blocks and head, LoRA off, no grad), which the probe times as pieces of their own;
    ORPO has no reference. The same alternating rounds and 25% as the SFT test above, for the same reasons."""
    from minilora.train.objectives import make_objective
    from minilora.train.step_probe import probe_step

    cfg, lora = geometry(), dict(r=8, alpha=16, dropout=0.05)
    model = real_model(cfg, dtype, (0, 0), lora)
    opt = PagedAdamW(lora_parameters(model), lr=1e-4, weight_decay=0.0)
    batch, obj = pair_batch(cfg, 3), make_objective(objective, 64)
    rows = obj.rows(batch)  # (P, T'): what the forwards run

    def step():
        s, n, _ = obj(model, batch)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    measured, predicted = [], []
    B, T = rows.input_ids.shape
    for _ in range(3):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        measured.append(statistics.median(times[1:]))
        kw = dict(lora_kw=lora, pack=True, reference=objective == "dpo")
        p = probe_step(cfg, torch.device("cpu"), dtype, B, T, rows.src.numel(), **kw)
        predicted.append(p.step)
        ratio = min(measured) / min(predicted)
        if abs(ratio - 1) <= TOLERANCE:
            break
    assert (p.reference_blocks > 0 and p.reference_rest > 0) == (objective == "dpo")
    assert abs(ratio - 1) <= TOLERANCE, f"measured {measured} s, predicted {predicted} s: ratio {ratio:.2f}"


def numbers_after(text: str, label: str) -> float:
    return float(re.search(rf"{label} ([\d,.]+)", text).group(1).replace(",", ""))


def test_plan_prints_the_probed_step_time_and_the_run_time(monkeypatch, capsys, tmp_path):
    out = train_py(monkeypatch, capsys, tmp_path / "run", "--plan", "--max-steps", "20", "--grad-accum", "2")
    assert "predicted peak" in out  # the memory table is still there
    m = re.search(r"at the longest micro-batch, (\d+) x (\d+) tokens", out)
    rows, length = int(m.group(1)), int(m.group(2))
    assert f"tokens per micro-batch {rows * length:,} (the longest batch)" in out  # the shape the memory plan uses
    step, tok_s = numbers_after(out, "predicted step"), numbers_after(out, r"micro-batches\),")
    assert tok_s == pytest.approx(2 * rows * length / step, rel=0.01)  # printed to 2 decimals
    assert "run of 40 micro-batches about" in out
    assert "GEMM rate" not in out


@pytest.mark.parametrize(
    "args,probe,why",
    [
        ([], "0", "MINILORA_STEP_PROBE=0 skips the probe"),
        ([], "0.000001", "the probe ran out of its 1e-06 s budget"),
        (["--memory-budget", "1000"], "30", "the run does not fit the memory budget"),
        ([], "soon", "MINILORA_STEP_PROBE='soon' is not a number of seconds"),
    ],
    ids=["skipped", "no-time-left", "memory-budget", "bad-budget"],
)
def test_plan_without_a_probe_says_the_time_is_unmeasured_and_prints_no_number(
    monkeypatch, capsys, tmp_path, args, probe, why
):
    out = train_py(monkeypatch, capsys, tmp_path / "run", "--plan", *args, probe=probe)
    assert "predicted peak" in out
    assert f"step time unmeasured: {why}" in out and "no time is predicted." in out
    assert "tok/s" not in out and "predicted step" not in out and " min " not in out


def test_a_probe_that_fails_predicts_nothing(monkeypatch):
    """An exception inside the probe (here apply_lora refusing a target the model does not have) leaves
    the run without a prediction, with the reason; so do two ranks (the probe would time one process)."""
    from minilora.train import steptime
    from minilora.train.config import TrainConfig
    from minilora.train.memory_plan import Plan

    monkeypatch.setenv("MINILORA_STEP_PROBE", "30")
    cpu = torch.device("cpu")
    pred, why = steptime.predict(TrainConfig(lora_targets="nope_proj"), tiny(), cpu, torch.float32, (2, 8), 4, Plan())
    assert pred is None and why.startswith("the probe failed (AdapterError: LoRA target(s) ['nope_proj'] match no")
    assert "no time is predicted" in steptime.describe(pred, why) and "tok/s" not in steptime.describe(pred, why)
    pred, why = steptime.predict(TrainConfig(), tiny(), cpu, torch.float32, (2, 8), 4, Plan(), world=2)
    assert pred is None and "under torchrun" in why


def test_run_records_the_prediction_and_its_summary_compares_it_with_the_steps(monkeypatch, capsys, tmp_path):
    args = ["--max-steps", "4", "--save-every", "0"]
    out = train_py(monkeypatch, capsys, tmp_path / "run", *args)
    with open(tmp_path / "run" / "config.json") as f:
        resolved = json.load(f)["resolved"]
    probe = resolved["step_probe"]
    assert resolved["predicted_step_seconds"] > 0 and probe["probe_seconds"] > 0
    assert sum(n for _, _, n, _ in probe["blocks"]) == ModelConfig.from_name("tiny").num_hidden_layers
    with open(tmp_path / "run" / "summary.json") as f:
        timed = json.load(f)["step_time"]
    assert timed["steps_timed"] == 3  # the first step (one-time costs) is left out
    assert timed["measured_over_predicted"] == pytest.approx(
        timed["measured_step_seconds"] / timed["predicted_step_seconds"]
    )
    line = next(x for x in out.splitlines() if x.startswith("step time: measured"))
    assert f"predicted {timed['predicted_step_seconds']:.3f} s for the same micro-batches" in line

    # without a probe: recorded as unmeasured, and the summary says so instead of inventing a number
    out = train_py(monkeypatch, capsys, tmp_path / "b", *args, probe="0")
    with open(tmp_path / "b" / "config.json") as f:
        resolved = json.load(f)["resolved"]
    assert resolved["predicted_step_seconds"] is None and "skips the probe" in resolved["step_unmeasured"]
    assert "predicted nothing (MINILORA_STEP_PROBE=0 skips the probe)" in out
