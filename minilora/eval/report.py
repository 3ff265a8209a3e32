"""The evaluation report: eval.json (everything, per example) and report.md (for people), plus gates.

`results` maps a variant name ("base", "few_shot", "fine_tuned") to evaluate_variant's dict
(perplexity, exact_match, structured_match, json_parse_failures, json_references, n, predictions).
Several adapters scored together (eval.py --adapter a --adapter b) have one variant per adapter
instead of "fine_tuned", and their report.md has a table per metric (build_comparison_markdown).
"""

from __future__ import annotations

import json
import math
import os

from minilora.fileio import write_text_atomic

VARIANTS = ("base", "few_shot", "fine_tuned")
GATES = (  # (flag, metric, direction): the fine-tuned model must be >= (min) or <= (max) the value
    ("--min-exact-match", "exact_match", "min"),
    ("--min-structured-match", "structured_match", "min"),
    ("--max-perplexity", "perplexity", "max"),
)


def check_gates(fine_tuned: dict, thresholds: dict) -> list[dict]:
    """[{flag, metric, threshold, value, passed}] for every gate given (thresholds: metric -> value or None)."""
    out = []
    for flag, metric, direction in GATES:
        limit = thresholds.get(metric)
        if limit is None:
            continue
        value = fine_tuned.get(metric)
        if metric == "structured_match" and not fine_tuned.get("json_references"):
            raise ValueError(
                f"{flag} was given but no reference completion in the test file is JSON, so "
                "structured match cannot be measured; drop the flag or use JSON completions."
            )
        if value is None:
            passed = False  # no perplexity (every example too long): a gate cannot pass on nothing
        else:
            passed = value >= limit if direction == "min" else value <= limit
        out.append({"flag": flag, "metric": metric, "threshold": limit, "value": value, "passed": passed})
    return out


def gate_failure_message(gates: list[dict], report_path: str) -> str | None:
    """One sentence naming every failed gate, or None when all passed."""
    failed = [g for g in gates if not g["passed"]]
    if not failed:
        return None
    parts = [
        f"{g.get('adapter', 'fine-tuned')} {g['metric'].replace('_', ' ')} {format_metric(g['metric'], g['value'])} is "
        f"{'below' if g['flag'].startswith('--min') else 'above'} {g['flag']} {g['threshold']:g}"
        for g in failed
    ]
    return "; ".join(parts) + f" (report: {report_path})."


def format_metric(metric: str, value) -> str:
    """A metric as the tables print it: a rate in percent, a perplexity to three decimals, or in
    scientific notation from 10^5 up (an untrained base's perplexity can pass 10^10)."""
    if value is None:
        return "n/a"
    if metric == "perplexity":
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3f}" if value < 1e5 else f"{value:.3e}"
    return f"{value:.1%}"


def _fence(text: str) -> str:
    """A fenced code block that survives backticks inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text}\n{f}"


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def _short(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def build_json(meta: dict, results: dict, examples: list, gates: list[dict]) -> dict:
    """eval.json: run metadata, metrics per variant (predictions moved into per-example records), gates."""
    metrics = {v: {k: x for k, x in r.items() if k != "predictions"} for v, r in results.items()}
    per_example = []
    for i, ex in enumerate(examples):
        rec = {"source": ex.source, "prompt": ex.prompt, "reference": ex.completion}
        rec.update({v: r["predictions"][i] for v, r in results.items()})
        per_example.append(rec)
    return {**meta, "metrics": metrics, "gates": gates, "examples": per_example}


def build_markdown(meta: dict, results: dict, examples: list, gates: list[dict], generations: int = 5) -> str:
    """report.md: the metrics side by side, the gates, and a few generations side by side."""
    shots = meta.get("shots_used", 0)
    cols = [v for v in VARIANTS if v in results]
    lines = [f"# Evaluation of {meta['adapter']}", ""]
    lines.append(
        f"Base model `{meta['model']}` ({meta['quantize']}), test data `{meta['data']}` "
        f"(n = {meta['n']}), template {meta['template']}, greedy decoding, at most "
        f"{meta['max_new_tokens']} new tokens."
    )
    if "few_shot" in results:
        lines.append(f"Few-shot baseline: {shots} examples from `{meta['train_data']}` in the prompt.")
    elif meta.get("few_shot_note"):
        lines.append(f"Few-shot baseline: skipped ({meta['few_shot_note']}).")
    header = "| metric | " + " | ".join(variant_label(c, shots) for c in cols) + " |"
    lines += ["", header, "|---" * (len(cols) + 1) + "|"]
    rows = [
        ("perplexity (completion tokens)", "perplexity"),
        ("exact match", "exact_match"),
        ("structured match (JSON)", "structured_match"),
    ]
    for label, key in rows:
        if key == "structured_match" and not results[cols[0]].get("json_references"):
            lines.append(f"| {label} | " + " | ".join("n/a (references are not JSON)" for _ in cols) + " |")
            continue
        lines.append(f"| {label} | " + " | ".join(format_metric(key, results[c].get(key)) for c in cols) + " |")
    bad = [f"{results[c]['json_parse_failures']} / {results[c]['n']}" for c in cols]
    lines.append("| outputs that are not valid JSON | " + " | ".join(bad) + " |")
    skipped = results[cols[0]].get("too_long_for_perplexity", 0)
    if skipped:
        lines += ["", f"{skipped} example(s) were too long for the model's context and are left out of perplexity."]
    if gates:
        lines += ["", "## Gates (fine-tuned model)", ""]
        for g in gates:
            mark = "pass" if g["passed"] else "FAIL"
            lines.append(f"- **{mark}** {g['flag']} {g['threshold']:g}: {format_metric(g['metric'], g['value'])}")
    lines += ["", f"## Generations (first {min(generations, len(examples))})", ""]
    for i, ex in enumerate(examples[:generations]):
        lines += [
            f"### {i + 1}. {ex.source}",
            "",
            "Prompt:",
            "",
            _fence(_short(_prompt_text(ex.prompt))),
            "",
            "Reference:",
            "",
            _fence(ex.completion),
            "",
        ]
        for c in cols:
            lines += [f"{variant_label(c, shots)}:", "", _fence(results[c]["predictions"][i]), ""]
    return "\n".join(lines).rstrip() + "\n"


def variant_label(variant: str, shots: int) -> str:
    """A variant's name in tables: the base, the few-shot base, the fine-tuned model, or an adapter's own name."""
    return {"base": "base", "few_shot": f"base, {shots}-shot", "fine_tuned": "fine-tuned"}.get(variant, variant)


def build_comparison_markdown(
    meta: dict, results: dict, examples: list, gates: list[dict], generations: int = 5
) -> str:
    """report.md for several adapters on one base: a table per metric (rows: the base, the few-shot base,
    each adapter), the gates, and a few generations side by side."""
    shots = meta.get("shots_used", 0)
    rows = list(results)
    lines = [f"# Evaluation of {len(meta['adapters'])} adapters on `{meta['model']}`", ""]
    lines.append(
        f"Base model `{meta['model']}` ({meta['quantize']}), test data `{meta['data']}` (n = {meta['n']}), "
        f"template {meta['template']}, greedy decoding, at most {meta['max_new_tokens']} new tokens. Every batch "
        "mixed the adapters' rows (one adapter per row) over one copy of the base."
    )
    if "few_shot" in results:
        lines.append(f"Few-shot baseline: {shots} examples from `{meta['train_data']}` in the prompt.")
    elif meta.get("few_shot_note"):
        lines.append(f"Few-shot baseline: skipped ({meta['few_shot_note']}).")
    lines += ["", "Adapters:", ""] + [f"- `{a['name']}`: {a['adapter']}" for a in meta["adapters"]]
    metrics = [("Perplexity (completion tokens)", "perplexity"), ("Exact match", "exact_match")]
    if results[rows[0]].get("json_references"):
        metrics.append(("Structured match (JSON)", "structured_match"))
    else:
        lines += ["", "Structured match: n/a (the references are not JSON)."]
    base = results["base"]
    for title, key in metrics:
        extra = " | not valid JSON" if key == "structured_match" else ""
        lines += ["", f"## {title}", "", f"| model | {key.replace('_', ' ')} | vs base{extra} |", "|---|---|---|"]
        lines[-1] += "---|" if extra else ""
        for v in rows:
            value, ref = results[v].get(key), base.get(key)
            delta = "" if v == "base" or value is None or ref is None else _delta(key, value, ref)
            bad = f" | {results[v]['json_parse_failures']} / {results[v]['n']}" if extra else ""
            lines.append(f"| {variant_label(v, shots)} | {format_metric(key, value)} | {delta}{bad} |")
    skipped = results[rows[0]].get("too_long_for_perplexity", 0)
    if skipped:
        lines += ["", f"{skipped} example(s) were too long for the model's context and are left out of perplexity."]
    if gates:
        lines += ["", "## Gates (every adapter)", ""]
        for g in gates:
            mark = "pass" if g["passed"] else "FAIL"
            value = format_metric(g["metric"], g["value"])
            lines.append(f"- **{mark}** `{g['adapter']}` {g['flag']} {g['threshold']:g}: {value}")
    lines += ["", f"## Generations (first {min(generations, len(examples))})", ""]
    for i, ex in enumerate(examples[:generations]):
        lines += [f"### {i + 1}. {ex.source}", "", "Prompt:", "", _fence(_short(_prompt_text(ex.prompt))), ""]
        lines += ["Reference:", "", _fence(ex.completion), ""]
        for v in rows:
            lines += [f"{variant_label(v, shots)}:", "", _fence(results[v]["predictions"][i]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _delta(metric: str, value: float, ref: float) -> str:
    """value - ref: points for a rate, a ratio for perplexity (lower is better there)."""
    if metric == "perplexity":
        return f"x{value / ref:.3g}" if math.isfinite(value) and math.isfinite(ref) and ref > 0 else "n/a"
    return f"{100 * (value - ref):+.1f} points"


def write_report(
    out_dir: str,
    meta: dict,
    results: dict,
    examples: list,
    gates: list[dict],
    generations: int = 5,
    markdown=build_markdown,
) -> tuple[str, str]:
    """Write report.md (`markdown`'s text) and eval.json into out_dir atomically; return their paths."""
    md = os.path.join(out_dir, "report.md")
    js = os.path.join(out_dir, "eval.json")
    write_text_atomic(js, json.dumps(build_json(meta, results, examples, gates), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md, markdown(meta, results, examples, gates, generations))
    return md, js
