"""Evaluation metrics: completion perplexity, exact match, structured (JSON) match, few-shot prompts.

Shape letters: B batch, T time, V vocabulary.

    perplexity        = exp( sum_t CE(logits_t, label_{t+1}) / #labelled tokens )   over completion tokens
                        (the chunked training loss, minilora/train/loss.py: no (B, T, V) logits)
    exact match       = strip(prediction) == strip(reference)
    structured match  = json.loads(prediction) == json.loads(reference)   (parse failures counted)

Only the final completion of each example is scored: in a multi-turn conversation (or a few-shot
prompt) earlier assistant turns are context, not targets. Structured match compares parsed values,
so key order and whitespace do not matter; a prediction wrapped in one Markdown code fence
(```json ... ```) is unwrapped first, as chat models often write one.

Few-shot baseline: k training examples rendered before the prompt, as earlier user/assistant turns
(chat template; the test example's own system message stays first) or concatenated (raw template).
A fine-tune is worth its cost only if it beats this.

Generation is greedy with the KV cache, batched (minilora.models.generate).
"""

from __future__ import annotations

import json
import math
import random
import re

import torch

from minilora.data.encode import encode_example, prompt_ids, prompt_messages, render_raw
from minilora.data.packing import IGNORE, batches
from minilora.data.records import Example
from minilora.train.loss import loss_over


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    examples: list[Example],
    template: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress=None,
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) for each example's prompt.

    progress: optional callable, called with the number of examples finished after each batch.
    """
    from minilora.models.generate import generate

    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            prompts = [prompt_ids(ex, tokenizer, template) for ex in chunk]
            new = generate(model, prompts, max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
            out += [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------- matching
def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)


def parse_json(text: str):
    """(ok, value): the text parsed as JSON after stripping whitespace and one Markdown code fence."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return False, None


def structured_match(prediction: str, reference: str) -> tuple[bool, bool]:
    """(match, prediction_parsed): both sides parsed as JSON and compared as values."""
    ok_p, p = parse_json(prediction)
    ok_r, r = parse_json(reference)
    return (ok_p and ok_r and _same(p, r)), ok_p


def _same(a, b) -> bool:
    """JSON value equality: Python's == says True == 1; in JSON a boolean is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b  # 1 and 1.0 are the same JSON number
    return type(a) is type(b) and a == b


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact and structured match rates, the number of predictions that are not JSON, and the
    number of references that are JSON (structured match means nothing when that is 0)."""
    n = len(references)
    if n == 0:
        raise ValueError("Nothing to score: the evaluation set is empty.")
    if len(predictions) != n:
        raise ValueError(f"{len(predictions)} predictions for {n} references; they must pair up.")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    sm = [structured_match(p, r) for p, r in zip(predictions, references)]
    return {
        "n": n,
        "exact_match": em / n,
        "structured_match": sum(m for m, _ in sm) / n,
        "json_parse_failures": sum(not ok for _, ok in sm),
        "json_references": sum(parse_json(r)[0] for r in references),
    }


# ------------------------------------------------------------------------------- perplexity
def completion_loss(
    model, encoded, batch_size: int = 16, pad_id: int = 0, progress=None, chunk: int = 256
) -> tuple[float, int]:
    """(sum of CE over labelled tokens, number of labelled tokens) of encoded examples, through the
    training loss (minilora.train.loss.chunked_lm_loss): at most chunk x V logits at a time."""
    return loss_over(model, batches(encoded, batch_size, shuffle=False, pad_id=pad_id), chunk, progress)


def perplexity(model, encoded, batch_size: int = 16, pad_id: int = 0, progress=None) -> float:
    total, count = completion_loss(model, encoded, batch_size, pad_id, progress)
    if count == 0:
        raise ValueError("No completion tokens to score: every label is masked.")
    return math.exp(total / count)


def final_completion_only(labels: list[int]) -> list[int]:
    """Keep the labels of the last contiguous labelled run (the final completion + EOS); mask the rest."""
    end = max((i + 1 for i, t in enumerate(labels) if t != IGNORE), default=0)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [t if start <= i < end else IGNORE for i, t in enumerate(labels)]


def encode_for_eval(examples: list[Example], tokenizer, template: str, max_seq_len: int):
    """(encoded examples with only the final completion labelled, number too long to score).

    Prompts longer than max_seq_len lose tokens from the left (BOS kept); an example whose
    completion alone does not fit is left out of perplexity (it is still generated for).
    """
    encoded, dropped = [], 0
    for ex in examples:
        enc = encode_example(ex, tokenizer, template, max_seq_len=max_seq_len, truncation="left")
        if enc is None:
            dropped += 1
            continue
        enc.labels = final_completion_only(enc.labels)
        encoded.append(enc)
    return encoded, dropped


# ------------------------------------------------------------------------------- few-shot
def select_shots(train: list[Example], k: int, seed: int = 0, exclude: list[Example] = ()) -> list[Example]:
    """k training examples drawn with a seeded RNG, skipping any whose prompt is an evaluation prompt."""
    from minilora.data.dedup import normalize_text, prompt_text

    banned = {normalize_text(prompt_text(e)) for e in exclude}
    pool = [e for e in train if e.fmt != "text" and normalize_text(prompt_text(e)) not in banned]
    return random.Random(seed).sample(pool, min(k, len(pool)))


def few_shot_example(ex: Example, shots: list[Example], template: str = "chat") -> Example:
    """`ex` with the shots rendered before its prompt (same completion)."""
    if template == "raw":
        context = "".join(render_raw(s.prompt) + s.completion + "\n\n" for s in shots)
        return Example(context + render_raw(ex.prompt), ex.completion, "prompt_completion", ex.source)
    own = prompt_messages(ex)
    system = [m for m in own[:1] if m["role"] == "system"]  # templates accept one system message, first
    turns = []
    for s in shots:
        turns += [m for m in prompt_messages(s) if m["role"] != "system"]
        turns.append({"role": "assistant", "content": s.completion})
    return Example(system + turns + own[len(system) :], ex.completion, "chat", ex.source)


# ------------------------------------------------------------------------------- one model
def evaluate_variant(
    model,
    tokenizer,
    examples: list[Example],
    template: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_seq_len: int = 2048,
    progress=None,
) -> dict:
    """Perplexity (final completion tokens), greedy generations and their scores for one model/prompting."""
    encoded, dropped = encode_for_eval(examples, tokenizer, template, max_seq_len)
    result: dict = {"perplexity": None, "loss": None, "label_tokens": 0, "too_long_for_perplexity": dropped}
    if encoded:
        total, count = completion_loss(model, encoded, batch_size, tokenizer.pad_id, progress)
        loss = total / count
        result.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, label_tokens=count)
    if progress is not None and dropped:
        progress(dropped)
    predictions = generate_completions(model, tokenizer, examples, template, max_new_tokens, batch_size, progress)
    result.update(score(predictions, [e.completion for e in examples]))
    result["predictions"] = predictions
    return result
