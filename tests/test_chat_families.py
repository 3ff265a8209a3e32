"""The chat templates of Qwen2.5, Qwen3 and Mistral v0.3 checkpoints: rendered by models/tokenizer.py
exactly as transformers renders them (hypothesis-drawn conversations with system prompts, tools, tool
calls and results, Qwen3's think blocks and enable_thinking), and completion-only masking with each.

Each tokenizer is built here: a BPE tokenizer.json trained with `tokenizers` on the family's special
tokens, and a tokenizer_config.json carrying the checkpoint's own template string (chat_templates/).
"""

import json
import os

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

# The checkpoints' own chat templates, verbatim: Qwen2.5-Instruct's (tools), Qwen3's (tools, think
# blocks, enable_thinking) and Mistral-7B-Instruct-v0.3's (tools, tool calls with 9-character ids).
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
MISTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "a + b",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    },
]


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    """{name: (our Tokenizer, transformers' tokenizer)} for a checkpoint folder per template: a BPE
    tokenizer.json trained here with the family's special tokens, tokenizer_config.json with the template."""
    from test_tokenizer import _train_bpe

    from minilora.models.tokenizer import Tokenizer

    out = {}
    for name, specials, special_map in [
        ("qwen2.5", QWEN_SPECIALS, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
        ("qwen3", QWEN_SPECIALS, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
        ("mistral-v0.3", MISTRAL_SPECIALS, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    ]:
        path = str(tmp_path_factory.mktemp(name))
        _train_bpe(specials, "<s>" if "<s>" in specials else None, post_processor="<s>" in specials).save(
            os.path.join(path, "tokenizer.json")
        )
        with open(os.path.join(TEMPLATES, name + ".jinja"), encoding="utf-8") as f:
            template = f.read()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": template,
            **special_map,
            "model_max_length": 32768,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        out[name] = (Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path))
    return out


words = st.text(alphabet="abc xyz.!?\n\t'\"{}<>é你", max_size=12)


@st.composite
def conversations(draw, name):
    """Conversations each template has branches for: a system prompt, tools, tool calls and their
    results, Qwen3's think blocks (inline or as reasoning_content), several turns."""
    msgs = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(words)})
        if draw(st.integers(0, 3)) == 0:  # a tool call and its result before the answer
            call_id = draw(st.text(alphabet="abcdefgh123", min_size=9, max_size=9))
            call = {"type": "function", "id": call_id, "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
            msgs.append(
                {"role": "assistant", "content": "" if name == "mistral-v0.3" else draw(words), "tool_calls": [call]}
            )
            msgs.append(
                {"role": "tool", "content": draw(st.sampled_from(["3", '{"sum": 3}'])), "tool_call_id": call_id}
            )
        answer = draw(words)
        if name == "qwen3" and draw(st.booleans()):
            if draw(st.booleans()):
                answer = "<think>\n" + draw(words) + "\n</think>\n\n" + answer
            else:
                msgs.append({"role": "assistant", "content": answer, "reasoning_content": draw(words)})
                continue
        msgs.append({"role": "assistant", "content": answer})
    if draw(st.booleans()):  # end on a user turn, the usual inference prompt
        msgs.append({"role": "user", "content": draw(words)})
    return msgs


@settings(deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from(["qwen2.5", "qwen3", "mistral-v0.3"]),
    gen=st.booleans(),
    tools=st.booleans(),
    thinking=st.sampled_from([None, True, False]),
)
def test_chat_templates_render_as_transformers_renders_them(chat_tokenizers, data, name, gen, tools, thinking):
    import jinja2

    ours, hf = chat_tokenizers[name]
    msgs = data.draw(conversations(name))
    kw = dict(add_generation_prompt=gen, tools=TOOLS if tools else None)
    if thinking is not None and name == "qwen3":
        kw["enable_thinking"] = thinking
    try:
        want = hf.apply_chat_template(msgs, tokenize=False, **kw)
    except jinja2.exceptions.TemplateError as e:  # e.g. Mistral: roles must alternate
        with pytest.raises(jinja2.exceptions.TemplateError, match=str(e)[:40]):
            ours.apply_chat_template(msgs, **kw)
        return
    assert ours.apply_chat_template(msgs, **kw) == want
    assert ours.apply_chat_template(msgs, tokenize=True, **kw) == hf(want, add_special_tokens=False).input_ids


@settings(deadline=None)
@given(
    name=st.sampled_from(["qwen2.5", "qwen3", "mistral-v0.3"]),
    system=words,
    user=words,
    answer=words,
    with_system=st.booleans(),
)
def test_completion_only_masking_with_each_template(chat_tokenizers, name, system, user, answer, with_system):
    """Labels cover exactly the tokens the template writes for the answer (Qwen3: with its empty think
    block, then <|im_end|>), plus EOS; the prompt tokens are transformers' rendering of the prompt."""
    from minilora.data.encode import encode_example
    from minilora.data.packing import IGNORE
    from minilora.data.records import Example

    ours, hf = chat_tokenizers[name]
    # Mistral v0.3 writes the system prompt into the last user turn only when a user turn ends the
    # conversation, so with a system prompt the training text cannot contain its own prompt.
    prompt = [{"role": "system", "content": system}] if with_system and name != "mistral-v0.3" else []
    prompt = prompt + [{"role": "user", "content": user}]
    enc = encode_example(Example(prompt, answer, "chat"), ours, max_seq_len=10**6)
    gen = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = hf.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(gen)
    prompt_ids = hf(gen, add_special_tokens=False).input_ids
    completion = hf(full[len(gen) :], add_special_tokens=False).input_ids
    if completion[-1] != hf.eos_token_id:
        completion.append(hf.eos_token_id)
    assert enc.input_ids == prompt_ids + completion
    assert enc.labels == [IGNORE] * len(prompt_ids) + completion


def test_mistral_system_prompt_that_the_template_drops_is_one_clear_error(chat_tokenizers):
    """Mistral v0.3's template writes the system prompt only into a conversation's final user turn:
    a training conversation (ending with the answer) would silently lose it, so it is refused."""
    from minilora.data.encode import encode_example
    from minilora.data.records import DataError, Example

    ours, hf = chat_tokenizers["mistral-v0.3"]
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    gen = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert "be brief" in gen and "be brief" not in hf.apply_chat_template(
        prompt + [{"role": "assistant", "content": "yo"}], tokenize=False
    )  # the oracle drops it too
    with pytest.raises(DataError, match="x.jsonl:3: the chat template's prompt .* is not a prefix"):
        encode_example(Example(prompt, "yo", "chat", "x.jsonl:3"), ours)
