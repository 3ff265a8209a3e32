"""Static check of the Triton kernels for a GPU this machine need not have.

    python bench/kernel_resources.py [--arch 90] [--check]

Compiles every configuration the launchers can pick (kernels/nf4_dequant.py, kernels/nf4_matmul.py)
through Triton's real CUDA pipeline (Python -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> SASS) for
the chosen compute capability, here on the CPU: Triton ships ptxas, and compiling needs no driver.
That catches what `TRITON_INTERPRET=1` cannot (the interpreter runs the Python, not the compiler:
layouts, tl.dot shape rules, dtype lowering), and shows what a kernel will cost before a GPU runs it:

    regs      registers per thread (ptxas -v); more than 255 spills, > 128 limits occupancy
    spill     bytes of spill stores + loads per thread (should be 0)
    smem      shared memory per program in bytes (layout conversions and tl.dot staging)
    cvt       ttg.convert_layout ops in the TTGIR (each one a round trip through shared memory)
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minilora.kernels import nf4_dequant, nf4_matmul  # noqa: E402

_TY = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_kernel(fn, types: dict, constexprs: dict, arch: int, num_warps: int, aligned_ints: bool,
                   **options):
    """Compile `fn` for sm_`arch`; returns Triton's CompiledKernel (asm: ttgir, ptx, cubin).

    types: argument name -> Triton type ('*u8', 'i32', ...); constexprs: name -> value.
    """
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or (aligned_ints and sig[name] == "i32")}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def resources(k, arch: int) -> dict:
    """Registers / spills from ptxas -v on the kernel's PTX; the rest from the TTGIR and PTX text."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    ptx_text = k.asm["ptx"]
    widths = lambda op: dict(Counter(re.findall(rf"\b{op}\.global(?:\.\w+)*?\.((?:v[248]\.)?[busf]\d+)\b", ptx_text)))
    return {
        "regs": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill": spills,
        "smem": k.metadata.shared,
        "cvt": k.asm["ttgir"].count("ttg.convert_layout"),
        "ld": widths("ld"),
        "st": widths("st"),
    }


def dequant_cases():
    """(name, fn, types, constexprs, num_warps, options) for every dequantization variant."""
    fn = nf4_dequant._nf4_dequant_kernel
    for dq in (True, False):
        for out in ("bf16", "fp16", "fp32"):
            for bs in (64, 32, 4096):
                types = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "absmax2_ptr": "*fp32",
                         "offset_ptr": "*fp32", "nf4_ptr": "*fp32", "dyn_ptr": "*fp32", "out_ptr": _TY[out],
                         "n_elements": "i32", "n_bytes": "i32"}
                const = {"BLOCKSIZE": bs, "DOUBLE_QUANT": dq, "BLOCK_SIZE": nf4_dequant.DEFAULT_BLOCK_SIZE,
                         "VEC": 2 if out == "fp32" else 4}
                name = f"dequant dq={int(dq)} out={out} bs={bs}"
                yield name, fn, types, const, nf4_dequant.DEFAULT_NUM_WARPS, {"enable_fp_fusion": False}


def matmul_cases():
    """Every (token count class x direction x dtype x double quant) the fused matmul launcher picks,
    plus the element-wise path for odd K (bf16 only: explicit calls; use_fused never picks it)."""
    fn = nf4_matmul._nf4_matmul_kernel
    seen = set()
    for n, m, k in [(1, 6912, 1152), (16, 1152, 6912), (1, 4096, 4096), (16, 14336, 4096), (64, 4096, 4096)]:
        for transposed in (False, True):
            o, r = (k, m) if transposed else (m, k)
            bn, bo, br, split, warps, stages = nf4_matmul._pick_config(n, o, r, transposed, 64, interpret=False)
            for act, dq, aligned in [(a, d, True) for a in ("bf16", "fp16", "fp32") for d in (True, False)] + \
                                    [("bf16", True, False)]:
                key = (bn, bo, br, split > 1, warps, stages, transposed, act, dq, aligned)
                if key in seen:
                    continue
                seen.add(key)
                types = {"a_ptr": _TY[act], "packed_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32",
                         "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "nf4_ptr": "*fp32", "dyn_ptr": "*fp32",
                         "out_ptr": "*fp32" if split > 1 else _TY[act], "N": "i32", "M": "i32", "K": "i32",
                         "K_HALF": "i32", "stride_an": "i32", "stride_os": "i32", "stride_on": "i32"}
                const = {"BLOCKSIZE": 64, "DOUBLE_QUANT": dq, "TRANSPOSED": transposed, "BLOCK_N": bn,
                         "BLOCK_O": bo, "BLOCK_R": br, "SPLIT_K": split, "ALIGNED": aligned,
                         "DOT_PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_IN_F32": False,
                         "stride_ar": 1, "stride_oo": 1}  # Triton specializes strides of 1
                name = (f"matmul {'dx=gW' if transposed else 'y=xWt'} {act} dq={int(dq)} "
                        f"{bn}x{bo}x{br} split={split}{'' if aligned else ' any-K'}")
                yield name, fn, types, const, warps, {"num_stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--check", action="store_true", help="compile aligned and unaligned variants; print failures only")
    ap.add_argument("--only", default="", help="only kernels whose name contains this, e.g. 'dequant'")
    args = ap.parse_args()
    rows, failures = [], 0
    for name, fn, types, const, warps, opts in [*dequant_cases(), *matmul_cases()]:
        if args.only not in name:
            continue
        for aligned in ((True, False) if args.check else (True,)):
            try:
                k = compile_kernel(fn, types, const, args.arch, warps, aligned, **opts)
                if not args.check:
                    rows.append({"kernel": name, "num_warps": warps, **resources(k, args.arch)})
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"FAILED sm_{args.arch} {name} aligned_ints={aligned}: {msg[-1] if msg else type(e).__name__}")
    if not args.check:
        print(f"sm_{args.arch}a, Triton {triton.__version__}")
        print(f"{'kernel':<50}{'warps':>6}{'regs':>6}{'spill':>6}{'smem':>7}{'cvt':>5}  ld / st")
        for r in rows:
            fmt = lambda d: " ".join(f"{w} x{c}" for w, c in sorted(d.items()))
            print(f"{r['kernel']:<50}{r['num_warps']:>6}{r['regs']:>6}{r['spill']:>6}{r['smem']:>7}{r['cvt']:>5}"
                  f"  {fmt(r['ld'])} / {fmt(r['st'])}")
        from bench.common import environment, write_json
        print(f"wrote {write_json('kernel_resources', {'env': environment(), 'arch': args.arch, 'rows': rows})}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
