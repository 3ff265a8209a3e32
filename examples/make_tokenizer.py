"""Train the small tokenizer of the `tiny` model: byte-level BPE on the demo data, vocab 1024.

    python examples/make_tokenizer.py        # rewrites examples/tokenizer/

Writes a checkpoint-style tokenizer folder that both minilora (`Tokenizer.from_dir`) and
transformers (`AutoTokenizer.from_pretrained`) load:

  tokenizer.json         byte-level BPE (any UTF-8 text encodes, via byte tokens), a post-processor
                         that prepends <bos> (as Gemma's does), ids 0-4 the special tokens
                         <pad> <bos> <eos> <start_of_turn> <end_of_turn>
  tokenizer_config.json  bos/eos/pad tokens and a Gemma-style chat_template

The merges are learned from the demo data (examples/demo/*.jsonl, run make_demo_data.py first)
plus a few lines of general text, so other inputs still tokenize sensibly.
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]

# Gemma 3's chat template (text part): system text goes in front of the first user turn, roles
# must alternate, assistant is written "model", each turn ends with <end_of_turn> and a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)

GENERAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Please summarize the following text in one sentence.",
    "Answer the question with a short JSON object.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "user model system assistant",
    "model\n",
    "user\n",
    'model\n{"',
    "\n\n",
]


def corpus(demo_dir: str) -> list[str]:
    lines = GENERAL * 20  # so common words (e.g. "model" in the template) get merges
    for name in ("train.jsonl", "test.jsonl"):
        with open(os.path.join(demo_dir, name), encoding="utf-8") as f:
            for line in f:
                for m in json.loads(line)["messages"]:
                    lines.append(m["content"])
    return lines


def main(out_dir: str, demo_dir: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(demo_dir), trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, write in (
        ("tokenizer.json", lambda p: tok.save(p, pretty=False)),
        ("tokenizer_config.json", lambda p: open(p, "w", encoding="utf-8").write(json.dumps(config, indent=2) + "\n")),
    ):
        path = os.path.join(out_dir, name)
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    print(f"wrote {out_dir} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(os.path.join(here, "tokenizer"), os.path.join(here, "demo"))
