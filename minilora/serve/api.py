"""An OpenAI request body as a scheduler Request: the prompt's token ids and the sampling settings, every
field checked, each refusal a ServeError 400 in one sentence (serve.py answers it); and the body's size,
from its headers, before a byte of it is read."""

from __future__ import annotations

from minilora.data.encode import prompt_ids
from minilora.data.records import ROLES, DataError, Example
from minilora.serve.scheduler import Request, ServeError

MAX_BODY_BYTES = 4 * 2**20  # a request body's limit: a prompt of millions of characters, past any context served


def content_length(headers) -> int:
    """The request body's size in bytes, from its Content-Length header: ServeError 411 without one (or with
    a chunked body), 400 when it is not a number, 413 above MAX_BODY_BYTES."""
    if headers.get("Transfer-Encoding"):
        raise ServeError(
            411,
            "Chunked request bodies are not read here; send the JSON body with a Content-Length header.",
            "length_required",
        )
    size = headers.get("Content-Length")
    if size is None:
        raise ServeError(
            411,
            "The request has no Content-Length header; send the JSON body with its length in bytes.",
            "length_required",
        )
    size = size.strip()
    if not size.isdecimal():
        raise ServeError(
            400,
            f"The Content-Length header {size!r} is not a number of bytes; send the body's length in bytes.",
            "invalid_content_length",
        )
    if len(size) > 18 or int(size) > MAX_BODY_BYTES:  # int() refuses over 4300 digits; 19 are too many anyway
        raise ServeError(
            413,
            f"The request body is over this server's limit of {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt.",
            "request_too_large",
        )
    return int(size)


def request_ids(body: dict, chat: bool, tok, template: str) -> list[int]:
    """The prompt's token ids: chat messages rendered as training renders prompts (`template`: chat or raw),
    or a completion prompt (a string, encoded with BOS, or token ids)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(400, "The prompt is empty; pass at least one message in 'messages'.", "empty_prompt")
        try:
            return prompt_ids(Example(prompt=chat_messages(messages), completion="", fmt="chat"), tok, template)
        except DataError as e:
            raise ServeError(400, template_refusal(e), "invalid_messages") from None
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
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ServeError(400, "'stream' must be true or false.", "invalid_stream")
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) is not None and body[key] is not False:  # 0 == False, yet logprobs 0 asks for some
            raise ServeError(400, f"'{key}' is not supported by this server; leave it out.", f"invalid_{key}")
    return Request(ids, adapter, max_tokens, float(temperature), float(top_p), tuple(stop), seed)


def chat_messages(messages: list) -> list[dict]:
    """[{"role", "content" text}] of a non-empty 'messages' list, or ServeError 400 saying what to send:
    each role one of ROLES, and a last message the model can answer."""
    try:
        msgs = [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]
    except (TypeError, KeyError, AttributeError):
        raise ServeError(400, "Each message needs a 'role' and a text 'content'.", "invalid_messages") from None
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise ServeError(
                400,
                f"The role {m['role']!r} of messages[{i}] is unknown here; send 'system', 'user' or 'assistant'.",
                "invalid_messages",
            )
    if msgs[-1]["role"] == "assistant":  # the prompt ends where a new assistant turn starts, after this one
        raise ServeError(
            400,
            "The last message is the assistant's, so there is nothing to answer; end 'messages' with a user message.",
            "invalid_messages",
        )
    return msgs


def template_refusal(e: DataError) -> str:
    """The sentence for messages the chat template rejects. encode.py's own sentence speaks to train.py
    (a data line, --template, --skip-bad-lines); the template's words are its context, where encode.py
    raised it while handling the template's error."""
    why = f" ({e.__context__})" if e.__context__ is not None else ""
    return (
        f"The model's chat template rejected these messages{why}; send user and assistant messages that "
        "alternate and end with a user message."
    )


def text_of(content) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p["text"] for p in content if p.get("type") == "text")
    raise TypeError(content)
