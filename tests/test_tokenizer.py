"""models/tokenizer.py against transformers (the oracle), nothing downloaded.

A byte-level BPE tokenizer is trained here with `tokenizers`, wrapped as transformers'
PreTrainedTokenizerFast with a Gemma-like or a Llama-3-like chat template and saved with
save_pretrained. Our ids, decoded strings, special ids and rendered chat prompts must equal what
`AutoTokenizer.from_pretrained(dir)` gives for hypothesis-drawn unicode strings and conversations.
"""

import json
import os

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTok  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from minilora.models.tokenizer import Tokenizer

# Gemma 3's template (text part), verbatim apart from the image branch.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Llama 3.2's template without tool calls; it uses strftime_now, tojson, loop controls and the
# trim_blocks / lstrip_blocks whitespace rules (the un-dashed block tags below rely on them).
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{% if system_message %}
    {{- "Instructions (json): " + (system_message | tojson) + "\\n" }}
{% endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{% if messages | length > 2 %}
    [long]
  {% endif %}
{%- for message in messages %}
    {%- if message['role'] == 'stop' %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va? 你好，世界。 こんにちは 🙂 <>&'\"",
    "def f(x):\n    return x * 2  # tabs\tand spaces",
    "Numbers 12345 67890 and symbols @#$%^&*()[]{}",
] * 20

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _train_bpe(specials, bos, *, post_processor=True, vocab_size=400):
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _save(tmp, kind, *, post_processor=True):
    from transformers import PreTrainedTokenizerFast

    if kind == "gemma":
        tok = _train_bpe(GEMMA_SPECIALS, "<bos>", post_processor=post_processor)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
        hf.chat_template = GEMMA_TEMPLATE
        gen = {"eos_token_id": [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]}
    else:
        tok = _train_bpe(LLAMA_SPECIALS, "<|begin_of_text|>", post_processor=post_processor)
        # Llama 3 ships no pad token: pad falls back to EOS.
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        hf.chat_template = LLAMA_TEMPLATE
        gen = {"eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}
    path = os.path.join(tmp, f"{kind}_{int(post_processor)}")
    hf.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tok"))
    out = {}
    for kind in ("gemma", "llama"):
        path = _save(tmp, kind)
        out[kind] = (path, Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path))
    return out


texts = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(["<bos>", "<eos>", "<start_of_turn>", "<|eot_id|>", " ", "\n", "  x", "é", "🙂", "fox", "<"])
        | st.text(max_size=5),
        max_size=12,
    ).map("".join),
)


@settings(max_examples=30)
@given(text=texts, add=st.booleans(), kind=st.sampled_from(["gemma", "llama"]))
def test_encode_decode_match_transformers(saved, text, add, kind):
    _, ours, ref = saved[kind]
    ids = ours.encode(text, add_special_tokens=add)
    assert ids == ref.encode(text, add_special_tokens=add)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@st.composite
def conversations(draw):
    content = st.one_of(texts, st.sampled_from(["", "  padded  ", "a < b & c > 'd'", "línea\nnueva"]))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(content)})
    n = draw(st.integers(1, 4))
    for i in range(n):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(content)})
    return msgs


@settings(max_examples=30)
@given(msgs=conversations(), gen=st.booleans(), kind=st.sampled_from(["gemma", "llama"]))
def test_chat_template_matches_transformers(saved, msgs, gen, kind):
    _, ours, ref = saved[kind]
    text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    ref_ids = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids == list(ref_ids)


def test_template_errors_and_loop_controls_match(saved):
    _, ours, ref = saved["gemma"]
    bad = [{"role": "assistant", "content": "hi"}]
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ours.apply_chat_template(bad)
    _, ours, ref = saved["llama"]
    msgs = [{"role": "user", "content": "a"}, {"role": "stop", "content": "x"}, {"role": "user", "content": "b"}]
    text = ours.apply_chat_template(msgs, date_string="1 Jan 2025")
    assert text == ref.apply_chat_template(msgs, tokenize=False, date_string="1 Jan 2025")
    assert "b<|eot_id|>" not in text  # {% break %} stopped the loop


@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_special_ids_match_transformers(saved, kind):
    path, ours, ref = saved[kind]
    assert ours.bos_id == ref.bos_token_id
    assert ours.eos_id == ref.eos_token_id
    assert ours.vocab_size == len(ref)
    assert ours.chat_template == ref.chat_template
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)["eos_token_id"]
    assert ours.eos_ids == list(dict.fromkeys([ref.eos_token_id] + gen))
    if kind == "gemma":
        assert ours.pad_id == ref.pad_token_id == ref.convert_tokens_to_ids("<pad>")
    else:
        assert ref.pad_token_id is None and ours.pad_id == ref.eos_token_id


def test_no_post_processor_and_template_in_config(tmp_path):
    """tokenizer.json without a post-processor adds no BOS; chat_template from tokenizer_config.json."""
    path = _save(str(tmp_path), "gemma", post_processor=False)
    os.remove(os.path.join(path, "chat_template.jinja"))
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["chat_template"] = [{"name": "default", "template": GEMMA_TEMPLATE}, {"name": "other", "template": "x"}]
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    ours = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    for text in ["hello fox", "", "🙂 <bos>"]:
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )


def test_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    path = _save(str(tmp_path), "gemma")
    os.remove(os.path.join(path, "chat_template.jinja"))
    tok = Tokenizer.from_dir(path)
    with pytest.raises(ValueError, match="no chat template.*--template raw"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer.json could not be read"):
        Tokenizer.from_dir(path)
