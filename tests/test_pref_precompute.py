"""--precompute-reference: every training pair's reference values computed once, stored in the run folder
and looked up by pair index. The stored values equal the reference forward of each pair alone (float32
rounding: other batch shapes), the run's losses equal a run with the reference forward in every step,
a resume reads the table back (not recomputed) and is bitwise, held-out pairs still use the live
reference, and the flag with another objective is one sentence."""

import os

import pytest
import torch
from cli_runs import metrics, one_sentence, train, train_here
from safetensors.torch import load_file

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE
from minilora.data.encode import EncodedExample
from minilora.data.packing import IGNORE
from minilora.data.pairs import EncodedPair, collate_pairs
from minilora.lora.surgery import apply_lora
from minilora.models.loader import load_model
from minilora.train.objectives import make_objective
from minilora.train.reference import STORED, precompute, reference_logprobs

DPO = ["--objective", "dpo", "--log-every", "1", "--save-every", "0", "--dtype", "float32", "--batch-size", "4"]
TIMING = ("tokens_per_s", "peak_mem_mb")


def test_table_equals_each_pairs_reference_alone():
    model, _ = load_model("tiny", quantize="nf4", dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(0)
    enc = lambda n: EncodedExample([1] + torch.randint(5, 500, (n,), generator=g).tolist(), [IGNORE] + [7] * n)
    pairs = [EncodedPair(enc(int(a)), enc(int(b))) for a, b in torch.randint(2, 12, (7, 2), generator=g)]
    table = precompute(model, pairs, batch_size=3, pad_id=0, chunk=5)  # batches sorted by length, padded
    for i, p in enumerate(pairs):
        alone = reference_logprobs(model, collate_pairs([[i]], pairs, 0), 5)  # (2,)
        torch.testing.assert_close(table[i], alone, rtol=1e-6, atol=1e-5)
    obj = make_objective("dpo", 5)
    obj.stored = table
    b = collate_pairs([[4], [1]], pairs, 0)
    looked_up = obj.terms(model, b)
    obj.stored = None
    torch.testing.assert_close(looked_up.loss, obj.terms(model, b).loss, rtol=1e-5, atol=1e-6)


def test_run_equals_the_live_reference_and_resumes_from_the_stored_table(tmp_path):
    args = [*DPO, "--max-steps", "6", "--lora-dropout", "0.1", "--eval-every", "3"]
    assert train(tmp_path / "live", *args).returncode == 0
    assert train(tmp_path / "full", *args, "--precompute-reference").returncode == 0
    live, full = metrics(tmp_path / "live"), metrics(tmp_path / "full")
    assert [r["step"] for r in live] == [r["step"] for r in full]
    for a, b in zip(live, full):  # the same reference values, computed in other batches
        for k in set(a) - set(TIMING) - {"step", "lr"}:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    table = load_file(str(tmp_path / "full" / STORED))["reference_logps"]
    assert table.shape == (144, 2) and table.dtype == torch.float32 and (table < 0).all()

    p = train(tmp_path / "cut", *args, "--precompute-reference", "--debug-interrupt-at-step", "2")
    assert p.returncode == EXIT_INTERRUPTED
    stored = tmp_path / "cut" / STORED
    written = os.stat(stored).st_mtime_ns
    assert train(tmp_path / "cut", *args, "--precompute-reference", "--resume").returncode == 0
    assert os.stat(stored).st_mtime_ns == written  # read back, not computed again
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(metrics(tmp_path / "cut")) == strip(full)


def test_the_flag_belongs_to_dpo(tmp_path, capsys):
    code, _, err = train_here(capsys, tmp_path / "r", "--objective", "orpo", "--precompute-reference")
    assert code == EXIT_USAGE and "--precompute-reference applies to --objective dpo" in one_sentence(err)
    assert not (tmp_path / "r").exists()
