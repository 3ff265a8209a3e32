"""Rendering and loss masking: one Example (or one answer of a pair) becomes input_ids and labels.

  encode_example(ex, tok)   -> EncodedExample(input_ids, labels): labels = -100 on prompt tokens,
                               the prompt rendered with the checkpoint's chat template or raw,
                               truncated by --truncation drop|left
  max_line_bytes(tok, T)    the JSONL line length above which a line cannot fit T tokens

Shape letters: T sequence length (tokens of one example).

Labels are aligned with input_ids (labels[t] is input_ids[t] or -100), not shifted; the loss is
CE(logits[:, :-1], labels[:, 1:]) (see minilora/train/loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from minilora.data.packing import IGNORE
from minilora.data.records import DataError, Example


@dataclass
class EncodedExample:
    """input_ids (T,) and labels (T,) with -100 on tokens that carry no loss; EOS is the last token."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------- encoding
def resolve_template(template: str, tokenizer) -> str:
    """--template auto: "chat" when the tokenizer has a chat template (an instruct checkpoint), "raw"
    otherwise (a pretrained one, e.g. Gemma 3 270M); "chat" and "raw" stay as they are."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) is not None else "raw"


def run_template(run_config: dict) -> str:
    """The template a run rendered prompts with: config.json's resolved one (train.py records what
    --template auto chose under "resolved"), else its --template (runs recorded before auto existed)."""
    return (run_config.get("resolved") or {}).get("template") or run_config.get("template", "chat")


def prompt_messages(ex: Example) -> list[dict]:
    """The messages before the completion (a string prompt becomes one user message)."""
    if isinstance(ex.prompt, str):
        return [{"role": "user", "content": ex.prompt}]
    return [dict(m) for m in ex.prompt]


def render_raw(prompt: str | list[dict]) -> str:
    """Raw concatenation: a string prompt as is; messages as "role: content" lines + "assistant: "."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def _renderer(tokenizer, source: str):
    """apply_chat_template whose template errors (e.g. roles that do not alternate) name the example."""
    import jinja2

    def render(messages, add_generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(
                f"{source}: the chat template rejected this conversation ({e}); fix the messages, "
                "use --template raw, or pass --skip-bad-lines to skip it."
            ) from None

    return render


def _chat_pieces(messages: list[dict], tokenizer, source: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) pieces.

    For each assistant turn k: the context piece ends where render(messages[:k],
    add_generation_prompt=True) ends, and the assistant piece is what render(messages[:k+1]) adds
    after that. This needs every render to be a prefix of the next (true for Gemma, Llama, ChatML
    templates); when it is not, only the last assistant turn is labelled, and when even that fails
    the example is rejected.
    """
    render = _renderer(tokenizer, source)
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        gen = render(messages[:k], True) if k else None
        full = render(messages[: k + 1], False)
        if gen is None:  # a conversation starting with the assistant: no context before it
            gen = ""
        if not (gen.startswith(done) and full.startswith(gen)):
            pieces = None
            break
        pieces.append((gen[len(done) :], False))
        pieces.append((full[len(gen) :], True))
        done = full
    if pieces is not None:  # messages end with the assistant, so `done` is the whole conversation
        return pieces
    # Fallback: the template rewrites earlier turns; label the final turn only.
    gen = render(messages[:-1], True) if len(messages) > 1 else ""
    full = render(messages, False)
    if not full.startswith(gen):
        raise DataError(
            f"{source}: the chat template's prompt (add_generation_prompt=True) is not a prefix of the full "
            "conversation, so the completion cannot be located; use --template raw for this tokenizer."
        )
    return [(gen, False), (full[len(gen) :], True)]


def _encoded_pieces(ex: Example, tokenizer, template: str) -> list[tuple[str, bool, list[int]]]:
    """The example as (text, is_completion, token ids) pieces: the one place a prompt is rendered.

    template "chat": the tokenizer's chat template, split at each assistant turn (_chat_pieces;
    the template writes BOS itself); "raw": render_raw(prompt), then the completion, with the
    tokenizer's special tokens (BOS) before the first piece. Text records are one completion piece.
    """
    if template not in ("chat", "raw"):
        raise ValueError(f"Unknown template '{template}'; use chat or raw.")
    if ex.fmt == "text":
        pieces, first_special = [(ex.completion, True)], True
    elif template == "raw":
        pieces, first_special = [(render_raw(ex.prompt), False), (ex.completion, True)], True
    else:
        messages = prompt_messages(ex) + [{"role": "assistant", "content": ex.completion}]
        pieces, first_special = _chat_pieces(messages, tokenizer, ex.source), False
    return [
        (text, flag, tokenizer.encode(text, add_special_tokens=first_special and i == 0))
        for i, (text, flag) in enumerate(pieces)
    ]


def prompt_ids(ex: Example, tokenizer, template: str = "chat") -> list[int]:
    """Token ids before the final completion, tokenized exactly as encode_example tokenizes them,
    so generation starts where training's labelled completion started."""
    if ex.fmt == "text":  # no prompt: generation starts from BOS alone
        return tokenizer.encode("", add_special_tokens=True)
    return [t for _, _, piece_ids in _encoded_pieces(ex, tokenizer, template)[:-1] for t in piece_ids]


def encode_example(
    ex: Example,
    tokenizer,
    template: str = "chat",
    train_on_all: bool = False,
    max_seq_len: int = 2048,
    truncation: str = "drop",
) -> EncodedExample | None:
    """Tokenize one example; labels are -100 except on completion tokens (or everywhere with train_on_all).

    template "chat": the tokenizer's chat template (the labelled span is each assistant turn as the
    template writes it, e.g. "answer<end_of_turn>\\n"); "raw": render_raw(prompt) + completion.
    Text records are always raw and fully labelled. EOS is appended and labelled, unless the
    template already ended the completion with EOS.

    Longer than max_seq_len: truncation "drop" returns None; "left" cuts prompt tokens from the
    left (keeping BOS), and returns None when the final completion + EOS alone does not fit.
    """
    if truncation not in ("drop", "left"):
        raise ValueError(f"Unknown truncation policy '{truncation}'; use drop or left.")
    if tokenizer.eos_id is None:
        raise ValueError("The tokenizer has no EOS token; set eos_token in tokenizer_config.json.")
    ids: list[int] = []
    labelled: list[bool] = []
    completion_start = 0
    for text, is_completion, piece_ids in _encoded_pieces(ex, tokenizer, template):
        if is_completion:
            completion_start = len(ids)
        ids += piece_ids
        labelled += [is_completion] * len(piece_ids)
    # The sequence ends with the completion: text a template writes after the last assistant turn
    # is dropped, and EOS appended unless the template already wrote it.
    end = max((j + 1 for j, flag in enumerate(labelled) if flag), default=len(ids))
    ids, labelled = ids[:end], labelled[:end]
    if not (end > completion_start and ids[-1] == tokenizer.eos_id):
        ids.append(tokenizer.eos_id)
        labelled.append(True)
    labels = [t if (flag or train_on_all) else IGNORE for t, flag in zip(ids, labelled)]

    truncated = False
    if len(ids) > max_seq_len:
        if truncation == "drop":
            return None
        keep_bos = tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id and completion_start > 0
        budget = max_seq_len - int(keep_bos)
        if len(ids) - completion_start > budget:
            return None  # the completion itself does not fit; never cut it
        head = ids[:1] if keep_bos else []
        head_labels = labels[:1] if keep_bos else []
        ids, labels = head + ids[-budget:], head_labels + labels[-budget:]
        truncated = True
    return EncodedExample(ids, labels, truncated, ex.source)


def max_line_bytes(tokenizer, max_seq_len: int) -> int | None:
    """Length in bytes above which a JSONL line cannot encode to max_seq_len tokens or fewer.

    A token stands for at most Lt bytes of text (Lt: the longest token string of the vocabulary,
    in UTF-8), and JSON writes one byte of text as at most 6 bytes ("\\u0001"), so a line of
    more than 6 Lt max_seq_len bytes of text, plus 4 KiB for keys and structure, holds more than
    max_seq_len tokens. (A normalizer that deletes characters, or megabytes of ignored extra keys,
    could break this; such lines are dropped and counted.) None for a tokenizer without a vocabulary.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return None
    longest = max(len(t.encode("utf-8")) for t in backend.get_vocab(with_added_tokens=True))
    return 6 * longest * max_seq_len + 4096
