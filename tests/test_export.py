"""minilora.export.merge against transformers and bitsandbytes (the oracles), on tiny models built here.

- merged checkpoint: transformers' from_pretrained loads it and its logits equal our model with the
  LoRA adapter unmerged (float32; dense or NF4 base, LoRA / rsLoRA / DoRA, Gemma 3 / Llama, sharded);
- 4-bit checkpoint: bitsandbytes loads it pre-quantized: the same packed codes and quant state as
  our NF4 model of the merged weights, and the same logits;
- the quant-state tensors equal bitsandbytes' own QuantState.as_dict(packed=True), byte for byte;
- config.json round-trips every preset; writes are atomic and never replace a user's folder.
"""

import json
import os
import shutil

import bitsandbytes as bnb
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM  # noqa: E402

from minilora.export import bnb as bnb_export
from minilora.export import hf_checkpoint
from minilora.export import merge as E
from minilora.lora.adapter import save_adapter
from minilora.lora.surgery import apply_lora, lora_modules
from minilora.models.config import ModelConfig
from minilora.models.hf_config import from_hf_config
from minilora.models.loader import load_model
from minilora.models.presets import PRESETS
from minilora.quant.nf4 import quantize_nf4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")


def _load_eval_cli():
    """eval.py is a script at the repository root, not an installed module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilora_eval_cli", os.path.join(ROOT, "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


eval_cli = _load_eval_cli()


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def hf_base(family: str, vocab: int = 97, D: int = 32, F: int = 48, seed: int = 0, tie: bool = True):
    """A random transformers model with non-identity norms (so a wrong norm convention shows)."""
    torch.manual_seed(seed)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=D // 4,
            sliding_window=3,
            query_pre_attn_scalar=D // 4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=4.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4},
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            },
            initializer_range=0.1,
        )  # non-default RoPE bases: a config key lost in export would show
        hf = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
            initializer_range=0.1,
            rope_theta=5e5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        )
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return hf.eval()


def add_lora(model, r=4, use_rslora=False, use_dora=False, seed=0):
    """LoRA on every block linear with a random (non-zero) B, so the adapter changes the output."""
    apply_lora(
        model,
        "all-linear",
        r=r,
        alpha=2 * r,
        dropout=0.0,
        use_rslora=use_rslora,
        use_dora=use_dora,
        seed=seed,
        verbose=False,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
            if use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------- merged export
@settings(max_examples=12)  # each example merges, writes a checkpoint and loads it in transformers
@given(
    family=st.sampled_from(["gemma3", "llama"]),
    quantize=st.sampled_from([None, "nf4"]),
    kind=st.sampled_from(["lora", "rslora", "dora"]),
    tie=st.booleans(),
    sharded=st.booleans(),
    r=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_merged_export_loads_in_transformers_with_the_adapted_logits(
    tmp_path_factory, family, quantize, kind, tie, sharded, r, seed
):
    base = tmp_path_factory.mktemp("base")
    hf_base(family, tie=tie, seed=seed).save_pretrained(base)
    ours, _ = load_model(str(base), quantize=quantize, dtype=torch.float32)
    add_lora(ours, r=r, use_rslora=kind == "rslora", use_dora=kind == "dora", seed=seed)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ours(ids)
    E.merge_to_dense(ours, torch.float32)
    out = str(tmp_path_factory.mktemp("out") / "merged")
    hf_checkpoint.write_checkpoint(
        out,
        E.dense_tensors(ours, torch.float32),
        E.to_hf_config(ours.config, None, torch.float32),
        max_shard_bytes=20_000 if sharded else 2**30,
    )
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == sharded
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert rel_err(want, got) < 2e-5


def _make_run(tmp_path, quantize: str, vocab: int):
    """A base checkpoint folder (tiny transformers Llama + the bundled tokenizer) and a train.py-like
    run directory: adapter/ (PEFT layout) + config.json."""
    base = tmp_path / "base"
    hf_base("llama", vocab=vocab, D=64, F=128, tie=False, seed=5).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, f), base / f)
    model, _ = load_model(str(base), quantize=quantize, dtype=torch.float32)
    add_lora(model, r=4, seed=1)
    run = tmp_path / "run"
    save_adapter(model, str(run / "adapter"), str(base))
    (run / "config.json").write_text(
        json.dumps({"model": str(base), "quantize": quantize or "none", "dtype": "float32"})
    )
    return str(base), str(run), model


def test_export_cli_float32_and_bfloat16(tmp_path, capsys):
    """`eval.py export` end to end: adapter -> merged checkpoint that transformers loads as is,
    with the tokenizer (chat template included) and generation config beside it."""
    base, run, model = _make_run(tmp_path, None, vocab=1024)
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    out = str(tmp_path / "merged32")
    assert eval_cli.main(["export", "--adapter", run, "--out", out, "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(want, hf(ids).logits) < 2e-5
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    rendered = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2

    out16 = str(tmp_path / "merged16")  # the default dtype is bf16
    assert eval_cli.main(["export", "--adapter", os.path.join(run, "adapter"), "--out", out16]) == 0
    hf16 = AutoModelForCausalLM.from_pretrained(out16)  # dtype from config.json
    assert hf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_err(want, hf16(ids).logits.float()) < 3e-2
    assert "wrote" in capsys.readouterr().out


def _no_bf16_cpu_kernel(hf):
    """bitsandbytes' CPU Linear4bit repacks weights for an AVX512-BF16 kernel at the first forward
    (computing in bf16); the generic path dequantizes and multiplies in the compute dtype."""
    for m in hf.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def test_4bit_export_loads_prequantized_in_bitsandbytes(tmp_path):
    """A QLoRA run (NF4 base): the 4-bit export is the merged model quantized to NF4. transformers +
    bitsandbytes load the packed codes as written (no requantization): they equal our NF4 model of
    the merged float32 export byte for byte, and the logits agree."""
    base, run, _ = _make_run(tmp_path, "nf4", vocab=1024)
    dense, q4 = str(tmp_path / "dense"), str(tmp_path / "q4")
    assert eval_cli.main(["export", "--adapter", run, "--out", dense, "--dtype", "float32"]) == 0
    assert eval_cli.main(["export", "--adapter", run, "--out", q4, "--dtype", "float32", "--quantize-4bit"]) == 0
    qc = json.load(open(os.path.join(q4, "config.json")))["quantization_config"]
    assert (qc["quant_method"], qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == (
        "bitsandbytes",
        "nf4",
        True,
    )
    hf = AutoModelForCausalLM.from_pretrained(q4, device_map="cpu")
    ours, _ = load_model(dense, quantize="nf4", dtype=torch.float32)
    n_linear = 0
    for name, m in hf.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mine = ours.get_submodule(name)
            qs = m.weight.quant_state
            assert torch.equal(m.weight.data.view(-1), mine.weight_packed), name
            assert torch.equal(qs.absmax, mine.weight_absmax) and torch.equal(qs.state2.absmax, mine.weight_absmax2)
            assert qs.offset.item() == mine.weight_offset.item() and qs.quant_type == "nf4" and qs.blocksize == 64
            n_linear += 1
    assert n_linear == 2 * 7  # every block linear; lm_head and embeddings stay dense
    _no_bf16_cpu_kernel(hf)
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


@settings(max_examples=20)  # each example merges, writes a checkpoint and loads it in transformers
@given(
    shape=st.sampled_from([(7,), (33, 5), (64, 64), (3, 130), (300, 257)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    blocksize=st.sampled_from([32, 64, 256]),
    double_quant=st.booleans(),
    seed=st.integers(0, 99),
)
def test_quant_state_tensors_equal_bitsandbytes_serialization(shape, dtype, blocksize, double_quant, seed):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    _, state = q.to_bnb()
    want = state.as_dict(packed=True)
    got = bnb_export.bnb_quant_state(q, "")
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trips_every_preset(name):
    cfg = ModelConfig.from_name(name)
    back = from_hf_config(json.loads(json.dumps(E.to_hf_config(cfg))), name=name)
    skip = {"name", "hf_repo", "source_architecture", "bos_token_id", "pad_token_id", "eos_token_ids"}
    for field in cfg.__dataclass_fields__:
        if field not in skip:
            assert getattr(back, field) == getattr(cfg, field), field
    assert (back.bos_token_id, back.pad_token_id, back.eos_token_ids) == (
        cfg.bos_token_id,
        cfg.pad_token_id,
        cfg.eos_token_ids,
    )


# ------------------------------------------------------------------------------- atomic writes
def test_write_refuses_a_users_folder_and_is_atomic(tmp_path, monkeypatch):
    """A folder holding a file the export did not write is never replaced, --overwrite or not; an
    earlier export (its marker lists every file) is replaced whole, or, when the write fails, kept."""
    import safetensors.torch

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    tensors, cfg = {"a": torch.ones(3)}, {"model_type": "llama"}
    for overwrite in (False, True):
        with pytest.raises(E.ExportError, match=r"has no .minilora-export.json, so it is not an export's folder"):
            hf_checkpoint.write_checkpoint(str(out), tensors, cfg, overwrite=overwrite)
    assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    hf_checkpoint.write_checkpoint(str(out), tensors, cfg)  # an empty folder may be written
    with pytest.raises(E.ExportError, match="is not empty; choose another folder or pass --overwrite"):
        hf_checkpoint.write_checkpoint(str(out), tensors, cfg)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf_checkpoint.write_checkpoint(str(out), tensors, cfg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # untouched, no temporary folder left
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    monkeypatch.undo()
    hf_checkpoint.write_checkpoint(str(out), tensors, {"model_type": "gemma3_text"}, overwrite=True)
    assert sorted(os.listdir(out)) == [".minilora-export.json", "config.json", "model.safetensors"]
    assert json.load(open(out / "config.json"))["model_type"] == "gemma3_text"
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700: a server may read it
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp or old folder left behind
