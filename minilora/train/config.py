"""TrainConfig: every knob of train.py, its default, and its --help text, in one place.

The command line is generated from the dataclass: field `lora_r` is flag `--lora-r`, its
`help` metadata is the flag's help. `python train.py` with no arguments is the offline demo
(the `tiny` model on the bundled examples/demo data, with the DEMO_OVERRIDES preset that --help
shows as [tiny: value]); every flag given overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from minilora import DEMO_RUN, EXAMPLES, REPO_ROOT
from minilora.cli import UsageError
from minilora.dtypes import resolve_dtype

DEMO_TRAIN = os.path.join(EXAMPLES, "demo", "train.jsonl")
DEMO_TEST = os.path.join(EXAMPLES, "demo", "test.jsonl")
DEMO_PAIRS_TRAIN = os.path.join(EXAMPLES, "demo", "pairs_train.jsonl")  # --objective dpo / orpo on the tiny model
DEMO_PAIRS_TEST = os.path.join(EXAMPLES, "demo", "pairs_test.jsonl")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


# Every int and float field declares its bounds in its metadata, read by validate() (and by the test
# that walks every numeric field): ge / gt, the lowest value allowed (inclusive / exclusive), le / lt,
# the highest, or choices. A float must also be finite.
BOUND_KEYS = ("ge", "gt", "le", "lt", "choices")


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("tiny", "preset name (e.g. gemma-3-1b), Hugging Face repo id, or local checkpoint folder")
    data: str = _f(
        DEMO_TRAIN,
        "training JSONL (prompt/completion, alpaca, chat messages, or text; for --objective dpo or orpo, "
        "preference pairs: prompt, chosen, rejected)",
    )
    val_data: str | None = _f(None, "validation JSONL; default: --val-fraction of --data")
    eval_data: str | None = _f(
        None,
        "held-out test JSONL: checked for contamination, and scored before/after training on --eval-generate examples",
    )
    out: str = _f(DEMO_RUN, "run directory (config, metrics.jsonl, checkpoints, adapter)")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")
    # objective (minilora/train/objectives.py)
    objective: str = _f(
        "sft",
        "sft: next-token loss on the completions; dpo: preference pairs, the frozen base (LoRA off) as the "
        "reference; orpo: preference pairs, SFT loss on the chosen answer + an odds-ratio term, no reference",
        choices=["sft", "dpo", "orpo"],
    )
    beta: float = _f(0.1, "DPO: how closely the policy stays to the reference (higher: closer); IPO's tau", gt=0.0)
    label_smoothing: float = _f(
        0.0, "DPO: the probability that a pair's preference is flipped (conservative DPO)", ge=0.0, lt=0.5
    )
    dpo_loss: str = _f("sigmoid", "DPO loss: sigmoid (DPO) or ipo (IPO)", choices=["sigmoid", "ipo"])
    orpo_lambda: float = _f(0.1, "ORPO: weight of the odds-ratio term beside the SFT loss", gt=0.0)
    pair_split: bool = _f(
        False,
        "DPO/ORPO: backpropagate the rejected and then the chosen answers one after the other, the chosen ones "
        "recomputing their forward: a step holds the activations of one answer per pair (about SFT's) for one "
        "more forward of half the rows",
    )
    share_prompt: bool = _f(
        True,
        "DPO/ORPO: one row per pair, the prompt once and both answers after it, each attending to the prompt "
        "and itself (the same log-probabilities for fewer tokens); --no-share-prompt gives each answer its own "
        "row as TRL does; --pair-split always does",
    )
    precompute_reference: bool = _f(
        False,
        "DPO: compute the reference log-probabilities of every training pair once before training, store them "
        "in the run folder, and skip the reference forward in each step",
    )
    # data
    format: str = _f(
        "auto",
        "data format: auto, prompt_completion, alpaca, chat, text",
        choices=["auto", "prompt_completion", "alpaca", "chat", "text"],
    )
    template: str = _f(
        "auto",
        "render prompts with the model's chat template (chat), or raw concatenation (raw); auto: chat "
        "when the tokenizer has a chat template, raw otherwise (the choice is printed and saved in config.json)",
        choices=["auto", "chat", "raw"],
    )
    train_on_all: bool = _f(False, "put loss on every token, not only the completion")
    max_seq_len: int = _f(512, "longest sequence in tokens", ge=8)
    truncation: str = _f(
        "drop",
        "examples longer than --max-seq-len: drop them, or cut the prompt from the left",
        choices=["drop", "left"],
    )
    pack: bool = _f(False, "pack several examples per row (attention stays within each example)")
    dedup: bool = _f(True, "remove exact and near-duplicate examples before splitting (--no-dedup to keep)")
    near_threshold: float = _f(
        0.9, "MinHash Jaccard similarity at which two examples are near-duplicates", gt=0.0, le=1.0
    )
    val_fraction: float = _f(0.1, "held-out validation fraction when --val-data is not given", ge=0.0, lt=1.0)
    allow_contamination: bool = _f(False, "train even if eval prompts also appear in the training set")
    skip_bad_lines: bool = _f(False, "skip malformed data lines (counted) instead of stopping")
    # model and LoRA
    quantize: str = _f("nf4", "base weights: nf4 (QLoRA, double quantized) or none", choices=["nf4", "none"])
    dtype: str = _f(
        "auto",
        "compute dtype: auto (bf16 on GPUs with bf16 and on CPUs with bf16 matrix units, "
        "AVX512-BF16 or AMX; float32 elsewhere), bfloat16, float16, float32; LoRA weights, "
        "gradients and optimizer states stay float32",
        choices=["auto", "bfloat16", "float16", "float32"],
    )
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    parallel: str = _f(
        "auto",
        "under torchrun: ddp (a whole model per rank), fsdp (the NF4 base, LoRA weights and "
        "optimizer states sharded over the ranks), or auto",
        choices=["auto", "ddp", "fsdp"],
    )
    lora_r: int = _f(16, "LoRA rank r", ge=1)
    lora_alpha: float = _f(32.0, "LoRA alpha (scale alpha/r)", gt=0.0)
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", ge=0.0, lt=1.0)
    lora_targets: str = _f("all-linear", "all-linear, or comma-separated module names (q_proj,v_proj)")
    use_rslora: bool = _f(False, "rank-stabilized scale alpha/sqrt(r)")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    lora_compute: str = _f(
        "fused",
        "the LoRA path with a 16-bit --dtype: fused (compute's products, the term added inside the base "
        "matmul's float32 sum and rounded once, so small early updates are not rounded away), float32 "
        "(PEFT's numbers: float32 products, the term rounded, then added) or compute (PEFT under "
        "torch.autocast: the products in the compute dtype); DoRA keeps float32",
        choices=["fused", "float32", "compute"],
    )
    init: str = _f(
        "default",
        "LoRA initialisation, named as PEFT's init_lora_weights: default, gaussian (B = 0); pissa (the top-r "
        "singular directions of W train, the residual is the frozen base, quantized with --quantize nf4), "
        "pissa_niter_N (the same by randomized SVD, N iterations), olora (QR of W), loftq (needs --quantize "
        "nf4: B A fits the NF4 error of W), eva (A = the principal directions of each layer's inputs over the "
        "first training batches: forward passes before step 1)",
    )
    loftq_iters: int = _f(1, "--init loftq: alternations of NF4 quantization and rank-r SVD", ge=1)
    eva_rho: float = _f(
        1.0, "--init eva: a layer may take up to r x rho directions, r per layer in all (1 = r each)", ge=1.0, le=1000.0
    )
    eva_tau: float = _f(
        0.99, "--init eva: a direction has converged at this cosine similarity between batches", gt=0.0, le=1.0
    )
    lora_plus_ratio: float = _f(
        0.0, "LoRA+: lora_B learns at this many times --lr (e.g. 16); 0 = off, one rate", ge=0.0
    )
    init_adapter: str | None = _f(
        None,
        "start from this adapter (a train.py run folder, e.g. an SFT run, or a PEFT adapter folder) instead of "
        "a fresh one; with --objective dpo the reference is then the base plus this adapter, frozen",
    )
    gradient_checkpointing: str = _f(
        "auto",
        "recompute block activations in backward: auto (off when the plan "
        "fits the memory budget; else full recompute on as few blocks as fit), "
        "selective (every block keeps its matmul outputs and reruns the "
        "elementwise ops), on (full, every block), off",
        choices=["auto", "selective", "on", "off"],
    )
    weight_reuse: str = _f(
        "auto",
        "keep each block's dequantized NF4 weights for the backward and from step to step instead of "
        "dequantizing them again (the same numbers, faster, 2 bytes a weight in bf16): auto (on as many "
        "blocks as the memory budget allows, after the recompute choice: off before any block recomputes), "
        "on (every block), off",
        choices=["auto", "on", "off"],
    )
    memory_budget: str = _f(
        "auto",
        "bytes the run may use (auto: free RAM on the CPU, free GPU memory on CUDA); the plan must fit 85%% of it",
    )
    plan: bool = _f(
        False,
        "print the memory and time plan and exit; reads config.json (a preset's is built in) and the data, "
        "and downloads nothing else: without the tokenizer on disk, token counts are estimated",
    )
    tf32: bool = _f(
        True,
        "CUDA: run float32 matmuls (the LoRA terms and their gradients) on TF32 tensor "
        "cores; the LoRA term is rounded to the 16-bit compute dtype before it is added, no "
        "finer than TF32's inputs (--no-tf32: full float32)",
    )
    loss_chunk: int = _f(
        0,
        "labelled tokens per cross-entropy chunk: at most chunk x vocab float32 logits "
        "exist at once (256 x 262k = 256 MiB for Gemma 3); 0: 64 on the CPU, 256 on CUDA",
        ge=0,
    )
    # optimization
    lr: float = _f(2e-4, "peak learning rate", gt=0.0)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine schedule)", ge=0.0, le=1.0)
    warmup_steps: int = _f(10, "linear warmup steps", ge=0)
    weight_decay: float = _f(0.0, "decoupled weight decay", ge=0.0)
    optimizer_bits: int = _f(32, "optimizer state precision: 32 or 8 (blockwise)", choices=[32, 8])
    optimizer_budget: str = _f("none", "device memory for optimizer pages: none (all resident), auto, or bytes")
    batch_size: int = _f(8, "examples per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step (loss normalized by tokens)", ge=1)
    epochs: int = _f(1, "passes over the training data (ignored when --max-steps is set)", ge=0)
    max_steps: int = _f(0, "optimizer steps; 0 = --epochs worth", ge=0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)", ge=0.0)
    seed: int = _f(0, "seed for data order, splits, LoRA init and dropout", ge=0, le=2**32 - 1)
    # evaluation, checkpoints, logging
    eval_every: int = _f(50, "validation loss every N steps (0 = only at the end)", ge=0)
    early_stopping: int = _f(0, "stop after N validations without improvement (0 = off)", ge=0)
    eval_generate: int = _f(
        40,
        "held-out examples scored by greedy generation before and after (pairs: by preference accuracy) (0 = skip)",
        ge=0,
    )
    save_every: int = _f(100, "checkpoint every N steps (and at the end)", ge=0)
    keep_checkpoints: int = _f(2, "checkpoints kept on disk", ge=1)
    log_every: int = _f(1, "log line every N steps", ge=1)
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)", ge=0)
    debug_nan_at_step: int = _f(0, "testing aid: make the loss NaN at this step", hidden=True, ge=0)
    debug_interrupt_at_step: int = _f(0, "testing aid: send SIGINT to this process after this step", hidden=True, ge=0)

    def resolved_dtype(self, device_type: str):
        return resolve_dtype(self.dtype, device_type)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


ConfigError = UsageError  # a flag value that cannot work; the message names the flag


def bounds_text(meta) -> str | None:
    """What a numeric field's bounds allow, in words ("at least 1", "in [0, 1)", "one of 32, 8"), or None
    when the metadata declares none."""
    num = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    if "choices" in meta:
        return "one of " + ", ".join(map(num, meta["choices"]))
    lo = ("[", num(meta["ge"])) if "ge" in meta else ("(", num(meta["gt"])) if "gt" in meta else None
    hi = ("]", num(meta["le"])) if "le" in meta else (")", num(meta["lt"])) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return "positive" if lo == ("(", "0") else f"at least {lo[1]}" if lo[0] == "[" else f"greater than {lo[1]}"
    if hi:
        return f"at most {hi[1]}" if hi[0] == "]" else f"less than {hi[1]}"
    return None


def in_bounds(value, meta) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if "choices" in meta:
        return value in meta["choices"]
    return (
        ("ge" not in meta or value >= meta["ge"])
        and ("gt" not in meta or value > meta["gt"])
        and ("le" not in meta or value <= meta["le"])
        and ("lt" not in meta or value < meta["lt"])
    )


def validate(cfg: TrainConfig) -> None:
    """Refuse, in one sentence naming the flag, a value that cannot work: each numeric field's declared
    bounds, then the checks that span fields or look at files; nothing is written before this passes."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in ("int", "float", int, float) and not in_bounds(value, f.metadata):
            flag = "--" + f.name.replace("_", "-")
            allowed = bounds_text(f.metadata) or "a finite number"
            unbounded = not any(k in f.metadata for k in ("le", "lt", "choices")) and allowed != "a finite number"
            finite = " and finite" if f.type in ("float", float) and unbounded else ""  # what inf breaks
            raise ConfigError(f"{flag} must be {allowed}{finite} (got {value}); fix the flag and run again.")
    if not cfg.out.strip():
        raise ConfigError("--out is empty; pass the run folder's path (e.g. runs/mytask).")
    if cfg.early_stopping and (cfg.eval_every == 0 or (cfg.val_fraction == 0 and not cfg.val_data)):
        why = "--eval-every 0 validates only at the end" if cfg.eval_every == 0 else "there is no validation set"
        raise ConfigError(
            f"--early-stopping {cfg.early_stopping} counts validations during training, but {why}; pass "
            "--eval-every N and --val-fraction or --val-data, or drop --early-stopping."
        )
    if cfg.epochs < 1 and cfg.max_steps == 0:
        raise ConfigError("--epochs must be at least 1 (or set --max-steps); fix the flag and run again.")
    for flag, path in (("--data", cfg.data), ("--val-data", cfg.val_data), ("--eval-data", cfg.eval_data)):
        if path is not None and os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a folder; pass the path of a JSONL file.")
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path} does not exist; pass the path of a JSONL file.")
    check_init_flags(cfg)
    if cfg.objective != "sft":
        for on, flag in ((cfg.pack, "--pack"), (cfg.train_on_all, "--train-on-all")):
            if on:
                raise ConfigError(f"{flag} does not apply to preference pairs (--objective {cfg.objective}); drop it.")
        if cfg.format != "auto":
            raise ConfigError(
                f"--format {cfg.format} names an SFT format; --objective {cfg.objective} reads preference pairs "
                "(prompt, chosen, rejected), so drop --format."
            )
    if cfg.label_smoothing > 0 and cfg.dpo_loss == "ipo":
        raise ConfigError("--label-smoothing applies to --dpo-loss sigmoid (conservative DPO), not ipo; drop one.")
    if cfg.memory_budget != "auto" and not cfg.memory_budget.isdigit():
        raise ConfigError(f"--memory-budget {cfg.memory_budget!r} must be auto or a number of bytes.")
    if cfg.optimizer_budget not in ("none", "auto") and not cfg.optimizer_budget.isdigit():
        raise ConfigError(f"--optimizer-budget {cfg.optimizer_budget!r} must be none, auto, or a number of bytes.")


def check_init_flags(cfg: TrainConfig) -> None:
    """--init and what it needs of the other flags: a ConfigError (one sentence) for what cannot work."""
    from minilora.lora import inits

    if not inits.is_known(cfg.init):
        raise ConfigError(f"--init {cfg.init} is unknown; use one of {inits.known_inits()} (N a positive integer).")
    if cfg.use_dora and inits.reads_weights(cfg.init):
        raise ConfigError(f"--init {cfg.init} is not supported with --use-dora; drop --use-dora or use --init default.")
    if cfg.init == "eva" and cfg.objective != "sft":
        raise ConfigError(
            f"--init eva fits A to the inputs of SFT batches, not preference pairs; use --init default with "
            f"--objective {cfg.objective}, or start from an EVA-initialised SFT run with --init-adapter."
        )
    if cfg.init == "loftq" and cfg.quantize == "none":
        raise ConfigError(
            "--init loftq fits the adapter to the NF4 quantization error of the base, so it needs --quantize "
            "nf4; drop --quantize none, or use --init pissa for an unquantized base."
        )


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """train.py's parser, one flag per TrainConfig field; no abbreviations (`--epoch` is an error).
    suppress_defaults: flags not on the command line stay out of the namespace (see given_flags)."""
    from minilora.cli import EXIT_CODES_HELP, parser

    p = parser(
        "train.py",
        "QLoRA fine-tuning: NF4 base, LoRA adapters, paged AdamW. With no arguments: the "
        "offline demo (tiny model, bundled examples).",
        epilog="--model tiny (the offline demo) uses the preset shown as [tiny: ...] in a flag's help "
        "unless that flag is given; with --objective dpo or orpo, on the bundled preference pairs "
        "(examples/demo/pairs_*.jsonl) for 1 epoch, into runs/demo-dpo or runs/demo-orpo. " + EXIT_CODES_HELP,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = {k: v for k, v in f.metadata.items() if k not in BOUND_KEYS or k == "choices"}  # bounds: validate()
        help_ = argparse.SUPPRESS if meta.pop("hidden", False) else meta.pop("help")
        meta.pop("help", None)
        if f.name in DEMO_OVERRIDES and help_ is not argparse.SUPPRESS:
            demo = DEMO_OVERRIDES[f.name]
            help_ += f" [tiny: {os.path.relpath(demo, REPO_ROOT) if f.name == 'eval_data' else demo}]"
        default = argparse.SUPPRESS if suppress_defaults else f.default
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, type=typ, default=default, help=help_, **meta)
    return p


def given_flags(argv) -> set[str]:
    """The TrainConfig fields named on the command line (however spelled: --no-dedup names dedup)."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(list(argv))))


# The offline demo trains a tiny random model, which wants a far higher learning rate and more
# passes than a pretrained 1B model; these apply to `--model tiny` unless the flag is given, and
# --help shows them as [tiny: value].
DEMO_OVERRIDES = {
    "eval_data": DEMO_TEST,
    "lr": 3e-3,
    "epochs": 3,
    "warmup_steps": 10,
    "eval_every": 25,
    "lora_dropout": 0.0,
    "threads": 1,
    "log_every": 10,
    "save_every": 50,
}


# `--objective dpo` or `orpo` on the tiny model: the bundled preference pairs (examples/demo/pairs_*.jsonl),
# on top of DEMO_OVERRIDES, unless the flag is given.
DEMO_PAIR_OVERRIDES = {
    "data": DEMO_PAIRS_TRAIN,
    "eval_data": DEMO_PAIRS_TEST,
    "epochs": 1,
    "eval_every": 0,
    "save_every": 0,
    "log_every": 2,
    "eval_generate": 90,  # every bundled test pair: scoring a pair is two forwards, no generation
}


def parse_args(argv=None) -> TrainConfig:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.model == "tiny":
        given = given_flags(argv)
        pairs = DEMO_PAIR_OVERRIDES if cfg.objective != "sft" else {}
        if pairs:  # its own run folder: runs/demo holds the SFT demo's checkpoints
            pairs = {**pairs, "out": os.path.join("runs", f"demo-{cfg.objective}")}
        for name, value in {**DEMO_OVERRIDES, **pairs}.items():
            if name not in given:
                setattr(cfg, name, value)
    for name in ("val_data", "eval_data", "init_adapter"):
        if getattr(cfg, name) in ("", "none", "None"):
            setattr(cfg, name, None)
    # absolute, as config.json records them: eval.py and --resume then find them from any folder
    for name in ("data", "val_data", "eval_data", "init_adapter"):
        if getattr(cfg, name):
            setattr(cfg, name, os.path.abspath(os.path.expanduser(getattr(cfg, name))))
    if cfg.model != "tiny" and os.path.isdir(os.path.expanduser(cfg.model)):  # a local folder, not a hub name
        cfg.model = os.path.abspath(os.path.expanduser(cfg.model))
    return cfg
