"""Step time, predicted by timing the step's own pieces on this device, before the run starts.

Shape letters: B rows, T the batch's length, N = B T padded tokens, n labelled tokens, L blocks,
D hidden, V vocabulary.

The model of one optimizer step of M micro-batches (M = --grad-accum):

    micro-batch = sum over recompute modes of L_mode x (one block's forward + backward in that mode)
                + the rest: embedding, RoPE tables and masks, final norm, the chunked head/loss
                  (minilora/train/loss.py at the run's loss chunk), forward and backward
    step        = M x micro-batch + optimizer (gradient clipping + PagedAdamW over the LoRA parameters)

Preference pairs (DPO, ORPO) run their micro-batches at the rows the objective forwards (one row per
pair with the prompt shared, data/pairs.py; its masked rows timed as packed rows are) with both
answers' labelled tokens at the head; DPO adds its reference forward: L blocks forward with LoRA off
and the head forward, without grad (none with --precompute-reference). --pair-split is not predicted
(its second forward of the chosen answers is not a piece of this model).

Each term is measured, not counted (minilora/train/step_probe.py): the run's own modules, built from
its ModelConfig on random weights (NF4, LoRA with its rank, targets, dropout, DoRA), one block of each
layer kind that costs differently, run forward and backward at B x T in the run's dtype under each
recompute mode the plan chose, scaled by the number of blocks in that mode; the rest through
chunked_lm_loss with n labelled tokens; the optimizer over L blocks' worth of LoRA parameters. Each
piece is warmed up once and timed a few times; the median counts.

Another micro-batch (b, t) with n' labelled tokens is scaled from the probe: the blocks by b t / N,
the rest by n' / n (the head over V dominates it); the first micro-batch of each (b, t) the process
meets adds the kernel selection for its shapes (measured by the probe too: on the CPU oneDNN builds a
primitive per new GEMM shape). What the model leaves out: the process's first step's one-time costs
(allocation, lazy initialization), data collation and host-to-device copies, the first
block computing no gradient for its input, the attention's T^2 share when scaling to other lengths,
communication between ranks (under torchrun nothing is predicted), the weights' values (random weights
of std 0.02 give logits of a modest spread; where a checkpoint's logits span more than ~87 nats, exp
underflows, which some CPUs compute 30x slower), and everything outside the step: validation,
generation, checkpoints.

The probe runs in a process of its own (its memory, kernel caches and RNG are not the run's).
MINILORA_STEP_PROBE (seconds, default 30) bounds it: a piece is not started once the budget is spent,
and 0 skips the probe. Where it cannot run, nothing is predicted: the reason is printed instead.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from minilora.dtypes import dtype_name

PROBE_ENV = "MINILORA_STEP_PROBE"
DEFAULT_BUDGET_S = 30.0  # no piece starts after this many seconds: the probe then predicts nothing
STARTUP_S = 60.0  # on top of the budget, for the probe's interpreter and imports, before it is stopped


class ProbeSkipped(Exception):
    """The probe did not run or did not finish; the message says why (one clause)."""


@dataclass
class StepTime:
    """A measured prediction. blocks: [layer kind, recompute mode, how many of the L blocks, seconds
    per block forward + backward]; rest: embedding + masks + final norm + head/loss, forward + backward;
    optimizer: clip + PagedAdamW step, once per optimizer step; reference_blocks, reference_rest: DPO's
    reference forward (L blocks, and the rest), per micro-batch."""

    rows: int
    length: int
    labels: int
    blocks: list
    rest: float
    optimizer: float
    grad_accum: int = 1
    new_shape: float = 0.0  # what a micro-batch adds whose (B, T) this process has not run yet
    threads: int = 1
    load: float | None = None  # the 1-minute load average when the probe started (busy CPUs: noisy timings)
    dtype: str = "float32"
    probe_seconds: float = 0.0
    reference_blocks: float = 0.0
    reference_rest: float = 0.0

    @property
    def micro_batch(self) -> float:
        return sum(n * t for _, _, n, t in self.blocks) + self.rest + self.reference_blocks + self.reference_rest

    @property
    def step(self) -> float:
        return self.grad_accum * self.micro_batch + self.optimizer

    @property
    def tokens_per_s(self) -> float:
        return self.grad_accum * self.rows * self.length / self.step

    def micro_seconds(self, tokens: int, labels: int, new_shape: bool = False) -> float:
        """A micro-batch of `tokens` padded tokens, `labels` labelled, scaled from the probe's; plus
        the kernel selection of its shapes when the process meets them for the first time."""
        blocks = sum(n * t for _, _, n, t in self.blocks) + self.reference_blocks
        rest = self.rest + self.reference_rest
        scaled = blocks * tokens / (self.rows * self.length) + rest * labels / max(1, self.labels)
        return scaled + (self.new_shape if new_shape else 0.0)

    def settings(self) -> dict:
        return {
            "predicted_step_seconds": self.step,
            "predicted_tokens_per_s": self.tokens_per_s,
            "step_probe": asdict(self),
        }


def settings(pred: StepTime | None, reason: str | None) -> dict:
    """What config.json's "resolved" records of the prediction."""
    return pred.settings() if pred is not None else {"predicted_step_seconds": None, "step_unmeasured": reason}


# ------------------------------------------------------------------------------------------ batches
def _label_count(labels) -> int:
    from minilora.data.packing import IGNORE

    return sum(t != IGNORE for t in labels[1:])  # collate drops each example's first label


def batch_shapes(
    encoded, batch_kw: dict, epoch: int = 0, shuffle: bool | None = None, share_prompt: bool = False
) -> list[tuple[int, int, int]]:
    """(rows, length, labelled tokens) of every batch of one epoch, as packing.batches forms them; a
    batch of preference pairs as its objective forwards it: one row per pair with share_prompt (the
    SharedPairs' rows), else two, and both answers' labelled tokens."""
    from minilora.data.packing import plan_batches
    from minilora.data.pairs import EncodedPair, shared_length

    kw = {k: v for k, v in batch_kw.items() if k not in ("pad_id", "shuffle")}
    pairs = bool(encoded) and isinstance(encoded[0], EncodedPair)
    lengths = [len(e) if pairs else len(e.input_ids) for e in encoded]  # what batching groups by
    if pairs:
        labels = [_label_count(e.chosen.labels) + _label_count(e.rejected.labels) for e in encoded]
        row_len, per = ([shared_length(e) for e in encoded], 1) if share_prompt else (lengths, 2)
    else:
        labels, row_len, per = [_label_count(e.labels) for e in encoded], lengths, 1
    plan = plan_batches(
        lengths, shuffle=batch_kw.get("shuffle", True) if shuffle is None else shuffle, epoch=epoch, **kw
    )
    longest = lambda rows: max(sum(row_len[i] for i in row) for row in rows)  # noqa: E731
    return [(per * len(rows), longest(rows), sum(labels[i] for row in rows for i in row)) for rows in plan]


def longest_shape(encoded, batch_kw: dict, share_prompt: bool = False) -> tuple[int, int, int]:
    """(rows, length, labelled tokens) of the batch with the most padded tokens (the first of them):
    what the plan sizes memory for (planner.longest_batch) and the probe times."""
    shapes = batch_shapes(encoded, batch_kw, shuffle=False, share_prompt=share_prompt)
    return max(shapes, key=lambda s: s[0] * s[1], default=(1, 1, 0))


def longest_labels(encoded, batch_kw: dict, share_prompt: bool = False) -> int:
    """Labelled tokens of the batch planner.longest_batch picks (longest_shape)."""
    return longest_shape(encoded, batch_kw, share_prompt)[2]


def run_seconds(pred: StepTime, encoded, batch_kw: dict, micro_batches: int, share_prompt: bool = False) -> float:
    """The run's `micro_batches` micro-batches in the order the run takes them (epoch after epoch),
    each scaled from the probe (the first of each shape with its kernel selection), plus one
    optimizer step per grad_accum of them."""
    total, epoch, left, seen = 0.0, 0, micro_batches, set()
    while left > 0:
        shapes = batch_shapes(encoded, batch_kw, epoch, share_prompt=share_prompt)[:left]
        for rows, T, n in shapes:
            total += pred.micro_seconds(rows * T, n, (rows, T) not in seen)
            seen.add((rows, T))
        left, epoch = left - len(shapes), epoch + 1
    return total + micro_batches / pred.grad_accum * pred.optimizer


# ------------------------------------------------------------------------------------------ prediction
def _budget() -> float:
    raw = os.environ.get(PROBE_ENV, "")
    try:
        return DEFAULT_BUDGET_S if raw == "" else float(raw)
    except ValueError:
        raise ProbeSkipped(f"{PROBE_ENV}={raw!r} is not a number of seconds") from None


def predict(tc, model_cfg, device, dtype, shape: tuple[int, int], labels: int, plan, world: int = 1, fits=True):
    """(StepTime, None) for a TrainConfig's run as `plan` resolved it, at the longest batch `shape` with
    `labels` labelled tokens; or (None, why nothing is predicted).

    The probe runs in a process of its own (python -m minilora.train.step_probe, with this process's
    import path and thread count): what it allocates, the kernels it selects and the code it loads
    (torch's checkpoint loads torch._dynamo) stay out of the run's memory, and the run's RNG is
    untouched. Its interpreter start (seconds) is not counted in its budget."""
    if tc.objective != "sft" and tc.pair_split:  # its recompute of the chosen answers: not a probed piece
        return None, "the probe does not time --pair-split's second forward of the chosen answers"
    if world > 1:
        return None, f"the probe times one process, not {world} processes under torchrun and their communication"
    if not fits:
        return None, "the run does not fit the memory budget, so the probe did not run"
    try:
        budget = _budget()
    except ProbeSkipped as e:
        return None, str(e)
    if budget <= 0:
        return None, f"{PROBE_ENV}={os.environ[PROBE_ENV]} skips the probe"
    ob = tc.optimizer_budget
    spec = dict(
        model=asdict(model_cfg),
        device=str(device),
        dtype=dtype_name(dtype),
        threads=torch.get_num_threads(),
        rows=shape[0],
        length=shape[1],
        labels=labels,
        quantize=tc.quantize,
        lora_kw=dict(
            targets=tc.lora_targets if tc.lora_targets == "all-linear" else tc.lora_targets.split(","),
            r=tc.lora_r,
            alpha=tc.lora_alpha,
            dropout=tc.lora_dropout,
            use_rslora=tc.use_rslora,
            use_dora=tc.use_dora,
            lora_compute=tc.lora_compute,
        ),
        recompute=[plan.recompute_blocks, plan.selective_blocks],
        reuse=plan.reuse_blocks,
        loss_chunk=plan.loss_chunk,
        pack=tc.pack or (tc.objective != "sft" and tc.share_prompt),  # a pair's row: masked, as packed rows
        reference=tc.objective == "dpo" and not tc.precompute_reference,
        optimizer_bits=tc.optimizer_bits,
        optimizer_budget=None if ob == "none" else ob if ob == "auto" else int(ob),  # as train.py's PagedAdamW
        max_grad_norm=tc.max_grad_norm,
        grad_accum=tc.grad_accum,
        budget=budget,
    )
    path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))  # the modules this process imports
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "minilora.train.step_probe", json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
            timeout=budget + STARTUP_S,
        )
    except subprocess.TimeoutExpired:
        return None, f"the probe did not finish within {budget + STARTUP_S:g} s and was stopped"
    try:
        result = json.loads((p.stdout.strip().splitlines() or [""])[-1])
    except ValueError:
        err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:200]
        return None, f"the probe failed ({err})"
    if "step_time" not in result:
        return None, result.get("skipped") or f"the probe failed ({result.get('failed')})"
    try:
        return StepTime(**{**result["step_time"], "probe_seconds": time.perf_counter() - t0}), None
    except TypeError as e:  # a probe from another version of this file
        return None, f"the probe failed (its answer does not fit: {e})"


def describe(pred: StepTime | None, why: str | None, run_s: float | None = None, micro_batches: int = 0) -> str:
    """The plan's step-time lines; without a prediction, the reason and no number."""
    if pred is None:
        return f"step time unmeasured: {why}; no time is predicted."
    many = len({kind for kind, _, _, _ in pred.blocks}) > 1
    parts = " + ".join(
        f"{n} x {t:.3f} s ({f'{kind}, ' if many else ''}recompute {mode})" for kind, mode, n, t in pred.blocks
    )
    threads = f"{pred.threads} thread{'s' if pred.threads > 1 else ''}"
    ref = pred.reference_blocks + pred.reference_rest
    reference = f" + the reference forward {ref:.3f} s (LoRA off, no grad)" if ref else ""
    if pred.load is not None:
        threads += f", load average {pred.load:.1f} on {os.cpu_count()} CPUs"
    rows = [
        f"step time, from a {pred.probe_seconds:.1f} s probe of one block, the head/loss and the optimizer on this "
        f"device ({pred.dtype}, {threads}) at the longest micro-batch, {pred.rows} x {pred.length} tokens "
        f"({pred.labels:,} labelled):",
        f"  micro-batch {pred.micro_batch:.3f} s = blocks {parts} + embedding and head/loss {pred.rest:.3f} s"
        f"{reference}; optimizer {pred.optimizer:.3f} s a step; the first micro-batch of each new shape adds "
        f"{pred.new_shape:.3f} s (kernel selection)",
        f"  predicted step {pred.step:.3f} s ({pred.grad_accum} micro-batch{'es' if pred.grad_accum > 1 else ''}), "
        f"{pred.tokens_per_s:,.0f} tok/s",
    ]
    if run_s is not None and micro_batches:
        most = micro_batches * pred.micro_batch + micro_batches / pred.grad_accum * pred.optimizer
        rows.append(
            f"  run of {micro_batches} micro-batches about {run_s / 60:,.1f} min (each scaled to its own tokens; "
            f"at most {most / 60:,.1f} min at the longest one's time), without validation, generation and checkpoints"
        )
    return "\n".join(rows)


class StepClock:
    """The loop's own step times (micro-batches through the optimizer step, without validation or
    checkpoints) beside the prediction for the same micro-batches: train.py's summary."""

    def __init__(self, pred: StepTime | None, why: str | None, device: torch.device):
        self.pred, self.why, self.device = pred, why, device
        self.steps: list[tuple[float, float]] = []  # (measured s, predicted s)
        self.seen: set[tuple[int, ...]] = set()  # the (B, T) this process has run

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.t0, self.expect = self._now(), self.pred.optimizer if self.pred else 0.0

    def micro(self, batch) -> None:
        """A micro-batch as the objective forwards it: a Batch, or a pair objective's rows (a
        PairBatch, or its SharedPairs, whose labelled targets are listed in src)."""
        from minilora.data.pairs import SharedPairs

        if self.pred:
            shape = tuple(batch.input_ids.shape)
            labels = batch.src.numel() if isinstance(batch, SharedPairs) else batch.n_label_tokens
            self.expect += self.pred.micro_seconds(batch.input_ids.numel(), labels, shape not in self.seen)
            self.seen.add(shape)

    def stop(self) -> None:
        self.steps.append((self._now() - self.t0, self.expect))

    def summary(self) -> dict:
        """Means over the steps after the first (which pays one-time costs), or the only one."""
        timed = self.steps[1:] or self.steps
        if not timed:
            return {}
        out = {"steps_timed": len(timed), "measured_step_seconds": statistics.fmean(m for m, _ in timed)}
        if self.pred is None:
            return {**out, "predicted_step_seconds": None, "unmeasured": self.why}
        predicted = statistics.fmean(p for _, p in timed)
        return {
            **out,
            "predicted_step_seconds": predicted,
            "measured_over_predicted": out["measured_step_seconds"] / predicted,
        }


def summary_line(s: dict) -> str | None:
    if not s:
        return None
    which = f"mean of the last {s['steps_timed']} steps" if s["steps_timed"] > 1 else "one step"
    line = f"step time: measured {s['measured_step_seconds']:.3f} s ({which})"
    if s["predicted_step_seconds"] is None:
        return line + f", predicted nothing ({s['unmeasured']})"
    return line + (
        f", predicted {s['predicted_step_seconds']:.3f} s for the same micro-batches "
        f"(measured / predicted {s['measured_over_predicted']:.2f})"
    )
