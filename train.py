"""QLoRA fine-tuning, end to end: setup, one flat loop, finish.

    python train.py                                   # offline demo: tiny model, bundled data
    python train.py --objective dpo                   # offline demo of DPO: bundled preference pairs
    python train.py --model gemma-3-1b --data train.jsonl --out runs/mytask
    torchrun --nproc_per_node 2 train.py ...          # data parallel, LoRA grads all-reduced
    torchrun --nproc_per_node 2 train.py ... --parallel fsdp   # NF4 base and LoRA sharded over ranks

setup: load (NF4 base) -> data -> LoRA surgery -> PagedAdamW + cosine schedule -> the objective, all
in a `Run`. loop: for each step, M micro-batches; the objective (minilora/train/objectives.py: sft,
dpo or orpo) turns each into (loss_sum, normalizer, metrics); the loss is normalized by the step's
normalizers (label tokens, or pairs), backward, clip, step -> validation / early stopping / atomic
checkpoints. finish: final adapter (PEFT format) + summary.
Every knob is a flag (minilora/train/config.py; `python train.py --help`). The run folder --out is
written only by train.py, one process at a time (an OS lock on RUN/.lock, taken before the first
write): a new folder, or one it wrote before (continued with --resume, see
minilora/train/rundir.py). Exit codes: 0 done, 1 the loss became NaN/inf, 2 a user error (one sentence),
3 interrupted by SIGINT/SIGTERM (checkpointed; continue with --resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time

import torch

from minilora.cli import EXIT_FAILED, EXIT_INTERRUPTED, Progress, fail, resolve_device, run_main
from minilora.dtypes import dtype_name, resolve_dtype
from minilora.train import steptime
from minilora.train.config import given_flags, parse_args, validate
from minilora.train.run import Run, heldout_pairs, print_summary

# the flags of one objective: given with another, they would be silently ignored
ONLY_FOR = {
    **dict.fromkeys(("beta", "label_smoothing", "dpo_loss", "precompute_reference"), ("dpo",)),
    "orpo_lambda": ("orpo",),
    **dict.fromkeys(("pair_split", "share_prompt"), ("dpo", "orpo")),
}


def setup(cfg, given: set[str]) -> Run | int:
    """Everything before the first step, every check before the first write; an exit code when the
    run ends here (--plan, or a refusal)."""
    from minilora.data.encode import resolve_template
    from minilora.data.prepare import prepare_data
    from minilora.data.records import load_records
    from minilora.fileio import write_text_atomic
    from minilora.lora import eva, inits
    from minilora.lora.plus import learning_rates, lora_param_groups
    from minilora.lora.surgery import apply_lora, check_targets, lora_modules, trainable_report
    from minilora.models.loader import check_local_weights, load_config, load_model, plan_config
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.parallel import distributed as D
    from minilora.parallel import sharded_checkpoint as SC
    from minilora.train import checkpoint as C
    from minilora.train import init_adapter, rundir
    from minilora.train import schedule as T
    from minilora.train.objectives import ObjectiveModule, make_objective
    from minilora.train.planner import longest_batch, plan_run

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world, ddp_device = D.init_distributed()
    parallel = D.choose_parallel(cfg.parallel, world)  # "none", "ddp" or "fsdp"
    D.check_parallel(parallel, D.launched_by_torchrun(), cfg.optimizer_bits, cfg.use_dora, cfg.init)
    fsdp = parallel == "fsdp"
    main = rank == 0
    device = ddp_device or resolve_device(cfg.device)

    # --- run directory: written only by train.py; checked (and --resume compared) before any write
    ckpt, old = (None, None) if cfg.plan else rundir.check_run_folder(cfg.out, cfg.resume)  # --plan writes nothing
    if ckpt is not None:
        SC.check_readable(ckpt)  # an old torch DCP checkpoint (a pickle) is refused unopened
    D.all_reduce_sum(0, world)  # a barrier: every rank has read --out before rank 0 writes into it
    if cfg.resume and old is not None:  # the run's recorded flags, with or without a checkpoint yet

        def resolve(name: str) -> str:  # --dtype NAME on this device, e.g. auto -> "float32" on the CPU
            return dtype_name(resolve_dtype(name, device.type))

        def resolve_tpl(name: str) -> str:  # --template NAME for this model, e.g. auto -> "chat"
            return resolve_template(name, load_config(cfg.model)[1])

        ckpt_step = C.check_checkpoint(ckpt)["step"] if ckpt else 0  # a damaged file: one sentence, nothing written
        changed = rundir.merge_resume(cfg, given, old, resolve, ckpt_step, world, resolve_tpl)
        validate(cfg)
        if world > 1:  # the run's --parallel unless given: every mode resumes every checkpoint
            parallel = D.choose_parallel(cfg.parallel, world)
            fsdp = parallel == "fsdp"
        if fsdp and (cfg.optimizer_bits != 32 or cfg.use_dora or inits.reads_weights(cfg.init)):  # recorded flags
            kept = "--use-dora" if cfg.use_dora else f"--optimizer-bits {cfg.optimizer_bits}"
            kept = f"--init {cfg.init}" if inits.reads_weights(cfg.init) else kept
            return fail(
                f"--out {cfg.out} was trained with {kept}, which --parallel fsdp does not support; resume it "
                f"with `torchrun --nproc_per_node {world} train.py --out {cfg.out} --resume --parallel ddp`."
            )
        if changed and main:
            print("resume: " + ", ".join(f"{rundir.flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
        device = ddp_device or resolve_device(cfg.device)
    for name in sorted(given & set(ONLY_FOR)):  # a flag of another objective would be silently ignored
        if cfg.objective not in ONLY_FOR[name]:
            obj = " or ".join(ONLY_FOR[name])
            return fail(f"{rundir.flag(name)} applies to --objective {obj}; drop it or pass --objective {obj}.")
    if {"share_prompt", "pair_split"} <= given and cfg.share_prompt and cfg.pair_split:
        return fail(
            "--pair-split backpropagates the chosen and the rejected answers one after the other, so it runs "
            "them in rows of their own; drop --share-prompt or --pair-split."
        )
    torch.manual_seed(cfg.seed + rank)  # dropout masks; data order and LoRA init have their own seeds
    dtype = cfg.resolved_dtype(device.type)
    if device.type == "cuda":  # float32 GEMMs: the LoRA terms (see --tf32)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    say = print if main else (lambda *a, **k: None)

    if cfg.resume and ckpt is None:
        say(f"note: {cfg.out} has no checkpoint yet; its run starts from step 0.")

    # --- tokenizer, data, plan (config.json only: no weights yet), model
    t_start = time.time()
    model_cfg, tok = (plan_config if cfg.plan else load_config)(cfg.model)  # --plan downloads no tokenizer
    estimated = tok is None and cfg.plan
    if estimated:
        from minilora.data.token_estimate import BYTES_PER_TOKEN, ByteCountTokenizer

        tok = ByteCountTokenizer()
        say(
            f"note: no tokenizer for {cfg.model} on disk (--plan downloads none), so token counts are "
            f"estimated as UTF-8 bytes / {BYTES_PER_TOKEN} with prompts rendered raw."
        )
    if tok is None:
        return fail(f"{cfg.model} has no tokenizer.json; a tokenizer is needed to encode the data.")
    if not cfg.plan:
        check_local_weights(cfg.model)  # no weights, or a truncated file: refused before the run folder exists
    context = model_cfg.max_position_embeddings
    if cfg.max_seq_len > context and ckpt is None:  # positions past it were never trained; a resume keeps its own
        if "max_seq_len" in given:
            return fail(
                f"--max-seq-len {cfg.max_seq_len} is longer than {cfg.model}'s context of {context} tokens "
                f"(max_position_embeddings); pass --max-seq-len {context} or less."
            )
        say(f"note: --max-seq-len {cfg.max_seq_len} is longer than the model's context; using {context}.")
        cfg.max_seq_len = context
    template = "raw" if estimated else resolve_template(cfg.template, tok)  # auto: chat if the tokenizer has one
    if cfg.template == "auto" and not estimated:
        why = "has a chat template" if template == "chat" else "has no chat template"
        say(f"template: {template} (--template auto: the tokenizer {why})")
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    # apply_lora's matching and rank fit, on meta
    check_targets(model_cfg, targets, init=cfg.init, r=cfg.lora_r, rho=cfg.eva_rho)
    init_dir = None  # --init-adapter: checked now; on --resume the run folder's own copy
    if cfg.init_adapter:
        kept = os.path.join(cfg.out, init_adapter.FOLDER)
        init_dir = kept if ckpt is not None and os.path.isdir(kept) else init_adapter.check(cfg, model_cfg, targets)
    data = prepare_data(
        cfg.data,
        tok,
        val_path=cfg.val_data,
        eval_path=cfg.eval_data,
        fmt=cfg.format,
        template=template,
        train_on_all=cfg.train_on_all,
        max_seq_len=cfg.max_seq_len,
        truncation=cfg.truncation,
        dedup=cfg.dedup,
        near_threshold=cfg.near_threshold,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        allow_contamination=cfg.allow_contamination,
        skip_bad_lines=cfg.skip_bad_lines,
        objective=cfg.objective,
    )
    say(
        ("data (estimated): " if estimated else "data: ")
        + ", ".join(f"{k}={v}" for k, v in data.summary.items() if k != "train_file")
    )
    batch_kw = dict(
        batch_size=cfg.batch_size,
        pack=cfg.pack,
        max_seq_len=cfg.max_seq_len,
        shuffle=True,
        seed=cfg.seed,
        pad_id=tok.pad_id,
    )
    shared = cfg.objective != "sft" and cfg.share_prompt and not cfg.pair_split  # a pair runs as one row
    shape = longest_batch(data.train, batch_kw, shared)
    plan, too_big = plan_run(cfg, model_cfg, device, dtype, shape, fsdp_ranks=world if fsdp else 1)
    if too_big and parallel == "ddp" and cfg.parallel == "auto":
        parallel = D.choose_parallel(cfg.parallel, world, fits_one_device=False)  # does not fit one device: shard
        D.check_parallel(parallel, D.launched_by_torchrun(), cfg.optimizer_bits, cfg.use_dora, cfg.init)
        fsdp = True
        plan, too_big = plan_run(cfg, model_cfg, device, dtype, shape, fsdp_ranks=world)
        say(f"parallel: fsdp over {world} ranks (the model does not fit one device)")
    labels = steptime.longest_labels(data.train, batch_kw, shared)  # the probe's batch
    step_time, unmeasured = steptime.predict(cfg, model_cfg, device, dtype, shape, labels, plan, world, not too_big)
    if cfg.plan:
        from minilora.data.packing import num_batches

        micro = cfg.max_steps * cfg.grad_accum or cfg.epochs * num_batches(data.train, **batch_kw)
        run_s = step_time and steptime.run_seconds(step_time, data.train, batch_kw, micro, shared)
        per = f", per rank of {world} (--parallel fsdp)" if fsdp else ""
        print(
            f"plan for {device.type} ({cfg.model}){per}:\n{plan.table()}\n"
            + steptime.describe(step_time, unmeasured, run_s, micro)
            + (eva.plan_note(step_time) if cfg.init == "eva" else "")
            + (f"\nwould not start: {too_big}" if too_big else "")
        )
        return 0
    if too_big:
        return fail(too_big)
    eva_batches = None  # --init eva: A from the inputs of the first training batches (lora/eva.py)
    if cfg.init == "eva" and not (ckpt is not None and eva.load_ranks(cfg.out) is not None):
        stream = T.BatchStream(data.train, batch_kw)  # epoch 0's batches in training's order, every rank alike
        eva_batches = [stream.next() for _ in range(min(stream.per_epoch, eva.MAX_BATCHES))]
        try:
            eva.check_batches(eva_batches, cfg.lora_r, cfg.eva_rho)  # refused before anything is written
        except eva.EvaError as e:
            return fail(str(e))
    say(
        f"settings: dtype {plan.dtype}, recompute {plan.recompute}, dequantized weights kept {plan.weight_reuse}, "
        f"loss chunk {plan.loss_chunk}, "
        f"predicted peak {plan.peak / 2**20:,.0f} MiB"
    )
    objective = make_objective(
        cfg.objective,
        plan.loss_chunk,
        cfg.beta,
        cfg.label_smoothing,
        cfg.dpo_loss,
        cfg.orpo_lambda,
        cfg.pair_split,
        cfg.share_prompt,
    )
    heldout = []
    if cfg.eval_data and cfg.eval_generate > 0:  # read before the first write: a bad file is refused here
        if objective.pairs:
            heldout = heldout_pairs(cfg, tok, template)
        else:
            records, report = load_records(cfg.eval_data, cfg.format, cfg.skip_bad_lines)
            if report.fmt == "text":  # nothing to prompt with: its exact match would score nothing
                return fail(
                    f"--eval-data {cfg.eval_data} holds text records with no prompts; held-out scoring needs "
                    "prompt/completion, alpaca or chat records, so pass such a file or --eval-generate 0."
                )
            heldout = records[: cfg.eval_generate]
    lock = None
    if main:  # the first write: every check above has passed
        lock = rundir.claim(cfg.out, cfg.resume, (ckpt, old))  # held while the Run lives (or the process)
        lrs = learning_rates(cfg.lr, cfg.lora_plus_ratio)  # LoRA+: lora_B's rate is --lora-plus-ratio x lora_A's
        resolved = {**plan.settings(), **steptime.settings(step_time, unmeasured), "template": template}
        config = rundir.config_json(cfg, dtype_name(dtype), world, {**resolved, "learning_rates": lrs})
        write_text_atomic(os.path.join(cfg.out, "config.json"), config)
        rundir.remove_stale_temps(cfg.out)  # what a kill -9 left half-written
        if init_dir is not None:
            init_dir = init_adapter.copy_into_run(init_dir, cfg.out)  # a resume needs only the run folder
    if init_dir is not None:
        D.all_reduce_sum(0, world)  # a barrier: rank 0's copy exists before the other ranks read it
        init_dir = os.path.join(cfg.out, init_adapter.FOLDER)
    lora_kw = dict(
        targets=targets,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        lora_compute=cfg.lora_compute,
        init=cfg.init,
        loftq_iters=cfg.loftq_iters,
        seed=cfg.seed,
        verbose=False,
    )
    streamed = fsdp and D.streams_load(cfg.model, cfg.quantize)  # loaded straight into this rank's shards
    if streamed:
        model, _, report = D.load_sharded(cfg.model, dtype, device, world, lora_kw)
    else:  # an init that reads W (PiSSA, OLoRA, LoftQ) runs on the dense weights; the base is quantized after it
        dense_first = inits.reads_weights(cfg.init) and cfg.quantize == "nf4"
        quantize = None if cfg.quantize == "none" or dense_first else "nf4"
        model, _ = load_model(cfg.model, quantize=quantize, dtype=dtype, device=str(device))

    # --- LoRA surgery + optimizer + schedule
    if not streamed:
        report = apply_lora(model, **lora_kw)  # the same init on every rank and on --resume (seeded)
        if dense_first:
            from minilora.models.loader import quantize_linears

            quantize_linears(model, compute_dtype=dtype)  # PiSSA/OLoRA residuals (QPiSSA); LoftQ's are NF4 already
    if eva_batches is not None:
        try:
            ranks = eva.initialise(
                model, [b.to(device) for b in eva_batches], cfg.lora_r, cfg.eva_rho, cfg.eva_tau, say
            )
        except eva.EvaError as e:
            return fail(str(e))
        if main:
            eva.save_ranks(cfg.out, ranks)  # a resume rebuilds these ranks; its checkpoint holds A and B
        report = {**trainable_report(model), "modules": [n for n, rl in ranks.items() if rl]}
    elif cfg.init == "eva":
        eva.set_ranks(model, eva.load_ranks(cfg.out), cfg.lora_r)
        report = {**trainable_report(model), "modules": list(lora_modules(model))}
    say(f"LoRA: {len(report['modules'])} modules; {report['message']}")
    if init_dir is not None:  # the policy starts there; DPO's reference is base + these weights, frozen
        objective.frozen = init_adapter.load(model, init_dir)
    if cfg.precompute_reference:  # stored in the run folder once; a resume reads it back
        from minilora.train.reference import stored_table

        objective.stored = stored_table(cfg.out, model, objective, data.train, cfg.batch_size, tok.pad_id, main)
    model.set_gradient_checkpointing(plan.recompute_blocks, selective=plan.selective_blocks)
    model.set_weight_reuse(plan.reuse_blocks)
    model.train()
    if fsdp and not streamed:
        D.shard_model(model, device, world)  # before the optimizer: it holds the sharded LoRA parameters
    budget = (
        None
        if cfg.optimizer_budget == "none"
        else ("auto" if cfg.optimizer_budget == "auto" else int(cfg.optimizer_budget))
    )
    optimizer = PagedAdamW(
        lora_param_groups(model, cfg.lr, cfg.lora_plus_ratio, cfg.weight_decay),  # LoRA+: B at ratio x lr
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        state_bits=cfg.optimizer_bits,
        device_budget=budget,
    )
    stream = T.BatchStream(data.train, batch_kw)
    total_steps = cfg.max_steps or max(1, cfg.epochs * stream.per_epoch // (cfg.grad_accum * world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, T.cosine_with_warmup(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    step_fn = ObjectiveModule(model, objective)
    if parallel == "ddp":
        step_fn = torch.nn.parallel.DistributedDataParallel(
            step_fn,
            device_ids=None if device.type == "cpu" else [device.index],
            # --pair-split's chosen half backpropagates inside a reentrant checkpoint's backward, so each
            # LoRA weight's gradient arrives twice a step: DDP takes that only with a static graph
            static_graph=cfg.pair_split,  # SFT with --pair-split is refused before this
        )
    r = Run(  # each field is the local of the same name
        *(cfg, rank, world, parallel, device, say, t_start, tok, template, data, plan, model, objective, step_fn),
        *(optimizer, scheduler, stream, total_steps),
        heldout=heldout,
        lock=lock,
        clock=steptime.StepClock(step_time, unmeasured, device),  # step times beside the prediction
    )

    # --- state (fresh or resumed)
    if cfg.resume and ckpt is not None:
        read = lambda path: SC.read_state(path, model, optimizer)  # written in any mode: this rank's part
        r.state = C.load_checkpoint(ckpt, model, optimizer, scheduler, read_state=read)
        r.step = r.state["step"]
        C.apply_hyperparameters(optimizer, scheduler, cfg.lr, cfg.weight_decay)  # flags changed on resume
        if main:
            rundir.cut_metrics(os.path.join(cfg.out, "metrics.jsonl"), r.state)  # steps after ckpt: logged again
        r.stream = T.BatchStream(data.train, batch_kw, r.state["epoch"], r.state["index"])
        say(f"resumed from {ckpt} at step {r.step}")
        if r.step >= r.total_steps:  # --max-steps (or --epochs) lowered below the step it has reached
            say(f"note: the run ends at step {r.total_steps}, which it has reached; it finishes without training.")
    if (main or fsdp) and r.heldout and r.state["heldout_before"] is None:
        r.state["heldout_before"] = r.score_heldout()
    r.metrics = rundir.MetricsWriter(os.path.join(cfg.out, "metrics.jsonl"), append=r.step > 0) if main else None
    if (main or fsdp) and r.step == 0:
        r.record_validation(r.validate())
    return r


def loop(r: Run) -> str | int:
    """Train until the last step, early stopping or a stop request; the stop reason, or an exit code."""
    from minilora.lora.surgery import lora_parameters
    from minilora.parallel import distributed as D
    from minilora.train import checkpoint as C
    from minilora.train.process_memory import peak_memory_bytes

    cfg, world, rank = r.cfg, r.world, r.rank
    micro_per_step = cfg.grad_accum * world
    progress = Progress(r.total_steps, enabled=r.main, initial=r.step)
    clock = r.clock
    busy, tokens_since = 0.0, 0  # training seconds and tokens since the last log line (no evals, no saves)
    stop_reason = "finished"
    with C.StopRequest() as stop:
        while r.step < r.total_steps:
            t_step = time.perf_counter()
            clock.start()
            micro = [r.stream.next() for _ in range(micro_per_step)][rank::world]  # this rank's share
            n_total = D.all_reduce_sum(sum(r.objective.normalizer(b) for b in micro), world)  # tokens, or pairs
            loss_sum, sums = 0.0, {}
            for i, b in enumerate(micro):
                b = b.to(r.device)
                last = i == len(micro) - 1
                sync = r.step_fn.no_sync() if r.parallel == "ddp" and not last else contextlib.nullcontext()
                with sync:
                    s, _, m = r.step_fn(b)
                    (s * world / max(1.0, n_total)).backward()
                loss_sum += float(s.detach())
                clock.micro(r.objective.rows(b) if r.objective.pairs else b)
                for k, v in m.items():  # sums over the micro-batch's items (pairs): rewards, margin, accuracy
                    sums[k] = sums.get(k, 0.0) + v
                tokens_since += int(b.attention_mask.sum())
            loss = D.all_reduce_sum(loss_sum, world) / max(1.0, n_total)
            step_metrics = {k: D.all_reduce_sum(v, world) / max(1.0, n_total) for k, v in sums.items()}
            if cfg.debug_nan_at_step and r.step + 1 == cfg.debug_nan_at_step:
                loss = float("nan")
            if not math.isfinite(loss):
                last = C.latest_checkpoint(cfg.out)
                keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                return fail(
                    f"the loss became {loss} at step {r.step + 1}; stopped without saving this step "
                    f"({keep}); lower --lr or check the data.",
                    code=EXIT_FAILED,
                )
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(lora_parameters(r.model), cfg.max_grad_norm)
            r.optimizer.step()
            r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
            clock.stop()
            busy += time.perf_counter() - t_step
            r.step += 1
            r.state.update(r.stream.position())
            if cfg.debug_interrupt_at_step and r.step == cfg.debug_interrupt_at_step:
                os.kill(os.getpid(), signal.SIGINT)  # exercises the real signal path in tests

            if r.main and (r.step % cfg.log_every == 0 or r.step == r.total_steps):
                tok_s = tokens_since * world / max(1e-9, busy)
                lr = r.scheduler.get_last_lr()[0]
                peak = peak_memory_bytes(r.device) / 2**20
                pref = f" | margin {step_metrics['margin']:.3f} | acc {step_metrics['accuracy']:.0%}" if sums else ""
                text = f"loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | peak {peak:,.0f} MB{pref}"
                progress.update(r.step, text)
                r.metrics.write(step=r.step, loss=loss, lr=lr, tokens_per_s=tok_s, peak_mem_mb=peak, **step_metrics)
                busy, tokens_since = 0.0, 0
            if cfg.eval_every and r.step % cfg.eval_every == 0 and r.step < r.total_steps:
                v = r.validate()  # every rank holds the same weights and val data: same v
                if v:
                    r.record_validation(v)
                    r.say(f"step {r.step} | " + " | ".join(f"{k} {x:.4f}" for k, x in v.items()))
                    if v["val_loss"] < r.state["best_val"] - 1e-4:
                        r.state["best_val"], r.state["bad_evals"] = v["val_loss"], 0
                    else:
                        r.state["bad_evals"] += 1
                if cfg.early_stopping and r.state["bad_evals"] >= cfg.early_stopping:
                    stop_reason = f"early stopping after {r.state['bad_evals']} validations without improvement"
                    break
            if cfg.save_every and r.step % cfg.save_every == 0 and r.step < r.total_steps:  # every rank: its RNG
                r.save_checkpoint()
            if stop:
                stop_reason = "interrupted"
                break
    progress.close()
    return stop_reason


def finish(r: Run, stop_reason: str) -> int:
    """The last checkpoint, the adapter, the summary."""
    from minilora.fileio import write_text_atomic
    from minilora.lora import inits
    from minilora.lora.adapter import save_adapter
    from minilora.parallel import distributed as D
    from minilora.train import schedule as T

    cfg = r.cfg
    path = r.save_checkpoint()  # every rank: each one's RNG state goes into it
    if not (r.main or r.fsdp):
        return EXIT_INTERRUPTED if stop_reason == "interrupted" else 0
    if stop_reason == "interrupted":
        if r.main:
            r.metrics.close()
            print(
                f"\nInterrupted at step {r.step}; checkpoint written to {path}. "
                f"Resume with: python train.py --out {cfg.out} --resume  (exit code {EXIT_INTERRUPTED})"
            )
        return EXIT_INTERRUPTED
    v = r.validate()
    full = D.full_adapter_state(r.model) if r.fsdp else None  # gathered from the shards, written once
    r.record_validation(v)
    if r.main:
        save_adapter(r.model, os.path.join(cfg.out, "adapter"), state=full, **r.adapter_meta())
        note = inits.save_note(cfg.init, cfg.lora_r, cfg.quantize, cfg.loftq_iters)  # PiSSA / OLoRA: converted
        if note:
            print(note)
    summary = {
        "steps": r.step,
        "stop_reason": stop_reason,
        "minutes": (time.time() - r.t_start) / 60,
        "val_loss": r.state["val_history"],
        "heldout_before": r.state["heldout_before"],
        "adapter": os.path.join(cfg.out, "adapter"),
        "step_time": r.clock.summary(),
    }
    if r.objective.pairs:
        summary["objective"] = cfg.objective
        summary["val_pref_accuracy"] = r.state.get("val_pref", [])
    if r.heldout:
        summary["heldout_after"] = r.score_heldout()
    if not r.main:
        return 0
    r.metrics.close()
    write_text_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2))
    T.plot_loss_curve(cfg.out)
    print_summary(summary)
    return 0


def run(cfg, given: set[str] = frozenset()) -> int:
    """Train as `cfg` says; `given`: the fields named on the command line (compared on --resume)."""
    r = setup(cfg, set(given))
    if isinstance(r, int):
        return r
    stop_reason = loop(r)
    return stop_reason if isinstance(stop_reason, int) else finish(r, stop_reason)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    seen = {}  # the run folder, once parsed

    def body() -> int:
        from minilora.parallel.distributed import close_distributed

        cfg = parse_args(argv)
        seen["out"] = cfg.out
        validate(cfg)
        try:
            return run(cfg, given_flags(argv))
        finally:
            close_distributed()

    # a user error: one sentence, exit 2 (MINILORA_DEBUG=1: the traceback)
    def resume() -> str:  # Ctrl-C before the loop or after it (the loop itself stops at a step's end)
        out = seen.get("out", "RUN")
        return f"`python train.py --out {out} --resume` continues it (from its last checkpoint, or the start if none)"

    return run_main(body, again="continue the run with --resume", interrupted=resume)


if __name__ == "__main__":
    sys.exit(main())
