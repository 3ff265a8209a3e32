"""The q4_k_m / q5_k_m / q6_k / q4_0 recipes against the types llama.cpp's llama-quantize gives each tensor.

The oracle is a table written out by hand here, per geometry, from llama-quant.cpp's rules (not from
minilora's code): Llama 3.2 1B, Qwen2.5 0.5B, Gemma 3 1B and Mistral 7B, whose row lengths cover
both the K-quant path (multiples of 256) and llama.cpp's fallbacks (896 and 1152 are not). Then a
tiny Llama with rows of 256 is exported q4_k_m end to end: the file's tensor types are the table's,
general.file_type is llama.cpp's, and readback's validation (transformers reading the file) passes.
"""

import json
import os
import shutil

import gguf
import pytest
import torch

from minilora.export import gguf as G
from minilora.export.gguf_recipes import recipe_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")  # the bundled byte-level BPE tokenizer

# geometry: layers, hidden D, ffn F, q rows, kv rows, tied embeddings, vocab
GEOMETRIES = {
    "llama-3.2-1b": (16, 2048, 8192, 2048, 512, True, 128256),
    "qwen2.5-0.5b": (24, 896, 4864, 896, 128, True, 151936),
    "gemma-3-1b": (26, 1152, 6912, 1024, 256, True, 262144),
    "mistral-7b": (32, 4096, 14336, 4096, 1024, False, 32768),
}
# layers whose attn_v / ffn_down get Q6_K in the _M recipes: i < n/8, i >= 7n/8, (i - n/8) % 3 == 2
MORE_BITS = {
    "llama-3.2-1b": {0, 1, 4, 7, 10, 13, 14, 15},
    "qwen2.5-0.5b": {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23},
    "gemma-3-1b": {0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25},
    "mistral-7b": {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},
}
# (recipe, geometry) -> type per tensor kind; ("more", "rest") for attn_v / ffn_down
EXPECTED = {
    ("q4_k_m", "llama-3.2-1b"): dict(
        embd="Q6_K", q="Q4_K", k="Q4_K", v=("Q6_K", "Q4_K"), o="Q4_K", gate="Q4_K", up="Q4_K", down=("Q6_K", "Q4_K")
    ),
    ("q4_k_m", "qwen2.5-0.5b"): dict(  # rows of 896: Q4_K -> Q5_0, Q6_K -> Q8_0; ffn_down rows 4864 = 19 * 256
        embd="Q8_0", q="Q5_0", k="Q5_0", v=("Q8_0", "Q5_0"), o="Q5_0", gate="Q5_0", up="Q5_0", down=("Q6_K", "Q4_K")
    ),
    ("q4_k_m", "gemma-3-1b"): dict(  # rows of 1152 fall back; attn_output reads 4 heads x 256 = 1024
        embd="Q8_0", q="Q5_0", k="Q5_0", v=("Q8_0", "Q5_0"), o="Q4_K", gate="Q5_0", up="Q5_0", down=("Q6_K", "Q4_K")
    ),
    ("q4_k_m", "mistral-7b"): dict(  # untied: token_embd keeps the default, output gets Q6_K
        embd="Q4_K",
        output="Q6_K",
        q="Q4_K",
        k="Q4_K",
        v=("Q6_K", "Q4_K"),
        o="Q4_K",
        gate="Q4_K",
        up="Q4_K",
        down=("Q6_K", "Q4_K"),
    ),
    ("q5_k_m", "qwen2.5-0.5b"): dict(  # Q5_K -> Q5_1 on rows of 896
        embd="Q8_0", q="Q5_1", k="Q5_1", v=("Q8_0", "Q5_1"), o="Q5_1", gate="Q5_1", up="Q5_1", down=("Q6_K", "Q5_K")
    ),
    ("q5_k_m", "mistral-7b"): dict(
        embd="Q5_K",
        output="Q6_K",
        q="Q5_K",
        k="Q5_K",
        v=("Q6_K", "Q5_K"),
        o="Q5_K",
        gate="Q5_K",
        up="Q5_K",
        down=("Q6_K", "Q5_K"),
    ),
    ("q6_k", "gemma-3-1b"): dict(  # Q6_K -> Q8_0 on rows of 1152; no per-layer bumps
        embd="Q8_0", q="Q8_0", k="Q8_0", v="Q8_0", o="Q6_K", gate="Q8_0", up="Q8_0", down="Q6_K"
    ),
    ("q6_k", "llama-3.2-1b"): dict(
        embd="Q6_K", q="Q6_K", k="Q6_K", v="Q6_K", o="Q6_K", gate="Q6_K", up="Q6_K", down="Q6_K"
    ),
    # q4_0: the output rule picks Q6_K (Q4_0 is not Q8_0 and the row is a multiple of Q4_0's 32)
    ("q4_0", "llama-3.2-1b"): dict(  # tied: token_embd is the output
        embd="Q6_K", q="Q4_0", k="Q4_0", v="Q4_0", o="Q4_0", gate="Q4_0", up="Q4_0", down="Q4_0"
    ),
    ("q4_0", "qwen2.5-0.5b"): dict(  # Q6_K -> Q8_0 on rows of 896
        embd="Q8_0", q="Q4_0", k="Q4_0", v="Q4_0", o="Q4_0", gate="Q4_0", up="Q4_0", down="Q4_0"
    ),
    ("q4_0", "mistral-7b"): dict(  # untied: token_embd keeps the default Q4_0
        embd="Q4_0", output="Q6_K", q="Q4_0", k="Q4_0", v="Q4_0", o="Q4_0", gate="Q4_0", up="Q4_0", down="Q4_0"
    ),
}


def tensors(geometry: str):
    """[(GGUF name, shape (out, in), kind)] of a checkpoint of that geometry, norms and biases included."""
    n, D, F, q, kv, tied, vocab = GEOMETRIES[geometry]
    out = [("token_embd.weight", (vocab, D), "embd"), ("output_norm.weight", (D,), None)]
    if not tied:
        out.append(("output.weight", (vocab, D), "output"))
    for i in range(n):
        shapes = {"q": (q, D), "k": (kv, D), "v": (kv, D), "o": (D, q), "gate": (F, D), "up": (F, D), "down": (D, F)}
        names = dict(q="attn_q", k="attn_k", v="attn_v", o="attn_output", gate="ffn_gate", up="ffn_up", down="ffn_down")
        out += [(f"blk.{i}.{names[k]}.weight", s, k) for k, s in shapes.items()]
        out += [(f"blk.{i}.attn_norm.weight", (D,), None), (f"blk.{i}.ffn_norm.weight", (D,), None)]
        out += [(f"blk.{i}.attn_q.bias", (q,), None)]
    return out


@pytest.mark.parametrize("recipe, geometry", sorted(EXPECTED))
def test_recipe_assigns_llama_cpp_types(recipe, geometry):
    want, n_layer, tied = EXPECTED[(recipe, geometry)], GEOMETRIES[geometry][0], GEOMETRIES[geometry][5]
    for name, shape, kind in tensors(geometry):
        expected = "F32" if kind is None else want[kind]
        if isinstance(expected, tuple):
            expected = expected[0] if int(name.split(".")[1]) in MORE_BITS[geometry] else expected[1]
        assert recipe_type(name, shape, recipe, n_layer, has_output=not tied) == expected, name


def test_fallbacks_past_32_and_the_70b_rule():
    assert recipe_type("blk.0.ffn_down.weight", (64, 80), "q4_k_m", 6, True) == "F16"  # not even 32 divides 80
    assert recipe_type("blk.0.ffn_down.weight", (64, 96), "q5_k_m", 6, True) == "Q5_1"
    assert recipe_type("token_embd.weight", (1000, 80), "q6_k", 6, False) == "F16"
    # Llama 2/3 70B: 80 layers, 8 kv heads; attn_v of a layer without more bits goes Q4_K -> Q5_K
    assert recipe_type("blk.40.attn_v.weight", (1024, 8192), "q4_k_m", 80, True, llm_70b=True) == "Q5_K"
    assert recipe_type("blk.40.attn_v.weight", (1024, 8192), "q4_k_m", 80, True) == "Q4_K"


def test_gguf_module_wires_the_recipe_and_file_types():
    """tensor_qtype reads layer count and tying from the ModelConfig; general.file_type is llama.cpp's."""
    from minilora.models.config import ModelConfig

    cfg = ModelConfig.from_name("smollm2-135m")  # hidden 576: every projection reading it falls back to Q5_0
    T = gguf.GGMLQuantizationType
    assert G.tensor_qtype("token_embd.weight", (cfg.vocab_size, 576), "q4_k_m", cfg) == T.Q8_0
    assert G.tensor_qtype("blk.5.ffn_down.weight", (576, 1536), "q4_k_m", cfg) == T.Q6_K
    assert G.tensor_qtype("blk.6.ffn_down.weight", (576, 1536), "q4_k_m", cfg) == T.Q4_K
    assert G.tensor_qtype("blk.6.attn_v.weight", (192, 576), "q4_k_m", cfg) == T.Q5_0
    assert G.tensor_qtype("blk.6.attn_v.weight", (192, 576), "q4_0", cfg) == T.Q4_0
    F = gguf.LlamaFileType
    assert [G.file_type(t) for t in ("q4_k_m", "q5_k_m", "q6_k")] == [F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M, F.MOSTLY_Q6_K]
    assert [int(G.file_type(t)) for t in ("q4_k_m", "q5_k_m", "q6_k", "q4_0")] == [15, 17, 18, 2]
    assert G.tensor_qtype("token_embd.weight", (cfg.vocab_size, 576), "q4_0", cfg) == T.Q8_0  # Q6_K falls back
    assert G.tensor_qtype("blk.0.ffn_down.weight", (576, 80), "q4_0", cfg) == T.F16  # 80 % 32 != 0


def test_q4_k_m_file_end_to_end(tmp_path):
    """A Llama with rows of 256 and 512 and untied embeddings: real Q4_K and Q6_K blocks in the file."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.05,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    run = _run(tmp_path, transformers.LlamaForCausalLM(cfg))
    from minilora.export import merge as E

    out, lines = str(tmp_path / "m.gguf"), []
    E.export_adapter(run, out, fmt="gguf", gguf_type="q4_k_m", log=lines.append)  # validation on: must pass
    assert any(line.startswith("validation (gguf q4_k_m)") for line in lines)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 15
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    # n = 2: use_more_bits holds for layer 1 only (1 >= 7 * 2 // 8)
    want = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_K"}
    want.update({"blk.1.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"})
    want.update({"blk.0.attn_q.weight": "Q4_K", "blk.1.ffn_up.weight": "Q4_K", "blk.0.attn_norm.weight": "F32"})
    assert {k: got[k] for k in want} == want


def _run(tmp_path, hf) -> str:
    """A saved base with the bundled tokenizer and a train.py-shaped run with a random LoRA adapter."""
    from minilora.lora.adapter import save_adapter
    from minilora.lora.surgery import apply_lora, lora_modules
    from minilora.models.loader import load_model

    base = str(tmp_path / "base")
    hf.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, f), os.path.join(base, f))
    model, _ = load_model(base, quantize=None, dtype=torch.float32)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.0, seed=0, verbose=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "run" / "adapter"), base)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": base, "quantize": "none", "dtype": "float32"}))
    return str(tmp_path / "run")
