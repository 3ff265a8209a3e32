"""Per-tensor GGML types of the llama-quantize recipes (--gguf-type q4_k_m / q5_k_m / q6_k / q4_0), as
llama.cpp's llama-quantize assigns them (llama-quant.cpp: llama_model_quantize_impl and
llama_tensor_get_type), and the writers minilora uses for the types it quantizes itself.

Quantized at all: a tensor whose name ends in "weight", with 2 or more dimensions, that is not a norm
(`*_norm.weight`). Everything else (norms, biases, rope factors) stays F32.

Type of a quantized tensor, T being the recipe's default (q4_k_m: Q4_K, q5_k_m: Q5_K, q6_k: Q6_K,
q4_0: Q4_0), the rules in llama.cpp's order:
  output.weight, or token_embd.weight when the file has no output.weight (tied embeddings):
      Q8_0 when the row length is not a multiple of T's block (256; Q4_0: 32), else Q6_K (so a q4_0
      file's output is Q6_K, or Q8_0 by the fallback below when its rows are not a multiple of 256)
  blk.i.attn_v.weight:  Q6_K when q4_k_m / q5_k_m and use_more_bits(i, n_layer), else T;
                        then, in a "70B" model (llama.cpp's LLM_TYPE_70B: a llama with 80 layers and
                        grouped kv heads, or a qwen2 with 80 layers), Q4_K becomes Q5_K
  blk.i.ffn_down.weight:  Q6_K when q4_k_m / q5_k_m and use_more_bits(i, n_layer), else T
  anything else (an untied token_embd.weight included, in q4_0 too): T
with use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division): the first
and last eighth of the layers and every third layer between. llama.cpp counts attn_v and ffn_down
tensors in its loader's order, which sorts by block number, so its counter is the block number i.

Fallback, when the row length (GGUF ne[0], the in-features K) is not a multiple of the type's block:
    Q4_K -> Q5_0,  Q5_K -> Q5_1,  Q6_K -> Q8_0,  then F16 when K is not a multiple of 32 either
    (Q4_0, Q8_0: F16 directly).
So a model whose hidden size is not a multiple of 256 (SmolLM2-135M: 576, Gemma 3 1B: 1152,
Qwen2.5-0.5B: 896) gets Q5_0 (q4_k_m) or Q5_1 (q5_k_m) or Q8_0 (q6_k) for every projection that reads
the hidden state. (For an output tensor that lands on Q8_0 with K % 32 != 0, llama-quantize stops with
"unsupported tensor size"; we write F16, the converter's fallback.)

general.file_type: LlamaFileType MOSTLY_Q4_K_M (15), MOSTLY_Q5_K_M (17), MOSTLY_Q6_K (18), MOSTLY_Q4_0 (2).
(q8_0 is no recipe: llama-quantize and the converter both write every 2-D weight Q8_0.)
"""

from __future__ import annotations

import re

BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_0": 32}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
RECIPES = {  # --gguf-type -> (default type T, gguf.LlamaFileType member)
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers whose attn_v / ffn_down get Q6_K in the _M recipes."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_llm_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B for the architectures minilora writes (llama-model.cpp load_hparams)."""
    return n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))


def recipe_type(
    name: str, shape: tuple[int, ...], recipe: str, n_layer: int, has_output: bool, llm_70b: bool = False
) -> str:
    """The GGML type name (e.g. "Q4_K") llama-quantize gives the GGUF tensor `name` of `shape`
    (transformers order: shape[-1] is the row length) under `recipe` (the table in the docstring)."""
    if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
        return "F32"
    default = RECIPES[recipe][0]
    want, row = default, shape[-1]
    block = re.match(r"blk\.(\d+)\.", name)
    layer = int(block.group(1)) if block else -1
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        want = "Q8_0" if row % BLOCK[default] else "Q6_K"
    elif "attn_v.weight" in name:
        if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            want = "Q6_K"
        if llm_70b and want == "Q4_K":
            want = "Q5_K"
    elif "ffn_down" in name:
        if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            want = "Q6_K"
    if row % BLOCK[want]:
        want = FALLBACK.get(want, want)
        if row % BLOCK[want]:
            want = "F16"
    return want


def our_writer(type_name: str):
    """float32 array (..., K) -> GGUF bytes, for the types minilora quantizes itself (K-quants and
    their 5-bit fallbacks); None for the rest (gguf's own quantizers write F16, BF16, Q8_0, Q4_0)."""
    from minilora.export import kquants, q5_quants

    if type_name in kquants.TYPE_SIZE:
        return lambda x: kquants.quantize(x, type_name)
    if type_name in q5_quants.TYPE_SIZE:
        return lambda x: q5_quants.quantize(x, type_name)
    return None
