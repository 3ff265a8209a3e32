"""Validation after an export: reload what was written through an independent reader and compare.

Readers: transformers' from_pretrained for a merged checkpoint, transformers + bitsandbytes for the
NF4 one, transformers' GGUF loader (gguf_file=..., which dequantizes with gguf's own code and undoes
llama.cpp's q/k row order and Gemma's norm offset) for a GGUF. The reference is the in-memory merged
model with each weight replaced by what the file should hold: the NF4 or Q8_0/Q4_0 round trip of it
(an f16/bf16/float32 file holds the weights exactly). Both sides then compute in float32 from
identical weights (and RoPE frequencies: models/transformer.py keeps them float32 through a cast), so
their logits differ only by summation order:

    rel = max |z_ref - z_file| / max |z_ref|   over every prompt position,  gate: rel <= TOLERANCE

Each float32 dot product of length K carries a relative rounding error of order sqrt(K) * 2^-24
(about 4e-6 at K = 16384) and a few dozen layers add a few of those, so 1e-3 sits two orders above
any reordering noise, while one wrong tensor (a flipped byte, a missing weight, a wrong row order or
norm offset) moves the logits by O(1) of their range. Also printed: the same numbers against the
unquantized merged model (what quantizing cost) and greedy agreement (tokens of free-running greedy
continuations that match, position by position).

NF4 on the CPU: bitsandbytes 0.50's CPU dequantize_4bit misplaces blocks that straddle two rows (a
linear whose in_features K is not a multiple of the 64-value block), so such an export fails here,
rightly: that is the model bitsandbytes would run on the CPU. Real checkpoints have K % 64 == 0.
"""

from __future__ import annotations

import os
import random

import torch

from minilora.export.errors import ExportError

TOLERANCE = 1e-3


class ValidationError(RuntimeError):
    """The export read back differs from the merged model beyond the tolerance, or cannot be read.

    The sentence names the file (`path`), what is wrong with it (`problem`) and what to do with it
    (`advice`); not_written() says the same of an export checked in a temporary folder, which therefore
    never reached --out (`retry`: what to do then)."""

    def __init__(self, path: str, problem: str, advice: str = "do not serve it", retry: str | None = None):
        self.problem = problem
        self.retry = retry or "pass --no-validate to keep it for inspection, but do not serve it"
        super().__init__(f"{path} {problem}; {advice}.")

    def not_written(self, out: str) -> ValidationError:
        return type(self)(f"the export to {out}", f"{self.problem}, so nothing was written there", self.retry)


N_PROMPTS, MAX_PROMPT_TOKENS, NEW_TOKENS = 4, 64, 8


def validation_prompts(run_config: dict, tokenizer, vocab_size: int, n: int = N_PROMPTS, seed: int = 0):
    """([token ids] per prompt, where they came from): the run's eval data, else its training data,
    else random token ids (a run without data files still gets its weights checked)."""
    from minilora.data.encode import prompt_ids, resolve_template, run_template
    from minilora.data.records import load_records

    for key in ("eval_data", "data"):
        path = run_config.get(key)
        if not path or not os.path.isfile(path) or tokenizer is None:
            continue
        try:
            examples = load_records(path, run_config.get("format", "auto"))[0][:n]
            template = resolve_template(run_template(run_config), tokenizer)
            ids = [prompt_ids(e, tokenizer, template)[-MAX_PROMPT_TOKENS:] for e in examples]
        except (ValueError, TypeError, AttributeError):
            continue  # text records have no prompts: try the next source
        if ids and all(ids):
            return ids, f"{len(ids)} prompts from {path}"
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(12)] for _ in range(n)], f"{n} random token sequences"


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0].float()  # (T, V)


@torch.no_grad()
def _greedy(model, ids: list[int], n: int, logits: torch.Tensor | None = None) -> list[int]:
    """n greedy tokens after ids; `logits` (T, V), when given, are the prompt's own (not computed again)."""
    ids = list(ids)
    for _ in range(n):
        logits = _logits(model, ids) if logits is None else logits
        ids.append(int(logits[-1].argmax()))
        logits = None
    return ids[-n:]


def reference_weights(model, transform) -> None:
    """Replace every parameter p (transformers name) by transform(name, p) in float32, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = transform(name, p.data).float()
        for b_name, b in model.named_buffers():
            if torch.is_floating_point(b):
                b.data = b.data.float()


def reload(kind: str, path: str, hf_config: dict):
    """The export as transformers reads it, computing in float32 on the CPU."""
    try:
        import transformers
    except ImportError:
        raise ExportError(
            "Validation reloads the export with transformers, which is not installed; "
            "pip install transformers, or pass --no-validate."
        ) from None
    auto = transformers.AutoModelForCausalLM
    if kind == "gguf":
        cfg = transformers.CONFIG_MAPPING[hf_config["model_type"]](
            **{k: v for k, v in hf_config.items() if k != "model_type"}
        )
        folder, name = os.path.split(os.path.abspath(path))
        model = auto.from_pretrained(folder, gguf_file=name, config=cfg, dtype=torch.float32)
    elif kind == "nf4":
        model = auto.from_pretrained(path, device_map="cpu", dtype=torch.float32)
        for m in model.modules():  # compare float32 against float32: dequantize NF4 to float32 and compute there
            state = getattr(getattr(m, "weight", None), "quant_state", None)
            if state is not None:
                state.dtype, m.compute_dtype = torch.float32, torch.float32
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False  # bitsandbytes' bf16 CPU kernel would round to bf16
        for p in model.parameters():
            if p.dtype in (torch.bfloat16, torch.float16):  # embeddings, norms, lm_head stay in the file's dtype
                p.data = p.data.float()
    else:
        model = auto.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def reload_or_fail(kind: str, path: str, hf_config: dict):
    """reload(), with a file the reader rejects reported as a failed validation (one sentence)."""
    try:
        return reload(kind, path, hf_config)
    except ExportError:
        raise
    except Exception as e:  # any reader error on a file we just wrote means the file is unusable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(path, f"could not be read back ({msg})") from None


def report(name: str, stats: dict, against_merged: dict | None, log=print) -> None:
    log(
        f"validation ({name}): logits max rel err {stats['rel_logit_err']:.2e} (tolerance {TOLERANCE:.0e}), "
        f"greedy tokens agreeing {stats['greedy_agree']:.1%}"
    )
    if against_merged is not None:
        log(
            f"  vs the unquantized merged model: logits max rel err {against_merged['rel_logit_err']:.2e}, "
            f"greedy tokens agreeing {against_merged['greedy_agree']:.1%}"
        )


def check(path: str, stats: dict) -> None:
    if not stats["rel_logit_err"] <= TOLERANCE:  # `not <=` also catches NaN
        raise ValidationError(
            path,
            f"does not reproduce the merged model (logits max rel err {stats['rel_logit_err']:.2e} > {TOLERANCE:.0e})",
            "the file is damaged or mis-converted, so do not serve it",
        )


def outputs(model, prompts) -> list[tuple[torch.Tensor, list[int]]]:
    """(logits (T, V), greedy continuation) per prompt."""
    out = []
    for ids in prompts:
        logits = _logits(model, ids)  # (T, V), also the first greedy step's
        out.append((logits, _greedy(model, ids, NEW_TOKENS, logits)))
    return out


def compare(ref: list, got: list) -> dict:
    """Logit agreement (max abs difference over max abs reference logit) and greedy agreement."""
    err = max((a - b).abs().max().item() for (a, _), (b, _) in zip(ref, got))
    scale = max(a.abs().max().item() for a, _ in ref)
    same = sum(x == y for (_, ga), (_, gb) in zip(ref, got) for x, y in zip(ga, gb))
    total = sum(len(ga) for _, ga in ref)
    return {"rel_logit_err": err / max(scale, 1e-30), "greedy_agree": same / max(total, 1)}


def check_gguf_tensors(path: str, expected, log=print, shown: str | None = None) -> None:
    """Read a GGUF back with gguf's reader: every expected (name, data, qtype) is there, bit for bit.
    `shown`: the path the log names (the --out a temporary file is renamed to)."""
    from gguf import GGUFReader

    try:
        found = {t.name: t for t in GGUFReader(path).tensors}
    except Exception as e:  # a truncated or garbled file: numpy's or gguf's own error, never a sentence
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        damaged = "the file is damaged, so do not serve it"
        raise ValidationError(path, f"could not be read back ({msg})", damaged) from None
    for name, data, qtype in expected:
        t = found.get(name)
        if t is None or t.tensor_type != qtype or t.data.tobytes() != data.tobytes():
            raise ValidationError(path, f"does not hold {name} as written (missing or damaged)")
    log(f"validation: {len(expected)} tensors of {shown or path} read back identical")
