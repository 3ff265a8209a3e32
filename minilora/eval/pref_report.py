"""The evaluation report of a preference run (--objective dpo or orpo): eval.json and report.md.

`results` maps a variant ("base": the frozen base, DPO's reference; "initial": base + the adapter a run
started from with --init-adapter, the reference then; "fine_tuned": base + the trained adapter) to
evaluate_pairs' dict (pref_accuracy: the share of pairs whose chosen answer
the model scores higher; margin: the mean reward margin; loss: the objective's mean loss; n) plus
"generations": greedy completions of the first pairs' prompts, shown beside chosen and rejected.
"""

from __future__ import annotations

import json
import os

from minilora.eval.report import _fence, _prompt_text, _short
from minilora.fileio import write_text_atomic

NAMES = {"base": "base", "initial": "initial adapter", "fine_tuned": "fine-tuned"}


def build_json(meta: dict, results: dict, pairs: list) -> dict:
    metrics = {v: {k: x for k, x in r.items() if k != "generations"} for v, r in results.items()}
    shown = []
    for i, p in enumerate(pairs[: len(next(iter(results.values()))["generations"])]):
        rec = {"source": p.source, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        rec.update({v: r["generations"][i] for v, r in results.items()})
        shown.append(rec)
    return {**meta, "metrics": metrics, "generations": shown}


def build_markdown(meta: dict, results: dict, pairs: list) -> str:
    cols = [v for v in NAMES if v in results]
    lines = [f"# Preference evaluation of {meta['adapter']} ({meta['objective']})", ""]
    lines.append(
        f"Base model `{meta['model']}` ({meta['quantize']}), held-out pairs `{meta['data']}` (n = {meta['n']}), "
        f"template {meta['template']}. Preference accuracy: the share of pairs whose chosen answer the model "
        f"scores higher than the rejected one ({meta['score']}); margin: the mean reward margin "
        f"({meta['reward']}), 0 for DPO's reference itself (the base, or the initial adapter)."
    )
    lines += ["", "| metric | " + " | ".join(NAMES[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| preference accuracy | " + " | ".join(f"{results[c]['pref_accuracy']:.1%}" for c in cols) + " |")
    lines.append("| mean margin | " + " | ".join(f"{results[c]['margin']:.4f}" for c in cols) + " |")
    lines.append(f"| {meta['objective']} loss | " + " | ".join(f"{results[c]['loss']:.4f}" for c in cols) + " |")
    if meta.get("dropped"):
        lines += ["", f"{meta['dropped']} pair(s) longer than the model's context were left out."]
    shown = len(results[cols[0]]["generations"])
    lines += ["", f"## Greedy generations beside chosen and rejected (first {shown})", ""]
    for i, p in enumerate(pairs[:shown]):
        lines += [f"### {i + 1}. {p.source}", "", "Prompt:", "", _fence(_short(_prompt_text(p.prompt))), ""]
        lines += ["Chosen:", "", _fence(p.chosen), "", "Rejected:", "", _fence(p.rejected), ""]
        for c in cols:
            lines += [f"{NAMES[c]}:", "", _fence(results[c]["generations"][i]), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: str, meta: dict, results: dict, pairs: list) -> tuple[str, str]:
    """Write report.md and eval.json into out_dir atomically; return their paths."""
    md, js = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "eval.json")
    write_text_atomic(js, json.dumps(build_json(meta, results, pairs), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md, build_markdown(meta, results, pairs))
    return md, js
