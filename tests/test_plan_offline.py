"""`train.py --plan` reads config.json and the data and downloads nothing: for a preset it runs with the
hub unreachable and an empty cache (config.json from the preset's table, token counts estimated from
the bytes and labelled as estimates), counts tokens exactly with a tokenizer the cache already holds,
and writes nothing anywhere.

Each plan runs as the user runs it, `python train.py` in a subprocess, because huggingface_hub reads
HF_HOME and HF_HUB_OFFLINE when it is imported."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from minilora.data.encode import render_raw
from minilora.data.prepare import prepare_data
from minilora.data.token_estimate import ByteCountTokenizer
from minilora.models.config import ModelConfig
from minilora.models.presets import PRESETS
from minilora.models.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "demo", "train.jsonl")
TOK_DIR = os.path.join(ROOT, "examples", "tokenizer")


def plan(tmp_path, hf_home, *args):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--plan", "--data", DATA, "--out", str(out), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert not out.exists()  # --plan writes nothing
    return p.stdout


def summary_value(stdout: str, key: str) -> int:
    return int(re.search(rf"\b{key}=(\d+)", stdout).group(1))


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_plan_for_a_preset_needs_no_download_and_says_its_token_counts_are_estimates(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    stdout = plan(tmp_path, hf_home, "--model", "smollm2-135m")
    assert "plan for cpu (smollm2-135m)" in stdout and "predicted peak" in stdout
    assert "token counts are estimated as UTF-8 bytes / 4" in stdout and "data (estimated): " in stdout
    assert files_under(hf_home) == []  # nothing fetched or cached
    # the estimate, independently: ceil(bytes / 4) tokens for the raw prompt and for the completion,
    # plus BOS and EOS, over the examples that stay in the training split
    kept = prepare_data(DATA, ByteCountTokenizer(), template="raw", max_seq_len=512).train_examples
    lengths = [2 + -(-len(render_raw(e.prompt).encode()) // 4) + -(-len(e.completion.encode()) // 4) for e in kept]
    assert summary_value(stdout, "train_tokens") == sum(lengths) and summary_value(stdout, "max_len") == max(lengths)


def test_plan_for_a_preset_counts_tokens_with_a_tokenizer_already_in_the_cache(tmp_path):
    """A tokenizer in the Hugging Face cache (the layout huggingface_hub writes) is used, read only."""
    hf_home = tmp_path / "hf_home"
    repo = PRESETS["smollm2-135m"]["hf_repo"]
    entry = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(TOK_DIR, entry / "snapshots" / commit)
    before = files_under(hf_home)
    stdout = plan(tmp_path, hf_home, "--model", "smollm2-135m")
    assert "estimated" not in stdout and "template: chat (--template auto: the tokenizer has a chat template)" in stdout
    want = prepare_data(DATA, Tokenizer.from_dir(TOK_DIR), template="chat", max_seq_len=512).summary
    assert summary_value(stdout, "train_tokens") == want["train_tokens"]
    assert summary_value(stdout, "max_len") == want["max_len"]
    assert files_under(hf_home) == before
    # and its config.json, when the cache holds one, is what the plan reads (as the run would)
    (entry / "snapshots" / commit / "config.json").write_text(json.dumps({**smollm2_config(), "num_hidden_layers": 2}))
    two_layers = plan(tmp_path, hf_home, "--model", "smollm2-135m")
    assert base_mib(two_layers) == pytest.approx(base_mib(stdout) * 2 / 30, abs=0.1)  # printed to 0.1 MiB


def base_mib(stdout: str) -> float:
    return float(re.search(r"base weights \(NF4 codes \+ quant state\)\s+([\d.,]+)", stdout).group(1))


def smollm2_config() -> dict:
    """SmolLM2-135M's config.json keys the loader reads (the values of the preset's table)."""
    p = ModelConfig.from_name("smollm2-135m")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": p.rms_norm_eps,
        "max_position_embeddings": p.max_position_embeddings,
        "tie_word_embeddings": p.tie_word_embeddings,
        "rope_theta": p.rope_theta,
        "bos_token_id": p.bos_token_id,
        "eos_token_id": p.eos_token_ids[0],
        "hidden_act": "silu",
    }
