"""The Run: what train.py's setup, loop and finish share, and the evaluation they run on it.

setup builds a Run (the model, the objective, the optimizer, the data stream, the state a checkpoint
stores), loop advances it step by step, finish writes the adapter and the summary; each reads the
Run instead of a dozen locals threaded through one long function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Run:
    """What the steps share: built by setup, advanced by loop, closed by finish."""

    cfg: object
    rank: int
    world: int
    parallel: str  # "none", "ddp" or "fsdp"
    device: torch.device
    say: object  # print on rank 0, silent elsewhere
    t_start: float
    tok: object
    template: str
    data: object  # prepare.DataBundle: EncodedExamples, or EncodedPairs for a pair objective
    plan: object
    model: object
    objective: object  # objectives.SFT / DPO / ORPO
    step_fn: object  # the objective around the model (DDP-wrapped under --parallel ddp)
    optimizer: object
    scheduler: object
    stream: object  # schedule.BatchStream
    total_steps: int
    # what a checkpoint stores besides the weights: validation history, early stopping, the stream's position
    state: dict = field(
        default_factory=lambda: {
            "best_val": math.inf,
            "bad_evals": 0,
            "val_history": [],
            "heldout_before": None,
            "epoch": 0,
            "index": 0,
        }
    )
    step: int = 0
    heldout: list = field(default_factory=list)  # --eval-data: Examples to generate, or EncodedPairs to rank
    metrics: object = None  # rundir.MetricsWriter on rank 0
    lock: object = None  # the run folder's lock, held while the Run lives
    clock: object = None  # steptime.StepClock: the measured step times beside the plan's prediction

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:  # every rank then takes part in evaluation and checkpoints too
        return self.parallel == "fsdp"

    def validate(self) -> dict:
        """The held-out split: {"val_loss"}, and on pairs the preference accuracy and mean margin; {} without one."""
        from minilora.eval.evaluate import completion_loss
        from minilora.train.pair_objective import evaluate_pairs

        if not self.data.val:
            return {}
        if self.objective.pairs:
            v = evaluate_pairs(self.model, self.objective, self.data.val, self.cfg.batch_size, self.tok.pad_id)
            return {"val_loss": v["loss"], "val_pref_accuracy": v["pref_accuracy"], "val_margin": v["margin"]}
        chunk = self.plan.loss_chunk
        total, count = completion_loss(self.model, self.data.val, self.cfg.batch_size, self.tok.pad_id, chunk=chunk)
        return {"val_loss": total / max(1, count)}

    def record_validation(self, v: dict) -> None:
        if not v:
            return
        self.state["val_history"].append([self.step, v["val_loss"]])
        if "val_pref_accuracy" in v:
            self.state.setdefault("val_pref", []).append([self.step, v["val_pref_accuracy"], v["val_margin"]])
        if self.main:
            self.metrics.write(step=self.step, **v)

    def score_heldout(self) -> dict | None:
        """--eval-data: exact / structured match of greedy generations, or the pairs' preference accuracy."""
        from minilora.eval.evaluate import generate_completions, score
        from minilora.train.pair_objective import evaluate_pairs

        if not self.heldout:
            return None
        if self.objective.pairs:
            return evaluate_pairs(self.model, self.objective, self.heldout, self.cfg.batch_size, self.tok.pad_id)
        preds = generate_completions(self.model, self.tok, self.heldout, self.template, batch_size=16)
        return score(preds, [e.completion for e in self.heldout])

    def save_checkpoint(self) -> str | None:  # with metrics.jsonl's length: a resume drops what was logged after it
        """Every rank calls it (each rank's RNG state is gathered); DDP's rank 0 writes alone, FSDP's every
        rank its shards. The path on rank 0, None elsewhere."""
        from minilora.parallel import sharded_checkpoint as SC
        from minilora.train import checkpoint as C

        rng = C.every_rank_rng_state()
        if not (self.main or self.fsdp):
            return None
        train_state = {**self.state, "metrics_bytes": self.metrics.tell() if self.main else 0}
        save = SC.save_checkpoint if self.fsdp else C.save_checkpoint  # FSDP: every rank writes its shards
        cfg = self.cfg
        return save(
            cfg.out,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            train_state,
            self.adapter_meta(),
            cfg.keep_checkpoints,
            rng=rng,
        )

    def adapter_meta(self) -> dict:
        """save_adapter's keywords for this run's adapters: the base, and EVA's settings as PEFT's eva_config."""
        cfg = self.cfg
        meta = {"base_model_name_or_path": cfg.model}
        if cfg.init == "eva":
            from minilora.lora import eva

            meta["config"] = {"eva_config": eva.peft_config(cfg.eva_rho, cfg.eva_tau)}
        return meta


def heldout_pairs(cfg, tok, template: str) -> list:
    """--eval-data's first --eval-generate preference pairs, encoded as training encodes pairs."""
    from minilora.data.pairs import encode_pair, load_pairs

    pairs, _ = load_pairs(cfg.eval_data, cfg.objective, cfg.skip_bad_lines)
    enc = (encode_pair(p, tok, template, False, cfg.max_seq_len, cfg.truncation) for p in pairs)
    return [e for e in enc if e is not None][: cfg.eval_generate]


def print_summary(s: dict) -> None:
    print("\n=== summary ===")
    print(f"steps: {s['steps']} ({s['stop_reason']}), {s['minutes']:.1f} min")
    if s.get("step_time"):
        from minilora.train import steptime

        print(steptime.summary_line(s["step_time"]))
    if s["val_loss"]:
        first, last = s["val_loss"][0], s["val_loss"][-1]
        print(f"validation loss: {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    if s.get("val_pref_accuracy"):
        first, last = s["val_pref_accuracy"][0], s["val_pref_accuracy"][-1]
        print(f"validation preference accuracy: {first[1]:.1%} (step {first[0]}) -> {last[1]:.1%} (step {last[0]})")
    b, a = s.get("heldout_before"), s.get("heldout_after")
    if b and a and "pref_accuracy" in a:
        print(f"held-out preference accuracy: {b['pref_accuracy']:.1%} -> {a['pref_accuracy']:.1%}  (n={a['n']})")
        print(f"held-out mean margin:         {b['margin']:.4f} -> {a['margin']:.4f}")
    elif b and a:
        print(f"held-out exact match:      {b['exact_match']:.1%} -> {a['exact_match']:.1%}  (n={a['n']})")
        print(f"held-out structured match: {b['structured_match']:.1%} -> {a['structured_match']:.1%}")
    print(f"adapter (PEFT format): {s['adapter']}")
