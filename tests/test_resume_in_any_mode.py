"""A checkpoint written in any mode resumes in any mode: one process, DDP or FSDP on any number of
ranks (each rank writes its rows of the AdamW state under FSDP; each reads the rows it now holds),
with every step's loss and the final adapter of one uninterrupted process; a number of processes
that cannot take the run's micro-batches is refused with a command that works.

Few torchrun launches (the `tiny` model, 4 steps, one thread per rank: ~15 s each on 2 cores).
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_fsdp import COMMON, ROOT, assert_same_adapter, train, write_tiny_checkpoint
from test_train import losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(flags, run folder): the tiny checkpoint trained 4 steps uninterrupted by one process with
    grad-accum 2, the global batch of 2 ranks with grad-accum 1. LoRA rank 3: FSDP splits each
    lora_A's 3 rows 2 + 1 over 2 ranks, so a checkpoint's pieces are uneven."""
    tmp = tmp_path_factory.mktemp("reference")
    common = [*COMMON, "--model", write_tiny_checkpoint(tmp / "ckpt"), "--lr", "3e-3", "--lora-dropout", "0"]
    common += ["--lora-r", "3", "--lora-alpha", "6"]
    train(tmp / "one", *common, "--grad-accum", "2")
    assert sorted(losses(tmp / "one")) == [1, 2, 3, 4]
    return common, tmp / "one"


def assert_same_run(one, run):
    """Every step's loss and the final PEFT adapter of `run` equal the reference run `one`'s."""
    want, got = losses(one), losses(run)
    assert sorted(got) == sorted(want), run
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (run, s, want[s], got[s])
    assert_same_adapter(one / "adapter", run / "adapter")


def test_fsdp_two_ranks_interrupted_and_resumed_equal_one_process(tmp_path, reference):
    """2 ranks under FSDP, loading block by block into their shards, stopped by SIGINT after step 2
    (each rank writes its rows of the AdamW state), then resumed on 2 ranks and, from a copy of the
    same checkpoint, on 1 process: every step's loss equals one process's over the same global batch
    (grad-accum 2), and so do the final PEFT adapters."""
    common, one = reference
    two = tmp_path / "two"
    p = train(two, *common, "--parallel", "fsdp", "--debug-interrupt-at-step", "2", nproc=2, check=False)
    # interrupted: every rank exits 3 (checkpointed), which torchrun reports as a failed launch (1)
    assert p.returncode != 0 and "Interrupted at step 2" in p.stdout, p.stderr[-3000:]
    ckpt = two / "checkpoints" / "step_0000002"
    shards = sorted(os.listdir(ckpt / "optimizer_shards"))
    assert shards == ["index.json", "rank_00000.safetensors", "rank_00001.safetensors"]
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and not (ckpt / "dcp").exists()
    assert not (two / "adapter").exists()  # interrupted: no final adapter yet
    shutil.copytree(two, tmp_path / "two_to_one")
    train(two, *common, "--parallel", "fsdp", "--resume", nproc=2)
    train(tmp_path / "two_to_one", *common, "--resume")  # 2-rank checkpoint, 1 process (grad-accum 2 taken)
    for run in ("two", "two_to_one"):
        assert_same_run(one, tmp_path / run)
    # the checkpoint's adapter is the gathered one, in PEFT format, as one process writes it
    assert (
        load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).keys()
        == load_file(str(one / "adapter" / "adapter_model.safetensors")).keys()
    )


def test_one_run_resumes_across_modes_with_the_losses_of_one_process(tmp_path, reference):
    """One run folder, each leg interrupted by SIGINT and resumed in another mode: 1 process
    (grad-accum 2) -> 2 FSDP ranks -> 2 DDP ranks -> 2 FSDP ranks. Each reads the checkpoint the
    previous mode wrote (one process's whole optimizer.safetensors, FSDP's per-rank shards, DDP's
    whole file again); every step's loss and the final adapter equal the uninterrupted run's."""
    common, one = reference
    run = tmp_path / "run"
    p = train(run, *common, "--grad-accum", "2", "--debug-interrupt-at-step", "1", check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    for parallel, stop in (("fsdp", 2), ("ddp", 3)):
        p = train(
            run,
            *common,
            "--resume",
            "--parallel",
            parallel,
            "--debug-interrupt-at-step",
            str(stop),
            nproc=2,
            check=False,
        )
        assert f"Interrupted at step {stop}" in p.stdout and "resumed from" in p.stdout, p.stderr[-3000:]
    assert (run / "checkpoints" / "step_0000002" / "optimizer_shards" / "index.json").is_file()  # FSDP wrote it
    assert (run / "checkpoints" / "step_0000003" / "optimizer.safetensors").is_file()  # DDP wrote it
    train(run, *common, "--resume", "--parallel", "fsdp", nproc=2)
    assert_same_run(one, run)


def test_ddp_resume_with_dropout_equals_the_uninterrupted_run_bit_for_bit(tmp_path, reference):
    """LoRA dropout on 2 DDP ranks: each rank draws its own masks (train.py seeds rank k with seed + k),
    so the checkpoint keeps every rank's RNG state and each rank resumes its own. Interrupted after step
    2 and resumed, the run equals the same 2 ranks run uninterrupted, bit for bit: every logged loss and
    every adapter tensor. (Resuming rank 1 from rank 0's state, as before, changes step 3's loss.)"""
    common, _ = reference
    flags = [*common, "--lora-dropout", "0.3", "--parallel", "ddp"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(whole, *flags, nproc=2)
    p = train(cut, *flags, "--debug-interrupt-at-step", "2", nproc=2, check=False)
    assert "Interrupted at step 2" in p.stdout, p.stderr[-3000:]
    rng = load_file(str(cut / "checkpoints" / "step_0000002" / "rng.safetensors"))
    assert not torch.equal(rng["rank1/torch"], rng["torch"])  # two ranks, two states
    train(cut, *flags, "--resume", nproc=2)
    assert losses(cut) == losses(whole)
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_two_ranks_cannot_share_is_refused_with_a_command_that_works(tmp_path):
    """`python train.py --max-steps 4` (grad-accum 1: one micro-batch a step) resumed by 2 FSDP ranks:
    refused with one sentence that names no flag the user did not give and states a command; that
    command resumes the run."""
    out = tmp_path / "r"
    args = ["--max-steps", "4", "--save-every", "0", "--debug-interrupt-at-step", "2"]
    assert train(out, *args, check=False).returncode == 3
    p = train(out, "--parallel", "fsdp", "--resume", nproc=2, check=False)
    assert p.returncode != 0, p.stderr[-3000:]  # every rank exits 2; torchrun reports a failed launch
    line = next(x for x in p.stderr.splitlines() if x.startswith("error: "))
    assert "1 micro-batch per step" in line and "2 processes cannot share" in line, line
    assert "--grad-accum" not in line and "--parallel ddp" not in line, line
    command = re.search(r"resume it with `python (train\.py [^`]*)`\.$", line).group(1).split()
    assert command == ["train.py", "--out", str(out), "--resume"]
    p = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2, 3, 4]


def _rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows of `n` that rank `rank` of `world` holds under FSDP (torch.chunk's split)."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


@given(
    rows=st.integers(0, 9),
    cols=st.integers(1, 3),
    saved=st.integers(1, 4),
    loaded=st.integers(1, 4),
    data=st.data(),
)
def test_saved_rows_reassemble_into_any_new_sharding(rows, cols, saved, loaded, data):
    """A moment saved as `saved` ranks' row pieces (one safetensors file each, offsets beside them)
    reads back as exactly the rows any rank of any other number of ranks holds; a missing piece
    that the rank needs is an error, not zeros."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from minilora.parallel.sharded_checkpoint import _assemble

    whole = torch.randn(rows, cols)
    rank = data.draw(st.integers(0, loaded - 1))
    lo, hi = _rows(rows, loaded, rank)
    region = (slice(lo, hi), slice(0, cols))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        pieces = []
        for r in range(saved):
            a, b = _rows(rows, saved, r)
            path = os.path.join(tmp, f"{r}.safetensors")
            save_file({"m": whole[a:b].contiguous()}, path)
            pieces.append((stack.enter_context(safe_open(path, framework="pt")), "m", [a, 0]))
        assert torch.equal(_assemble(pieces, region, "m"), whole[lo:hi])
        needed = [i for i, (_, _, (a, _)) in enumerate(pieces) if max(a, lo) < min(_rows(rows, saved, i)[1], hi)]
        if needed:
            with pytest.raises(ValueError, match="cover"):
                _assemble([x for i, x in enumerate(pieces) if i != needed[0]], region, "m")
