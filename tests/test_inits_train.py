"""--init and --lora-plus-ratio in train.py: a resumed run equals the uninterrupted one bit for bit for
every weight-aware init (the init is recomputed identically, then the checkpoint's A, B replace it);
the PiSSA / OLoRA adapter train.py writes loads in PEFT onto the ORIGINAL transformers model with the
logits of the model minilora trained; config.json records the learning rates; what cannot work is
refused in one sentence before anything is written (FSDP included)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE
from minilora.parallel.distributed import check_parallel
from minilora.parallel.errors import ParallelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--eval-generate", "0", "--eval-every", "0", "--threads", "1", "--log-every", "1", "--save-every", "0"]
SHORT = ["--max-steps", "4", "--batch-size", "4", "--lora-dropout", "0.1", "--lora-r", "4", "--lora-alpha", "8"]
# (init, extra flags): QPiSSA (randomized SVD, residual quantized), PiSSA and OLoRA on a float32 dense base
# (the PEFT comparison below), LoftQ with two alternations and LoRA+
CASES = {
    "pissa_niter_2": ["--quantize", "nf4"],
    "pissa": ["--quantize", "none", "--dtype", "float32"],
    "olora": ["--quantize", "none", "--dtype", "float32", "--lora-plus-ratio", "4"],
    "loftq": ["--quantize", "nf4", "--loftq-iters", "2", "--lora-plus-ratio", "16"],
    # EVA with ranks redistributed (rho 2): a resume rebuilds the ranks from RUN/eva_ranks.json
    "eva": ["--quantize", "none", "--dtype", "float32", "--eva-rho", "2"],
}


def train(out, *args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, *args]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """init -> (uninterrupted run, interrupted-and-resumed run), trained on first use."""
    done = {}

    def get(init):
        if init not in done:
            root = tmp_path_factory.mktemp(init)
            args = [*SHORT, "--init", init, *CASES[init]]
            train(root / "full", *args)
            p = train(root / "cut", *args, "--debug-interrupt-at-step", "2", check=False)
            assert p.returncode == EXIT_INTERRUPTED, p.stdout[-2000:] + p.stderr[-3000:]
            train(root / "cut", "--resume")  # every flag from the run's config.json
            done[init] = root / "full", root / "cut"
        return done[init]

    return get


@pytest.mark.parametrize("init", sorted(CASES))
def test_resume_is_bitwise_for_every_init(runs, init):
    full, cut = runs(init)
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # dropout on: the RNG state is part of the checkpoint, and the init is recomputed
        assert a[step] == b[step], (init, step, a[step], b[step])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with open(full / "adapter" / name, "rb") as f, open(cut / "adapter" / name, "rb") as g:
            assert f.read() == g.read(), name
    cfg = json.load(open(full / "config.json"))
    ratio = dict(zip(CASES[init][::2], CASES[init][1::2])).get("--lora-plus-ratio", "0")
    lr = cfg["lr"]
    assert cfg["init"] == init and cfg["resolved"]["learning_rates"] == {
        "lora_A": lr,
        "lora_B": lr * (float(ratio) or 1),
    }


def _hf_twin(model, tok):
    """transformers' Gemma 3 with the weights of minilora's tiny model (as tests/test_train.py builds it)."""
    import transformers

    from minilora.export.merge import to_hf_config

    hf_cfg = to_hf_config(model.config, tok, torch.float32)
    drop = ("architectures", "model_type", "torch_dtype", "dtype")
    hf = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**{k: v for k, v in hf_cfg.items() if k not in drop})
    )
    missing, unexpected = hf.eval().load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_written_adapter_loads_in_peft_on_the_original_model(runs, init):
    """adapter/ (rank 2r, for the original weights) in PEFT on the original transformers model gives the
    logits of minilora's trained model: the residual base (the init recomputed as train.py does) with
    the trained rank-r A, B of the last checkpoint."""
    import peft

    from minilora.lora.adapter import load_adapter
    from minilora.lora.surgery import apply_lora
    from minilora.models.loader import load_model

    full, _ = runs(init)
    cfg = json.load(open(full / "adapter" / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    original, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(_hf_twin(original, tok), str(full / "adapter")).eval()
    trained = load_model("tiny", quantize=None, dtype=torch.float32)[0]
    apply_lora(trained, r=4, alpha=8, dropout=0.1, init=init, seed=0, verbose=False)
    load_adapter(trained, str(full / "checkpoints" / "step_0000004" / "adapter"))
    ids = torch.randint(3, tok.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = trained.eval()(ids), hf(ids).logits, original(ids)
    assert not torch.allclose(want, before, atol=1e-3)  # training moved the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eva_adapter_loads_in_peft_with_its_ranks_and_equals_minilora(runs):
    """adapter/ of an EVA run with ranks redistributed (rank_pattern, alpha_pattern, eva_config) in PEFT on
    the transformers model gives the logits of minilora's model with the same adapter loaded."""
    import peft

    from minilora.lora.adapter import load_adapter
    from minilora.lora.eva import RANKS_FILE
    from minilora.models.loader import load_model

    full, cut = runs("eva")
    cfg = json.load(open(full / "adapter" / "adapter_config.json"))
    ranks = json.load(open(full / RANKS_FILE))
    assert cfg["init_lora_weights"] == "eva" and cfg["eva_config"]["rho"] == 2.0
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) == 4 * len(ranks)  # redistributed, r per layer
    assert json.load(open(cut / RANKS_FILE)) == ranks
    base, tok = load_model("tiny", quantize=None, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(_hf_twin(base, tok), str(full / "adapter")).eval()
    trained = load_model("tiny", quantize=None, dtype=torch.float32)[0]
    load_adapter(trained, str(full / "adapter"))
    ids = torch.randint(3, tok.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = trained.eval()(ids), hf(ids).logits, base(ids)
    assert not torch.allclose(want, before, atol=1e-3)  # training moved the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init", "pissa", "--use-dora"], "--init pissa is not supported with --use-dora"),
        (["--init", "loftq", "--quantize", "none"], "--init loftq fits the adapter to the NF4 quantization error"),
        (["--init", "svd"], "--init svd is unknown; use one of default, gaussian, pissa, pissa_niter_N, olora, loftq"),
        (["--init", "loftq", "--loftq-iters", "0"], "--loftq-iters must be at least 1"),
        (["--lora-plus-ratio", "-2"], "--lora-plus-ratio must be at least 0"),
        (["--init", "olora", "--lora-r", "33"], "--lora-r 33 on model.layers.0.self_attn.k_proj: init 'olora' takes"),
        (["--init", "eva", "--objective", "dpo"], "--init eva fits A to the inputs of SFT batches, not preference"),
        (["--init", "eva", "--lora-r", "40", "--eva-rho", "2"], "init 'eva' takes round(r x rho) = 80 directions"),
        (["--init", "eva", "--eva-rho", "0.5"], "--eva-rho must be in [1, 1000] (got 0.5)"),
        (["--init", "eva", "--lora-r", "64", "--batch-size", "1"], "--init eva needs a batch of at least 64 labelled"),
    ],
)
def test_bad_init_flags_end_in_one_sentence_before_any_write(tmp_path, capsys, args, message):
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilora_train_cli", os.path.join(ROOT, "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "run"
    code = cli.main(["--out", str(out), *FAST, "--max-steps", "1", *args])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert message in line and line.endswith(".") and line.startswith("error: "), line
    assert not out.exists()  # refused before the run folder exists


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "eva"])
def test_fsdp_refuses_weight_aware_inits_naming_them(init):
    with pytest.raises(ParallelError) as e:
        check_parallel("fsdp", True, 32, False, init)
    msg = str(e.value)
    assert f"--init {init} is not supported with --parallel fsdp" in msg and msg.endswith(".")
    check_parallel("fsdp", True, 32, False, "gaussian")  # the random inits shard as before
    check_parallel("ddp", True, 32, False, init)  # every DDP rank computes the same init


def test_plan_says_eva_costs_forward_passes_before_step_1(tmp_path):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--plan", "--init", "eva", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--init eva: before step 1, forward passes without backward over training batches" in p.stdout
    assert not (tmp_path / "r").exists()
