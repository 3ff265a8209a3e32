"""llama.cpp as the oracle of minilora's GGUF writers and recipes: per tensor, does llama-quantize pick
the same GGML type and write the same bytes; and how do both files run in llama.cpp itself.

    python -m bench.gguf_llamacpp [--geometry smollm2-135m|aligned-125m] [--types q4_k_m q8_0 ...]

Needs llama-cpp-python, which is not a dependency of minilora (bench/README.md says how to build
it); without it the script says so and exits 2.

Inputs (both sides quantize the same float32 values, so that equal bytes are possible):
  merged     a random base of the geometry (bench/gguf_kquants.py) with a random LoRA adapter merged
             in float32: the reference model.
  W16        the merged weights rounded to float16 (then read as float32).
  llama.cpp  minilora's f16 GGUF of W16, quantized by llama_cpp.llama_model_quantize with
             llama_model_quantize_default_params() and the ftype of the type (read from llama_cpp):
             llama.cpp converts each f16 tensor to float32 and quantizes it (no imatrix, so the
             *_ref quantizers of ggml-quants.c).
  minilora   eval.py's export path with --gguf-type T on a run whose base is W16 and whose adapter
             is zero (W16 + 0 = W16 exactly): the same float32 values, quantized by our writers
             (K-quants, Q5_0 / Q5_1) and gguf-py's (Q8_0, Q4_0).
Per tensor it reports: the GGML type each side chose (our recipe vs llama_tensor_get_type), whether
the bytes are identical, and where they are not: the max difference of the two dequantized tensors
(gguf.quants.dequantize) over the tensor's max |w|, and each side's relative round-trip error
||deq - W16|| / ||W16||.
In llama.cpp (llama_cpp.Llama, logits_all, 2 threads; each file in its own subprocess, so a crash is
reported instead of ending the bench): over random prompts, the max logit error over the largest
merged logit, teacher-forced top-1 agreement, and greedy agreement (8 tokens) against the merged
model as transformers computes it in float32.
Writes bench/results/gguf_llamacpp_<geometry>.json.
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

TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
FTYPE = {"f16": "F16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}


def llama_cpp_or_none():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


# ------------------------------------------------------------------------------- llama.cpp workers
def worker_quantize(src: str, dst: str, gguf_type: str) -> dict:
    """llama-quantize src (an f16 GGUF) into dst with the ftype of gguf_type, default parameters."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[gguf_type]}")
    params.nthread = 2
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return {"rc": int(rc), "seconds": time.perf_counter() - t0, "ftype": int(params.ftype)}


def worker_logits(path: str, prompts: list[list[int]], dst: str, new_tokens: int) -> dict:
    """Prompt logits (saved to dst as safetensors, p0, p1, ...) and greedy continuations of a GGUF in llama.cpp."""
    from llama_cpp import Llama
    from safetensors.numpy import save_file

    llm = Llama(model_path=path, logits_all=True, n_threads=2, n_ctx=256, verbose=False)
    logits, greedy = {}, []
    for k, ids in enumerate(prompts):
        llm.reset()
        llm.eval(ids)
        logits[f"p{k}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        greedy.append(out)
    save_file(logits, dst)
    return {"greedy": greedy}


def run_worker(kind: str, path: str, argv: list[str]) -> dict:
    """A worker in a fresh process; {"error": ...} when it fails or crashes (llama_decode can segfault)."""
    from bench.common import run_json_worker

    try:
        return run_json_worker("bench.gguf_llamacpp", kind, path, argv, dict(os.environ))
    except RuntimeError as e:
        return {"error": str(e).strip().splitlines()[-1] if str(e).strip() else "crashed"}


def llama_outputs(path: str, prompts, tmp: str, new_tokens: int):
    """[(logits (T, V) torch, greedy ids)] of path in llama.cpp, or the worker's error string."""
    from safetensors.numpy import load_file

    dst = os.path.join(tmp, "logits.safetensors")
    res = run_worker("logits", path, ["--prompts-json", json.dumps(prompts), "--dst", dst])
    if "error" in res:
        return res["error"]
    arrays = load_file(dst)
    os.remove(dst)
    return [(torch.from_numpy(arrays[f"p{k}"]), g) for k, g in enumerate(res["greedy"])]


# ------------------------------------------------------------------------------- tensor comparison
def compare_tensors(ours_path: str, theirs_path: str, source_path: str) -> list[dict]:
    """Per tensor of our file: types, byte equality, and (where the bytes differ) the errors above."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    source = {t.name: t for t in GGUFReader(source_path).tensors}
    rows = []
    for t in GGUFReader(ours_path).tensors:
        o = theirs.get(t.name)
        row = {"name": t.name, "ours": t.tensor_type.name, "llama": o.tensor_type.name if o is not None else None}
        row["n"] = int(np.prod(t.shape))
        row["identical"] = o is not None and o.tensor_type == t.tensor_type and t.data.tobytes() == o.data.tobytes()
        if o is not None and not row["identical"]:
            s = source[t.name]
            w = dequantize(s.data, s.tensor_type).astype(np.float64).reshape(-1)  # W16, exactly
            a = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
            b = dequantize(o.data, o.tensor_type).astype(np.float64).reshape(-1)
            norm, amax = np.linalg.norm(w) or 1.0, np.abs(w).max() or 1.0
            row["max_diff_rel_absmax"] = float(np.abs(a - b).max() / amax)
            row["values_differing"] = int((a != b).sum())
            row["our_rel_err"] = float(np.linalg.norm(a - w) / norm)
            row["llama_rel_err"] = float(np.linalg.norm(b - w) / norm)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Counts per type pair; the worst byte-level difference; the error of the differing tensors."""
    differ = [r for r in rows if not r["identical"]]
    pairs: dict[str, int] = {}
    for r in rows:
        key = r["ours"] if r["ours"] == r["llama"] else f"{r['ours']} (llama.cpp {r['llama']})"
        pairs[key] = pairs.get(key, 0) + 1
    out = {
        "tensors": len(rows),
        "types": pairs,
        "type_mismatches": [r["name"] for r in rows if r["ours"] != r["llama"]],
        "identical": len(rows) - len(differ),
        "identical_values_fraction": 1 - sum(r.get("values_differing", 0) for r in differ) / sum(r["n"] for r in rows),
    }
    if differ:
        out["worst_max_diff_rel_absmax"] = max(r["max_diff_rel_absmax"] for r in differ)
        n = sum(r["n"] for r in differ)  # element-weighted mean of each side's squared relative error
        out["differing_our_rel_err"] = float(np.sqrt(sum(r["our_rel_err"] ** 2 * r["n"] for r in differ) / n))
        out["differing_llama_rel_err"] = float(np.sqrt(sum(r["llama_rel_err"] ** 2 * r["n"] for r in differ) / n))
    return out


# ------------------------------------------------------------------------------- main
def rounded_run(tmp: str, ref_dir: str) -> str:
    """A run whose base is the merged model (ref_dir, float32) rounded to float16, with a zero adapter."""
    import transformers

    from bench.gguf_export import run_from_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    os.makedirs(os.path.join(tmp, "w16"))
    return run_from_model(os.path.join(tmp, "w16"), hf, b_std=0.0)


def agreement(ref, got) -> dict:
    from bench.gguf_export import teacher_forced_top1
    from minilora.export import readback as V

    if isinstance(got, str):
        return {"error": got}
    return {**V.compare(ref, got), "top1_agree": teacher_forced_top1(ref, got)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", choices=["smollm2-135m", "aligned-125m"], default="smollm2-135m")
    p.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--no-logits", action="store_true", help="compare bytes only; do not run the files in llama.cpp")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gguf_llamacpp_<geometry>.json)")
    p.add_argument("--worker", choices=["quantize", "logits"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--gguf-type", help=argparse.SUPPRESS)
    p.add_argument("--prompts-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    llama_cpp = llama_cpp_or_none()
    if llama_cpp is None:
        print(
            "llama-cpp-python is not installed (it is not a minilora dependency); build it as bench/README.md "
            "says to run this benchmark.",
            file=sys.stderr,
        )
        return 2
    if args.worker == "quantize":
        print(json.dumps(worker_quantize(args.ckpt, args.dst, args.gguf_type)))
        return 0
    if args.worker == "logits":
        from minilora.export.readback import NEW_TOKENS

        print(json.dumps(worker_logits(args.ckpt, json.loads(args.prompts_json), args.dst, NEW_TOKENS)))
        return 0

    from bench.common import environment, write_json
    from bench.gguf_kquants import GEOMETRIES, build_run, cpu_facts
    from minilora.export import readback as V
    from minilora.export.merge import export_adapter

    g, facts = GEOMETRIES[args.geometry], cpu_facts()
    flags = ", ".join(facts["flags"])
    print(f"CPU: {facts['cpu']} ({flags}); llama.cpp on 2 threads, llama-cpp-python {llama_cpp.__version__}")
    quiet = lambda m: None  # noqa: E731
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1024) for _ in range(32)] for _ in range(args.prompts)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(tmp, g)
        ref_dir = os.path.join(tmp, "f32")
        export_adapter(run, ref_dir, dtype="float32", validate=False, log=quiet)
        hf_cfg = json.load(open(os.path.join(ref_dir, "config.json")))
        ref = V.outputs(V.reload("hf", ref_dir, hf_cfg), prompts)
        run16 = rounded_run(tmp, ref_dir)
        f16 = os.path.join(tmp, "ours_f16.gguf")
        export_adapter(run16, f16, fmt="gguf", gguf_type="f16", validate=False, log=quiet)
        if not args.no_logits:
            results.append({"gguf_type": "f16", "llama_cpp_ours": agreement(ref, llama_outputs(f16, prompts, tmp, 8))})
        for gguf_type in args.types:
            ours, theirs = os.path.join(tmp, f"ours_{gguf_type}.gguf"), os.path.join(tmp, f"llama_{gguf_type}.gguf")
            t0 = time.perf_counter()
            export_adapter(run16, ours, fmt="gguf", gguf_type=gguf_type, validate=False, log=quiet)
            ours_s = time.perf_counter() - t0
            q = run_worker("quantize", f16, ["--dst", theirs, "--gguf-type", gguf_type])
            row = {"gguf_type": gguf_type, "ftype": q.get("ftype"), "minilora_export_s": ours_s}
            if q.get("rc") != 0:
                row["error"] = f"llama_model_quantize failed: {q}"
                results.append(row)
                print(f"  {gguf_type}: {row['error']}", flush=True)
                continue
            row["llama_quantize_s"] = q["seconds"]
            row["bytes"] = {"ours": os.path.getsize(ours), "llama": os.path.getsize(theirs)}
            tensors = compare_tensors(ours, theirs, f16)
            row["summary"] = summarize(tensors)
            row["differing_tensors"] = [t for t in tensors if not t["identical"]]
            if not args.no_logits:
                row["llama_cpp_ours"] = agreement(ref, llama_outputs(ours, prompts, tmp, 8))
                row["llama_cpp_llama"] = agreement(ref, llama_outputs(theirs, prompts, tmp, 8))
            results.append(row)
            s = row["summary"]
            print(f"  {gguf_type}: {s['identical']}/{s['tensors']} tensors identical, types {s['types']}", flush=True)
            os.remove(ours), os.remove(theirs)

    print(f"\n{args.geometry}: per tensor, minilora's export vs llama-quantize of our f16 file (same float16 weights)")
    print(f"{'type':8}{'tensors':>8}{'same type':>10}{'same bytes':>11}{'values same':>12}{'max diff':>10}")
    for r in results:
        s = r.get("summary")
        if s:
            same = s["tensors"] - len(s["type_mismatches"])
            print(
                f"{r['gguf_type']:8}{s['tensors']:8}{same:10}{s['identical']:11}{s['identical_values_fraction']:12.6%}"
                f"{s.get('worst_max_diff_rel_absmax', 0):10.2e}"
            )
    if not args.no_logits:
        print(f"\nin llama.cpp vs the merged model (transformers, float32), {args.prompts} prompts x 32 tokens")
        print(f"{'type':8}{'file':10}{'logit rel err':>15}{'top-1':>8}{'greedy':>8}")
        for r in results:
            for side in ("llama_cpp_ours", "llama_cpp_llama"):
                a = r.get(side)
                if a is None:
                    continue
                who = "minilora" if side.endswith("ours") else "llama.cpp"
                if "error" in a:
                    print(f"{r['gguf_type']:8}{who:10}  failed: {a['error']}")
                else:
                    print(
                        f"{r['gguf_type']:8}{who:10}{a['rel_logit_err']:15.2e}{a['top1_agree']:8.1%}"
                        f"{a['greedy_agree']:8.1%}"
                    )
    env = {**environment(), **facts, "llama_cpp_python": llama_cpp.__version__, "llama_cpp_threads": 2}
    payload = {"args": {k: v for k, v in vars(args).items() if v is not None}, "env": env, "geometry": g}
    payload["rows"] = results
    path = write_json(f"gguf_llamacpp_{args.geometry}", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
