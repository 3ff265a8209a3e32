"""The tokenizer as GGUF metadata (what llama.cpp's converter writes from a tokenizer.json).

A byte-level BPE tokenizer.json (Llama 3, Qwen, GPT-2 style) becomes (convert_hf_to_gguf.py's
_set_vocab_gpt2):
  tokenizer.ggml.model          "gpt2"
  tokenizer.ggml.pre            the pre-tokenizer llama.cpp must split with: "gpt-2" for ByteLevel's
                                own regex, "llama-bpe" / "qwen2" for those models' Split regexes
  tokenizer.ggml.tokens         V strings, id order; ids with no token are "[PAD<id>]"
  tokenizer.ggml.token_type     1 normal, 3 control (special added tokens), 4 user-defined
                                (other added tokens), 5 unused (the padding ids)
  tokenizer.ggml.merges         "a b" strings in rank order
  tokenizer.ggml.{bos,eos,padding}_token_id, tokenizer.ggml.add_bos_token, tokenizer.chat_template

A SentencePiece-style BPE tokenizer.json (byte_fallback, "▁" for spaces: Gemma, Llama 2, Mistral v0.1)
becomes what _set_vocab_sentencepiece writes: model "llama", the same tokens, token types with 2
unknown and 6 byte (<0x00>..<0xFF>), no merges but a score per token, and add_space_prefix. llama.cpp
merges the adjacent pair whose joined token scores highest, so a token's score is minus the rank of
the first merge in tokenizer.json that forms it: the same order in which tokenizer.json's BPE merges.
"""

from __future__ import annotations

import json
import os

from minilora.export.errors import ExportError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType values

# Split regexes of tokenizer.json files -> llama.cpp's pre-tokenizer name (llama-vocab.cpp).
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
}


def _pre_tokenizer(tj: dict, path: str) -> str:
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel splits with GPT-2's own regex
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise ExportError(
        f"The pre-tokenizer in {path} is not one llama.cpp names (GPT-2, Llama 3 or Qwen 2 "
        "byte-level BPE); export --format hf instead."
    )


def _add_bos(tj: dict, tok_dir: str, bos_token: str | None) -> bool:
    """tokenizer_config.json's add_bos_token, else whether the post-processor prepends BOS."""
    cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            flag = json.load(f).get("add_bos_token")
        if flag is not None:
            return bool(flag)
    single = (tj.get("post_processor") or {}).get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    return first is not None and first == bos_token


def vocab_metadata(tok_dir: str | None, tokenizer, vocab_size: int, ids: dict) -> dict:
    """{gguf key: value} for the tokenizer in tok_dir; ids: {"bos": ..., "eos": ..., "pad": ...}."""
    path = os.path.join(tok_dir or "", "tokenizer.json")
    if tok_dir is None or not os.path.isfile(path):
        raise ExportError(
            "The base model has no tokenizer.json, and a GGUF needs the vocabulary; export --format hf instead."
        )
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"{path} holds a {model.get('type')} tokenizer; GGUF export writes BPE vocabularies "
            "(byte-level or SentencePiece-style), so export --format hf instead."
        )
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise ExportError(f"{path} has token id {i} past the model's {vocab_size} embedding rows.")
        tokens[i], types[i] = added["content"], CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        out = _sentencepiece_fields(tj, model, tokens, types, merges)
    else:
        out = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": _pre_tokenizer(tj, path),
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
        }
    out["tokenizer.ggml.add_bos_token"] = _add_bos(tj, tok_dir, getattr(tokenizer, "bos_token", None))
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if ids.get(key) is not None:
            out[f"tokenizer.ggml.{name}"] = int(ids[key])
    template = getattr(tokenizer, "chat_template", None)
    if template:
        out["tokenizer.chat_template"] = template
    return out


def _sentencepiece_fields(tj: dict, model: dict, tokens: list, types: list, merges: list[str]) -> dict:
    """Tokens, scores and types of a SentencePiece-style BPE vocabulary (see the module docstring)."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
        elif t == unk:
            types[i] = UNKNOWN
    out = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": _adds_space_prefix(tj),
    }
    if unk in model["vocab"]:
        out["tokenizer.ggml.unknown_token_id"] = int(model["vocab"][unk])
    return out


def _adds_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (Llama 2) or not (Gemma 3)."""
    norm, pre = tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" for n in steps):
        return True
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
