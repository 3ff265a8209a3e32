"""One DPO step, end to end: minilora beside TRL's DPOTrainer + PEFT + bitsandbytes, and minilora's SFT step.

    python -m bench.dpo                              # CPU: the 135M-class Llama geometry, 4 pairs
    python -m bench.dpo --layers 6 --steps 3         # a quicker look

Shape letters: P pairs per step, T the longest sequence, L layers, r LoRA rank.

The same random-weight checkpoint (bench/train_step.py's write_checkpoint: a transformers model saved
with save_pretrained into a temp folder), the same P pairs of random token ids (a prompt of random
length, then a chosen and a rejected answer of random lengths, --prompt and --answer), the same rank,
float32 compute on the CPU, no gradient checkpointing and no dropout on every side:

  minilora-dpo  load_model(dir, quantize="nf4"), apply_lora(all-linear, r, alpha=2r), PagedAdamW, and
                the DPO objective train.py runs (objectives.py): the reference forward with LoRA off
                under no_grad, then the policy forward through the chunked head, both over P rows, each
                a pair's prompt once and both answers (train.py's default, data/pairs.py's SharedPairs);
                loss_sum / P backward, clip_grad_norm_(1.0), step, zero_grad.
  minilora-dpo-rows  the same with --no-share-prompt: 2P rows (chosen rows, then rejected), TRL's layout.
  trl           AutoModelForCausalLM.from_pretrained(dir, BitsAndBytesConfig(nf4, double quant, compute
                dtype float32)), DPOTrainer(peft_config=LoraConfig(all-linear, r, alpha=2r)) as TRL builds
                it (it casts a QLoRA adapter to bf16, its own default), and the step on trainer.compute_loss
                of the same batch in TRL's layout (input_ids, attention_mask, completion_mask): the policy
                forward and the reference forward with PEFT's adapters disabled, its fused LM head;
                backward, clip_grad_norm_(1.0), torch.optim.AdamW step, zero_grad.
  minilora-dpo-split  the same with --pair-split: the rejected and then the chosen halves backpropagate one
                after the other, the chosen half recomputing its forward (pair_objective.py).
  minilora-dpo-recompute  (with --recompute-blocks K) minilora-dpo with its first K blocks recomputed in
                backward (train.py --gradient-checkpointing K, what --memory-budget makes the planner choose):
                the activations kept in L - K blocks only.
  minilora-sft  minilora's SFT step (the next-token loss train.py runs) on the P chosen sequences alone:
                what DPO's memory is compared to.

Each runs in its own subprocess (bench.train_step's method): step time is the median of --steps steps
after --warmup, pairs/s = P / median; peak memory is the child's VmHWM over its whole life (imports,
load, training) and the step peak (VmHWM reset after loading, minus the RSS then). glibc keeps freed
heap blocks resident, so the RSS may stay above what is live; --mmap-threshold 65536 gives every block
of 64 KiB and more its own mapping, returned when freed, so that RSS follows live memory (every side alike).
Targets: minilora-dpo at least 1.5x TRL's pairs/s at at most 0.6x its peak RSS; minilora's DPO step
peak at most 1.25x its own SFT step peak on the same pairs' chosen answers.
Writes bench/results/dpo.json (or --out NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPLS = ("minilora-dpo", "minilora-dpo-rows", "minilora-dpo-split", "trl", "minilora-sft")
RECOMPUTE = "minilora-dpo-recompute"  # run when --recompute-blocks > 0


def make_pairs(a, vocab: int):
    """P pairs of random ids: (prompt, chosen, rejected) token lists, lengths drawn from --prompt / --answer."""
    import torch

    g = torch.Generator().manual_seed(1)
    draw = lambda spec: int(torch.randint(int(spec.split(":")[0]), int(spec.split(":")[1]) + 1, (1,), generator=g))
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    return [(ids(draw(a.prompt)), ids(draw(a.answer)) + [2], ids(draw(a.answer)) + [2]) for _ in range(a.pairs)]


def worker(impl: str, ckpt: str, a) -> dict:
    import torch

    from bench.common import status_kib
    from bench.train_step import GEOMETRIES, resident_bytes
    from minilora.data.encode import EncodedExample
    from minilora.data.packing import IGNORE
    from minilora.data.pairs import EncodedPair, collate_pairs

    torch.set_num_threads(a.threads)
    pairs = make_pairs(a, GEOMETRIES[a.geometry]["vocab_size"])
    seq = lambda p, ans: EncodedExample(p + ans, [IGNORE] * len(p) + ans)
    batch = collate_pairs([[i] for i in range(len(pairs))], [EncodedPair(seq(p, c), seq(p, r)) for p, c, r in pairs], 0)
    P = batch.n_pairs
    base_rss = status_kib("VmRSS")
    t0 = time.perf_counter()
    if impl.startswith("minilora"):
        from minilora.data.packing import Batch
        from minilora.lora.surgery import apply_lora, lora_parameters
        from minilora.models.loader import load_model
        from minilora.optim.paged_adamw import PagedAdamW
        from minilora.train.objectives import make_objective

        model, _ = load_model(ckpt, quantize="nf4", dtype=torch.float32)
        apply_lora(model, targets="all-linear", r=a.rank, alpha=2 * a.rank, dropout=0.0, seed=0, verbose=False)
        model.set_gradient_checkpointing(a.recompute_blocks if impl == RECOMPUTE else False)
        model.train()
        params = lora_parameters(model)
        opt = PagedAdamW(params, lr=2e-4, weight_decay=0.0)
        kind = "sft" if impl == "minilora-sft" else "dpo"
        split, rows_layout = impl == "minilora-dpo-split", impl == "minilora-dpo-rows"
        objective = make_objective(kind, a.loss_chunk, beta=0.1, pair_split=split, share_prompt=not rows_layout)
        ran = objective.rows(batch) if kind == "dpo" else batch  # what the forwards run (before SFT's slice)
        if impl == "minilora-sft":  # the chosen rows only, as one SFT batch
            rows = {k: getattr(batch, k)[:P] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
            n = int((rows["labels"][:, 1:] != IGNORE).sum())
            batch = ran = Batch(**rows, segment_ids=rows["attention_mask"].clone(), n_label_tokens=n)

        def loss_backward() -> float:
            s, n, _ = objective(model, batch)
            (s / n).backward()
            return float(s.detach()) / n
    else:
        import bitsandbytes  # noqa: F401
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        from trl import DPOConfig, DPOTrainer

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
        )
        model.config.use_cache = False
        lora = LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        args = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl."),
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            beta=0.1,
        )
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "examples", "tokenizer"))  # TRL prepares a dataset
        data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
        model = trainer.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        ran = batch
        inputs = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "completion_mask": (batch.labels != IGNORE).long(),
        }

        def loss_backward() -> float:
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            return float(loss.detach())

    load_s = time.perf_counter() - t0
    model_bytes, _ = resident_bytes(model)

    def step() -> float:
        loss = loss_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    before, life_peak_load = status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS: from here it is the steps' peak
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        t1 = time.perf_counter()
        losses.append(step())
        if i >= a.warmup:
            times.append(time.perf_counter() - t1)
    train_peak = status_kib("VmHWM") * 1024
    med = statistics.median(times)
    return {
        "median_s": med,
        "times_s": times,
        "pairs_per_s": P / med,
        "rows": int(ran.input_ids.shape[0]),
        "T": int(ran.input_ids.shape[1]),
        "losses": losses,
        "load_s": load_s,
        "import_rss_mb": base_rss / 1024,
        "peak_mb": max(train_peak, life_peak_load) / 2**20,
        "step_peak_mb": (train_peak - before) / 2**20,
        "resident_mb": model_bytes / 2**20,
    }


def run_worker(impl: str, ckpt: str, argv: list[str], mmap_threshold: int = 0) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    if mmap_threshold > 0:  # glibc: every block above this size is its own mapping, unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    from bench.common import run_json_worker

    return run_json_worker("bench.dpo", impl, ckpt, argv, env)


def main() -> None:
    from bench.train_step import GEOMETRIES, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="llama-135m", choices=sorted(GEOMETRIES))
    ap.add_argument("--layers", type=int, default=0, help="override the geometry's layer count (0 = keep)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (P)")
    ap.add_argument("--prompt", default="96:160", metavar="LO:HI", help="prompt tokens, drawn per pair")
    ap.add_argument("--answer", default="48:128", metavar="LO:HI", help="tokens of each answer, drawn per answer")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    ap.add_argument("--loss-chunk", type=int, default=64, help="minilora's rows per loss chunk (train.py on a CPU: 64)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in each worker")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to reuse (written there if missing)")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ for every worker (0: glibc's; 65536: RSS follows live memory)",
    )
    ap.add_argument(
        "--recompute-blocks",
        type=int,
        default=0,
        help="also run the default step with its first K blocks recomputed (minilora-dpo-recompute); 0: not run",
    )
    ap.add_argument("--out", default="dpo", help="results name under bench/results/")
    ap.add_argument("--worker", choices=(*IMPLS, RECOMPUTE), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layers:
        GEOMETRIES[a.geometry]["num_hidden_layers"] = a.layers
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a)))
        return
    import importlib.metadata

    from bench.common import cpu_info, environment, write_json

    argv = ["--geometry", a.geometry, "--layers", str(a.layers), "--pairs", str(a.pairs), "--prompt", a.prompt]
    argv += ["--answer", a.answer, "--rank", str(a.rank), "--loss-chunk", str(a.loss_chunk)]
    argv += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    argv += ["--recompute-blocks", str(a.recompute_blocks)]
    impls = (*IMPLS, RECOMPUTE) if a.recompute_blocks > 0 else IMPLS
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt or os.path.join(tmp, "ckpt")
        if not os.path.isdir(ckpt):
            write_checkpoint(ckpt, a.geometry)
        res = {impl: run_worker(impl, ckpt, argv, a.mmap_threshold) for impl in impls}
    ours, split, trl, sft = res["minilora-dpo"], res["minilora-dpo-split"], res["trl"], res["minilora-sft"]
    rows = res["minilora-dpo-rows"]
    print(f"DPO step, {a.pairs} pairs, {a.geometry}, CPU, {a.threads} thread(s)")
    print(f"{'':24} {'rows x T':>9} {'s/step':>8} {'pairs/s':>8} {'peak RSS MB':>12} {'step peak MB':>13}")
    for impl in impls:
        r = res[impl]
        shape = f"{r['rows']}x{r['T']}"
        print(
            f"{impl:24} {shape:>9} {r['median_s']:8.2f} {r['pairs_per_s']:8.3f} {r['peak_mb']:12.0f} "
            f"{r['step_peak_mb']:13.0f}"
        )
    ratios = {
        "pairs_per_s_vs_trl": ours["pairs_per_s"] / trl["pairs_per_s"],
        "peak_rss_vs_trl": ours["peak_mb"] / trl["peak_mb"],
        "dpo_step_peak_vs_sft": ours["step_peak_mb"] / max(1e-9, sft["step_peak_mb"]),
        "rows_pairs_per_s_vs_trl": rows["pairs_per_s"] / trl["pairs_per_s"],
        "rows_peak_rss_vs_trl": rows["peak_mb"] / trl["peak_mb"],
        "rows_step_peak_vs_sft": rows["step_peak_mb"] / max(1e-9, sft["step_peak_mb"]),
        "split_pairs_per_s_vs_trl": split["pairs_per_s"] / trl["pairs_per_s"],
        "split_peak_rss_vs_trl": split["peak_mb"] / trl["peak_mb"],
        "split_step_peak_vs_sft": split["step_peak_mb"] / max(1e-9, sft["step_peak_mb"]),
    }
    if RECOMPUTE in res:
        rc = res[RECOMPUTE]
        ratios["recompute_pairs_per_s_vs_trl"] = rc["pairs_per_s"] / trl["pairs_per_s"]
        ratios["recompute_peak_rss_vs_trl"] = rc["peak_mb"] / trl["peak_mb"]
        ratios["recompute_step_peak_vs_sft"] = rc["step_peak_mb"] / max(1e-9, sft["step_peak_mb"])
    print(
        f"pairs/s {ratios['pairs_per_s_vs_trl']:.2f}x TRL's (target >= 1.5), peak RSS {ratios['peak_rss_vs_trl']:.2f}x "
        f"(target <= 0.6), DPO step peak {ratios['dpo_step_peak_vs_sft']:.2f}x the SFT step's (target <= 1.25)\n"
        f"--no-share-prompt: pairs/s {ratios['rows_pairs_per_s_vs_trl']:.2f}x TRL's, peak RSS "
        f"{ratios['rows_peak_rss_vs_trl']:.2f}x, DPO step peak {ratios['rows_step_peak_vs_sft']:.2f}x the SFT step's\n"
        f"--pair-split: pairs/s {ratios['split_pairs_per_s_vs_trl']:.2f}x TRL's, peak RSS "
        f"{ratios['split_peak_rss_vs_trl']:.2f}x, DPO step peak {ratios['split_step_peak_vs_sft']:.2f}x the SFT step's"
    )
    if RECOMPUTE in res:
        print(
            f"first {a.recompute_blocks} blocks recomputed: pairs/s {ratios['recompute_pairs_per_s_vs_trl']:.2f}x "
            f"TRL's, peak RSS {ratios['recompute_peak_rss_vs_trl']:.2f}x, DPO step peak "
            f"{ratios['recompute_step_peak_vs_sft']:.2f}x the SFT step's"
        )
    env = {**environment(), "trl": importlib.metadata.version("trl"), "cpu": cpu_info()}
    print(
        f"{env['cpu']['model']}; flags {' '.join(env['cpu']['flags'])}; torch {env['torch']}, trl {env['trl']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}"
    )
    path = write_json(a.out, {"args": vars(a), "environment": env, "results": res, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
