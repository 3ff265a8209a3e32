"""A checkpoint's tokenizer: tokenizer.json through `tokenizers`, chat template through jinja2.

`Tokenizer.from_dir(path)` reads what a Hugging Face checkpoint ships:

  tokenizer.json              the fast tokenizer (model, pre-tokenizer, post-processor, added tokens)
  tokenizer_config.json       bos/eos/pad/unk tokens, `chat_template` (string or named list)
  special_tokens_map.json     older place for the special tokens (read when the config lacks them)
  chat_template.jinja         the chat template (transformers 5 writes it here; takes priority)
  config.json / generation_config.json   `eos_token_id` (an int or a list, e.g. Llama 3 instruct
                              stops on <|eot_id|> as well as <|end_of_text|>), bos/pad ids

The goal is to give the same ids and the same rendered prompts as
`transformers.AutoTokenizer.from_pretrained(path)` (tests/test_tokenizer.py checks this), without
importing transformers at run time:

- `encode(text, add_special_tokens=True)` runs tokenizer.json's own post-processor (Gemma's and
  Llama 3's add BOS there). transformers 5 ignores `add_bos_token` in the config when a
  tokenizer.json exists; we do too, except when tokenizer.json has no post-processor at all, where
  an explicit `add_bos_token: true` is honoured (older checkpoints relied on it).
- `apply_chat_template` renders with the same jinja2 environment as transformers
  (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, loopcontrols, a
  `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`) and the same variables
  (`messages`, `add_generation_prompt`, `tools`, `documents`, `bos_token`, `eos_token`, ...).
  The rendered text is tokenized with `add_special_tokens=False`, since templates write BOS.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

# The named special tokens transformers passes to every chat template, in its order.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
    """A special token as saved in tokenizer_config.json: a string or a serialized AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download or fix the file.")
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


@lru_cache(maxsize=16)
def compile_chat_template(template: str):
    """Compile a chat template in the same sandboxed jinja2 environment transformers uses."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes <, >, & and ' ; transformers' (and so every template) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class Tokenizer:
    """A Hugging Face fast tokenizer plus its special tokens and chat template.

    Attributes: `bos_id`, `eos_id` (the tokenizer's own EOS), `eos_ids` (every id generation
    stops on: `eos_id` plus generation_config.json's list), `pad_id` (falls back to `eos_id`),
    `vocab_size` (including added tokens: the embedding needs at least this many rows),
    `chat_template` (str or None), and the token strings `bos_token`, `eos_token`, `pad_token`.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        extra_eos_ids: list[int] | tuple[int, ...] = (),
        config_ids: dict[str, int | None] | None = None,
        add_bos_fallback: bool = False,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        config_ids = config_ids or {}
        # Special tokens named in the config but missing from tokenizer.json are added, as
        # transformers does, so that every named token has an id.
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_id = self._id_of(self.bos_token, config_ids.get("bos_token_id"))
        self.eos_id = self._id_of(self.eos_token, config_ids.get("eos_token_id"))
        pad = self._id_of(self.pad_token, config_ids.get("pad_token_id"))
        self.pad_id = pad if pad is not None else self.eos_id
        eos_ids = ([self.eos_id] if self.eos_id is not None else []) + [int(i) for i in extra_eos_ids]
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self._prepend_bos = add_bos_fallback and backend.post_processor is None and self.bos_id is not None

    def _id_of(self, token: str | None, fallback: int | None) -> int | None:
        if token is not None:
            i = self.backend.token_to_id(token)
            if i is not None:
                return int(i)
        return None if fallback is None else int(fallback)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json, the special tokens and the chat template from a checkpoint folder."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; point at a checkpoint folder that ships a fast tokenizer."
            )
        try:
            backend = _HFTokenizer.from_file(tok_file)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{tok_file} could not be read by the tokenizers library ({e}); re-download it.") from e
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        smap = _read_json(os.path.join(path, "special_tokens_map.json"))
        mcfg = _read_json(os.path.join(path, "config.json"))
        gcfg = _read_json(os.path.join(path, "generation_config.json"))
        # gemma3 multimodal configs keep the text ids under text_config.
        text_cfg = mcfg.get("text_config") if isinstance(mcfg.get("text_config"), dict) else {}

        special = {}
        for name in _SPECIAL_NAMES:
            value = _token_str(tcfg.get(name))
            if value is None:
                value = _token_str(smap.get(name))
            special[name] = value

        template = None
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        else:
            ct = tcfg.get("chat_template")
            if isinstance(ct, list):  # named templates: [{"name": "default", "template": ...}, ...]
                named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
                ct = named.get("default")
            if isinstance(ct, str):
                template = ct

        def first(key):
            for source in (gcfg, mcfg, text_cfg):
                if source.get(key) is not None:
                    return source[key]
            return None

        eos_cfg = _as_id_list(first("eos_token_id"))
        bos_cfg = _as_id_list(first("bos_token_id"))
        pad_cfg = _as_id_list(first("pad_token_id"))
        return cls(
            backend,
            special_tokens=special,
            chat_template=template,
            extra_eos_ids=eos_cfg,
            config_ids={
                "eos_token_id": eos_cfg[0] if eos_cfg else None,
                "bos_token_id": bos_cfg[0] if bos_cfg else None,
                "pad_token_id": pad_cfg[0] if pad_cfg else None,
            },
            add_bos_fallback=bool(tcfg.get("add_bos_token", False)),
        )

    # ------------------------------------------------------------------ text <-> ids
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS etc. as the checkpoint's tokenizer adds them."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return list(ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs,
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}, ...]) with the checkpoint's chat template.

        Returns the prompt string, or its ids (encoded without adding special tokens, since the
        template writes BOS itself) when `tokenize=True`.
        """
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); use the raw template (--template raw) or add one."
            )
        if not messages:
            raise ValueError("Cannot apply the chat template to an empty conversation; pass at least one message.")
        # Like transformers: keys whose value is None are dropped (templates handle a missing key).
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {name: tok for name, tok in self.special_tokens.items()}
        variables.update(kwargs)
        text = compile_chat_template(self.chat_template).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )
