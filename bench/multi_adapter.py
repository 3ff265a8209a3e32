"""Mixed-adapter batches at inference: several LoRA adapters over one base, one adapter per request.

    python -m bench.multi_adapter                      # llama-135m geometry (random weights), 2 threads
    python -m bench.multi_adapter --repeat 5 --dtype bfloat16
    python -m bench.multi_adapter --device cuda --dtype bfloat16   # the Triton shrink/expand path

Setup: a 135M-class Llama (bench/train_step.py's "llama-135m", random weights), `--adapters` adapters
of rank r on every linear layer (random A and non-zero B, written and loaded as PEFT-layout files),
B requests of P prompt tokens each generating N new tokens greedily with the KV cache
(models/generate.py generate(..., adapter_ids=)); request b uses adapter b mod n. Every request
generates exactly N tokens (no EOS), so each request's latency is the batch's wall time.

Measured in one process, timed round-robin (bench/common.py interleaved_medians), medians:

  mixed          the mixed batch (adapter_ids = b mod n): minilora/lora/multi.py's choice of path
  one adapter    the same batch with adapter 0 for every row (set_adapter: no adapter_ids, one LoRA matmul pair)
  same ids       the same batch with adapter_ids all 0 (the gathered path, one adapter)
  base           the base alone (LoRA off), the latency reference
  served         the same requests through minilora/serve/scheduler.py (the server's loop, without HTTP),
                 submitted together: prefilled together, then decoded as one batch
  peft mixed     transformers' generate on a PeftModel with the same adapter files, adapter_names= per row

Two layer-level tables (CPU): one layer's LoRA term by each path at 1-64 tokens per row (what
multi.STACKED_MAX_TOKENS is chosen from), and decoding over d of 10 loaded adapters with the weights read
from memory (multi.STACKED_MIN_SHARE).

Memory per extra adapter: resident bytes (on CUDA: allocated device bytes) after loading all n adapters
and serving a mixed batch (the stacks of minilora/lora/multi.py built), less those after one adapter and
a batch, over n - 1; against an adapter's tensor bytes.

Targets: mixed >= 0.8x the tokens/s of one adapter; per-request latency <= 1.15x the base's; resident
memory per extra adapter <= 1.05x its tensor bytes; minilora's mixed batch >= 2x PEFT's tokens/s.
Writes bench/results/multi_adapter.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rss_after_trim(device: str = "cpu") -> int:
    """Resident bytes after returning freed heap pages to the OS (transient load buffers do not count);
    on CUDA the bytes allocated on the device."""
    from bench.common import status_kib

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib("VmRSS") * 1024


class NoText:
    """The scheduler's tokenizer for a checkpoint without one: no EOS, and no text handed out (the server
    decodes each completion again at every token; here only tokens are counted)."""

    eos_ids: list[int] = []

    def decode(self, ids: list[int]) -> str:
        return ""


def write_adapters(ckpt: str, out: str, n: int, r: int) -> list[str]:
    """n adapters (rank r, alpha 2r, all linear layers) with random A and B, saved in PEFT's layout."""
    from minilora.lora.adapter import save_adapter
    from minilora.lora.surgery import apply_lora, lora_modules
    from minilora.models.loader import load_model

    model, _ = load_model(ckpt, quantize=None, dtype=torch.float32)
    apply_lora(model, "all-linear", r=r, alpha=2 * r, dropout=0.0, seed=0, verbose=False)
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for m in lora_modules(model).values():
                for w in (m.lora_A.weight, m.lora_B.weight):
                    w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)  # unit-scale outputs
        dirs.append(os.path.join(out, f"a{i}"))
        save_adapter(model, dirs[-1], ckpt)
    return dirs


def layer_paths(n: int, r: int, K: int = 576, M: int = 1536, B: int = 16, repeat: int = 21) -> list[dict]:
    """One layer's LoRA term of a mixed batch (rows b mod n) by each CPU path of minilora/lora/mixed_term.py at
    T tokens per row, beside one adapter's single_delta on the same x: medians in microseconds. What
    multi.STACKED_MAX_TOKENS is chosen from."""
    from bench.common import interleaved_medians
    from minilora.lora import mixed_term as term
    from minilora.lora import multi

    table = multi.AdapterTable([f"a{i}" for i in range(n)])
    adapters = multi.NamedAdapters(table)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        adapters[f"a{i}"] = multi.AdapterSlot(torch.randn(r, K, generator=g), torch.randn(M, r, generator=g), 2.0)
    slots = [(a.lora_A, a.lora_B, a.scaling) for a in adapters.values()]
    stacks = adapters.stacks()
    rows = torch.tensor([b % n for b in range(B)])
    out = []
    for T in (1, 4, 16, 64):
        x = torch.randn(B, T, K, generator=g)
        t = interleaved_medians(
            {
                "grouped": lambda: term.mixed_grouped(x, rows, slots, M),
                "stacked": lambda: term.mixed_stacked(x, rows, stacks, M),
                "one adapter": lambda: term.single_delta(x, slots[0]),
            },
            repeat=repeat,
        )
        out.append({"T": T, **{k: v * 1e6 for k, v in t.items()}})
    return out


def share_paths(n: int = 10, r: int = 16, K: int = 576, M: int = 1536, B: int = 16, layers: int = 60) -> list[dict]:
    """Decoding (one token per row) over d of n loaded adapters, rows b mod d: the LoRA term added into a
    base output by the stacked and the grouped path, microseconds per layer beyond the base matmul, with
    the weights of `layers` layers cycled so that they are read from memory as in a model. What
    multi.STACKED_MIN_SHARE is chosen from."""
    import statistics
    import time

    from minilora.lora import mixed_term as term
    from minilora.lora import multi

    g = torch.Generator().manual_seed(0)
    held = []
    for _ in range(layers):
        adapters = multi.NamedAdapters(multi.AdapterTable([f"a{i}" for i in range(n)]))
        for i in range(n):
            adapters[f"a{i}"] = multi.AdapterSlot(torch.randn(r, K, generator=g), torch.randn(M, r, generator=g), 2.0)
        slots = [(a.lora_A, a.lora_B, a.scaling) for a in adapters.values()]
        held.append((torch.randn(M, K, generator=g), slots, adapters.stacks()))
    x = torch.randn(B, 1, K, generator=g)
    out = []
    for d in sorted({1, 2, 3, n // 2, (2 * n) // 3 + 1, n}):
        rows = torch.tensor([b % d for b in range(B)])

        def per_layer(kind):
            times = []
            for _ in range(7):
                start = time.perf_counter()
                for W, slots, stacks in held:
                    y = torch.nn.functional.linear(x, W)  # (B, 1, M)
                    if kind == "stacked":
                        term.mixed_stacked(x, rows, stacks, M, y)
                    elif kind == "grouped":
                        term.mixed_grouped(x, rows, slots, M, y)
                times.append((time.perf_counter() - start) / layers * 1e6)
            return statistics.median(times)

        t = {kind: per_layer(kind) for kind in ("base", "stacked", "grouped", "base again")}
        base = (t["base"] + t["base again"]) / 2
        out.append({"d": d, "n": n, "stacked": t["stacked"] - base, "grouped": t["grouped"] - base})
    return out


def main() -> None:
    from bench.train_step import GEOMETRIES, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="llama-135m", choices=sorted(GEOMETRIES))
    ap.add_argument("--adapters", type=int, default=5, help="adapters loaded (n)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r of every adapter (alpha = 2r)")
    ap.add_argument("--requests", type=int, default=16, help="requests in the batch (B)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (P)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request (N)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and compute, both sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (medians reported)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed batch")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    ap.add_argument("--out", default=None, help="results name under bench/results/ (default multi_adapter[_cuda])")
    a = ap.parse_args()
    a.out = a.out or ("multi_adapter" if a.device == "cpu" else "multi_adapter_cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch here; run on the CPU (the default).")
    if a.adapters < 2:
        ap.error("--adapters must be at least 2: the memory figure is per extra adapter.")
    torch.set_num_threads(a.threads)

    from bench.common import cpu_info, environment, interleaved_medians, write_json
    from minilora.lora import adapter_names, load_adapter, set_adapter
    from minilora.lora.named import hosts
    from minilora.lora.surgery import lora_disabled
    from minilora.models.generate import generate
    from minilora.models.loader import load_model
    from minilora.serve.scheduler import Request, Scheduler, release_openmp_threads

    dtype = DTYPES[a.dtype]
    B, P, N, n = a.requests, a.prompt, a.new, a.adapters
    vocab = GEOMETRIES[a.geometry]["vocab_size"]
    prompts = torch.randint(3, vocab, (B, P), generator=torch.Generator().manual_seed(0))  # (B, P)
    dev = a.device
    rows = [b % n for b in range(B)]  # request b -> adapter b mod n
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt or os.path.join(tmp, "ckpt")
        if not os.path.isdir(ckpt):
            write_checkpoint(ckpt, a.geometry)
        dirs = write_adapters(ckpt, tmp, n, a.rank)

        model, _ = load_model(ckpt, quantize=None, dtype=dtype, device=dev)
        model.eval()
        plist = prompts.tolist()
        # memory per extra adapter: one adapter loaded and a mixed batch served (what the first batch of the
        # adapter paths allocates and keeps is not any adapter's), then the other n - 1 and a batch again;
        # half the rows on the base, so that the batch is mixed (all on a0 would be a0 served alone)
        load_adapter(model, dirs[0], name="a0")
        generate(model, plist, N, adapter_ids=[0 if b % 2 else -1 for b in range(B)])
        rss0 = rss_after_trim(dev)
        for i, d in enumerate(dirs[1:], start=1):
            load_adapter(model, d, name=f"a{i}")
        ids = [adapter_names(model).index(f"a{i}") for i in rows]
        check = {"ours": generate(model, plist, N, adapter_ids=ids)}  # stacks built (multi.py), masks cached
        rss1 = rss_after_trim(dev)
        slots = [s for layer in hosts(model).values() for s in layer.adapters.values()]
        tensor_bytes = sum(p.numel() * p.element_size() for s in slots for p in (s.lora_A, s.lora_B)) / n
        per_adapter = (rss1 - rss0) / (n - 1)

        def ours(adapter_ids=None):
            return generate(model, plist, N, adapter_ids=adapter_ids)

        set_adapter(model, "a0")  # what a call without adapter_ids uses; the others pass adapter_ids

        def one_adapter():
            return ours()

        def base():
            with lora_disabled(model):
                return ours()

        sched = Scheduler(model, NoText(), max_batch=B)
        with sched.lock:
            sched.adapters.update({f"a{i}": d for i, d in enumerate(dirs)})  # loaded above, served from now on
        sched.start()

        def served():
            release_openmp_threads()  # as serve.py's main thread, which computes nothing while it serves
            reqs = [Request(prompt=plist[b], adapter=f"a{rows[b]}", max_tokens=N) for b in range(B)]
            for r in reqs:
                sched.submit(r)
            for r in reqs:
                while r.events.get()[0] not in ("done", "error"):
                    pass
            return [r.tokens for r in reqs]

        fns = {
            "mixed": lambda: ours(ids),
            "one adapter": one_adapter,
            "same ids": lambda: ours([ids[0]] * B),
            "base": base,
            "served": served,
        }
        check["served"] = served()
        if not a.no_peft:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(dev).eval()
            peft = PeftModel.from_pretrained(hf, dirs[0], adapter_name="a0").to(dev)
            for i, d in enumerate(dirs[1:], start=1):
                peft.load_adapter(d, adapter_name=f"a{i}")
            names = [f"a{i}" for i in rows]
            kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)

            def peft_mixed():
                with torch.no_grad():
                    ids_dev = prompts.to(dev)
                    out = peft.generate(
                        input_ids=ids_dev, attention_mask=torch.ones_like(ids_dev), adapter_names=names, **kw
                    )
                return out[:, P:].tolist()

            fns["peft mixed"] = peft_mixed
            check["peft"] = peft_mixed()
        t = interleaved_medians(fns, repeat=a.repeat, warmup=0)
        sched.stop(0.0)

    paths = layer_paths(n, a.rank) if dev == "cpu" else []  # the CPU paths multi.STACKED_MAX_TOKENS chooses between
    shares = share_paths(r=a.rank) if dev == "cpu" else []  # and multi.STACKED_MIN_SHARE
    tok_s = {k: B * N / v for k, v in t.items()}
    ratios = {
        "mixed_vs_one_adapter_tok_s": tok_s["mixed"] / tok_s["one adapter"],
        "mixed_vs_same_ids_tok_s": tok_s["mixed"] / tok_s["same ids"],
        "latency_vs_base": t["mixed"] / t["base"],
        "memory_per_adapter_vs_tensor_bytes": per_adapter / tensor_bytes,
    }
    served_same = sum(x == y for u, v in zip(check["ours"], check["served"]) for x, y in zip(u, v)) / (B * N)
    ratios["served_vs_mixed_tok_s"] = tok_s["served"] / tok_s["mixed"]
    same_tokens = None
    if "peft mixed" in t:
        ratios["mixed_vs_peft_tok_s"] = tok_s["mixed"] / tok_s["peft mixed"]
        same_tokens = sum(x == y for u, v in zip(check["ours"], check["peft"]) for x, y in zip(u, v)) / (B * N)
    cpu = cpu_info()
    if dev == "cuda":
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    else:
        print(
            f"{cpu['model']}; flags {' '.join(cpu['flags'])}; {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}"
        )
    print(
        f"{a.geometry}, {a.dtype}, {n} adapters (r={a.rank}, all linear), {B} requests x {P} prompt + {N} new "
        f"tokens, greedy, KV cache; medians of {a.repeat}"
    )
    print(f"{'':14}{'s/batch':>9}{'tok/s':>9}{'latency vs base':>17}")
    for k in t:
        print(f"{k:14}{t[k]:9.2f}{tok_s[k]:9.1f}{t[k] / t['base']:16.2f}x")
    print(
        f"mixed {ratios['mixed_vs_one_adapter_tok_s']:.2f}x one adapter's tok/s (target >= 0.8); request latency "
        f"{ratios['latency_vs_base']:.2f}x the base's (target <= 1.15); resident memory per adapter "
        f"{per_adapter / 2**20:.1f} MiB for {tensor_bytes / 2**20:.1f} MiB of tensors "
        f"({ratios['memory_per_adapter_vs_tensor_bytes']:.3f}x, target <= 1.05)"
    )
    if paths:
        print(f"one layer's LoRA term (K 576, M 1536, {B} rows over {n} adapters), microseconds:")
        print(f"{'T':>4}{'grouped':>10}{'stacked':>10}{'one adapter':>13}")
    for row in paths:
        print(f"{row['T']:4}{row['grouped']:10.0f}{row['stacked']:10.0f}{row['one adapter']:13.0f}")
    if shares:
        print(f"decoding over d of {shares[0]['n']} adapters, the term added into the base output, us per layer:")
        print(f"{'d':>4}{'stacked':>10}{'grouped':>10}")
    for row in shares:
        print(f"{row['d']:4}{row['stacked']:10.0f}{row['grouped']:10.0f}")
    print(
        f"served by minilora/serve/scheduler.py ({B} requests submitted together, prefilled together, then one "
        f"batch): {ratios['served_vs_mixed_tok_s']:.2f}x generate()'s tok/s; {served_same:.1%} of its tokens equal"
    )
    if same_tokens is not None:
        print(
            f"minilora mixed {ratios['mixed_vs_peft_tok_s']:.2f}x PEFT's mixed-batch tok/s (target >= 2); "
            f"{same_tokens:.1%} of the generated tokens equal PEFT's"
        )
    path = write_json(
        a.out,
        {
            "environment": {**environment(), "cpu": cpu},
            "setup": vars(a),
            "seconds_per_batch": t,
            "tokens_per_s": tok_s,
            "memory": {"rss_per_adapter_bytes": per_adapter, "tensor_bytes_per_adapter": tensor_bytes},
            "ratios": ratios,
            "layer_paths_us": paths,
            "share_paths_us": shares,
            "tokens_equal_to_peft": same_tokens,
            "served_tokens_equal_to_generate": served_same,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
