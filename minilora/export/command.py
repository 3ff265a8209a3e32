"""The `eval.py export` command: its flags, the refusal of a flag that would do nothing with the others
given, and the call of merge.export_adapter (whose docstring has what an export writes and checks)."""

from __future__ import annotations

import argparse
import os
import sys

from minilora import DEMO_RUN
from minilora.cli import fail, parser


def export_parser() -> argparse.ArgumentParser:
    from minilora.export.gguf import GGUF_TYPES

    p = parser(
        "eval.py export",
        "Merge a run's adapter into its base and write it for serving: a Hugging Face checkpoint "
        "(transformers / vLLM; optionally bitsandbytes NF4), one GGUF file (llama.cpp / Ollama), or "
        "the adapter alone as a GGUF LoRA (llama.cpp --lora). The export is written into a temporary "
        "folder beside --out, read back and compared with the merged model, and scored on the run's eval "
        "data beside it; only then is it renamed to --out (exit 1, nothing written, when they disagree "
        "or the export does the task measurably worse).",
        epilog="exit codes: 0 done; 1 the export failed its read-back or task gate (nothing written); "
        "2 a user error (one sentence on stderr); 3 interrupted (Ctrl-C: nothing written).",
    )
    a = p.add_argument
    a("--adapter", default=DEMO_RUN, help="run directory written by train.py (or its adapter/ folder)")
    a(
        "--out",
        required=True,
        help="--format hf: the checkpoint folder (new or empty); gguf, gguf-lora: the file, a path ending in "
        ".gguf (`ggdir/` is refused: pass ggdir/model.gguf). Never the --adapter run, a folder inside or "
        "above it, or the current folder",
    )
    a(
        "--format",
        choices=["hf", "gguf", "gguf-lora"],
        default="hf",
        help="hf: checkpoint folder; gguf: merged model as one GGUF file; gguf-lora: the adapter alone as GGUF",
    )
    a(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=argparse.SUPPRESS,  # unset unless given: refused with another --format
        help="weight dtype (--format hf only; default bfloat16)",
    )
    a("--quantize-4bit", action="store_true", help="write bitsandbytes' NF4 layout (double quant) instead")
    a(
        "--gguf-type",
        choices=GGUF_TYPES,
        default=argparse.SUPPRESS,  # unset unless given: refused with another --format
        help="GGUF tensor types (--format gguf only; default f16); q4_k_m / q5_k_m / q6_k are llama-quantize's recipes",
    )
    a(
        "--no-validate",
        action="store_true",
        help="skip reading the export back and comparing it with the merged model, and the task gate",
    )
    a(
        "--gate-examples",
        type=int,
        default=40,
        help="task gate: score the export on up to N examples of the run's eval data (0 = skip the gate)",
    )
    a(
        "--max-quality-drop",
        type=float,
        default=5.0,
        help="task gate: exit 1 when exact or structured match falls more than this many points below the merged model",
    )
    a("--model", default=None, help="base model (default: the run's --model)")
    a(
        "--merge-base",
        choices=["auto", "dequantized", "original"],
        default="auto",
        help="merge into the dequantized NF4 weights the run trained against, or the checkpoint's own "
        "(auto: dequantized for a QLoRA run; not with --format gguf-lora, which writes the adapter alone)",
    )
    a(
        "--overwrite",
        action="store_true",
        help="replace an earlier export at --out: a folder eval.py export wrote (its .minilora-export.json "
        "lists every file in it) or a GGUF file; anything else there is never replaced",
    )
    return p


def run_export(args) -> int:
    from minilora.export.merge import export_adapter
    from minilora.export.readback import ValidationError

    if args.gate_examples < 0 or not 0 <= args.max_quality_drop <= 100:
        return fail("--gate-examples cannot be negative and --max-quality-drop is in points, 0 to 100; fix the flag.")
    defaults = export_parser()
    gate_set = [f for f in ("gate_examples", "max_quality_drop") if getattr(args, f) != defaults.get_default(f)]
    if args.no_validate and gate_set:  # the gate runs in the validation that --no-validate skips
        flags = " and ".join("--" + f.replace("_", "-") for f in gate_set)
        return fail(f"{flags} set the task gate, which --no-validate skips; drop {flags} or --no-validate.")
    gguf_type, dtype = getattr(args, "gguf_type", None), getattr(args, "dtype", None)  # None: not given
    if gguf_type is not None and args.format != "gguf":  # a flag that would do nothing is refused
        return fail(f"--gguf-type sets the tensors of --format gguf, not of --format {args.format}; drop the flag.")
    if dtype is not None and args.format != "hf":
        what = "--gguf-type sets a GGUF's tensor types" if args.format == "gguf" else "the adapter is written as is"
        return fail(f"--dtype sets the weights of --format hf, not of --format {args.format} ({what}); drop the flag.")
    try:
        out = export_adapter(
            args.adapter,
            args.out,
            dtype=dtype or "bfloat16",
            quantize_4bit=args.quantize_4bit,
            overwrite=args.overwrite,
            model_name=args.model,
            merge_base=args.merge_base,
            fmt=args.format,
            gguf_type=gguf_type or "f16",
            validate=not args.no_validate,
            log=lambda m: print(m, file=sys.stderr),
            gate_examples=args.gate_examples,
            max_quality_drop=args.max_quality_drop,
        )
    except ValidationError as e:
        return fail(str(e), code=1)
    if os.path.isdir(out):
        size, files = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)), sorted(os.listdir(out))
        print(f"wrote {out} ({size / 2**20:,.1f} MiB): {', '.join(files)}")
    else:
        print(f"wrote {out} ({os.path.getsize(out) / 2**20:,.1f} MiB)")
    return 0
