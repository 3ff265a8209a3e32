"""The task gate after an export (minilora/export/gate.py) on a tiny model trained here on a learnable task.

The oracle for "does the export still do the task" is the task itself: exact match of greedy
completions against the eval data's references, the merged model generating with minilora, the export
as transformers reads it (its GGUF loader dequantizing with gguf's code) generating with transformers.

The model: a 4-layer Llama (hidden 64) whose LoRA adapter learns to complete "item NN is" with one of
eight words, 32 pairs, trained to every pair right. Its block linears start on Q4_0's grid (a base
kept at 4 bits), so the fine-tune lives in deltas of the order of Q4_0's step: q4_0 rounds most of
them back onto the base and loses most of the task, an extreme form of what 4-bit rounding does to a
fine-tune whose deltas are small against the weights; q8_0 (a grid 16x finer) keeps them all. A
q4_k_m file of this geometry (rows of 64, not 256) is llama.cpp's Q5_0 fallback with Q8_0 for
output and two layers' attn_v / ffn_down, and keeps more of the task than q4_0.
"""

import json
import os
import random
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers

from minilora.data.encode import encode_example
from minilora.data.records import Example
from minilora.export import gate as GATE
from minilora.export import merge as E
from minilora.export import readback as V
from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.surgery import apply_lora
from minilora.models.loader import is_block_linear, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def _on_q4_0_grid(w: torch.Tensor) -> torch.Tensor:
    q = gguf.GGMLQuantizationType.Q4_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.detach().numpy(), q), q)).reshape(w.shape)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A train.py-shaped run folder: base/, adapter/ (trained), eval.jsonl, config.json naming it."""
    tmp = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.3,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.copy_(_on_q4_0_grid(p))
    base = str(tmp / "base")
    hf.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, f), os.path.join(base, f))

    rng = random.Random(0)
    examples = [Example(f"item {i:02d} is", " " + rng.choice(WORDS), "prompt_completion", "t") for i in range(32)]
    data = tmp / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in examples))

    model, tok = load_model(base, quantize=None, dtype=torch.float32)
    assert all(torch.equal(p, _on_q4_0_grid(p)) for n, p in model.named_parameters() if is_block_linear(n))
    apply_lora(model, "all-linear", r=8, alpha=16, dropout=0.0, seed=0, verbose=False)
    enc = [encode_example(e, tok, "raw") for e in examples]
    T = max(len(e.input_ids) for e in enc)
    ids = torch.tensor([e.input_ids + [tok.pad_id] * (T - len(e.input_ids)) for e in enc])  # (B, T), right padded
    labels = torch.tensor([e.labels + [-100] * (T - len(e.labels)) for e in enc])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range(60):  # full batch: 32 pairs learned to exact match 1.0
        logits = model(ids)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, str(tmp / "run" / "adapter"), base)
    run_cfg = {"model": base, "quantize": "none", "dtype": "float32", "template": "raw", "eval_data": str(data)}
    (tmp / "run" / "config.json").write_text(json.dumps(run_cfg))
    return str(tmp / "run")


def _export(run, out, gguf_type, **kw):
    """(error or None, log lines) of export_adapter with validation and the gate on."""
    lines = []
    try:
        E.export_adapter(run, out, fmt="gguf", gguf_type=gguf_type, log=lines.append, **kw)
    except GATE.QualityGateError as e:
        return e, lines
    return None, lines


def _gate_scores(lines) -> tuple[float, float]:
    """(merged, export) exact match from the gate's log line."""
    line = next(x for x in lines if x.startswith("task gate ("))
    a, b = re.search(r"exact match ([\d.]+)% -> ([\d.]+)%", line).groups()
    return float(a), float(b)


def test_q4_0_fails_the_gate_where_q8_0_passes(run, tmp_path):
    err8, log8 = _export(run, str(tmp_path / "q8.gguf"), "q8_0")
    assert err8 is None and _gate_scores(log8) == (100.0, 100.0)
    err4, log4 = _export(run, str(tmp_path / "q4.gguf"), "q4_0")
    merged, q4 = _gate_scores(log4)
    assert merged == 100.0 and q4 < 80.0  # readback's logit check passed first: the file holds what was written
    assert any(x.startswith("validation (gguf q4_0)") for x in log4)
    msg = str(err4)
    assert f"{100 - q4:.1f} points worse than the merged model" in msg and "--gguf-type q4_k_m" in msg
    assert "32 examples of" in msg and msg.count(". ") == 0
    err_km, log_km = _export(run, str(tmp_path / "km.gguf"), "q4_k_m", max_quality_drop=100.0)
    assert err_km is None and _gate_scores(log_km)[1] > q4  # the K-quant recipe keeps more of the task


def test_cli_gate_flags(run, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilora_eval_cli_gate", os.path.join(ROOT, "eval.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["export", "--adapter", run, "--format", "gguf", "--gguf-type", "q4_0", "--gate-examples", "16"]
    assert cli.main(argv + ["--out", str(tmp_path / "a.gguf")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "points worse" in last and "16 examples of" in last
    assert cli.main(argv + ["--out", str(tmp_path / "b.gguf"), "--max-quality-drop", "100"]) == 0
    assert "task gate (gguf q4_0) on 16 examples" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "c.gguf"), "--no-validate"]) == 2  # a gate flag it would skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == "error: --gate-examples set the task gate, which --no-validate skips; drop --gate-examples or --no-validate."
    )
    plain = ["export", "--adapter", run, "--format", "gguf", "--gguf-type", "q4_0", "--no-validate"]
    assert cli.main(plain + ["--out", str(tmp_path / "c.gguf")]) == 0
    assert "task gate" not in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "d.gguf"), "--gate-examples", "0"]) == 0
    assert "task gate: skipped, --gate-examples 0" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "e.gguf"), "--max-quality-drop", "-1"]) == 2
    assert not os.path.exists(tmp_path / "e.gguf")


def test_gate_passes_f16_and_fails_a_damaged_export(run, tmp_path):
    """f16 passes through export_adapter; the same file with every ffn_down zeroed fails the gate itself
    (called directly: readback's logit check would stop it first)."""
    out = str(tmp_path / "f16.gguf")
    err, lines = _export(run, out, "f16")
    assert err is None and _gate_scores(lines) == (100.0, 100.0)

    run_cfg = json.load(open(os.path.join(run, "config.json")))
    model, tok = load_model(run_cfg["model"], quantize=None, dtype=torch.float32)
    load_adapter(model, os.path.join(run, "adapter"))
    E.merge_to_dense(model, torch.float32)
    examples, template, source = GATE.gate_examples(run_cfg, tok, 40)
    merged = GATE.score_merged(model, tok, examples, template)
    hf_config = E.to_hf_config(model.config, tok, torch.float32)
    intact = GATE.score_export(V.reload("gguf", out, hf_config), tok, examples, template)
    GATE.check(out, "f16", merged, intact, source, 5.0, "")  # passes: no exception

    reader = gguf.GGUFReader(out, "r+")
    for t in reader.tensors:
        if "ffn_down" in t.name:
            t.data[...] = np.zeros_like(t.data)
    del reader
    damaged = GATE.score_export(V.reload("gguf", out, hf_config), tok, examples, template)
    with pytest.raises(GATE.QualityGateError, match=r"points worse than the merged model .*--format hf --dtype"):
        GATE.check(out, "f16", merged, damaged, source, 5.0, GATE.advice("gguf", "f16", None))


def test_gate_without_eval_data_is_skipped_with_a_reason(run, tmp_path):
    cfg = json.load(open(os.path.join(run, "config.json")))
    tok = load_model(cfg["model"], quantize=None, dtype=torch.float32)[1]
    assert GATE.gate_examples({**cfg, "eval_data": None}, tok, 40)[0] is None
    missing = GATE.gate_examples({**cfg, "eval_data": str(tmp_path / "nope.jsonl")}, tok, 40)
    assert missing[0] is None and "is not there" in missing[2]
    assert len(GATE.gate_examples(cfg, tok, 5)[0]) == 5


def test_gate_runs_on_a_hugging_face_checkpoint_too(run, tmp_path):
    """A bf16 checkpoint folder, read back by transformers' from_pretrained and generating with it."""
    lines = []
    E.export_adapter(run, str(tmp_path / "hf"), dtype="bfloat16", log=lines.append)
    assert _gate_scores(lines) == (100.0, 100.0)
    assert GATE.advice("hf", "f16", "bfloat16") == "export --dtype float32 instead"
    assert GATE.advice("nf4", "f16", "bfloat16") == "export without --quantize-4bit instead"
