"""The task gate after an export: does the exported model still do the task?

readback.py checks that a file holds what was written (logits against the merged model with each
weight rounded as the format rounds it), which a q4_0 file passes even when the rounding has erased
the fine-tune. The gate asks the user's question instead. On the first N held-out examples of the
run's eval data (config.json's eval_data), it scores, with the metrics eval.py reports
(minilora.eval.evaluate: exact match; structured match when the references are JSON):

    merged   the merged model in memory, float32, generating with minilora's generate (the model
             eval.py scored)
    export   the export as the independent reader loads it (readback.reload: transformers, its GGUF
             loader dequantizing with gguf's code), generating with transformers' generate

both greedy from the same prompt token ids, and fails when

    drop = 100 (merged - export)  >  max_drop        (percentage points, the larger of the two metrics)

Greedy decoding ties can break differently between two implementations, so the default max_drop
(5 points) leaves room for a stray example (2.5 points each at N = 40) while a quantization that
erased the fine-tune drops tens of points. The failure names the drop and the next type up
(q4_0 -> q4_k_m -> q5_k_m -> q8_0 -> f16, NF4 -> bf16, bf16 -> float32).

Generation length: twice the longest reference completion in tokens, plus 8 (a correct completion
fits with room for a differently formatted JSON answer; a derailed one is cut early).
"""

from __future__ import annotations

import os

import torch

from minilora.export.readback import ValidationError

GATE_EXAMPLES, MAX_QUALITY_DROP = 40, 5.0
NEXT_UP = {"q4_0": "q4_k_m", "q4_k_m": "q5_k_m", "q5_k_m": "q8_0", "q6_k": "q8_0", "q8_0": "f16", "bf16": "f16"}


class QualityGateError(ValidationError):
    """The export does the task measurably worse than the merged model."""


def gate_examples(run_config: dict, tokenizer, n: int):
    """(examples, template, source) for the gate, or (None, None, why not) when it cannot run."""
    from minilora.data.encode import resolve_template, run_template
    from minilora.data.records import DataError, load_records

    path = run_config.get("eval_data")
    if n <= 0:
        return None, None, "--gate-examples 0"
    if not path:
        return None, None, "the run's config.json names no eval_data (train.py --eval-data)"
    if not os.path.isfile(path) or tokenizer is None:
        return None, None, f"its eval data {path} is not there"
    try:
        examples = [e for e in load_records(path, run_config.get("format", "auto"))[0] if e.fmt != "text"][:n]
    except (DataError, ValueError, OSError) as e:
        return None, None, f"its eval data {path} could not be read ({str(e).splitlines()[0]})"
    if not examples:
        return None, None, f"{path} holds no prompt/completion examples"
    return examples, resolve_template(run_template(run_config), tokenizer), f"{len(examples)} examples of {path}"


def new_token_budget(examples, tokenizer) -> int:
    return 2 * max(len(tokenizer.encode(e.completion)) for e in examples) + 8


@torch.no_grad()
def hf_completions(model, tokenizer, examples, template: str, max_new_tokens: int, batch_size: int = 16):
    """Greedy completions of a transformers model (left-padded batches), cut after the first EOS and
    decoded as minilora.eval.evaluate.generate_completions decodes."""
    from minilora.data.encode import prompt_ids

    eos, out = set(tokenizer.eos_ids), []
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_ids(e, tokenizer, template) for e in examples[i : i + batch_size]]
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), tokenizer.pad_id, dtype=torch.long)  # (B, P), left padded
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(eos),
            pad_token_id=tokenizer.pad_id,
        )[:, P:]  # (B, n)
        for row in new.tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def score_merged(model, tokenizer, examples, template: str) -> dict:
    from minilora.eval.evaluate import generate_completions, score

    predictions = generate_completions(model, tokenizer, examples, template, new_token_budget(examples, tokenizer))
    return score(predictions, [e.completion for e in examples])


def score_export(model, tokenizer, examples, template: str) -> dict:
    from minilora.eval.evaluate import score

    predictions = hf_completions(model, tokenizer, examples, template, new_token_budget(examples, tokenizer))
    return score(predictions, [e.completion for e in examples])


def drops(merged: dict, export: dict) -> dict:
    """{metric: points lost} for exact match, and structured match when the references are JSON."""
    metrics = ["exact_match"] + (["structured_match"] if merged["json_references"] else [])
    return {m: 100.0 * (merged[m] - export[m]) for m in metrics}


def advice(kind: str, gguf_type: str, dtype: str | None) -> str:
    """The next export up, in a few words."""
    if kind == "gguf":
        up = NEXT_UP.get(gguf_type)
        return f"export --gguf-type {up} instead" if up else "export --format hf --dtype float32 instead"
    if kind == "nf4":
        return "export without --quantize-4bit instead"
    return "export --dtype float32 instead" if dtype != "float32" else "check the base model and adapter"


def check(path: str, label: str, merged: dict, export: dict, source: str, max_drop: float, hint: str, log=print):
    """Log both scores; raise QualityGateError (one sentence) when the drop exceeds max_drop points."""
    lost = drops(merged, export)
    shown = ", ".join(f"{m.replace('_', ' ')} {merged[m]:.1%} -> {export[m]:.1%}" for m in lost)
    log(f"task gate ({label}) on {source}: merged -> export {shown}")
    metric, worst = max(lost.items(), key=lambda kv: kv[1])
    if worst > max_drop:
        raise QualityGateError(
            path,
            f"does the task {worst:.1f} points worse than the merged model ({metric.replace('_', ' ')} "
            f"{merged[metric]:.1%} -> {export[metric]:.1%} on {source}; --max-quality-drop {max_drop:g})",
            f"{hint}, or pass --no-validate to keep this file",
            f"{hint}, or pass --no-validate to write it anyway",
        )
