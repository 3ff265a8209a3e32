"""A run's compute dtype has one home: train.py resolves `--dtype auto` once and records it as
config.json's "resolved_dtype"; eval.py and the export read that record instead of resolving "auto"
again on whatever machine reads the run. Oracle: the merge of an NF4 base quantized from the
recorded dtype, computed here from the checkpoint's weights."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_export import add_lora, eval_cli, hf_base

from minilora.dtypes import run_dtype
from minilora.export import merge as E
from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.surgery import lora_modules
from minilora.models import loader


def bf16_units(monkeypatch, present: bool):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: present)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: present)


def make_run(tmp_path, resolved: str):
    """A float32-stored checkpoint, and a QLoRA run on it whose config.json says it computed in `resolved`."""
    base = str(tmp_path / "base")
    hf_base("llama", tie=False).save_pretrained(base)  # float32 safetensors
    model, _ = loader.load_model(base, quantize="nf4", dtype=getattr(torch, resolved))
    add_lora(model, r=4, seed=3)
    run = tmp_path / "run"
    save_adapter(model, str(run / "adapter"), base_model_name_or_path=base)
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    config = {"model": base, "quantize": "nf4", "dtype": "auto", "resolved_dtype": resolved, "eval_data": str(test)}
    (run / "config.json").write_text(json.dumps(config))
    return base, str(run)


def test_run_dtype_is_the_recorded_one_whatever_this_machine_resolves(monkeypatch):
    for present in (False, True):
        bf16_units(monkeypatch, present)
        assert run_dtype({"dtype": "auto", "resolved_dtype": "bfloat16"}) == torch.bfloat16
        assert run_dtype({"dtype": "auto", "resolved_dtype": "float32"}) == torch.float32
        assert run_dtype({"dtype": "auto"}) == (torch.bfloat16 if present else torch.float32)  # no record: as train.py


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("units,resolved", [(False, "bfloat16"), (True, "float32")])
def test_eval_loads_the_base_in_the_dtype_the_run_trained_in(tmp_path, monkeypatch, units, resolved):
    _, run = make_run(tmp_path, resolved)
    bf16_units(monkeypatch, units)  # this machine would resolve "auto" to the other dtype
    seen = {}

    def spy(name, quantize, dtype, device):
        seen.update(quantize=quantize, dtype=dtype)
        raise _Loaded

    monkeypatch.setattr(loader, "load_model", spy)
    with pytest.raises(_Loaded):
        eval_cli.main(["--adapter", run, "--shots", "0", "--device", "cpu"])
    assert seen == {"quantize": "nf4", "dtype": getattr(torch, resolved)}


def test_export_on_a_bf16_cpu_merges_into_the_base_the_run_trained_and_eval_scored(tmp_path, monkeypatch):
    base, run = make_run(tmp_path, "bfloat16")
    bf16_units(monkeypatch, True)
    out = str(tmp_path / "merged")
    E.export_adapter(run, out, dtype="float32", validate=False, log=lambda *a: None)
    got = load_file(os.path.join(out, "model.safetensors"))

    # what eval.py scored: the NF4 base quantized from the bf16 weights, with the adapter
    scored, _ = loader.load_model(base, quantize="nf4", dtype=torch.bfloat16)
    load_adapter(scored, os.path.join(run, "adapter"))
    modules = lora_modules(scored)
    assert modules
    for name, m in modules.items():
        want = m.merged_weight(m.base.dequantized_weight(torch.float32))  # (M, K) float32
        assert torch.equal(got[f"{name}.weight"], want), name
