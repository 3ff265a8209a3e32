"""Static check of the Triton kernels for a GPU this machine need not have.

    python -m bench.kernel_resources [--arch 90] [--check]

Compiles every configuration the launchers can pick (kernels/nf4_dequant.py, kernels/nf4_matmul.py,
kernels/lora_bgmv.py)
through Triton's real CUDA pipeline (Python -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> SASS) for
the chosen compute capability, here on the CPU: Triton ships ptxas, and compiling needs no driver.
That catches what `TRITON_INTERPRET=1` cannot (the interpreter runs the Python, not the compiler:
layouts, tl.dot shape rules, dtype lowering), and shows what a kernel will cost before a GPU runs it:

    regs      registers per thread (ptxas -v); more than 255 spills, > 128 limits occupancy
    spill     bytes of spill stores + loads per thread (should be 0)
    smem      shared memory per program in bytes (layout conversions and tl.dot staging)
    cvt       ttg.convert_layout ops in the TTGIR (each one a round trip through shared memory)
    sass      SASS instructions: the whole kernel, or one trip round its main loop
    per elt   sass / elements a thread handles (outputs for dequantization, weight elements per
              loop step for the fused matmul): compare with what the GPU can issue per element
              at full memory bandwidth (README: an H100 issues ~22 thread instructions per
              dequantized bf16 output, ~4.4 per weight element read for the fused matmul)
    ld / st   global loads / stores in the PTX by width, e.g. 'v4.b32 x2' = two 16-byte vector ops

Pointers are specialized as 16-byte aligned and sizes as multiples of 16, as Triton's launcher does
for torch tensors of real layer shapes. `--check` compiles each kernel a second time without the
size specialization (odd shapes) and prints nothing but failures; tests/test_kernels.py runs it.
Writes bench/results/kernel_resources.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # decorated kernels must be JITFunctions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minilora.kernels import lora_bgmv, nf4_dequant, nf4_matmul  # noqa: E402

_TY = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_kernel(fn, types: dict, constexprs: dict, arch: int, num_warps: int, aligned_ints: bool, **options):
    """Compile `fn` for sm_`arch`; returns Triton's CompiledKernel (asm: ttgir, ptx, cubin).

    types: argument name -> Triton type ('*u8', 'i32', ...); constexprs: name -> value.
    """
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name].startswith("*") or (aligned_ints and sig[name] == "i32")
    }
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def sass_counts(cubin_path: str, tools: str) -> tuple[int, int]:
    """(instructions in the kernel, instructions in its longest loop: 0 if none), from cuobjdump -sass."""
    sass = subprocess.run(
        [os.path.join(tools, "cuobjdump"), "-sass", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    addrs = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4,})\*/ ", sass)]
    loop = 0
    for at, target in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA (0x[0-9a-f]+)", sass):
        if int(target, 16) < int(at, 16):  # a backward branch closes a loop: count what it spans
            loop = max(loop, (int(at, 16) - int(target, 16)) // 16 + 1)
    return len(addrs), loop


def resources(k, arch: int, per_thread: int) -> dict:
    """Registers / spills from ptxas -v on the kernel's PTX, instruction counts from its SASS, the rest
    from the TTGIR and PTX text. per_thread: elements one thread handles (per loop step if any)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", ptx + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        total, loop = sass_counts(ptx + ".o", os.path.dirname(get_ptxas(arch).path))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    ptx_text = k.asm["ptx"]
    widths = lambda op: dict(Counter(re.findall(rf"\b{op}\.global(?:\.\w+)*?\.((?:v[248]\.)?[busf]\d+)\b", ptx_text)))
    return {
        "regs": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill": spills,
        "smem": k.metadata.shared,
        "cvt": k.asm["ttgir"].count("ttg.convert_layout"),
        "sass": loop or total,
        "per_elt": round((loop or total) / per_thread, 1),
        "ld": widths("ld"),
        "st": widths("st"),
    }


def dequant_cases():
    """(name, fn, types, constexprs, num_warps, outputs per thread, options) for every dequantization variant."""
    fn = nf4_dequant._nf4_dequant_kernel
    for dq in (True, False):
        for out in ("bf16", "fp16", "fp32"):
            for bs in (64, 32, 4096):
                types = {
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*u8" if dq else "*fp32",
                    "absmax2_ptr": "*fp32",
                    "offset_ptr": "*fp32",
                    "nf4_ptr": "*fp32",
                    "dyn_ptr": "*fp32",
                    "out_ptr": _TY[out],
                    "n_elements": "i32",
                    "n_bytes": "i32",
                }
                const = {
                    "BLOCKSIZE": bs,
                    "DOUBLE_QUANT": dq,
                    "BLOCK_SIZE": nf4_dequant.DEFAULT_BLOCK_SIZE,
                    "VEC": 2 if out == "fp32" else 4,
                }
                name = f"dequant dq={int(dq)} out={out} bs={bs}"
                warps = nf4_dequant.DEFAULT_NUM_WARPS
                outputs = 2 * nf4_dequant.DEFAULT_BLOCK_SIZE // (32 * warps)
                yield name, fn, types, const, warps, outputs, {"enable_fp_fusion": False}


def matmul_cases():
    """Every (token count class x direction x dtype x double quant) the fused matmul launcher picks,
    plus the element-wise path for odd K (bf16 only: explicit calls; use_fused never picks it)."""
    fn = nf4_matmul._nf4_matmul_kernel
    seen = set()
    for n, m, k in [(1, 6912, 1152), (16, 1152, 6912), (1, 4096, 4096), (16, 14336, 4096), (64, 4096, 4096)]:
        for transposed in (False, True):
            o, r = (k, m) if transposed else (m, k)
            for act, dq, aligned in [(a, d, True) for a in ("bf16", "fp16", "fp32") for d in (True, False)] + [
                ("bf16", True, False)
            ]:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[act]
                bn, bo, br, split, warps, stages = nf4_matmul._pick_config(
                    n, o, r, transposed, 64, dtype, interpret=False
                )
                key = (bn, bo, br, split > 1, warps, stages, transposed, act, dq, aligned)
                if key in seen:
                    continue
                seen.add(key)
                types = {
                    "a_ptr": _TY[act],
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*u8" if dq else "*fp32",
                    "absmax2_ptr": "*fp32",
                    "offset_ptr": "*fp32",
                    "nf4_ptr": "*fp32",
                    "dyn_ptr": "*fp32",
                    "out_ptr": "*fp32" if split > 1 else _TY[act],
                    "N": "i32",
                    "M": "i32",
                    "K": "i32",
                    "K_HALF": "i32",
                    "stride_an": "i32",
                    "stride_os": "i32",
                    "stride_on": "i32",
                }
                const = {
                    "BLOCKSIZE": 64,
                    "DOUBLE_QUANT": dq,
                    "TRANSPOSED": transposed,
                    "BLOCK_N": bn,
                    "BLOCK_O": bo,
                    "BLOCK_R": br,
                    "SPLIT_K": split,
                    "ALIGNED": aligned,
                    "DOT_PRECISION": "ieee" if act == "fp32" else "tf32",
                    "DOT_IN_F32": False,
                    "stride_ar": 1,
                    "stride_oo": 1,
                }  # Triton specializes strides of 1
                name = (
                    f"matmul {'dx=gW' if transposed else 'y=xWt'} {act} dq={int(dq)} "
                    f"{bn}x{bo}x{br} split={split}{'' if aligned else ' any-K'}"
                )
                yield name, fn, types, const, warps, bo * br // (32 * warps), {"num_stages": stages}


def lora_cases():
    """Every (x dtype x tile) the LoRA shrink/expand launchers pick for decoding (segments of 1 token) and
    prefill (long segments) at Gemma 3 1B / Llama 8B widths, ranks 8 to 128."""
    seen = set()
    for longest, n_seg, k, m, r in [(1, 8, 1152, 6912, 16), (1, 64, 4096, 4096, 64), (512, 4, 4096, 14336, 8)]:
        for r in (r, 128):
            bn, br, bk, split, warps = lora_bgmv._pick_config(longest, k, r, n_seg, interpret=False)
            for act in ("bf16", "fp16", "fp32"):
                key = ("shrink", bn, br, bk, split > 1, act)
                if key not in seen:
                    seen.add(key)
                    types = {"x_ptr": _TY[act], "a_ptr": "*fp32", "h_ptr": "*fp32"}
                    types |= {f"seg_{p}_ptr": "*i32" for p in ("start", "len", "adapter")}
                    types |= {"a_first_ptr": "*i64", "rank_ptr": "*i32"}
                    types |= {n: "i32" for n in ("K", "R", "stride_xn", "stride_ar", "stride_hs", "stride_hn")}
                    const = {"BLOCK_N": bn, "BLOCK_R": br, "BLOCK_K": bk, "SPLIT_K": split}
                    const |= {"stride_xk": 1, "stride_ak": 1, "stride_hr": 1}  # Triton specializes strides of 1
                    name = f"lora shrink x={act} {bn}x{br}x{bk} split={split}"
                    yield name, lora_bgmv._lora_shrink_kernel, types, const, warps, bn * bk // (32 * warps), {}
            bn, br, bm, _, warps = lora_bgmv._pick_config(longest, m, r, n_seg, interpret=False)
            # B padded (L, M, R): unit stride along the rank; B read in place from the stacks
            # (minilora/lora/mixed_term.py, Bt_cat (n r, M) viewed as (n, M, r)): unit stride along M
            for layout, unit in (("padded", "stride_br"), ("stacks", "stride_bm")):
                key = ("expand", bn, br, bm, layout)
                if key not in seen:
                    seen.add(key)
                    types = {"h_ptr": "*fp32", "b_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": "*fp32"}
                    types |= {f"seg_{p}_ptr": "*i32" for p in ("start", "len", "adapter")}
                    types |= {"b_first_ptr": "*i64", "rank_ptr": "*i32"}
                    strides = ("stride_bm", "stride_br")
                    types |= {n: "i32" for n in ("M", "R", "stride_hn", "stride_yn", *strides) if n != unit}
                    const = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_R": br, "stride_hr": 1, unit: 1, "stride_ym": 1}
                    name = f"lora expand {bn}x{bm}x{br} B {layout}"
                    yield name, lora_bgmv._lora_expand_kernel, types, const, warps, br * bm // (32 * warps), {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--check", action="store_true", help="compile aligned and unaligned variants; print failures only")
    ap.add_argument("--only", default="", help="only kernels whose name contains this, e.g. 'dequant'")
    args = ap.parse_args()
    rows, failures = [], 0
    for name, fn, types, const, warps, per_thread, opts in [*dequant_cases(), *matmul_cases(), *lora_cases()]:
        if args.only not in name:
            continue
        for aligned in (True, False) if args.check else (True,):
            try:
                k = compile_kernel(fn, types, const, args.arch, warps, aligned, **opts)
                if not args.check:
                    rows.append({"kernel": name, "num_warps": warps, **resources(k, args.arch, per_thread)})
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"FAILED sm_{args.arch} {name} aligned_ints={aligned}: {msg[-1] if msg else type(e).__name__}")
    if not args.check:
        print(f"sm_{args.arch}a, Triton {triton.__version__}")
        print(
            f"{'kernel':<50}{'warps':>6}{'regs':>6}{'spill':>6}{'smem':>7}{'cvt':>5}{'sass':>6}{'per elt':>8}  ld / st"
        )
        for r in rows:
            fmt = lambda d: " ".join(f"{w} x{c}" for w, c in sorted(d.items()))
            print(
                f"{r['kernel']:<50}{r['num_warps']:>6}{r['regs']:>6}{r['spill']:>6}{r['smem']:>7}{r['cvt']:>5}"
                f"{r['sass']:>6}{r['per_elt']:>8}  {fmt(r['ld'])} / {fmt(r['st'])}"
            )
        from bench.common import environment, write_json

        print(f"wrote {write_json('kernel_resources', {'env': environment(), 'arch': args.arch, 'rows': rows})}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
