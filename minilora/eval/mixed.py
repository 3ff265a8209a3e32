"""Several adapters of one base scored in one pass: every batch mixes rows of different adapters
(adapter_ids, minilora/lora/multi.py), so the base is loaded once and every forward serves them all.

Shape letters: R rows in a batch, T time.

A "variant" is one row of the report: a name, its examples (the few-shot baseline has its own prompts)
and the adapter index its rows use (-1: the base alone). Rows are (variant, example) pairs laid out
example-major, so a batch holds the same examples under every variant:

    rows = [(v, i) for i in examples for v in variants]      batches of --batch-size rows

and each variant's numbers are its own rows' sums, the same metrics evaluate_variant computes alone:

    loss_v       = sum_{rows of v} sum_t CE_t / sum_{rows of v} #labelled tokens     (perplexity = exp)
    predictions  = greedy generations of v's rows, scored by evaluate.score

A row computes what it would in a batch of its own variant (left padding and the padding mask make a
padded row equal to the row alone; the per-row LoRA term equals the single adapter's up to the order
of float additions), so the numbers equal a one-adapter eval.py run up to rounding.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from minilora.data.encode import prompt_ids
from minilora.data.packing import collate
from minilora.eval.evaluate import encode_for_eval, score
from minilora.models.generate import generate
from minilora.models.transformer import adapters_per_row
from minilora.train.loss import sequence_logprobs

RESERVED = ("base", "few_shot", "default")  # report rows and named.py's default adapter


@dataclass
class Variant:
    name: str  # the report's row: "base", "few_shot" or an adapter's name
    examples: list  # Examples (the few-shot baseline's carry the shots in their prompts)
    adapter: int  # index into adapter_names(model); -1 the base alone


# ------------------------------------------------------------------------------- the runs
def run_names(run_dirs: list[str], given: list[str] | None = None) -> list[str]:
    """An adapter name per run: its folder's name (characters outside [A-Za-z0-9_-] become '-'); runs
    whose names collide, or use a reserved one, are named with their parent folder too ("x-demo",
    "y-demo"). Raises one sentence for a run given twice, or two runs that still get one name.
    given: the runs as the user wrote them, for the sentence (default: run_dirs)."""
    given = given or run_dirs

    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-") or "run"

    paths = [os.path.realpath(d) for d in run_dirs]
    for i, p in enumerate(paths):
        if paths.index(p) != i:
            raise ValueError(
                f"--adapter {given[paths.index(p)]} and --adapter {given[i]} are the same run; pass it once."
            )
    names = [clean(os.path.basename(p)) for p in paths]
    clash = [names.count(n) > 1 or n in RESERVED for n in names]
    names = [clean(f"{os.path.basename(os.path.dirname(p))}-{n}") if c else n for p, n, c in zip(paths, names, clash)]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ValueError(
                f"--adapter {given[names.index(n)]} and --adapter {given[i]} both get the adapter name {n!r}; "
                "copy one of them under another folder name."
            )
    return names


def common_setting(what: str, recorded: list[tuple[str, object]], remedy: str | None):
    """The one value the runs record for `what` ([(run as given, value or None)]), or None when none does;
    raises one sentence naming two runs that differ, ending in `remedy` (None: the base differs)."""
    seen = [(run, v) for run, v in recorded if v is not None]
    for run, v in seen[1:]:
        if v != seen[0][1]:
            raise ValueError(
                f"{seen[0][0]} was trained with {what} {seen[0][1]!r} but {run} with {v!r}; "
                + (remedy or "their adapters belong to different bases, so evaluate each base's adapters separately")
                + "."
            )
    return seen[0][1] if seen else None


# ------------------------------------------------------------------------------- scoring
@torch.no_grad()
def completion_losses(model, encoded: list, rows: list[int], batch_size: int, pad_id: int, progress=None, chunk=256):
    """(summed CE (n,), labelled tokens (n,)) of each encoded example, example k through adapter rows[k]
    (-1 the base), in mixed batches of batch_size rows (float64 sums of the float32 per-row CE)."""
    dev = next(model.parameters()).device
    total, count = torch.zeros(len(encoded), dtype=torch.float64), torch.zeros(len(encoded), dtype=torch.long)
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        batch = collate([[k] for k in idx], encoded, pad_id).to(dev)  # (R, T), one example per row
        with adapters_per_row([rows[k] for k in idx], len(idx), dev):  # the lm_head may carry adapters too
            logp, n = sequence_logprobs(model, batch, chunk)  # (R,), (R,)
        total[idx], count[idx] = -logp.double().cpu(), n.cpu()
        if progress is not None:
            progress(len(idx))
    return total, count


@torch.no_grad()
def mixed_generations(model, tokenizer, prompts, rows, template, max_new_tokens, batch_size, progress=None):
    """Greedy completions (decoded) of (example, adapter index) pairs, in mixed batches of batch_size rows."""
    out = []
    for s in range(0, len(prompts), batch_size):
        ids = [prompt_ids(ex, tokenizer, template) for ex in prompts[s : s + batch_size]]
        new = generate(
            model,
            ids,
            max_new_tokens,
            eos_ids=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id,
            adapter_ids=rows[s : s + batch_size],
        )
        out += [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        if progress is not None:
            progress(len(ids))
    return out


def evaluate_mixed(
    model,
    tokenizer,
    variants: list[Variant],
    template: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_seq_len: int = 2048,
    progress=None,
) -> dict[str, dict]:
    """{variant name: evaluate_variant's dict} for every variant, every batch mixing variants (module docstring).

    progress: optional callable, called with the number of rows finished after each batch (2 per
    (variant, example): one for the loss, one for the generation)."""
    n = len(variants[0].examples)
    order = [(v, i) for i in range(n) for v in range(len(variants))]  # example-major: batches mix the variants
    fits = {}  # (variant, example) -> its EncodedExample; a completion too long for the context has none
    for v, i in order:
        enc, _ = encode_for_eval([variants[v].examples[i]], tokenizer, template, max_seq_len)
        if enc:
            fits[v, i] = enc[0]
    scored = [vi for vi in order if vi in fits]  # a too-long example is generated for, not scored
    dropped = [sum((v, i) not in fits for i in range(n)) for v in range(len(variants))]
    encoded = [fits[vi] for vi in scored]
    was_training = model.training
    model.eval()
    try:
        total = count = None
        if encoded:
            total, count = completion_losses(
                model, encoded, [variants[v].adapter for v, _ in scored], batch_size, tokenizer.pad_id, progress
            )
        if progress is not None and sum(dropped):
            progress(sum(dropped))
        preds = mixed_generations(
            model,
            tokenizer,
            [variants[v].examples[i] for v, i in order],
            [variants[v].adapter for v, _ in order],
            template,
            max_new_tokens,
            batch_size,
            progress,
        )
    finally:
        model.train(was_training)
    results = {}
    for k, var in enumerate(variants):
        mine = [j for j, (v, _) in enumerate(scored) if v == k]
        r: dict = {"perplexity": None, "loss": None, "label_tokens": 0, "too_long_for_perplexity": dropped[k]}
        if mine:
            loss = float(total[mine].sum()) / int(count[mine].sum())
            r.update(
                loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, label_tokens=int(count[mine].sum())
            )
        predictions = [p for (v, _), p in zip(order, preds) if v == k]
        r.update(score(predictions, [e.completion for e in var.examples]))
        r["predictions"] = predictions
        results[var.name] = r
    return results
