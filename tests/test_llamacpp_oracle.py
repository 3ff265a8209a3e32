"""minilora's GGUF quantized exports against llama.cpp's own quantizer, byte for byte.

The oracle is llama.cpp itself (llama-cpp-python's llama_model_quantize, default parameters: no
imatrix, so ggml-quants.c's *_ref quantizers, and llama_tensor_get_type's recipe). It is not a
dependency of minilora and takes about 15 minutes to build (bench/README.md), so the test skips
without it. Both sides quantize the same float32 values: a tiny Llama whose weights are float16
numbers, a zero LoRA adapter (the merge adds exactly 0), our f16 GGUF as llama.cpp's input (it turns
each f16 tensor back into the same float32 values), and our own export of each type. Every tensor
must have the same GGML type and the same bytes.

The geometry has rows of 256 (hidden; K-quant blocks, Q6_K output) and of 352 (ffn_down's in-features:
11 x 32, so the K-quants' fallbacks Q5_0 / Q5_1 / Q8_0), 4 layers (use_more_bits picks layers 2 and 3)
and untied embeddings (token_embd takes the recipe's default type, output the output rule).
"""

import ctypes
import json
import os
import shutil

import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (not a minilora dependency; bench/README.md builds it)"
)
gguf = pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")
FTYPE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}


@pytest.fixture(scope="module")
def f16_run(tmp_path_factory):
    """(run folder, our f16 GGUF) of the tiny model above."""
    import transformers

    from minilora.export import merge as E
    from minilora.lora.adapter import save_adapter
    from minilora.lora.surgery import apply_lora, lora_modules
    from minilora.models.loader import load_model

    tmp = tmp_path_factory.mktemp("oracle")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.05,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())  # float16 numbers: what llama.cpp reads back from the f16 file
    base = str(tmp / "base")
    hf.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, f), os.path.join(base, f))
    model, _ = load_model(base, quantize=None, dtype=torch.float32)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.0, seed=0, verbose=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.zero_()  # W + (alpha / r) B A = W exactly
    save_adapter(model, str(tmp / "run" / "adapter"), base)
    (tmp / "run" / "config.json").write_text(json.dumps({"model": base, "quantize": "none", "dtype": "float32"}))
    f16 = str(tmp / "f16.gguf")
    E.export_adapter(str(tmp / "run"), f16, fmt="gguf", gguf_type="f16", validate=False, log=lambda m: None)
    return str(tmp / "run"), f16


def llama_quantize(src: str, dst: str, gguf_type: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[gguf_type]}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("gguf_type", sorted(FTYPE))
def test_quantized_export_matches_llama_quantize_bytes(f16_run, tmp_path, gguf_type):
    from minilora.export import merge as E

    run, f16 = f16_run
    ours, theirs = str(tmp_path / "ours.gguf"), str(tmp_path / "llama.gguf")
    E.export_adapter(run, ours, fmt="gguf", gguf_type=gguf_type, validate=False, log=lambda m: None)
    llama_quantize(f16, theirs, gguf_type)
    want = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    got = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert sorted(got) == sorted(want)
    types = {n: (t.tensor_type.name, want[n].tensor_type.name) for n, t in got.items()}
    assert {n: a for n, (a, b) in types.items() if a != b} == {}, "GGML types differ from llama-quantize's"
    assert {a for a, _ in types.values()} >= {"F32"}  # norms pass through too
    differ = [n for n, t in got.items() if t.data.tobytes() != want[n].data.tobytes()]
    assert differ == [], f"{len(differ)} of {len(got)} tensors differ from llama-quantize's bytes"
    assert gguf.GGUFReader(ours).fields["general.file_type"].contents() == getattr(
        llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[gguf_type]}"
    )
