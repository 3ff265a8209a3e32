"""QLoRA fine-tuning, end to end, as one flat loop.

    python train.py                                   # offline demo: tiny model, bundled data
    python train.py --model gemma-3-1b --data train.jsonl --out runs/mytask
    torchrun --nproc_per_node 2 train.py ...          # data parallel, LoRA grads all-reduced

The loop: load (NF4 base) -> data -> LoRA surgery -> PagedAdamW + cosine schedule -> for each
step: M micro-batches, loss normalized by the step's label tokens, backward, clip, step ->
validation / early stopping / atomic checkpoints -> final adapter (PEFT format) + summary.
Every knob is a flag (minilora/train_config.py; `python train.py --help`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from minilora.train_config import ConfigError, parse_args, validate  # noqa: E402


def fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def run(cfg) -> int:
    from minilora import trainer as T
    from minilora.adapter import save_adapter
    from minilora.data import load_records, prepare_data
    from minilora.evaluate import completion_loss, generate_completions, score
    from minilora.fileio import write_text_atomic
    from minilora.lora import apply_lora, lora_parameters
    from minilora.loss import LossModule
    from minilora.models.loader import load_model
    from minilora.paged_adamw import PagedAdamW
    from minilora.planner import config_and_tokenizer, longest_batch, plan_run

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world, ddp_device = T.init_distributed()
    torch.manual_seed(cfg.seed + rank)  # dropout masks; data order and LoRA init have their own seeds
    main = rank == 0
    device = ddp_device or torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                        else ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
    dtype = cfg.resolved_dtype(device.type)
    if device.type == "cuda":  # float32 GEMMs: the LoRA terms (see --tf32)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    say = print if main else (lambda *a, **k: None)

    # --- run directory: never overwrite a previous run's checkpoints by accident
    ckpt = T.latest_checkpoint(cfg.out) if os.path.isdir(cfg.out) else None
    if ckpt is not None and not cfg.resume:
        return fail(f"{cfg.out} already holds checkpoints; pass --resume to continue it or choose another --out.")
    if cfg.resume and ckpt is None:
        say(f"note: --resume given but {cfg.out} has no checkpoint; starting fresh.")
    if main and not cfg.plan:
        write_text_atomic(os.path.join(cfg.out, "config.json"), cfg.to_json())

    # --- tokenizer, data, plan (config.json only: no weights yet), model
    t_start = time.time()
    model_cfg, tok = config_and_tokenizer(cfg.model)
    if tok is None:
        return fail(f"{cfg.model} has no tokenizer.json; a tokenizer is needed to encode the data.")
    data = prepare_data(cfg.data, tok, val_path=cfg.val_data, eval_path=cfg.eval_data, fmt=cfg.format,
                        template=cfg.template, train_on_all=cfg.train_on_all, max_seq_len=cfg.max_seq_len,
                        truncation=cfg.truncation, dedup=cfg.dedup, near_threshold=cfg.near_threshold,
                        val_fraction=cfg.val_fraction, seed=cfg.seed,
                        allow_contamination=cfg.allow_contamination, skip_bad_lines=cfg.skip_bad_lines)  # fmt: skip
    say("data: " + ", ".join(f"{k}={v}" for k, v in data.summary.items() if k != "train_file"))
    batch_kw = dict(batch_size=cfg.batch_size, pack=cfg.pack, max_seq_len=cfg.max_seq_len, shuffle=True,
                    seed=cfg.seed, pad_id=tok.pad_id)  # fmt: skip
    plan, too_big = plan_run(cfg, model_cfg, device, dtype, longest_batch(data.train, batch_kw),
                             probe_seconds=2.0 if cfg.plan else 0.0)  # fmt: skip
    if cfg.plan:
        from minilora.packing import num_batches

        plan.steps = cfg.max_steps * cfg.grad_accum or cfg.epochs * num_batches(data.train, **batch_kw)  # micro-batches
        print(f"plan for {device.type} ({cfg.model}):\n{plan.table()}" + (f"\nwould not start: {too_big}" if too_big else ""))
        return 0
    if too_big:
        return fail(too_big)
    say(f"settings: dtype {plan.dtype}, recompute {plan.recompute}, predicted peak {plan.peak / 2**20:,.0f} MiB")
    if main:
        write_text_atomic(os.path.join(cfg.out, "config.json"),
                          json.dumps({**json.loads(cfg.to_json()), "resolved": plan.settings()}, indent=2))
    model, _ = load_model(cfg.model, quantize=None if cfg.quantize == "none" else "nf4", dtype=dtype,
                          device=str(device))  # fmt: skip

    # --- LoRA surgery + optimizer + schedule
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    report = apply_lora(model, targets=targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, seed=cfg.seed)  # fmt: skip
    say(report["summary"] if isinstance(report, dict) and "summary" in report else report)
    model.set_gradient_checkpointing(plan.recompute_blocks)
    model.train()
    budget = None if cfg.optimizer_budget == "none" else (
        "auto" if cfg.optimizer_budget == "auto" else int(cfg.optimizer_budget))  # fmt: skip
    optimizer = PagedAdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           state_bits=cfg.optimizer_bits, device_budget=budget)  # fmt: skip
    stream = T.BatchStream(data.train, batch_kw)
    micro_per_step = cfg.grad_accum * world
    total_steps = cfg.max_steps or max(1, cfg.epochs * stream.per_epoch // micro_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, T.cosine_with_warmup(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    loss_fn = LossModule(model, cfg.loss_chunk)
    if world > 1:
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=None if device.type == "cpu"
                                                            else [device.index])  # fmt: skip
    adapter_meta = {"base_model_name_or_path": cfg.model}

    # --- state (fresh or resumed)
    state = {"best_val": math.inf, "bad_evals": 0, "val_history": [], "heldout_before": None,
             "epoch": 0, "index": 0}  # fmt: skip
    step = 0
    if cfg.resume and ckpt is not None:
        state = T.load_checkpoint(ckpt, model, optimizer, scheduler)
        step = state["step"]
        stream = T.BatchStream(data.train, batch_kw, state["epoch"], state["index"])
        say(f"resumed from {ckpt} at step {step}")
    eval_examples = []
    if cfg.eval_data and cfg.eval_generate > 0:
        eval_examples, _ = load_records(cfg.eval_data, cfg.format, cfg.skip_bad_lines)
        eval_examples = eval_examples[: cfg.eval_generate]
    if main and eval_examples and state["heldout_before"] is None:
        preds = generate_completions(model, tok, eval_examples, cfg.template, batch_size=16)
        state["heldout_before"] = score(preds, [e.completion for e in eval_examples])

    def validate_loss() -> float | None:
        if not data.val:
            return None
        total, count = completion_loss(model, data.val, cfg.batch_size, tok.pad_id, chunk=cfg.loss_chunk)
        return total / max(1, count)

    metrics = T.MetricsWriter(os.path.join(cfg.out, "metrics.jsonl"), append=step > 0) if main else None
    if main and step == 0:
        v0 = validate_loss()
        if v0 is not None:
            state["val_history"].append([0, v0])
            metrics.write(step=0, val_loss=v0)
    progress = T.Progress(total_steps, enabled=main)
    t_last, tokens_since = time.time(), 0
    stop_reason = "finished"

    # --- the loop
    with T.StopRequest() as stop:
        while step < total_steps:
            micro = [stream.next() for _ in range(micro_per_step)][rank::world]  # this rank's share
            n_total = T.all_reduce_sum(sum(b.n_label_tokens for b in micro), world)
            loss_sum = 0.0
            for i, b in enumerate(micro):
                b = b.to(device)
                sync = contextlib.nullcontext() if (world == 1 or i == len(micro) - 1) else loss_fn.no_sync()
                with sync:
                    s, _ = loss_fn(b)
                    (s * world / max(1.0, n_total)).backward()
                loss_sum += float(s.detach())
                tokens_since += int(b.attention_mask.sum())
            loss = T.all_reduce_sum(loss_sum, world) / max(1.0, n_total)
            if cfg.debug_nan_at_step and step + 1 == cfg.debug_nan_at_step:
                loss = float("nan")
            if not math.isfinite(loss):
                last = T.latest_checkpoint(cfg.out)
                keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                return fail(f"the loss became {loss} at step {step + 1}; stopped without saving this step "
                            f"({keep}); lower --lr or check the data.", code=1)  # fmt: skip
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state.update(stream.position())
            if cfg.debug_interrupt_at_step and step == cfg.debug_interrupt_at_step:
                os.kill(os.getpid(), signal.SIGINT)  # exercises the real signal path in tests

            if main and (step % cfg.log_every == 0 or step == total_steps):
                now = time.time()
                tok_s = tokens_since * world / max(1e-9, now - t_last)
                lr = scheduler.get_last_lr()[0]
                peak = T.peak_memory_bytes(device) / 2**20
                progress.update(step, f"| loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | peak {peak:,.0f} MB")
                metrics.write(step=step, loss=loss, lr=lr, tokens_per_s=tok_s, peak_mem_mb=peak)
                t_last, tokens_since = now, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                v = validate_loss()  # every rank holds the same weights and val data: same v
                if v is not None:
                    state["val_history"].append([step, v])
                    if main:
                        metrics.write(step=step, val_loss=v)
                        say(f"step {step} | val_loss {v:.4f}")
                    if v < state["best_val"] - 1e-4:
                        state["best_val"], state["bad_evals"] = v, 0
                    else:
                        state["bad_evals"] += 1
                if cfg.early_stopping and state["bad_evals"] >= cfg.early_stopping:
                    stop_reason = f"early stopping after {state['bad_evals']} validations without improvement"
                    break
            if main and cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                T.save_checkpoint(cfg.out, step, model, optimizer, scheduler, state, adapter_meta,
                                  cfg.keep_checkpoints)  # fmt: skip
            if stop:
                stop_reason = "interrupted"
                break

    # --- end: checkpoint, adapter, summary
    if not main:
        return 0
    path = T.save_checkpoint(cfg.out, step, model, optimizer, scheduler, state, adapter_meta, cfg.keep_checkpoints)
    if stop_reason == "interrupted":
        print(f"\nInterrupted at step {step}; checkpoint written to {path}. "
              f"Resume with: python train.py {' '.join(sys.argv[1:])} --resume")
        return 0
    v = validate_loss()
    if v is not None:
        state["val_history"].append([step, v])
        metrics.write(step=step, val_loss=v)
    save_adapter(model, os.path.join(cfg.out, "adapter"), **adapter_meta)
    summary = {"steps": step, "stop_reason": stop_reason, "minutes": (time.time() - t_start) / 60,
               "val_loss": state["val_history"], "heldout_before": state["heldout_before"],
               "adapter": os.path.join(cfg.out, "adapter")}  # fmt: skip
    if eval_examples:
        preds = generate_completions(model, tok, eval_examples, cfg.template, batch_size=16)
        summary["heldout_after"] = score(preds, [e.completion for e in eval_examples])
    metrics.close()
    write_text_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2))
    T.plot_loss_curve(cfg.out)
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    print("\n=== summary ===")
    print(f"steps: {s['steps']} ({s['stop_reason']}), {s['minutes']:.1f} min")
    if s["val_loss"]:
        first, last = s["val_loss"][0], s["val_loss"][-1]
        print(f"validation loss: {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    b, a = s.get("heldout_before"), s.get("heldout_after")
    if b and a:
        print(f"held-out exact match:      {b['exact_match']:.1%} -> {a['exact_match']:.1%}  (n={a['n']})")
        print(f"held-out structured match: {b['structured_match']:.1%} -> {a['structured_match']:.1%}")
    print(f"adapter (PEFT format): {s['adapter']}")


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        validate(cfg)
        return run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # every user error ends in one sentence (data, model and flag errors are ValueErrors);
        # MINILORA_DEBUG=1 shows the traceback instead
        if os.environ.get("MINILORA_DEBUG"):
            raise
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
