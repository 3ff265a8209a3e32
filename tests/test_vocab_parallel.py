"""minilora.parallel.vocab_parallel on 2 gloo processes (CPU): the vocabulary-parallel cross-entropy (loss and
dL/dh, with and without grad) equals the single-process chunked loss (HeadCrossEntropyFn) and a
float64 reference; the embedding lookup equals a whole-table lookup bit for bit; the head's whole
logits and their gradient equal h W^T. Ranks bring different numbers of rows (zero included).
distributed.load_sharded keeps about half of the embedding/head rows per rank, read as slices,
and from a multimodal Gemma 3 checkpoint gives adapters with the checkpoint's module paths.

Two ranks are started once for the module (`ranks`) and run each drawn example, so hypothesis
examples cost milliseconds, not a process start each.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from minilora.parallel import distributed as D
from minilora.parallel import vocab_parallel as VP
from minilora.train.loss import HeadCrossEntropyFn

WORLD = 2


def _serve(rank, world, init_file, inbox, outbox):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    while (job := inbox.get()) is not None:
        fn, args = job
        try:
            outbox.put((rank, fn(rank, *args)))
        except Exception as e:  # reported to the test; the other rank may wait in a collective until torn down
            outbox.put((rank, RuntimeError(f"rank {rank}: {type(e).__name__}: {e}")))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """run(fn, *args) -> [fn(0, *args) on rank 0, fn(1, *args) on rank 1], the ranks in one gloo group."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = str(tmp_path_factory.mktemp("vp") / "init")
    inboxes, outbox = [ctx.Queue() for _ in range(WORLD)], ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(r, WORLD, init, inboxes[r], outbox), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()

    def run(fn, *args):
        for q in inboxes:
            q.put((fn, args))
        got = dict(outbox.get(timeout=300) for _ in range(WORLD))
        for v in got.values():
            if isinstance(v, Exception):
                raise v
        return [got[r] for r in range(WORLD)]

    yield run
    for q in inboxes:
        q.put(None)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()


def _tensors(seed, sizes, d, v, scale, dtype):
    """The drawn example, identical in the test and on each rank: rows h (N, D), head w (V, D),
    targets y (N,), an upstream gradient G (N, V) for the logits, and per rank (ids of its shape)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = torch.randn(v, d, generator=g).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    G = torch.randn(n, v, generator=g).to(dtype)
    ids = [torch.randint(0, v, (k % 3 + 1, k), generator=g) for k in sizes]  # (B_r, T_r) differ per rank
    return h, w, y, G, ids


def _on_rank(rank, seed, sizes, d, v, cap, chunk, scale, dtype):
    h, w, y, G, ids = _tensors(seed, sizes, d, v, scale, dtype)
    lo, hi = VP.vocab_range(v, WORLD, rank)
    first = sum(sizes[:rank])
    mine = slice(first, first + sizes[rank])
    head = VP.VocabParallelHead(torch.nn.Parameter(w[lo:hi].clone(), requires_grad=False), lo, v)
    emb = VP.VocabParallelEmbedding(head.weight, lo, v)
    hr = h[mine].clone().requires_grad_()
    loss = head.cross_entropy(hr, y[mine], cap, chunk)
    (loss * 0.7).backward()
    with torch.no_grad():
        plain = head.cross_entropy(h[mine], y[mine], cap, chunk)
    hl = h[mine].clone().requires_grad_()
    logits = head(hl)  # (n, V)
    (logits * G[mine]).sum().backward()
    return {
        "loss": loss.detach(),
        "grad": hr.grad,
        "plain": plain,
        "logits": logits.detach(),
        "logit_grad": hl.grad,
        "emb": emb(ids[rank]),
        "rows": hi - lo,
    }


def _reference(h, w, y, cap):
    z = h @ w.t()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, y, reduction="sum")


@given(
    sizes=st.lists(st.integers(0, 20), min_size=WORLD, max_size=WORLD),
    d=st.integers(1, 16),
    v=st.integers(WORLD, 200),
    chunk=st.sampled_from([1, 5, 16, 1024]),
    cap=st.sampled_from([None, 5.0, 30.0]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10**6),
)
def test_vocab_parallel_loss_embedding_and_head_equal_one_process(ranks, sizes, d, v, chunk, cap, scale, dtype, seed):
    got = ranks(_on_rank, seed, sizes, d, v, cap, chunk, scale, dtype)
    h, w, y, G, ids = _tensors(seed, sizes, d, v, scale, dtype)
    assert [r["rows"] for r in got] == [-(-v // 2), v - -(-v // 2)]  # rows [0, ceil(V/2)) and the rest
    # the single-process chunked loss and its dL/dh
    h1 = h.clone().requires_grad_()
    one = HeadCrossEntropyFn.apply(h1, w, y, cap, chunk)
    (one * 0.7).backward()
    total = sum(r["loss"] for r in got)
    torch.testing.assert_close(total, one.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum(r["plain"] for r in got), one.detach(), rtol=1e-5, atol=1e-4)  # no grad: same
    grad = torch.cat([r["grad"] for r in got])
    # softmax - one-hot cancels near 1 for confident rows: float32 rounding of the two slice sums
    # shows there (test_loss.py allows the same for HeadCrossEntropyFn against autograd)
    torch.testing.assert_close(grad, h1.grad, rtol=1e-4, atol=1e-5)
    # float64 reference through autograd on whole logits
    h64 = h.double().clone().requires_grad_()  # a copy also when h is float64
    ref = _reference(h64, w.double(), y, cap)
    (ref * 0.7).backward()
    torch.testing.assert_close(total.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    # whole logits from the head, and their gradient
    hl = h.clone().requires_grad_()
    want = hl @ w.t()  # (N, V)
    (want * G).sum().backward()
    torch.testing.assert_close(torch.cat([r["logits"] for r in got]), want.detach(), rtol=1e-5, atol=1e-5)
    # dL/dh sums V products of unit-size terms, in two slices: float32 rounding grows with V
    torch.testing.assert_close(torch.cat([r["logit_grad"] for r in got]), hl.grad, rtol=1e-5, atol=1e-6 * v)
    # embeddings: bit for bit a whole-table lookup, for ranks with batches of different shapes
    for r in range(WORLD):
        assert torch.equal(got[r]["emb"], F.embedding(ids[r], w)), r


def _loaded(rank, ckpt, lora, out):
    from minilora.lora.adapter import save_adapter

    model, _, _ = D.load_sharded(ckpt, torch.float32, torch.device("cpu"), WORLD, lora)
    full = D.full_adapter_state(model)  # a collective
    if rank == 0:
        save_adapter(model, out, state=full, base_model_name_or_path=ckpt)
    emb, head = model.model.embed_tokens, model.lm_head
    return {
        "resident": VP.resident_bytes(model),
        "emb": emb.weight.detach().clone(),
        "start": emb.start,
        "head": head.weight.detach().clone(),
        "tied": head.weight is emb.weight,
        "prefix": model.config.source_prefix,
    }


def _file_tensor(ckpt, name):
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def test_each_rank_loads_and_holds_about_half_of_an_untied_odd_vocabulary(ranks, tmp_path_factory):
    """An untied Llama with V = 301 (not divisible by 2): rank 0 holds rows [0, 151), rank 1
    [151, 301) of both embedding and head, as read from the file; resident bytes about 1/2 each."""
    import transformers

    ckpt = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    lora = dict(r=2, alpha=4, dropout=0.0, seed=0, verbose=False)
    got = ranks(_loaded, ckpt, lora, os.path.join(ckpt, "adapter"))
    emb, head = _file_tensor(ckpt, "model.embed_tokens.weight"), _file_tensor(ckpt, "lm_head.weight")
    whole = emb.numel() * 4 + head.numel() * 4
    for r, (lo, hi) in enumerate([(0, 151), (151, 301)]):
        assert got[r]["start"] == lo and not got[r]["tied"]
        assert torch.equal(got[r]["emb"], emb[lo:hi]) and torch.equal(got[r]["head"], head[lo:hi])
        assert 0.49 * whole < got[r]["resident"] < 0.51 * whole, (got[r]["resident"], whole)


def test_multimodal_gemma3_under_fsdp_gives_adapters_with_its_module_paths(ranks, tmp_path_factory):
    """load_sharded reads a Gemma3ForConditionalGeneration checkpoint through the loader's reader:
    cfg.source_prefix is the text tower's, so the adapter applies to that checkpoint in PEFT; the
    tied embedding is split in two halves, resident bytes about 1/2 each."""
    from test_families import multimodal_checkpoint

    base = str(tmp_path_factory.mktemp("mm") / "base")
    multimodal_checkpoint(base, "v4")
    out = os.path.join(os.path.dirname(base), "adapter")
    got = ranks(_loaded, base, dict(r=2, alpha=4, dropout=0.0, seed=0, verbose=False), out)
    prefix = "language_model.model."
    assert [r["prefix"] for r in got] == [prefix, prefix]
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model." + prefix + "layers.") for k in keys), keys[:3]
    emb = _file_tensor(base, prefix + "embed_tokens.weight")
    for r in got:
        assert r["tied"] and torch.equal(r["emb"], emb[r["start"] : r["start"] + len(r["emb"])])
        assert 0.49 * emb.numel() * 4 < r["resident"] < 0.51 * emb.numel() * 4
    assert got[0]["start"] == 0 and got[1]["start"] == len(got[0]["emb"])
    assert sum(len(r["emb"]) for r in got) == len(emb)
