"""GGUF export against llama.cpp's own `gguf` package and transformers' GGUF loader (the oracles).

Tiny random transformers checkpoints of every family in FAMILIES (Llama and Gemma 3 in both
config.json dialects; a family the models add is one line there) get a random LoRA adapter, and:
- transformers' GGUF loader (gguf_file=...) reads our f16/bf16/q8_0/q4_0 file back to the merged
  checkpoint's logits, the reference weights being the merged ones passed through gguf's own
  quantize -> dequantize (see test_gguf_logits_equal_merged_checkpoint for the tolerance);
- the tokenizer read from the GGUF encodes text exactly as tokenizer.json does;
- gguf's GGUFReader reads back the metadata llama.cpp's converter writes for that config;
- validation catches a damaged file; the GGUF LoRA's tensors equal the adapter's;
- bad input: an unmappable model, an existing --out, an interrupted write.
"""

import json
import math
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.export import gguf as G  # noqa: E402
from minilora.export import merge as E  # noqa: E402
from minilora.export.readback import ValidationError  # noqa: E402
from minilora.lora.adapter import save_adapter  # noqa: E402
from minilora.lora.surgery import apply_lora, lora_modules  # noqa: E402
from minilora.models.config import ModelConfig  # noqa: E402
from minilora.models.hf_config import from_hf_config  # noqa: E402
from minilora.models.loader import load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")
VOCAB = 1024  # the bundled byte-level BPE tokenizer's size


# ------------------------------------------------------------------------------- tiny checkpoints
def _llama(seed):
    """Rows a multiple of 64: bitsandbytes 0.50's CPU dequantize_4bit misplaces blocks that straddle
    rows (its own quantize/dequantize round trip of a (64, 96) weight errs 4x the NF4 bound)."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gemma3(seed):
    """llama.cpp's Gemma 3: every 6th layer global, sliding rope base 10000, scale hd**-0.5. The MLP
    width 80 is not a multiple of 32, so down_proj takes the F16 fallback in q8_0 / q4_0 files."""
    types = ["sliding_attention"] * 5 + ["full_attention"]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=types,
        final_logit_softcapping=30.0,
        max_position_embeddings=256,
        initializer_range=0.1,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.Gemma3ForCausalLM(cfg)


def _qwen2(seed):  # q/k/v carry biases (llama.cpp: blk.N.attn_q.bias, not permuted)
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            initializer_range=0.1,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _qwen3(seed):  # q_norm / k_norm per head (llama.cpp: attn_q_norm / attn_k_norm)
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            initializer_range=0.1,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _mistral(seed):  # llama.cpp runs Mistral as llama (q/k rows permuted)
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            initializer_range=0.1,
            max_position_embeddings=256,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _to_transformers4(cfg: dict) -> dict:
    """The same config in the transformers-4 dialect hub checkpoints carry."""
    rope = cfg.pop("rope_parameters")
    if "full_attention" in rope:  # Gemma 3
        full, local = dict(rope["full_attention"]), rope["sliding_attention"]
        cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
        cfg["rope_scaling"] = full
        cfg["sliding_window_pattern"] = 6
        cfg.pop("layer_types")
    else:
        rope = dict(rope)
        cfg["rope_theta"], cfg["rope_scaling"] = rope.pop("rope_theta"), rope
    return cfg


# family -> (transformers model builder, rewrite config.json into the transformers-4 dialect?)
FAMILIES = {
    "llama-t5": (_llama, False),
    "llama-t4": (_llama, True),
    "gemma3-t5": (_gemma3, False),
    "gemma3-t4": (_gemma3, True),
}


def _model_family_exists(family: str) -> bool:
    try:
        ModelConfig(family=family, num_attention_heads=4, num_key_value_heads=2)
    except ValueError:
        return False
    return True


# Families minilora's models/ adds: tested here as soon as ModelConfig knows them.
FAMILIES.update(
    {
        f"{name}-t5": (build, False)
        for name, build in (("qwen2", _qwen2), ("qwen3", _qwen3), ("mistral", _mistral))
        if _model_family_exists(name)
    }
)


def make_spm_tokenizer(out_dir, vocab_size=400):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing

    """A Gemma-style SentencePiece BPE tokenizer.json trained here: <pad> <eos> <bos> <unk> <mask>, turn
    markers, 256 byte-fallback tokens, then merged pieces in merge order."""
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "naïve café 12345 67890",
        "Hello  world\\t tabs",
        "日本語のテキスト",
        "def f(x):\\n    return x * 2",
    ] * 20
    t = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    json.dump(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True},
        open(os.path.join(out_dir, "tokenizer_config.json"), "w"),
    )
    return len(pieces)


def make_base(path, family: str, seed: int = 0, tok_dir: str = TOK_DIR) -> str:
    """A saved tiny checkpoint with non-identity norms (a lost Gemma norm offset shows) and the
    bundled tokenizer."""
    build, t4 = FAMILIES[family]
    torch.manual_seed(seed)
    hf = build(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(path)
    if t4:
        cfg_path = os.path.join(path, "config.json")
        cfg = _to_transformers4(json.load(open(cfg_path)))
        json.dump(cfg, open(cfg_path, "w"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))
    return str(path)


def make_run(tmp_path, family: str, seed: int = 0, use_rslora: bool = False, tok_dir: str = TOK_DIR):
    """A base checkpoint and a train.py-like run folder (adapter/ + config.json), random LoRA B."""
    base = make_base(tmp_path / "base", family, seed, tok_dir)
    model, _ = load_model(base, quantize=None, dtype=torch.float32)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.0, use_rslora=use_rslora, seed=seed, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    run = tmp_path / "run"
    save_adapter(model, str(run / "adapter"), base)
    (run / "config.json").write_text(json.dumps({"model": base, "quantize": "none", "dtype": "float32"}))
    return base, str(run)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


# ------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("gguf_type", G.GGUF_TYPES)
def test_gguf_logits_equal_merged_checkpoint(tmp_path, family, gguf_type):
    """transformers reads our GGUF back to the merged checkpoint's logits.

    Reference: the merged float32 checkpoint loaded by transformers, every weight replaced by
    gguf.quants.dequantize(gguf.quants.quantize(w)) for the type the file stores it in (f16 / bf16
    rounding, Q8_0 / Q4_0 blocks; Gemma norms as (1 + w) -> back). Both models then hold identical
    float32 weights, so the logits differ only by float32 summation order: each length-K dot product
    carries about sqrt(K) * 2^-24 relative error (< 1e-6 here), compounded over a few layers, hence
    rel <= 1e-4. A wrong name, row order (llama's q/k permutation), norm offset or damaged block moves
    the logits by O(1) of their range (test_validation_catches_damaged_files shows that). The same
    comparison against the *unrounded* weights is also asserted to be looser for q4_0 than this
    tolerance, so the reference's rounding is what the test relies on.
    """
    base, run = make_run(tmp_path, family)
    merged = str(tmp_path / "merged")
    E.export_adapter(run, merged, dtype="float32", validate=False, log=lambda m: None)
    out = str(tmp_path / f"m.{gguf_type}.gguf")
    E.export_adapter(run, out, fmt="gguf", gguf_type=gguf_type, validate=False, log=lambda m: None)

    ref = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    cfg = from_hf_config(json.load(open(os.path.join(merged, "config.json"))))
    exact = hf_logits(ref, ids := torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1)))
    transform = G.round_trip_fn(cfg, gguf_type)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(transform(name, p))
    want = hf_logits(ref, ids)
    hf_config = json.load(open(os.path.join(merged, "config.json")))
    reader = G.gguf_arch(cfg).reader_model_type  # transformers reads a Mistral GGUF as llama, as llama.cpp does
    hf_config["model_type"] = reader or hf_config["model_type"]
    config = transformers.CONFIG_MAPPING[hf_config["model_type"]](
        **{k: v for k, v in hf_config.items() if k != "model_type"}
    )
    got_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(out), config=config, dtype=torch.float32
    ).eval()
    got = hf_logits(got_model, ids)
    assert rel_err(want, got) <= 1e-4
    if gguf_type == "q4_0":
        assert rel_err(exact, got) > 1e-4  # the rounding is real: the reference had to model it


# ------------------------------------------------------------------------------- tokenizer
SAMPLE = "<bos>Hello  world\t\t 12345 <start_of_turn>user\nnaïve café 日本語 🤗   end<eos>  \n\n x 3.14159"


def test_gguf_tokenizer_encodes_like_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    base, run = make_run(tmp_path, "llama-t5")
    out = str(tmp_path / "m.gguf")
    E.export_adapter(run, out, fmt="gguf", validate=False, log=lambda m: None)
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ref = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    assert ours(SAMPLE)["input_ids"] == ref.encode(SAMPLE, add_special_tokens=True).ids
    assert ours.decode(ours(SAMPLE)["input_ids"]) == ref.decode(ref.encode(SAMPLE).ids, skip_special_tokens=False)
    template = json.load(open(os.path.join(TOK_DIR, "tokenizer_config.json")))["chat_template"]
    assert ours.chat_template == template


# ------------------------------------------------------------------------------- metadata
def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_metadata_is_what_llama_cpp_writes(tmp_path, family):
    """Every key llama.cpp's converter writes for this config, read back with gguf's GGUFReader,
    against values taken from the checkpoint's config.json here (not from minilora's ModelConfig)."""
    base, run = make_run(tmp_path, family)
    out = str(tmp_path / "m.gguf")
    E.export_adapter(run, out, fmt="gguf", gguf_type="q8_0", validate=False, log=lambda m: None)
    c = json.load(open(os.path.join(base, "config.json")))
    rope = c.get("rope_parameters") or {}
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    arch = G.ARCHS[family.split("-")[0]].arch
    want = {
        "general.architecture": arch,
        "general.type": "model",
        "general.file_type": 7,
        "general.quantization_version": 2,
        f"{arch}.context_length": c["max_position_embeddings"],
        f"{arch}.embedding_length": c["hidden_size"],
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.block_count": c["num_hidden_layers"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.attention.head_count_kv": c["num_key_value_heads"],
        f"{arch}.attention.key_length": hd,
        f"{arch}.attention.value_length": hd,
        f"{arch}.attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    if arch != "gemma3":
        theta = c.get("rope_theta", rope.get("rope_theta"))
        want[f"{arch}.rope.freq_base"] = theta
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        want.update({f"{arch}.vocab_size": c["vocab_size"], f"{arch}.rope.dimension_count": hd})
    if arch == "gemma3":
        theta = c.get("rope_theta", rope.get("full_attention", {}).get("rope_theta"))
        scaling = c.get("rope_scaling") or {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
        want.update(
            {
                f"{arch}.rope.freq_base": theta,
                f"{arch}.rope.scaling.type": "linear",
                f"{arch}.rope.scaling.factor": scaling["factor"],
                f"{arch}.attention.sliding_window": c["sliding_window"],
                f"{arch}.final_logit_softcapping": c["final_logit_softcapping"],
            }
        )
    reader = gguf.GGUFReader(out)
    for key, value in want.items():
        got = _field(reader, key)
        assert math.isclose(got, value, rel_tol=1e-6) if isinstance(value, float) else got == value, key
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = json.load(open(os.path.join(base, "tokenizer.json")))["model"]["vocab"]
    assert len(tokens) == c["vocab_size"] and all(tokens[i] == t for t, i in vocab.items())
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not c.get("tie_word_embeddings", arch == "gemma3"))
    if (c.get("rope_scaling") or rope).get(
        "rope_type"
    ) == "llama3":  # llama3 rope scaling travels as llama.cpp's rope_freqs tensor: f_default / f_llama3
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_cfg = transformers.AutoConfig.from_pretrained(base)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        plain = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        f = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        torch.testing.assert_close(
            torch.from_numpy(np.array(f.data)).double(), plain / scaled.double(), rtol=1e-5, atol=0
        )


_TOKENIZERS = {}


def _tokenizer_pair(tmp_path_factory, kind: str):
    """(tokenizer transformers builds from our GGUF, tokenizer.json's own), built once per kind:
    the bundled byte-level BPE, or a Gemma-style SentencePiece BPE (byte fallback) trained here."""
    if kind not in _TOKENIZERS:
        from tokenizers import Tokenizer

        tmp = tmp_path_factory.mktemp("tok")
        tok_dir = TOK_DIR
        if kind == "sentencepiece":
            tok_dir = str(tmp / "spm")
            make_spm_tokenizer(tok_dir)
        elif kind in ("llama-bpe", "qwen2"):  # the bundled vocabulary behind Llama 3's / Qwen 2's split regex
            from minilora.export.gguf_vocab import PRE_TOKENIZERS

            tok_dir = str(tmp / kind)
            shutil.copytree(TOK_DIR, tok_dir)
            regex = next(r for r, name in PRE_TOKENIZERS.items() if name == kind)
            tj = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
            tj["pre_tokenizer"] = {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            }
            json.dump(tj, open(os.path.join(tok_dir, "tokenizer.json"), "w"))
        base, run = make_run(tmp, "gemma3-t5", tok_dir=tok_dir)
        E.export_adapter(run, str(tmp / "m.gguf"), fmt="gguf", gguf_type="q4_0", validate=False, log=lambda m: None)
        _TOKENIZERS[kind] = (
            transformers.AutoTokenizer.from_pretrained(str(tmp), gguf_file="m.gguf"),
            Tokenizer.from_file(os.path.join(base, "tokenizer.json")),
        )
    return _TOKENIZERS[kind]


@settings(max_examples=25)
@given(
    kind=st.sampled_from(["byte-level", "llama-bpe", "qwen2", "sentencepiece"]),
    text=st.lists(
        st.sampled_from(
            [
                "<bos>",
                "<eos>",
                "<start_of_turn>",
                "<end_of_turn>",
                "<pad>",
                " ",
                "  ",
                "\t",
                "\n",
                "\n\n",
                "0",
                "42",
                "31415926",
                "ab",
                "Hello",
                "naïve",
                "日本",
                "🤗",
                "ß",
                "'s",
                "'LL",
                "x.y",
                "-",
                "  \n ",
                "quick",
                "fox",
                "\r\n",
            ]
        ),
        max_size=20,
    ).map("".join),
)
def test_gguf_tokenizer_matches_on_drawn_text(tmp_path_factory, kind, text):
    ours, ref = _tokenizer_pair(tmp_path_factory, kind)
    assert ours(text)["input_ids"] == ref.encode(text, add_special_tokens=True).ids


def test_sentencepiece_vocab_fields(tmp_path_factory):
    """Byte tokens typed BYTE, <unk> UNKNOWN, scores ordered as tokenizer.json's merges, no space prefix."""
    ours, ref = _tokenizer_pair(tmp_path_factory, "sentencepiece")
    path = next(p for p in tmp_path_factory.getbasetemp().rglob("m.gguf") if (p.parent / "spm").is_dir())
    reader = gguf.GGUFReader(str(path))
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert (
        _field(reader, "tokenizer.ggml.model") == "llama" and _field(reader, "tokenizer.ggml.add_space_prefix") is False
    )
    assert [types[tokens.index(f"<0x{b:02X}>")] for b in range(256)] == [6] * 256
    assert types[tokens.index("<unk>")] == 2 and types[tokens.index("<bos>")] == 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(ref.to_str())["model"]["merges"]]
    formed = [m.replace(" ", "") for m in merges]
    firsts = list(dict.fromkeys(formed))  # each formed token at its first merge, in merge order
    got = [scores[tokens.index(t)] for t in firsts]
    assert got == sorted(got, reverse=True) and len(set(got)) == len(got)


@settings(max_examples=25)
@given(
    h_kv=st.integers(1, 4),
    group=st.integers(1, 3),
    half=st.integers(1, 8),
    k=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 99),
)
def test_qk_row_order_is_what_transformers_undoes(h_kv, group, half, k, bias, seed):
    """transformers' GGUF loader un-permutes llama q/k rows; our permutation must be its inverse."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    h = h_kv * group
    undo = LlamaTensorProcessor(config={"num_attention_heads": h, "num_key_value_heads": h_kv})
    g = torch.Generator().manual_seed(seed)
    for n_head, name in ((h, "blk.0.attn_q.weight"), (h_kv, "blk.0.attn_k.weight")):
        w = torch.randn((n_head * 2 * half,) if bias else (n_head * 2 * half, k), generator=g)
        back = undo.process(G.permute_rows(w, n_head).numpy(), name).weights
        assert np.array_equal(back, w.numpy())


# ------------------------------------------------------------------------------- validation
def _merged(tmp_path, family, dtype=torch.float32):
    """The merged model as export_adapter holds it (loaded and merged in `dtype`)."""
    base, run = make_run(tmp_path, family)
    model, tok = load_model(base, quantize=None, dtype=dtype)
    from minilora.lora.adapter import load_adapter

    load_adapter(model, os.path.join(run, "adapter"))
    E.merge_to_dense(model, dtype)
    return base, run, model, tok


def _flip_tensor_bytes(path, name):
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + 7)
        byte = f.read(1)
        f.seek(int(t.data_offset) + 7)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("damage", ["flipped bytes", "missing tensor"])
@pytest.mark.parametrize("family", ["llama-t5", "gemma3-t4"])
def test_validation_catches_damaged_gguf(tmp_path, family, damage):
    base, run = make_run(tmp_path, family)
    out = str(tmp_path / "m.gguf")
    E.export_adapter(run, out, fmt="gguf", gguf_type="q8_0", validate=False, log=lambda m: None)
    hf_config = E.to_hf_config(load_model(base, quantize=None, dtype=torch.float32)[0].config, None, torch.float32)

    def fresh():
        _, _, model, tok = _merged(tmp_path / f"m{len(os.listdir(tmp_path))}", family)
        return model, tok

    model, tok = fresh()
    E.validate_export(out, "gguf", model, tok, hf_config, {}, "q8_0", log=lambda m: None)  # intact: passes
    if damage == "flipped bytes":
        _flip_tensor_bytes(out, "blk.0.attn_q.weight")
    else:
        reader = gguf.GGUFReader(out)
        kept = [(t.name, np.array(t.data), t.tensor_type) for t in reader.tensors if t.name != "blk.1.ffn_down.weight"]
        meta = {}
        G.write_gguf(out, reader.fields["general.architecture"].contents(), meta, kept, overwrite=True)
    model, tok = fresh()
    with pytest.raises(ValidationError, match="do not serve it"):
        E.validate_export(out, "gguf", model, tok, hf_config, {}, "q8_0", log=lambda m: None)


@pytest.mark.parametrize("kind", ["hf", "nf4"])
def test_validation_catches_damaged_hf_checkpoint(tmp_path, kind):
    """A bf16 checkpoint (NF4: bitsandbytes' layout) passes as written and fails with one weight changed."""
    from safetensors.torch import load_file, save_file

    base, run = make_run(tmp_path, "llama-t5")
    out = str(tmp_path / "hf")
    E.export_adapter(run, out, dtype="bfloat16", quantize_4bit=kind == "nf4", validate=False, log=lambda m: None)
    hf_config = json.load(open(os.path.join(out, "config.json")))
    _, _, model, tok = _merged(tmp_path / "a", "llama-t5", torch.bfloat16)
    E.validate_export(out, kind, model, tok, hf_config, {}, log=lambda m: None)
    weights = load_file(os.path.join(out, "model.safetensors"))
    w = weights["model.layers.1.mlp.up_proj.weight"]
    if kind == "nf4":
        w[5] ^= 0x77  # two NF4 codes of one byte
    else:
        w[3, 5] += 1.0
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    _, _, model, tok = _merged(tmp_path / "b", "llama-t5", torch.bfloat16)
    with pytest.raises(ValidationError, match="does not reproduce the merged model"):
        E.validate_export(out, kind, model, tok, hf_config, {}, log=lambda m: None)


# ------------------------------------------------------------------------------- GGUF LoRA
@settings(max_examples=6, deadline=None)  # each example saves and converts a checkpoint (~1 s)
@given(family=st.sampled_from(sorted(FAMILIES)), use_rslora=st.booleans(), seed=st.integers(0, 50))
def test_gguf_lora_tensors_equal_the_adapters(tmp_path_factory, family, use_rslora, seed):
    """Read back with gguf's reader: lora_a = A; lora_b = B with llama's q/k rows in llama.cpp's order
    (undone here with transformers' inverse) and rsLoRA's scale folded so that alpha / r applies."""
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    tmp = tmp_path_factory.mktemp("lora")
    base, run = make_run(tmp, family, seed=seed, use_rslora=use_rslora)
    out = str(tmp / "lora.gguf")
    E.export_adapter(run, out, fmt="gguf-lora", validate=True, log=lambda m: None)
    c = json.load(open(os.path.join(base, "config.json")))
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.type") == "adapter" and _field(reader, "adapter.type") == "lora"
    assert _field(reader, "adapter.lora.alpha") == 8.0
    got = {
        t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    undo = LlamaTensorProcessor(
        config={"num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"]}
    )
    arch = G.ARCHS[family.split("-")[0]].arch
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c["num_hidden_layers"])
    adapter = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    n = 0
    for key, want in adapter.items():
        path, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        gname = names.get_name(path + ".weight", try_suffixes=(".weight",)) + (
            ".lora_a" if part == "A.weight" else ".lora_b"
        )
        t = got[gname]
        if part == "B.weight":
            if G.ARCHS[family.split("-")[0]].permute_qk and (".attn_q." in gname or ".attn_k." in gname):
                t = torch.from_numpy(undo.process(t.numpy(), gname.replace(".lora_b", "")).weights)
            if use_rslora:  # llama.cpp applies alpha / r; the adapter's scale is alpha / sqrt(r)
                t = t * (8.0 / 4) / (8.0 / math.sqrt(4))
        torch.testing.assert_close(t, want.float(), rtol=1e-6, atol=0)
        n += 1
    assert n == len(adapter) and len(got) == len(adapter)


# ------------------------------------------------------------------------------- bad input
def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilora_eval_cli_gguf", os.path.join(ROOT, "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_gguf_end_to_end_and_bad_input(tmp_path, capsys, monkeypatch):
    cli = _cli()
    base, run = make_run(tmp_path, "gemma3-t5")
    out = tmp_path / "model.gguf"
    assert cli.main(["export", "--adapter", run, "--out", str(out), "--format", "gguf", "--gguf-type", "q4_0"]) == 0
    err = capsys.readouterr().err
    assert "validation (gguf q4_0): logits max rel err" in err and "ollama create model -f" in err
    assert (tmp_path / "model.Modelfile").read_text() == f"FROM {out}\n"
    size = out.stat().st_size
    # an existing --out is refused (exit 2, one sentence) and left as it was
    assert cli.main(["export", "--adapter", run, "--out", str(out), "--format", "gguf"]) == 2
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert out.stat().st_size == size

    # interrupted while writing tensors: the old file survives, no temp file is left behind
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        E.export_adapter(run, str(out), fmt="gguf", overwrite=True, validate=False, log=lambda m: None)
    monkeypatch.undo()
    assert out.stat().st_size == size
    assert sorted(os.listdir(tmp_path)) == ["base", "model.Modelfile", "model.gguf", "run"]

    # a converter that forgets Gemma's norm offset (1 + w): validation fails the export with exit 1
    from dataclasses import replace

    monkeypatch.setitem(G.ARCHS, "gemma3", replace(G.ARCHS["gemma3"], norm_shift=0.0))
    bad = tmp_path / "bad.gguf"
    assert cli.main(["export", "--adapter", run, "--out", str(bad), "--format", "gguf", "--gguf-type", "f16"]) == 1
    assert "does not reproduce the merged model" in capsys.readouterr().err.splitlines()[-1]
    unchecked = str(tmp_path / "unchecked.gguf")  # --no-validate skips the read-back
    assert cli.main(["export", "--adapter", run, "--out", unchecked, "--format", "gguf", "--no-validate"]) == 0
    assert "validat" not in capsys.readouterr().err


def test_unmappable_model_is_refused_in_one_sentence(tmp_path, capsys, monkeypatch):
    cli = _cli()
    base, run = make_run(tmp_path, "gemma3-t5")
    cfg_path = os.path.join(base, "config.json")
    c = json.load(open(cfg_path))
    c["rope_parameters"]["sliding_attention"]["rope_theta"] = 500.0  # llama.cpp fixes 10000
    json.dump(c, open(cfg_path, "w"))
    assert cli.main(["export", "--adapter", run, "--out", str(tmp_path / "a.gguf"), "--format", "gguf"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: This gemma3 model has a sliding-layer rope base of 500") and last.count(". ") == 0
    monkeypatch.delitem(G.ARCHS, "gemma3")
    assert cli.main(["export", "--adapter", run, "--out", str(tmp_path / "a.gguf"), "--format", "gguf-lora"]) == 2
    assert "Model family 'gemma3' has no GGUF mapping" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.gguf")


def test_validation_prompts_come_from_the_runs_eval_data(tmp_path):
    """The held-out prompts, rendered as evaluation renders them; no data at all: seeded random ids."""
    from minilora.data.records import load_records
    from minilora.eval.evaluate import prompt_ids
    from minilora.export.readback import validation_prompts
    from minilora.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOK_DIR)
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": str(2 * i)}) + "\n" for i in range(6))
    )
    run_cfg = {"eval_data": str(data), "data": "/nonexistent.jsonl", "template": "chat"}
    ids, source = validation_prompts(run_cfg, tok, VOCAB)
    want = [prompt_ids(e, tok, "chat") for e in load_records(str(data), "auto")[0][:4]]
    assert ids == want and str(data) in source
    resolved = {**run_cfg, "template": "auto", "resolved": {"template": "raw"}}  # what --template auto chose
    want_raw = [prompt_ids(e, tok, "raw") for e in load_records(str(data), "auto")[0][:4]]
    assert validation_prompts(resolved, tok, VOCAB)[0] == want_raw != want
    ids2, source2 = validation_prompts({}, tok, VOCAB)
    assert len(ids2) == 4 and all(0 <= i < VOCAB for p in ids2 for i in p) and "random" in source2
    assert validation_prompts({}, tok, VOCAB)[0] == ids2  # seeded
