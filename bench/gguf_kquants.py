"""GGUF K-quant exports on a 135M-class geometry: file size, export time, writer speed and logit error
per --gguf-type, and our writers' speed beside gguf-py's Q8_0 / Q4_0 / Q5_0 quantizers.

    python -m bench.gguf_kquants [--geometry smollm2-135m|aligned-125m] [--prompts 8]

Geometries (random weights, the bundled tokenizer padded to the vocabulary):
  smollm2-135m   SmolLM2-135M's: 30 layers, hidden 576, MLP 1536, 9 heads / 3 kv, vocab 49152, tied.
                 576 is not a multiple of 256, so q4_k_m / q5_k_m / q6_k are mostly llama.cpp's
                 Q5_0 / Q5_1 / Q8_0 fallbacks; only ffn_down (rows of 1536) holds K-quant blocks.
  aligned-125m   every row a multiple of 256: 12 layers, hidden 768, MLP 2048, 12 heads / 4 kv,
                 vocab 32000, untied: K-quant blocks throughout.
Each type is exported through eval.py's code path (merge in float32, write; validation off) and read
back with transformers' GGUF loader. Against the merged model (transformers reading the float32
export) over random prompts: the max logit error relative to the largest logit and teacher-forced
top-1 agreement. A random model's logits are nearly flat, so these are lower bounds for a trained one.
"writer s" is the time spent turning float tensors into GGUF bytes (encode_tensor) within the export.
Writes bench/results/gguf_kquants_<geometry>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import cpu_info

GEOMETRIES = {
    "smollm2-135m": dict(layers=30, hidden=576, ffn=1536, heads=9, kv=3, vocab=49152, tied=True),
    "aligned-125m": dict(layers=12, hidden=768, ffn=2048, heads=12, kv=4, vocab=32000, tied=False),
}
TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def cpu_facts() -> dict:
    info = cpu_info()
    model, flags = info["model"], info["flags"]
    return {
        "cpu": model,
        "flags": flags,
        "os_cpu_count": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "numpy_threads": 1,  # the writers are numpy elementwise code: one thread
    }


def build_run(tmp: str, g: dict, seed: int = 0) -> str:
    import transformers

    from bench.gguf_export import run_from_model

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=g["vocab"],
        hidden_size=g["hidden"],
        intermediate_size=g["ffn"],
        num_hidden_layers=g["layers"],
        num_attention_heads=g["heads"],
        num_key_value_heads=g["kv"],
        tie_word_embeddings=g["tied"],
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return run_from_model(tmp, transformers.LlamaForCausalLM(cfg), seed)


def writer_speeds(repeat: int) -> list[dict]:
    """Values per second of each writer on the same (1536, 1536) weight-like matrix."""
    import gguf

    from bench.common import interleaved_medians
    from minilora.export import kquants, q5_quants

    T = gguf.GGMLQuantizationType
    x = (np.random.default_rng(0).standard_normal((1536, 1536)) * 0.02).astype(np.float32)
    fns = {f"gguf-py {k}": (lambda k=k: gguf.quants.quantize(x, getattr(T, k))) for k in ("Q8_0", "Q4_0", "Q5_0")}
    fns.update({f"minilora {k}": (lambda k=k: q5_quants.quantize(x, k)) for k in ("Q5_0", "Q5_1")})
    fns.update({f"minilora {k}": (lambda k=k: kquants.quantize(x, k)) for k in ("Q4_K", "Q5_K", "Q6_K")})
    secs = interleaved_medians(fns, repeat=repeat, warmup=1)
    return [{"writer": k, "seconds": s, "mvalues_per_s": x.size / s / 1e6} for k, s in secs.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per writer in the speed comparison")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gguf_kquants_<geometry>.json)")
    args = p.parse_args(argv)

    from bench.common import environment, write_json
    from bench.gguf_export import size_of, teacher_forced_top1
    from minilora.export import gguf as G
    from minilora.export import readback as V
    from minilora.export.merge import export_adapter

    g, facts = GEOMETRIES[args.geometry], cpu_facts()
    print(
        f"CPU: {facts['cpu']} ({', '.join(facts['flags'])}); {facts['sched_cpus']} CPUs for this process, "
        f"torch threads {facts['torch_threads']}, writers single-threaded numpy"
    )
    quiet = lambda m: None  # noqa: E731
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1024) for _ in range(32)] for _ in range(args.prompts)]
    writer_time = [0.0]
    encode = G.encode_tensor

    def timed_encode(t, qtype):
        t0 = time.perf_counter()
        out = encode(t, qtype)
        writer_time[0] += time.perf_counter() - t0
        return out

    G.encode_tensor = timed_encode  # gguf_tensors looks it up at call time
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(tmp, g)
        ref_dir = os.path.join(tmp, "f32")
        export_adapter(run, ref_dir, dtype="float32", validate=False, log=quiet)
        hf_cfg, f32 = json.load(open(os.path.join(ref_dir, "config.json"))), size_of(ref_dir)
        n_params = f32 // 4
        ref = V.outputs(V.reload("hf", ref_dir, hf_cfg), prompts)
        for gguf_type in TYPES:
            path = os.path.join(tmp, f"{gguf_type}.gguf")
            writer_time[0] = 0.0
            t0 = time.perf_counter()
            export_adapter(run, path, fmt="gguf", gguf_type=gguf_type, validate=False, log=quiet)
            seconds = time.perf_counter() - t0
            got = V.outputs(V.reload("gguf", path, hf_cfg), prompts)
            stats = V.compare(ref, got)
            rows.append(
                {
                    "gguf_type": gguf_type,
                    "bytes": size_of(path),
                    "bits_per_param": 8 * size_of(path) / n_params,
                    "export_s": seconds,
                    "writer_s": writer_time[0],
                    "rel_logit_err": stats["rel_logit_err"],
                    "top1_agree": teacher_forced_top1(ref, got),
                }
            )
            os.remove(path)
            print(f"  {gguf_type}: {rows[-1]['export_s']:.1f} s", flush=True)
    G.encode_tensor = encode
    speeds = writer_speeds(args.repeat)

    print(f"\n{args.geometry}: {n_params / 1e6:.0f}M parameters, {args.prompts} random prompts x 32 tokens")
    print(f"{'type':8}{'MiB':>9}{'bits/w':>8}{'export s':>10}{'writer s':>10}{'logit rel err':>15}{'top-1':>8}")
    for r in rows:
        print(
            f"{r['gguf_type']:8}{r['bytes'] / 2**20:9.1f}{r['bits_per_param']:8.2f}{r['export_s']:10.1f}"
            f"{r['writer_s']:10.1f}{r['rel_logit_err']:15.2e}{r['top1_agree']:8.1%}"
        )
    print(f"\n{'writer (1536 x 1536 float32)':30}{'s':>8}{'Mvalues/s':>11}")
    for s in speeds:
        print(f"{s['writer']:30}{s['seconds']:8.3f}{s['mvalues_per_s']:11.1f}")
    payload = {"args": vars(args), "env": {**environment(), **facts}, "geometry": g, "float32_bytes": f32}
    payload.update(rows=rows, writer_speeds=speeds)
    path = write_json(f"gguf_kquants_{args.geometry}", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
