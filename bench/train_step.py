"""One QLoRA training step, end to end: minilora beside transformers + PEFT + bitsandbytes.

    python -m bench.train_step                                  # CPU: small Gemma-3-shaped model
    python -m bench.train_step --geometry gemma-3-1b            # GPU: Gemma 3 1B's exact geometry
    python -m bench.train_step --no-gradient-checkpointing --steps 10

Shape letters: B batch rows, T tokens per row, D model dim, F MLP dim, V vocabulary, L layers,
H heads, Hkv kv heads, hd head dim, r LoRA rank.

The same random-weight checkpoint (a Gemma3ForCausalLM written by transformers' save_pretrained
into a temp folder), the same (B, T) random token ids with a label on every next token, the same
rank and the same gradient-checkpointing setting go through both implementations:

  minilora      load_model(dir, quantize="nf4")  (NF4, blocksize 64, double quant), apply_lora(all-linear,
                r, alpha=2r, dropout 0), PagedAdamW on lora_parameters, the loss train.py computes
                (chunked_lm_loss on a packing.Batch, divided by its label tokens), then train.py's
                step: backward, clip_grad_norm_(1.0), optimizer.step, zero_grad(set_to_none=True).
  peft+bnb      AutoModelForCausalLM.from_pretrained(dir, BitsAndBytesConfig(load_in_4bit, nf4, double
                quant, compute dtype = the run's dtype)), get_peft_model(LoraConfig(all-linear, r,
                alpha=2r, dropout 0)), torch.optim.AdamW on the trainable parameters,
                loss = model(input_ids, attention_mask, labels).loss, then the same step.
                prepare_model_for_kbit_training is NOT applied by default (it upcasts the embedding
                and norms to float32, which costs memory); --prepare-kbit applies it.

Threads: one torch thread per worker by default. On this shared 2-core machine every parallel
elementwise op's OpenMP fork/join waits for a scheduler slice whenever another process holds a
core, which slowed 2-thread steps up to 10x at random (bitsandbytes' side most, with its many
small ops), so 2-thread timings measured the neighbours, not the code; on a quiet machine 2 threads
gave the same ratio as 1. --threads 0 uses torch's default.

dtype: float32 on the CPU (train.py's --dtype auto there), bfloat16 on CUDA. The learning-rate
scheduler is left out on both sides (a scalar multiply per step).

Each implementation runs in its own subprocess, so its peak memory is its own. Measured there:
  step time   median of --steps steps after --warmup warm-up steps (forward + backward + clip +
              optimizer step + zero_grad, CUDA synchronized), tokens/s = B*T / median.
  peak memory CPU: VmHWM from /proc/self/status (the child's own peak RSS over its whole life:
              imports, load, training; getrusage's ru_maxrss is inherited across fork + exec, so it
              would report the parent's peak). Also the step peak: VmHWM reset through
              /proc/self/clear_refs after loading, minus the RSS then (activations, gradients,
              optimizer state, temporaries). CUDA: torch.cuda.max_memory_allocated over the whole
              child, and the same step peak minus the allocation before the first step.
              glibc keeps freed large buffers in its heap (its mmap threshold grows after the first
              big free), so on the CPU the RSS also holds retained garbage and varies by ~+-50 MB
              from run to run; --mmap-threshold 65536 makes RSS follow live memory (and slows both).
  resident    bytes of parameters + buffers (+ bitsandbytes' quant_state tensors, which are neither),
              each storage counted once (tied head): the NF4 base and the LoRA weights.

Targets: CPU no slower and at most 0.8x the peak memory; an H100 with Gemma 3 1B's
geometry at least 1.5x the tokens/s and at most 0.6x the peak memory. Ratios printed as
speedup = their time / ours (> 1 favours minilora) and memory = ours / theirs (< 1 favours minilora).
Writes bench/results/train_step.json (train_step_<geometry>_<device>.json for other geometries or
devices, or --out NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPLS = ("minilora", "peft+bnb")

# Gemma3TextConfig keyword arguments. "small" is Gemma 3's shape scaled down for a 2-core CPU;
# "gemma-3-1b" is google/gemma-3-1b-pt's geometry (5 sliding-window layers : 1 global, window 512).
GEOMETRIES = {
    "small": {
        "vocab_size": 16384,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 128,
        "sliding_window": 128,
        "query_pre_attn_scalar": 128,
    },
    "gemma-3-1b": {
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
    },
    # a 135M-class Llama (SmolLM-135M's shape): LlamaConfig keyword arguments
    "llama-135m": {
        "family": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
    },
}


def write_checkpoint(folder: str, geometry: str) -> None:
    """A random-weight Gemma3ForCausalLM with `geometry`, bf16, via transformers' save_pretrained."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from minilora.models.config import every_nth_full

    g = dict(GEOMETRIES[geometry])
    if g.pop("family", "gemma3") == "llama":
        cfg = LlamaConfig(
            **g, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        tmp = tempfile.mkdtemp(prefix=".ckpt.", dir=os.path.dirname(os.path.abspath(folder)))
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
        return
    n = GEOMETRIES[geometry]["num_hidden_layers"]
    layer_types = every_nth_full(n, 6)
    cfg = Gemma3TextConfig(
        **GEOMETRIES[geometry],
        layer_types=layer_types,
        max_position_embeddings=32768,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix=".ckpt.", dir=os.path.dirname(os.path.abspath(folder)))
    model.save_pretrained(tmp)
    os.replace(tmp, folder)


def resident_bytes(model) -> tuple[int, int]:
    """(all bytes, trainable bytes) of parameters, buffers and bitsandbytes quant states, once per storage."""
    import torch

    seen, total, train = set(), 0, 0

    def add(t, trainable=False):
        nonlocal total, train
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        train += t.numel() * t.element_size() if trainable else 0

    for p in model.parameters():
        add(p, p.requires_grad)
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: absmax, code, nested state
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for b in model.buffers():
        add(b)
    return total, train


def profile_steps(step, cuda: bool, n: int = 2, top: int = 12) -> dict:
    """Where n more steps' time goes (torch.profiler, after the timed steps): the ops with the most self
    time on the device (CUDA kernels) or the CPU, the number of aten ops dispatched and of kernels
    launched, and the device's busy share of the wall time. A step whose device is busy for a small
    share of it is bound by the host: by how many ops it dispatches, not by its kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
    wall = time.perf_counter() - t0
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:top]
    busy_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    return {
        "steps": n,
        "wall_s": wall,
        "aten_ops_per_step": sum(1 for e in events if e.name.startswith("aten::")) / n,  # nested calls too
        "kernels_per_step": len(kernels) / n,
        "device_busy_share": busy_s / wall if cuda else None,
        "top": [{"op": e.key, "calls": e.count // n, "self_ms_per_step": getattr(e, key) / 1e3 / n} for e in table],
    }


def worker(impl: str, ckpt: str, a) -> dict:
    """Runs in a fresh process: build one implementation, time its steps, report JSON."""
    import torch  # torch._dynamo (~150 MB RSS) loads when something needs it: torch.optim's AdamW when

    # built, non-reentrant checkpointing when first used; minilora without recompute never loads it
    from bench.common import status_kib

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    if cuda:  # the same for both: PEFT's LoRA terms are float32 matmuls too
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    B, T = a.batch, a.seq
    gen = torch.Generator().manual_seed(1)
    vocab = GEOMETRIES[a.geometry]["vocab_size"]
    ids = torch.randint(3, vocab, (B, T), generator=gen).to(a.device)  # (B, T), no special tokens
    # --lengths LO:HI: rows of random length in [LO, HI] (T = HI), right-padded; the second half of
    # each row is its completion (labelled), the first half its prompt and the padding are not
    lens = [T] * B
    if a.lengths:
        lo, hi = map(int, a.lengths.split(":"))
        lens = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
    real = (torch.arange(T)[None, :] < torch.tensor(lens)[:, None]).to(a.device)  # (B, T)
    completion = real & (torch.arange(T)[None, :] >= torch.tensor(lens)[:, None] // 2).to(a.device)
    hf_labels = torch.where(completion, ids, -100)  # transformers shifts inside its loss

    if impl == "minilora":
        from minilora.data.packing import Batch
        from minilora.lora.surgery import apply_lora, lora_parameters
        from minilora.models.loader import load_model
        from minilora.optim.paged_adamw import PagedAdamW
        from minilora.train.loss import chunked_lm_loss

        base_rss = status_kib("VmRSS")
        t0 = time.perf_counter()
        model, _ = load_model(ckpt, quantize="nf4", dtype=dtype, device=a.device)
        report = apply_lora(
            model,
            targets="all-linear",
            r=a.rank,
            alpha=2 * a.rank,
            dropout=0.0,
            seed=0,
            verbose=False,
            lora_compute=a.lora_compute,
        )
        if not a.gradient_checkpointing or a.recompute in ("full", "selective"):
            model.set_gradient_checkpointing(
                a.gradient_checkpointing and a.recompute == "full",
                selective=a.gradient_checkpointing and a.recompute == "selective",
            )
        else:  # FULL:SELECTIVE block counts (what train.py's planner may choose)
            full, sel = map(int, a.recompute.split(":"))
            model.set_gradient_checkpointing(full, selective=sel)
        model.set_weight_reuse(a.reuse_blocks)
        model.lean_saves = a.lean_saves
        model.train()
        params = lora_parameters(model)
        opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0)
        labels = hf_labels.clone()
        labels[:, 0] = -100  # packing's convention: the first token of an example carries no loss
        mask = real.long()
        pos = torch.arange(T, device=ids.device).expand(B, T) * mask  # (B, T), padding at 0 as collate does
        batch = Batch(ids, labels, mask, pos, mask.clone(), n_label_tokens=int((labels[:, 1:] != -100).sum()))
        trainable = report["trainable"]
        from minilora.train.memory_plan import LINEARS, flops_per_token

        # the model's FLOPs per step (no recompute counted): what utilisation divides by the step time
        labelled = batch.n_label_tokens / (B * T)
        flops_step = flops_per_token(model.config, T, a.rank, LINEARS, label_fraction=labelled) * B * T

        def loss_backward() -> float:
            s, n = chunked_lm_loss(model, batch, chunk=a.loss_chunk)
            (s / max(1.0, n)).backward()
            return float(s.detach()) / n
    else:
        import bitsandbytes  # noqa: F401  (imported here so that its RSS counts as import, not load)
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        base_rss = status_kib("VmRSS")
        t0 = time.perf_counter()
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=bnb, dtype=dtype, device_map=a.device)
        model.config.use_cache = False
        if a.prepare_kbit:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=a.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif a.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(
            model,
            LoraConfig(
                r=a.rank, lora_alpha=2 * a.rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
            ),
        )
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        mask = real.long()
        trainable = sum(p.numel() for p in params)
        flops_step = None

        def loss_backward() -> float:
            loss = model(input_ids=ids, attention_mask=mask, labels=hf_labels, use_cache=False).loss  # mean
            loss.backward()
            return float(loss.detach())

    load_s = time.perf_counter() - t0
    loaded_rss = status_kib("VmRSS")
    model_bytes, lora_bytes = resident_bytes(model)

    def step() -> float:
        loss = loss_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss

    # the step's own peak: reset the high-water mark to "now" once everything is loaded
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        life_peak_load = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # from here max_memory_allocated is the training peak
    else:
        before = status_kib("VmRSS") * 1024
        life_peak_load = status_kib("VmHWM") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    if not cuda:  # this machine's GEMM ceiling in this process, just before and after the timed steps
        from bench.common import gemm_rates

        rates_before = gemm_rates()
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        t1 = time.perf_counter()
        losses.append(step())
        if i >= a.warmup:
            times.append(time.perf_counter() - t1)
    if cuda:
        train_peak = torch.cuda.max_memory_allocated()
        peak = max(train_peak, life_peak_load)  # reset_peak_memory_stats dropped the loading peak
    else:
        train_peak = status_kib("VmHWM") * 1024
        peak = max(train_peak, life_peak_load)
    med = statistics.median(times)
    rates = None if cuda else {"before": rates_before, "after": gemm_rates()}
    prof = profile_steps(step, cuda) if a.profile else None
    return {
        "median_s": med,
        "times_s": times,
        "tokens_per_s": sum(lens) / med,
        "losses": losses,
        "load_s": load_s,
        "import_rss_mb": base_rss / 1024,
        "loaded_rss_mb": loaded_rss / 1024,
        "end_rss_mb": status_kib("VmRSS") / 1024,
        "peak_mb": peak / 2**20,
        "step_peak_mb": (train_peak - before) / 2**20,
        "resident_mb": model_bytes / 2**20,
        "lora_mb": lora_bytes / 2**20,
        "trainable_params": trainable,
        "flops_per_step": flops_step,
        "gemm_rates_gflops": rates,
        "profile": prof,
    }


def run_worker(impl: str, ckpt: str, argv: list[str], mmap_threshold: int = 0) -> dict:
    # no torch.compile on either side (bitsandbytes' CPU nf4 path is native C; measured the same with it on)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    if mmap_threshold > 0:  # glibc: every block above this size is its own mapping, unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    from bench.common import run_json_worker

    return run_json_worker("bench.train_step", impl, ckpt, argv, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="small", choices=sorted(GEOMETRIES))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=4, help="rows per step (B)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (T)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute block activations in backward, on both sides (train.py's default: on)",
    )
    ap.add_argument(
        "--recompute",
        default="full",
        help="what --gradient-checkpointing means on minilora's side: full recompute, selective "
        "(keep the matmul outputs, recompute the elementwise ops; bench/recompute.py compares), "
        "or FULL:SELECTIVE block counts",
    )
    ap.add_argument(
        "--prepare-kbit", action="store_true", help="apply peft.prepare_model_for_kbit_training on the competitor side"
    )
    ap.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: float32 matmuls on TF32 tensor cores, on both sides (train.py's default: on)",
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=256,
        help="minilora's labelled tokens per cross-entropy chunk (train.py's default: 256)",
    )
    ap.add_argument(
        "--lora-compute",
        default="fused",
        choices=["fused", "float32", "compute"],
        help="minilora's LoRA path (train.py --lora-compute): fused (the default: the term added inside the base "
        "matmul's sum), float32 (PEFT's numbers) or compute (PEFT under autocast)",
    )
    ap.add_argument(
        "--reuse-blocks",
        type=int,
        default=0,
        help="minilora: the last N blocks keep their dequantized weights from forward to backward "
        "(train.py --weight-reuse; its planner picks N)",
    )
    ap.add_argument(
        "--lean-saves",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="minilora: blocks that keep their activations rebuild their normed inputs and act(gate) * up "
        "in backward (models/ops.rebuilt_in_backward; on in train.py); --no-lean-saves keeps them",
    )
    ap.add_argument("--layers", type=int, default=0, help="override the geometry's layer count (0 = keep)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype on both sides (auto: float32 on the CPU, bfloat16 on CUDA)",
    )
    ap.add_argument(
        "--lengths",
        default=None,
        metavar="LO:HI",
        help="rows of random length in [LO, HI] tokens (T = HI), right-padded, completion = second half",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in both workers, so that CPU RSS follows live memory "
        "instead of glibc's retained heap (0 = glibc's default, as users run)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the two workers this many times, alternating; per-figure medians reported",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads in each worker (0 = torch's default); see the module docstring",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after its timed steps each worker profiles two more (torch.profiler): top ops by self time, "
        "aten ops and kernels per step, the device's busy share",
    )
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    ap.add_argument("--out", default=None, help="results name under bench/results/ (default: by geometry/device)")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--write-ckpt", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layers:
        GEOMETRIES[a.geometry]["num_hidden_layers"] = a.layers
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.write_ckpt:
        return write_checkpoint(a.ckpt, a.geometry)
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a)))
        return
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available; run with --device cpu for the CPU benchmark.")
    if min(a.steps, a.batch, a.rank, a.rounds, a.loss_chunk) < 1 or a.seq < 2 or a.warmup < 0:
        sys.exit("--steps, --batch, --rank, --rounds and --loss-chunk must be >= 1, --seq >= 2 and --warmup >= 0.")

    # the same options go to both workers (everything but --ckpt/--out)
    argv = [
        "--geometry",
        a.geometry,
        "--device",
        a.device,
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--rank",
        str(a.rank),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--threads",
        str(a.threads),
        "--loss-chunk",
        str(a.loss_chunk),
        "--layers",
        str(a.layers),
        "--dtype",
        a.dtype,
        *(["--lengths", a.lengths] if a.lengths else []),
        "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing",
        "--recompute",
        a.recompute,
        "--lora-compute",
        a.lora_compute,
        "--reuse-blocks",
        str(a.reuse_blocks),
        "--lean-saves" if a.lean_saves else "--no-lean-saves",
        "--tf32" if a.tf32 else "--no-tf32",
        *(["--profile"] if a.profile else []),
    ]
    if a.prepare_kbit:
        argv.append("--prepare-kbit")
    with tempfile.TemporaryDirectory(prefix="minilora_train_step_") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, f"gemma3-{a.geometry}")
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            t0 = time.perf_counter()
            # in a subprocess, so this process (the workers' parent) stays small
            subprocess.run(
                [sys.executable, "-m", "bench.train_step", "--write-ckpt", "--geometry", a.geometry, "--ckpt", ckpt],
                check=True,
                cwd=ROOT,
            )
            print(f"wrote a random {a.geometry} checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = {impl: [] for impl in IMPLS}
        for k in range(a.rounds):
            for impl in IMPLS:  # alternating, so a burst of load from elsewhere hits both sides
                r = run_worker(impl, ckpt, argv, a.mmap_threshold)
                runs[impl].append(r)
                print(
                    f"  round {k + 1} {impl}: {r['median_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB, "
                    f"losses {' '.join(f'{x:.3f}' for x in r['losses'])}",
                    flush=True,
                )
    rows = median_rows(runs)
    add_utilisation(rows)
    report(a, rows)


def median_rows(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """{impl: its workers' numeric results, each the median over its rounds, and "runs": the rounds}."""
    rows = {}
    for impl, rs in runs.items():
        rows[impl] = {
            key: statistics.median(r[key] for r in rs) for key, v in rs[0].items() if isinstance(v, (int, float))
        }
        rows[impl]["trainable_params"] = rs[0]["trainable_params"]
        rows[impl]["runs"] = rs
    return rows


def add_utilisation(rows: dict) -> None:
    """CPU: each side's utilisation, the model's FLOPs per step (the same batch on both sides) / its
    median step time / the bf16 GEMM rate its worker measured around its timed steps (the mean of
    before and after, per run; medians over rounds). A shared VM's bf16 rate moves 3x between minutes,
    so the ceiling is taken in the same process and minutes as the steps it divides."""
    flops = rows["minilora"]["runs"][0]["flops_per_step"]
    for row in rows.values():
        row["flops_per_step"] = flops
        rates = [r["gemm_rates_gflops"] for r in row["runs"]]
        if rates[0] is None:
            continue
        bf16 = [(x["before"]["bfloat16"] + x["after"]["bfloat16"]) / 2 for x in rates]
        f32 = [(x["before"]["float32"] + x["after"]["float32"]) / 2 for x in rates]
        row["gemm_bf16_gflops"], row["gemm_f32_gflops"] = statistics.median(bf16), statistics.median(f32)
        row["utilisation"] = statistics.median(flops / r["median_s"] / (b * 1e9) for r, b in zip(row["runs"], bf16))


def report(a, rows: dict) -> None:
    ours, theirs = rows["minilora"], rows["peft+bnb"]
    speedup = theirs["median_s"] / ours["median_s"]
    mem = ours["peak_mb"] / theirs["peak_mb"]
    step_mem = ours["step_peak_mb"] / max(1e-9, theirs["step_peak_mb"])
    # CPU only: the peak above the RSS right after imports (torch alone is ~200 MB of it)
    above = (
        None
        if a.device == "cuda"
        else ((ours["peak_mb"] - ours["import_rss_mb"]) / (theirs["peak_mb"] - theirs["import_rss_mb"]))
    )
    g = GEOMETRIES[a.geometry]
    cuda = a.device == "cuda"
    mem_name = "max allocated" if cuda else "peak RSS"
    family = "Llama" if a.geometry.startswith("llama") else "Gemma 3"
    compute = a.dtype if a.dtype != "auto" else ("bfloat16" if cuda else "float32")
    print(
        f"\n{a.geometry} {family} geometry (D {g['hidden_size']}, F {g['intermediate_size']}, "
        f"L {g['num_hidden_layers']}, H {g['num_attention_heads']}/Hkv {g['num_key_value_heads']}, "
        f"hd {g['head_dim']}, V {g['vocab_size']}), random weights, NF4 + double quant, "
        f"{compute} compute on {a.device}"
    )
    print(
        f"B {a.batch} x T {a.seq}, LoRA all-linear r {a.rank} alpha {2 * a.rank}, gradient checkpointing "
        f"{'on' if a.gradient_checkpointing else 'off'}, prepare_model_for_kbit_training "
        f"{'on' if a.prepare_kbit else 'off'}{', TF32 ' + ('on' if a.tf32 else 'off') if cuda else ''}; "
        f"median of {a.steps} steps after {a.warmup} warm-up, "
        f"{a.rounds} round(s)"
    )
    hdr = (
        f"{'':10}{'step s':>8}{'tok/s':>8}{mem_name + ' MB':>18}{'import RSS MB':>15}{'step peak MB':>14}"
        f"{'resident MB':>13}{'LoRA MB':>9}{'trainable':>11}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for name, r in rows.items():
        print(
            f"{name:10}{r['median_s']:8.2f}{r['tokens_per_s']:8.0f}{r['peak_mb']:18.0f}{r['import_rss_mb']:15.0f}"
            f"{r['step_peak_mb']:14.0f}{r['resident_mb']:13.1f}{r['lora_mb']:9.1f}{r['trainable_params']:11,d}"
        )
    print(
        f"minilora vs peft+bnb: {speedup:.3f}x tokens/s, {mem:.3f}x {mem_name}"
        + ("" if above is None else f" ({above:.2f}x above the import RSS)")
        + f", {step_mem:.2f}x step peak"
    )
    if cuda:
        targets = {"speedup >= 1.5": speedup >= 1.5, "peak memory <= 0.6x": mem <= 0.6}
    else:
        targets = {"no slower (speedup >= 1.0)": speedup >= 1.0, "peak RSS <= 0.8x": mem <= 0.8}
    print("targets: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in targets.items()))
    for impl, row in rows.items():
        prof = row["runs"][-1].get("profile")
        if prof:
            busy = "" if prof["device_busy_share"] is None else f", device busy {100 * prof['device_busy_share']:.0f}%"
            print(
                f"profile {impl} (last round, {prof['steps']} steps): {prof['aten_ops_per_step']:.0f} aten ops and "
                f"{prof['kernels_per_step']:.0f} kernels a step{busy}; top self time (ms a step): "
                + ", ".join(f"{t['op']} {t['self_ms_per_step']:.1f} ({t['calls']}x)" for t in prof["top"][:8])
            )
    from bench.common import cpu_info, environment, write_json

    cpu = None
    if not cuda:
        cpu = cpu_info()
        cpu["threads"] = a.threads or cpu["threads"]
        print(
            f"CPU {cpu['model']} ({' '.join(f for f in cpu['flags'] if f.startswith(('amx', 'avx512_bf16')))}), "
            f"{cpu['threads']} threads; GEMM 640x576 @ 576x1536 around each side's steps: bf16 "
            f"{ours['gemm_bf16_gflops']:.0f} / {theirs['gemm_bf16_gflops']:.0f} GFLOP/s, float32 "
            f"{ours['gemm_f32_gflops']:.0f} / {theirs['gemm_f32_gflops']:.0f}; utilisation (model FLOPs per step / "
            f"step time / that bf16 rate): minilora {100 * ours['utilisation']:.1f}%, peft+bnb "
            f"{100 * theirs['utilisation']:.1f}%"
        )

    name = a.out or (
        "train_step" if (a.geometry, a.device) == ("small", "cpu") else f"train_step_{a.geometry}_{a.device}"
    )
    g_out = dict(g, layer_types="5 sliding : 1 full")
    path = write_json(
        name,
        {
            "benchmark": "train_step",
            "geometry": a.geometry,
            "config": g_out,
            "device": a.device,
            "dtype": a.dtype if a.dtype != "auto" else ("bfloat16" if cuda else "float32"),
            "batch": a.batch,
            "seq": a.seq,
            "rank": a.rank,
            "alpha": 2 * a.rank,
            "steps": a.steps,
            "warmup": a.warmup,
            "gradient_checkpointing": a.gradient_checkpointing,
            "prepare_model_for_kbit_training": a.prepare_kbit,
            "tf32": a.tf32 if cuda else None,
            "memory": (
                "torch.cuda.max_memory_allocated over the worker's life"
                if cuda
                else "VmHWM (peak RSS) of the worker process over its life"
            ),
            "loss_chunk": a.loss_chunk,
            "lora_compute": a.lora_compute,
            "reuse_blocks": a.reuse_blocks,
            "lean_saves": a.lean_saves,
            "rounds": a.rounds,
            "threads": a.threads,
            "malloc_mmap_threshold": a.mmap_threshold or None,
            "results": rows,
            "speedup": speedup,
            "memory_ratio": mem,
            "memory_ratio_above_import": above,
            "step_memory_ratio": step_mem,
            "targets": targets,
            "cpu": cpu,
            "environment": environment(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
