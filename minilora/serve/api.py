"""An OpenAI request body as a scheduler Request: the prompt's token ids and the sampling settings, every
field checked, each refusal a ServeError 400 in one sentence (serve.py answers it)."""

from __future__ import annotations

from minilora.data.encode import prompt_ids
from minilora.data.records import DataError, Example
from minilora.serve.scheduler import Request, ServeError


def request_ids(body: dict, chat: bool, tok, template: str) -> list[int]:
    """The prompt's token ids: chat messages rendered as training renders prompts (`template`: chat or raw),
    or a completion prompt (a string, encoded with BOS, or token ids)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(400, "The prompt is empty; pass at least one message in 'messages'.", "empty_prompt")
        try:
            msgs = [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]
            return prompt_ids(Example(prompt=msgs, completion="", fmt="chat"), tok, template)
        except (TypeError, KeyError):
            raise ServeError(400, "Each message needs a 'role' and a text 'content'.", "invalid_messages") from None
        except DataError as e:
            raise ServeError(400, str(e), "invalid_messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < tok.vocab_size for t in prompt):
        ids = list(prompt)  # token ids as given
    elif isinstance(prompt, str):
        ids = tok.encode(prompt, add_special_tokens=True) if prompt else []
    else:
        raise ServeError(400, "'prompt' must be one string or one list of token ids.", "invalid_prompt")
    if not prompt:
        raise ServeError(400, "The prompt is empty; pass at least one character or token.", "empty_prompt")
    return ids


def parse_request(
    body: dict, chat: bool, adapter: str | None, tok, template: str, context: int, default_max: int
) -> Request:
    """A Request from an OpenAI completion or chat body, or ServeError 400 naming the field to fix."""
    ids = request_ids(body, chat, tok, template)
    room = context - len(ids)
    if room < 1:
        raise ServeError(
            400,
            f"The prompt has {len(ids)} tokens but the model's context is {context}; shorten it.",
            "context_length_exceeded",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(default_max, room)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ServeError(400, "'max_tokens' must be a positive integer.", "invalid_max_tokens")
    if max_tokens > room:
        raise ServeError(
            400,
            f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of "
            f"{context} tokens; lower max_tokens or shorten the prompt.",
            "context_length_exceeded",
        )
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ServeError(400, "'temperature' must be a number from 0 (greedy) to 2.", "invalid_temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ServeError(400, "'top_p' must be a number in (0, 1].", "invalid_top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ServeError(400, "'stop' must be a string or a list of up to 4 non-empty strings.", "invalid_stop")
    if body.get("n", 1) != 1:
        raise ServeError(400, "Only n = 1 is supported; send several requests instead.", "invalid_n")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise ServeError(400, "'seed' must be an integer.", "invalid_seed")
    return Request(ids, adapter, max_tokens, float(temperature), float(top_p), tuple(stop), seed)


def text_of(content) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if p.get("type") == "text")
    raise TypeError(content)
