"""Evaluate a fine-tuned adapter against its base and a few-shot baseline; export merged checkpoints.

    python eval.py                                          # the offline demo's run (runs/demo)
    python eval.py --adapter runs/mytask --data test.jsonl  # base vs k-shot base vs fine-tuned
    python eval.py ... --min-exact-match 0.8                # exit 1 when the fine-tuned model falls below
    python eval.py --adapter runs/a --adapter runs/b --data test.jsonl   # several adapters of one base
    python eval.py export --adapter runs/mytask --out merged/ [--dtype bfloat16] [--quantize-4bit]
    python eval.py export --adapter runs/mytask --out model.gguf --format gguf --gguf-type q4_k_m  # llama.cpp

Evaluation: load the base as the run trained it (NF4 unless the run said --quantize none) -> score
the base -> score the base with k training examples in its prompt -> load the adapter -> score the
fine-tuned model -> report.md + eval.json in the run directory -> gates. Each score is perplexity on
the completion tokens, exact match and structured (JSON) match of greedy generations.
A preference run (train.py --objective dpo or orpo) is scored on held-out pairs instead: preference
accuracy and mean margin of the base, the initial adapter (--init-adapter runs) and the fine-tuned
model, and greedy generations beside the chosen and rejected answers in report.md.
Defaults for --model, --data, --train-data, --template and --format come from the run's config.json.
Several --adapter runs of one base: the base is loaded once, every adapter is loaded beside it by name
(its run folder's name), and the base, the few-shot base and every adapter are scored together, each
batch mixing their rows (minilora/eval/mixed.py); report.md has a table per metric. Runs trained on
different bases (model, quantization, dtype) are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minilora import DEMO_RUN
from minilora.cli import EXIT_FAILED, Progress, fail, parser, resolve_device, run_main
from minilora.data.records import DataError, without_skip_hint
from minilora.dtypes import dtype_name, resolve_dtype, run_dtype


def eval_parser() -> argparse.ArgumentParser:
    p = parser(
        "eval.py",
        "Score base, few-shot base and fine-tuned model side by side (report.md + eval.json). "
        "With no arguments: the offline demo's run. Subcommand: `eval.py export --help`.",
        epilog="exit codes: 0 done; 1 a gate (--min-exact-match, --min-structured-match, --max-perplexity) "
        "was missed; 2 a user error (one sentence on stderr); 3 interrupted (Ctrl-C: no report written).",
    )
    a = p.add_argument
    a(
        "--adapter",
        action="append",
        default=None,
        help="run directory written by train.py (or its adapter/ folder); repeat it to score several adapters "
        "of one base side by side, in mixed batches",
    )
    a("--model", default=None, help="base model (default: the run's --model)")
    a("--data", default=None, help="test JSONL (default: the run's --eval-data)")
    a("--train-data", default=None, help="JSONL the few-shot examples come from (default: the run's --data)")
    a("--shots", type=int, default=3, help="examples in the few-shot baseline's prompt (0 = no baseline)")
    a("--max-new-tokens", type=int, default=64, help="greedy generation length limit")
    a("--batch-size", type=int, default=16, help="examples per forward pass")
    a("--generations", type=int, default=5, help="examples shown side by side in report.md")
    a("--limit", type=int, default=0, help="evaluate only the first N test examples (0 = all)")
    a(
        "--out",
        default=None,
        help="folder for report.md and eval.json (default: the run directory; several adapters: "
        "compare-NAME1-NAME2... beside the first run)",
    )
    a(
        "--template",
        choices=["auto", "chat", "raw"],
        default=None,
        help="prompt rendering (default: the one the run trained with; auto: chat when the tokenizer has a template)",
    )
    a("--format", default=None, help="data format (default: the run's, else auto)")
    a("--quantize", choices=["nf4", "none"], default=None, help="base weights (default: as the run trained)")
    a(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default=None,
        help="compute dtype (default: the one the run trained in; auto = bf16 where the device has bf16 units)",
    )
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=0, help="seed for choosing the few-shot examples")
    a("--min-exact-match", type=float, default=None, help="gate: exit 1 if fine-tuned exact match is lower")
    a("--min-structured-match", type=float, default=None, help="gate: exit 1 if fine-tuned structured match is lower")
    a("--max-perplexity", type=float, default=None, help="gate: exit 1 if fine-tuned perplexity is higher")
    return p


def validate(args) -> None:
    checks = [
        (args.shots >= 0, "--shots cannot be negative"),
        (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.generations >= 0, "--generations cannot be negative"),
        (args.limit >= 0, "--limit cannot be negative"),
    ]
    for flag, value in (
        ("--min-exact-match", args.min_exact_match),
        ("--min-structured-match", args.min_structured_match),
    ):
        checks.append((value is None or 0.0 <= value <= 1.0, f"{flag} is a fraction; pass a value in [0, 1]"))
    checks.append((args.max_perplexity is None or args.max_perplexity > 0, "--max-perplexity must be positive"))
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"{msg}; fix the flag and run again.")


def run_eval(args) -> int:
    from minilora.data.encode import run_template
    from minilora.eval.evaluate import evaluate_variant, few_shot_example
    from minilora.eval.report import check_gates
    from minilora.lora.adapter import check_adapter_fits
    from minilora.lora.adapter_files import read_adapter_config
    from minilora.train.rundir import find_run

    validate(args)
    device = resolve_device(args.device)
    if args.adapter and len(args.adapter) > 1:
        return run_compare(args, device)
    args.adapter = args.adapter[0] if args.adapter else DEMO_RUN
    if args.adapter == DEMO_RUN and not os.path.isdir(DEMO_RUN):
        return fail(
            f"{DEMO_RUN} does not exist yet; run `python train.py` first (the offline demo), then `python eval.py`."
        )
    adapter_dir, run_dir, run_cfg = find_run(args.adapter)
    report_dir = args.out or run_dir
    check_report_folder(report_dir, None if args.out else run_cfg)  # a user's files: refused before any work
    report_lock(report_dir, check_only=True)  # a run train.py is writing: refused now, not after the evaluation
    trained_on = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    name = args.model or run_cfg.get("model") or trained_on
    if not name:
        return fail(f"{adapter_dir} does not say which base model it was trained on; pass --model.")
    template = args.template or run_template(run_cfg)  # what --template auto resolved to in training
    fmt = args.format or run_cfg.get("format", "auto")
    data = args.data or run_cfg.get("eval_data")
    if not data:
        return fail(f"the run in {run_dir} names no test data; pass --data test.jsonl.")
    if run_cfg.get("objective", "sft") != "sft":
        return run_pref_eval(args, adapter_dir, run_cfg, report_dir, name, template, data, device)
    examples, why = scored_examples(args, data, fmt)
    if why:
        return fail(why)

    shots, note, train = [], None, args.train_data or run_cfg.get("data")
    if args.shots == 0:
        note = "--shots 0"
    elif not train:
        note = "no training file to draw examples from; pass --train-data"
    elif not os.path.isfile(train):
        if args.train_data:
            return fail(f"--train-data {train} does not exist; pass the JSONL the adapter was trained on.")
        note = f"the run's training file {train} is not there; pass --train-data"
    else:
        shots, note = draw_shots(args, train, fmt, examples)

    quantize, dtype = base_settings(args, run_cfg, device)
    model, tok, template = load_for_eval(name, quantize, dtype, device, template)
    check_adapter_fits(model, adapter_dir, name)
    if trained_on and trained_on != name:
        print(f"note: the adapter was trained on {trained_on!r}; evaluating it on {name!r}.", file=sys.stderr)

    variants = [("base", examples)]
    if shots:
        variants.append(("few_shot", [few_shot_example(e, shots, template) for e in examples]))
    variants.append(("fine_tuned", examples))
    progress = Progress(2 * len(examples) * len(variants), unit="example")
    done = [0]
    kw = dict(
        template=template,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_seq_len=model.config.max_position_embeddings,
    )
    results = {}
    for variant, exs in variants:
        if variant == "fine_tuned":
            from minilora.lora.adapter import load_adapter

            load_adapter(model, adapter_dir)

        def tick(n, variant=variant):
            done[0] += n
            if progress.live:  # a bar redraws in place; a log gets one line per variant (below)
                progress.update(done[0], variant.replace("_", "-"))

        results[variant] = evaluate_variant(model, tok, exs, progress=tick, **kw)
        if not progress.live:
            progress.update(done[0], f"{variant.replace('_', '-')} scored")
    progress.close()

    thresholds = {
        "exact_match": args.min_exact_match,
        "structured_match": args.min_structured_match,
        "perplexity": args.max_perplexity,
    }
    gates = check_gates(results["fine_tuned"], thresholds)
    meta = {"adapter": adapter_dir, **run_meta(name, quantize, data, examples, template, args, train, shots, note)}
    return finish_report(report_dir, meta, results, examples, gates, args, len(shots))


def draw_shots(args, train: str, fmt: str, examples: list) -> tuple[list, str | None]:
    """(the few-shot examples, the report's note when there are fewer than --shots): drawn from the
    training file's prompted records that are not test prompts; a shortfall is said, not hidden."""
    from minilora.data.records import load_records
    from minilora.eval.evaluate import select_shots

    shots = select_shots(load_records(train, fmt)[0], args.shots, args.seed, exclude=examples)
    if not shots:
        return shots, f"{train} has no prompted records that are not test prompts"
    if len(shots) < args.shots:
        print(f"note: --shots {args.shots}, but {train} has {len(shots)} usable examples; using them.", file=sys.stderr)
    return shots, None


def scored_examples(args, data: str, fmt: str) -> tuple[list, str | None]:
    """The examples of `data` eval.py scores (--limit applied), or None and a one-sentence refusal."""
    from minilora.data.records import load_records
    from minilora.eval.evaluate import parse_json

    examples, rep = load_records(data, fmt)
    if rep.fmt == "text":
        return None, (
            f"{data} holds text records with no prompts; evaluation needs prompt/completion, alpaca or chat records."
        )
    examples = examples[: args.limit] if args.limit else examples
    if args.min_structured_match is not None and not any(parse_json(e.completion)[0] for e in examples):
        return None, (
            f"--min-structured-match was given but no reference completion in {data} is JSON, so "
            "structured match cannot be measured; drop the flag or use JSON completions."
        )
    return examples, None


def base_settings(args, run_cfg: dict, device) -> tuple:
    """(quantize, dtype) of the base one run's adapter is scored on: --quantize / --dtype where given,
    else as the run trained."""
    quantize = args.quantize or run_cfg.get("quantize", "nf4")
    return quantize, resolve_dtype(args.dtype, device.type) if args.dtype else run_dtype(run_cfg)


def load_for_eval(name, quantize, dtype, device, template, note=""):
    """(model, tokenizer, template resolved for it) of the base `name`; UsageError (one sentence, exit 2)
    when they cannot encode the data."""
    from minilora.cli import UsageError
    from minilora.data.encode import resolve_template
    from minilora.dtypes import dtype_name
    from minilora.models.loader import load_model

    print(f"loading {name} ({quantize}, {dtype_name(dtype)}, {device}){note}", file=sys.stderr)
    model, tok = load_model(name, quantize=None if quantize == "none" else "nf4", dtype=dtype, device=str(device))
    if tok is None:
        raise UsageError(f"{name} has no tokenizer.json; a tokenizer is needed to encode the test data.")
    template = resolve_template(template, tok)
    if template == "chat" and tok.chat_template is None:
        raise UsageError(
            f"{name}'s tokenizer has no chat template, so --template chat cannot render prompts; pass --template raw."
        )
    return model, tok, template


def run_meta(name, quantize, data, examples, template, args, train, shots, note) -> dict:
    """What eval.json records of the evaluation itself, beside the adapter(s)."""
    return {
        "model": name,
        "quantize": quantize,
        "data": data,
        "n": len(examples),
        "template": template,
        "max_new_tokens": args.max_new_tokens,
        "train_data": train if shots else None,
        "shots_used": len(shots),
        "few_shot_note": note,
        "shot_sources": [s.source for s in shots],
    }


def finish_report(report_dir, meta, results, examples, gates, args, n_shots: int, build=None) -> int:
    """report.md and eval.json under the folder's lock, the summary printed; exit 1 when a gate missed."""
    from minilora.eval.report import gate_failure_message, write_report

    extra = () if build is None else (build,)
    with report_lock(report_dir):  # train.py cannot start on the folder while report.md is written
        md, js = write_report(report_dir, meta, results, examples, gates, args.generations, *extra)
    print_summary(results, n_shots)
    print(f"report: {md}\nmetrics: {js}")
    msg = gate_failure_message(gates, md)
    return fail(msg, code=EXIT_FAILED) if msg else 0


def run_compare(args, device) -> int:
    """Several adapters of one base (module docstring): every check runs before the base is loaded,
    nothing is written before the scores exist."""
    from minilora.data.encode import run_template
    from minilora.eval.evaluate import few_shot_example
    from minilora.eval.mixed import Variant, common_setting, evaluate_mixed, run_names
    from minilora.eval.report import build_comparison_markdown, check_gates
    from minilora.lora.adapter import check_adapter_fits, load_adapter
    from minilora.lora.adapter_files import read_adapter_config
    from minilora.lora.named import adapter_names
    from minilora.train.rundir import find_run

    runs = [find_run(a) for a in args.adapter]  # (adapter folder, run directory, config)
    names = run_names([run_dir for _, run_dir, _ in runs], args.adapter)
    for (_, run_dir, cfg), given in zip(runs, args.adapter):
        if cfg.get("objective", "sft") != "sft":
            return fail(
                f"{given} is a {cfg['objective']} run, scored on preference pairs; several adapters are compared on "
                "completions, so evaluate it alone."
            )
    trained_on = [read_adapter_config(a).get("base_model_name_or_path") for a, _, _ in runs]

    def agreed(what, values, remedy):  # the one value the runs record, or one sentence naming two that differ
        return common_setting(what, list(zip(args.adapter, values)), remedy)

    other_base = (
        "that changes the base they were trained against; evaluate them separately, or pass {} to score every "
        "adapter on one base"
    )
    recorded = agreed("base model", [c.get("model") or t for (_, _, c), t in zip(runs, trained_on)], None)
    name = args.model or recorded
    if not name:
        return fail(f"none of {', '.join(args.adapter)} says which base model it was trained on; pass --model.")
    quantize = args.quantize or agreed(
        "--quantize", [c.get("quantize", "nf4") for _, _, c in runs], other_base.format("--quantize")
    )
    if args.dtype:
        dtype = resolve_dtype(args.dtype, device.type)
    else:  # the dtype the runs trained in
        agreed("dtype", [dtype_name(run_dtype(c)) for _, _, c in runs], other_base.format("--dtype"))
        dtype = run_dtype(runs[0][2])
    template = args.template or agreed(
        "--template", [run_template(c) for _, _, c in runs], "pass --template to render every prompt one way"
    )
    fmt = args.format or agreed(
        "--format", [c.get("format", "auto") for _, _, c in runs], "pass --format to read the test data one way"
    )
    data = args.data or agreed(
        "--eval-data", [c.get("eval_data") for _, _, c in runs], "pass --data to score every adapter on one file"
    )
    if not data:
        return fail(f"none of {', '.join(args.adapter)} names test data; pass --data test.jsonl.")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(runs[0][1])), "compare-" + "-".join(names))
    check_report_folder(out)  # a user's files: refused before any work
    report_lock(out, check_only=True)  # a folder train.py is writing: refused now, not after the evaluation
    examples, why = scored_examples(args, data, fmt)
    if why:
        return fail(why)
    shots, note, train = [], None, args.train_data
    if not train:  # the runs' training file, when they share one
        files = {c.get("data") for _, _, c in runs}
        train = files.pop() if len(files) == 1 else None
        note = None if train or args.shots == 0 else "the runs trained on different files; pass --train-data"
    if args.shots == 0:
        note = "--shots 0"
    elif not train:
        note = note or "no training file to draw examples from; pass --train-data"
    elif not os.path.isfile(train):
        if args.train_data:
            return fail(f"--train-data {train} does not exist; pass the JSONL the adapters were trained on.")
        note = f"the runs' training file {train} is not there; pass --train-data"
    else:
        shots, note = draw_shots(args, train, fmt, examples)

    model, tok, template = load_for_eval(name, quantize, dtype, device, template, f" once for {len(runs)} adapters")
    for (adapter_dir, _, _), t in zip(runs, trained_on):
        check_adapter_fits(model, adapter_dir, name)
        if t and t != name:
            print(f"note: {adapter_dir} was trained on {t!r}; evaluating it on {name!r}.", file=sys.stderr)
    for (adapter_dir, _, _), n in zip(runs, names):
        load_adapter(model, adapter_dir, name=n)
    variants = [Variant("base", examples, -1)]
    if shots:
        variants.append(Variant("few_shot", [few_shot_example(e, shots, template) for e in examples], -1))
    variants += [Variant(n, examples, adapter_names(model).index(n)) for n in names]

    progress = Progress(2 * len(examples) * len(variants), unit="example")
    done = [0]

    def tick(k):
        done[0] += k
        if progress.live:  # a log gets one line at the end (below)
            progress.update(done[0], "mixed batches")

    results = evaluate_mixed(
        model,
        tok,
        variants,
        template=template,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_seq_len=model.config.max_position_embeddings,
        progress=tick,
    )
    if not progress.live:
        progress.update(done[0], "all scored")
    progress.close()

    thresholds = {
        "exact_match": args.min_exact_match,
        "structured_match": args.min_structured_match,
        "perplexity": args.max_perplexity,
    }
    gates = [{"adapter": n, **g} for n in names for g in check_gates(results[n], thresholds)]
    adapters = [{"name": n, "adapter": a, "run": r} for n, (a, r, _) in zip(names, runs)]
    meta = {"adapters": adapters, **run_meta(name, quantize, data, examples, template, args, train, shots, note)}
    return finish_report(out, meta, results, examples, gates, args, len(shots), build_comparison_markdown)


def run_pref_eval(args, adapter_dir, run_cfg, report_dir, name, template, data, device) -> int:
    """A preference run: held-out pairs scored by the base, the initial adapter of a run started with
    --init-adapter (DPO's reference there), and the fine-tuned model (see the module docstring)."""
    from minilora.data.pairs import encode_pair, load_pairs
    from minilora.eval.evaluate import generate_completions
    from minilora.eval.pref_report import write_report
    from minilora.lora.adapter import check_adapter_fits, load_adapter
    from minilora.train import init_adapter
    from minilora.train.loss import default_chunk
    from minilora.train.objectives import make_objective
    from minilora.train.pair_objective import evaluate_pairs

    objective = run_cfg["objective"]
    for flag, value in (
        ("--min-exact-match", args.min_exact_match),
        ("--min-structured-match", args.min_structured_match),
    ):
        if value is not None:
            return fail(f"{flag} scores generations of an SFT run; a {objective} run reports preference accuracy.")
    pairs = load_pairs(data, objective)[0]
    pairs = pairs[: args.limit] if args.limit else pairs
    quantize, dtype = base_settings(args, run_cfg, device)
    model, tok, template = load_for_eval(name, quantize, dtype, device, template)
    check_adapter_fits(model, adapter_dir, name)
    encoded = [encode_pair(p, tok, template, False, model.config.max_position_embeddings) for p in pairs]
    kept = [(p, e) for p, e in zip(pairs, encoded) if e is not None]  # pairs longer than the context are left out
    if not kept:
        return fail(f"every pair in {data} is longer than {name}'s context; pass shorter pairs.")
    dropped = len(pairs) - len(kept)
    pairs, encoded = [p for p, _ in kept], [e for _, e in kept]
    hyper = {k: run_cfg[k] for k in ("beta", "label_smoothing", "dpo_loss", "orpo_lambda") if k in run_cfg}
    scorer = make_objective(objective, default_chunk(device), **hyper)  # the run's own loss and rewards
    shown = [p.example(p.chosen) for p in pairs[: args.generations]]  # each pair's prompt, to generate from
    initial = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), init_adapter.FOLDER)  # --init-adapter
    results = {}
    for variant in ("base", "initial", "fine_tuned") if os.path.isdir(initial) else ("base", "fine_tuned"):
        if variant == "initial":  # DPO's reference from here on: base + the initial adapter, frozen
            frozen = init_adapter.load(model, initial)
            scorer.frozen = frozen if objective == "dpo" else None
        if variant == "fine_tuned":
            load_adapter(model, adapter_dir)
        results[variant] = evaluate_pairs(model, scorer, encoded, args.batch_size, tok.pad_id)
        results[variant]["generations"] = generate_completions(
            model, tok, shown, template, args.max_new_tokens, args.batch_size
        )
        print(f"{variant.replace('_', '-')} scored", file=sys.stderr)
    dpo = objective == "dpo"
    meta = {
        "adapter": adapter_dir,
        "model": name,
        "quantize": quantize,
        "data": data,
        "n": len(pairs),
        "dropped": dropped,
        "template": template,
        "objective": objective,
        "score": "the summed log-probability of the answer" if dpo else "the mean log-probability per answer token",
        "reward": "beta (log pi - log pi_ref)" if dpo else "lambda x the mean log-probability per token",
    }
    with report_lock(report_dir):  # train.py cannot start on the folder while report.md is written
        md, js = write_report(report_dir, meta, results, pairs)
    print(f"\n{'':12}{'pref. accuracy':>16}{'mean margin':>13}")
    for v, r in results.items():
        print(f"{v.replace('_', '-'):12}{r['pref_accuracy']:>16.1%}{r['margin']:>13.4f}")
    print(f"report: {md}\nmetrics: {js}")
    return 0


REPORT_FILES = ("report.md", "eval.json")


def check_report_folder(folder: str, run_cfg: dict | None = None) -> None:
    """Refuse (ValueError, one sentence) a report folder eval.py may not write report.md and eval.json
    into: a file, or a folder holding anything but a train.py run (`run_cfg`: its config.json) or an
    earlier report of eval.py's (an eval.json of its keys beside report.md and the lock), so that no
    file of the user's is ever replaced. A new folder is created when the report is written."""
    from minilora.fileio import LOCK_NAME

    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise ValueError(f"--out {folder} is a file; pass a folder for report.md and eval.json.")
    if run_cfg:
        return
    names = set(os.listdir(folder)) - {LOCK_NAME}
    if names and not (names <= set(REPORT_FILES) and _is_our_report(os.path.join(folder, "eval.json"))):
        shown = ", ".join(sorted(names - set(REPORT_FILES)) or sorted(names)[:3])
        raise ValueError(
            f"{folder} already holds files eval.py did not write ({shown}), so the report is not written "
            "there; pass --out with a new or empty folder."
        )


def _is_our_report(path: str) -> bool:
    """Whether `path` is an eval.json eval.py wrote (minilora/eval/report.py build_json's keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"metrics", "gates", "examples"} <= report.keys()


def report_lock(folder: str, check_only: bool = False):
    """The run folder's lock (minilora.fileio.lock_folder) for writing report.md there, or a null
    context for a folder no train.py ran in; ValueError naming the holder when a train.py holds it."""
    import contextlib

    from minilora.fileio import FolderBusy, check_unlocked, lock_folder

    try:
        if check_only:
            check_unlocked(folder)
            return None
        return lock_folder(folder, create=False) or contextlib.nullcontext()
    except FolderBusy as e:
        who = f"pid {e.pid}" if e.pid is not None else "a process whose pid could not be read"
        raise ValueError(
            f"{folder} is being written by train.py ({who}), so report.md cannot be written there; wait for the "
            "run to end, or pass --out to write the report elsewhere."
        ) from None


def print_summary(results: dict, shots: int) -> None:
    from minilora.eval.report import format_metric

    names = {v: {"few_shot": f"{shots}-shot", "fine_tuned": "fine-tuned"}.get(v, v) for v in results}
    w = max(12, *(len(n) + 1 for n in names.values()))  # adapter names may be longer than the variants'
    print(f"\n{'':{w}}{'perplexity':>12}{'exact':>9}{'struct':>9}{'bad JSON':>10}")
    for v, r in results.items():
        ppl = format_metric("perplexity", r["perplexity"])
        sm = f"{r['structured_match']:.1%}" if r["json_references"] else "n/a"
        print(f"{names[v]:{w}}{ppl:>12}{r['exact_match']:>9.1%}{sm:>9}{r['json_parse_failures']:>10}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        if argv[:1] == ["export"]:
            from minilora.export.command import export_parser, run_export

            args = export_parser().parse_args(argv[1:])
            if args.adapter == DEMO_RUN and not os.path.isdir(DEMO_RUN):
                return fail(f"{DEMO_RUN} does not exist yet; run `python train.py` first, or pass --adapter.")
            return run_export(args)
        try:
            return run_eval(eval_parser().parse_args(argv))
        except DataError as e:  # its sentence may suggest train.py's --skip-bad-lines
            raise DataError(without_skip_hint(str(e))) from None

    return run_main(body)  # a user error: one sentence, exit 2 (MINILORA_DEBUG=1: the traceback)


if __name__ == "__main__":
    sys.exit(main())
