"""save_adapter never deletes what it did not write, and load_adapter changes the model wholly or not at all:
an empty path, the current folder or one above it, a link, a path inside a file and a folder holding a
user's files are refused before anything is written (an earlier adapter's folder is still replaced whole);
an adapter that does not fit is refused before any tensor is copied (the model keeps its outputs); a
hand-edited adapter_config.json is read as PEFT reads it (its defaults for missing fields) or refused in one
sentence naming the file and the field; a file path or a missing folder is named as such."""

import copy
import json
import os

import pytest
import torch
from cli_runs import temps, tree
from peft import PeftModel
from test_adapter import logits, randomize_params, tiny_llama

from minilora.lora.adapter import AdapterError, load_adapter, save_adapter
from minilora.lora.adapter_files import read_adapter_config
from minilora.lora.surgery import apply_lora, lora_modules, lora_state_dict
from minilora.models import load_model

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 60, 17]])


def tiny(lora=True, r=4, **kw):
    model, _ = load_model("tiny", quantize=None, dtype=torch.float32)
    model.eval()
    if lora:
        apply_lora(model, r=r, alpha=2 * r, dropout=0.0, seed=0, verbose=False, **kw)
    return model


def trained(**kw):
    """A tiny model whose adapter changes its outputs (B != 0)."""
    model = tiny(**kw)
    randomize_params(lora_state_dict(model).values(), 7)
    return model


def out(model):
    with torch.no_grad():
        return model(TOKENS)


def sentence(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# ------------------------------------------------------------------------------- save_adapter's target
def test_a_folder_holding_a_users_files_is_refused_and_kept(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "adapter_config.json").write_text("{}")  # an adapter's name does not make the folder one
    with pytest.raises(AdapterError, match="notes.txt, which save_adapter did not write") as e:
        save_adapter(trained(), str(folder), "tiny")
    assert str(folder) in sentence(e)
    assert tree(folder) == {"notes.txt": b"mine", "adapter_config.json": b"{}"}
    assert sorted(os.listdir(tmp_path)) == ["u"]  # refused before anything was written


def test_the_current_folder_and_those_above_it_are_refused(tmp_path, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    os.symlink(here, tmp_path / "link")
    monkeypatch.chdir(here)
    model = trained()
    for target in [".", str(here), "..", str(tmp_path), "/", str(tmp_path / "link"), str(here) + "/"]:
        with pytest.raises(AdapterError, match="current folder or one above it") as e:
            save_adapter(model, target, "tiny")
        sentence(e)
    for target in ["", "  "]:
        with pytest.raises(AdapterError, match="path is empty") as e:
            save_adapter(model, target, "tiny")
        sentence(e)
    assert tree(here) == {"notes.txt": b"mine"} and sorted(os.listdir(tmp_path)) == ["link", "work"]
    save_adapter(model, "adapter", "tiny")  # a new folder inside the current one is fine
    assert sorted(os.listdir(here / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_link_a_file_and_a_path_inside_a_file_are_refused(tmp_path):
    model = trained()
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    (tmp_path / "file").write_text("mine")
    cases = [
        (tmp_path / "link", "is a symbolic link"),
        (tmp_path / "file", "is not a directory"),
        (tmp_path / "file" / "adapter", "lies inside the file"),
    ]
    for target, pattern in cases:
        with pytest.raises(AdapterError, match=pattern) as e:
            save_adapter(model, str(target), "tiny")
        sentence(e)
    assert (tmp_path / "file").read_text() == "mine" and os.path.islink(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "real"]


def test_an_earlier_adapter_folder_is_replaced_whole(tmp_path):
    """What train.py does at the end of a run and again after a resume: RUN/adapter replaced, RUN kept."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    adapter = run / "adapter"
    first, second = trained(), tiny()
    save_adapter(first, str(adapter), "tiny")
    before = tree(adapter)
    randomize_params(lora_state_dict(second).values(), 8)
    save_adapter(second, str(adapter), "tiny")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tree(adapter)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    loaded = tiny(lora=False)
    load_adapter(loaded, str(adapter))
    torch.testing.assert_close(out(loaded), out(second), rtol=0, atol=0)
    assert sorted(os.listdir(run)) == ["adapter", "checkpoints", "config.json"] and not temps(run)
    with pytest.raises(AdapterError, match="config.json.*which save_adapter did not write") as e:
        save_adapter(second, str(run), "tiny")  # the run folder is not an adapter's
    sentence(e)
    (tmp_path / "empty").mkdir()
    save_adapter(second, str(tmp_path / "empty"), "tiny")  # an empty folder loses nothing
    assert sorted(os.listdir(tmp_path / "empty")) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------- a refused load changes nothing
def test_an_adapter_with_another_rank_on_one_module_is_refused_before_any_copy(tmp_path):
    last = sorted(lora_modules(tiny()))[-1]
    src = trained(ranks={last: 8})
    save_adapter(src, str(tmp_path / "a"), "tiny")
    model = trained()
    before, weights = out(model), {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(AdapterError, match=rf"{last} has rank 8 in the adapter but rank 4 in this model") as e:
        load_adapter(model, str(tmp_path / "a"))
    assert "different base" not in sentence(e) and "without LoRA layers" in str(e.value)
    torch.testing.assert_close(out(model), before, rtol=0, atol=0)
    assert all(torch.equal(v, weights[k]) for k, v in lora_state_dict(model).items())
    fresh = tiny(lora=False)  # what the message says to do
    load_adapter(fresh, str(tmp_path / "a"))
    torch.testing.assert_close(out(fresh), out(src), rtol=0, atol=0)


def test_a_refused_load_into_a_model_without_lora_adds_no_layers(tmp_path):
    """DoRA magnitudes under a config saying use_dora false: refused before apply_lora changes the model."""
    save_adapter(trained(use_dora=True), str(tmp_path / "d"), "tiny")
    path = tmp_path / "d" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": False}))
    model = tiny(lora=False)
    before = out(model)
    with pytest.raises(AdapterError, match="lora_magnitude_vector.*use_dora false") as e:
        load_adapter(model, str(tmp_path / "d"))
    sentence(e)
    assert not lora_modules(model)
    torch.testing.assert_close(out(model), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------- adapter_config.json fields
def test_missing_fields_take_peft_defaults_as_peft_reads_them(tmp_path):
    hf = tiny_llama()
    ours = copy.deepcopy(hf)
    apply_lora(ours, ["q_proj", "v_proj"], r=4, alpha=16, dropout=0.0, verbose=False)
    randomize_params(lora_state_dict(ours).values(), 9)
    save_adapter(ours, str(tmp_path / "a"), "tiny-llama")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        del cfg[key]
    path.write_text(json.dumps(cfg))
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()  # the oracle: lora_alpha 8
    mine = copy.deepcopy(hf)
    got = load_adapter(mine, str(tmp_path / "a"))
    torch.testing.assert_close(logits(mine.eval()), logits(pm), rtol=1e-5, atol=1e-5)
    assert got["lora_alpha"] == 8 and {m.alpha for m in lora_modules(mine).values()} == {8}
    assert not torch.allclose(logits(mine), logits(ours), atol=1e-3)  # alpha 8, not the 16 it was saved with


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_alpha", "16"),
        ("lora_alpha", None),
        ("lora_alpha", True),
        ("lora_dropout", "x"),
        ("lora_dropout", 1.5),
        ("lora_dropout", None),
        ("use_dora", "false"),
        ("use_rslora", 1),
        ("rank_pattern", {"q_proj": "2"}),
        ("rank_pattern", {"(": 2}),
        ("alpha_pattern", ["q_proj"]),
    ],
)
def test_a_field_of_the_wrong_kind_is_one_sentence_naming_file_and_field(tmp_path, key, value):
    save_adapter(trained(), str(tmp_path / "a"), "tiny")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    for model in (tiny(lora=False), trained()):
        before = out(model)
        with pytest.raises(AdapterError, match=rf"adapter_config.json has {key}=.*but {key} must be") as e:
            load_adapter(model, str(tmp_path / "a"))
        assert str(path) in sentence(e)
        torch.testing.assert_close(out(model), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------- where the adapter is
def test_a_file_path_and_a_missing_folder_are_named_as_such(tmp_path):
    save_adapter(trained(), str(tmp_path / "a"), "tiny")
    config = str(tmp_path / "a" / "adapter_config.json")
    for read in (lambda p: load_adapter(tiny(lora=False), p), read_adapter_config):
        with pytest.raises(AdapterError, match="is a file; pass the adapter's folder") as e:
            read(config)
        assert sentence(e).startswith(config + " is a file")
        with pytest.raises(FileNotFoundError) as e:
            read(str(tmp_path / "nowhere"))
        assert sentence(e).startswith(f"{tmp_path / 'nowhere'} does not exist; pass a folder")
