"""bitsandbytes' serialized NF4 layout for a merged export (from_pretrained loads it pre-quantized).

Shape letters: M out_features, K in_features, n = M*K weight elements, nb = ceil(n / blocksize) NF4
blocks, nb2 = ceil(nb / 256) second-level blocks. For every block linear `L` (embeddings, norms and
lm_head stay in the export dtype, as bitsandbytes leaves them):
  L.weight                                 uint8 (ceil(n/2), 1)  NF4 codes, two per byte
  L.weight.absmax                          uint8 (nb,)    8-bit codes of the block absmax
  L.weight.quant_map                       float32 (16,)  the NF4 table
  L.weight.nested_absmax                   float32 (nb2,)
  L.weight.nested_quant_map                float32 (256,) the signed dynamic 8-bit map
  L.weight.quant_state.bitsandbytes__nf4   uint8 bytes of the JSON {quant_type, blocksize, dtype,
                                           shape, nested_blocksize, nested_dtype, nested_offset}
plus `quantization_config` in config.json. The codes come from minilora.quant.nf4.quantize_nf4, which is
bit-exact with bitsandbytes.
"""

from __future__ import annotations

import json

import torch

from minilora.dtypes import DTYPE_NAMES
from minilora.models.loader import is_block_linear


def quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict:
    """The quantization_config transformers writes for a bitsandbytes NF4 model."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def bnb_quant_state(q, prefix: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' QuantState.as_dict(packed=True) for an NF4Tensor, keys prefixed by `prefix`.

    Written without importing bitsandbytes (not a runtime dependency); tests compare it byte for
    byte with bitsandbytes' own serialization of the same state.
    """
    from minilora.quant.maps import dynamic_map, nf4_code
    from minilora.quant.nf4 import BLOCKSIZE2

    out = {prefix + "absmax": q.absmax, prefix + "quant_map": nf4_code("cpu")}
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": DTYPE_NAMES[q.dtype], "shape": list(q.shape)}
    if q.double_quant:
        out[prefix + "nested_absmax"] = q.absmax2
        out[prefix + "nested_quant_map"] = dynamic_map(True).clone()
        meta.update({"nested_blocksize": BLOCKSIZE2, "nested_dtype": "float32", "nested_offset": float(q.offset)})
    blob = json.dumps(meta).encode("utf-8")  # bitsandbytes' pack_dict_to_tensor: json.dumps -> uint8 bytes
    out[prefix + "quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def bnb_4bit_tensors(
    dense: dict[str, torch.Tensor], blocksize: int = 64, double_quant: bool = True
) -> dict[str, torch.Tensor]:
    """Dense tensors -> bitsandbytes' serialized 4-bit layout (block linears quantized to NF4).

    Each weight is quantized in the dtype it is stored in, exactly as minilora's loader with
    quantize="nf4" (and bitsandbytes' from_pretrained(load_in_4bit)) would quantize it.
    """
    from minilora.quant.nf4 import quantize_nf4

    out = {}
    for name, t in dense.items():
        if not is_block_linear(name):
            out[name] = t
            continue
        q = quantize_nf4(t, blocksize=blocksize, double_quant=double_quant)
        out[name] = q.packed.reshape(-1, 1)  # (ceil(n/2), 1) uint8
        out.update(bnb_quant_state(q, name + "."))
    return out


def nf4_round_trip(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight bitsandbytes reconstructs (dequantizing to `dtype`) from the NF4 export of `w`,
    which is quantized in the dtype it is stored in."""
    from minilora.quant.linear import dequantize_nf4
    from minilora.quant.nf4 import quantize_nf4

    return dequantize_nf4(quantize_nf4(w, blocksize=blocksize, double_quant=double_quant), dtype=dtype)
