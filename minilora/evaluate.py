"""Evaluation metrics: completion perplexity, exact match, structured (JSON) match.

Shape letters: B batch, T time, V vocabulary.

    perplexity        = exp( sum_t CE(logits_t, label_{t+1}) / #labelled tokens )   over completion tokens
    exact match       = strip(prediction) == strip(reference)
    structured match  = json.loads(prediction) == json.loads(reference)   (parse failures counted)

Generation is greedy with the KV cache, batched (minilora.models.generate).
"""

from __future__ import annotations

import json
import math

import torch

from minilora.data import Example, prompt_messages, render_raw
from minilora.packing import batches, token_loss_sum


def prompt_ids(ex: Example, tokenizer, template: str = "chat") -> list[int]:
    """Token ids of the prompt, ending where the completion would start."""
    if template == "chat":
        text = tokenizer.apply_chat_template(prompt_messages(ex), add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
    return tokenizer.encode(render_raw(ex.prompt), add_special_tokens=True)


@torch.no_grad()
def generate_completions(model, tokenizer, examples: list[Example], template: str = "chat",
                         max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) for each example's prompt."""
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
    finally:
        model.train(was_training)
    return out


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def parse_json(text: str):
    """(ok, value): the text parsed as JSON after stripping whitespace."""
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def structured_match(prediction: str, reference: str) -> tuple[bool, bool]:
    """(match, prediction_parsed): both sides parsed as JSON and compared as values."""
    ok_p, p = parse_json(prediction)
    ok_r, r = parse_json(reference)
    return (ok_p and ok_r and p == r), ok_p


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact and structured match rates and the number of predictions that are not JSON."""
    n = len(references)
    if n == 0:
        raise ValueError("Nothing to score: the evaluation set is empty.")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    sm = [structured_match(p, r) for p, r in zip(predictions, references)]
    return {"n": n, "exact_match": em / n, "structured_match": sum(m for m, _ in sm) / n,
            "json_parse_failures": sum(not ok for _, ok in sm)}


@torch.no_grad()
def completion_loss(model, encoded, batch_size: int = 16, pad_id: int = 0) -> tuple[float, int]:
    """(sum of CE over labelled tokens, number of labelled tokens) of encoded examples."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b in batches(encoded, batch_size, shuffle=False, pad_id=pad_id):
            b = b.to(dev)
            logits = model(b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask)  # (B, T, V)
            total += float(token_loss_sum(logits, b.labels))
            count += b.n_label_tokens
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, encoded, batch_size: int = 16, pad_id: int = 0) -> float:
    total, count = completion_loss(model, encoded, batch_size, pad_id)
    if count == 0:
        raise ValueError("No completion tokens to score: every label is masked.")
    return math.exp(total / count)
