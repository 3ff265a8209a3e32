"""Token counts without a tokenizer: what `train.py --plan` measures the data with when the model's
tokenizer is not on disk (a plan downloads nothing but a hub repo's config.json).

    tokens(text) ~= ceil(utf8_bytes(text) / 4)

Four bytes a token is the usual rule of thumb for the 32k-262k BPE vocabularies of the supported
families on English text and code; it is an estimate (other languages, digits and JSON punctuation
take more tokens per byte), and the plan says so. Prompts are rendered raw ("role: content" lines,
encode.render_raw), which stands in for a chat template's few marker tokens a turn.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4


class ByteCountTokenizer:
    """Stands in for a tokenizer in encode_example / prepare_data: encode(text) has the estimated
    length; the ids themselves mean nothing (1 for text, then BOS 2 and EOS 3 as special tokens)."""

    bos_id, eos_id, pad_id = 2, 3, 0
    eos_ids = (3,)
    chat_template = None
    backend = None  # no vocabulary: max_line_bytes then sets no limit on line length

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        n = -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)  # ceil
        return [self.bos_id] * add_special_tokens + [1] * n
