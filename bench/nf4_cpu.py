"""NF4 quantize / dequantize on the CPU: minilora's PyTorch reference beside bitsandbytes.

    python -m bench.nf4_cpu [--repeat 7]

Both run in this process on the same bf16 matrices, timed round-robin; the table gives median milliseconds and
the ratio bitsandbytes / minilora (> 1 means minilora is faster). Writes bench/results/nf4_cpu.json.
"""

from __future__ import annotations

import argparse

import torch  # noqa: E402

from bench.common import environment, interleaved_medians, write_json  # noqa: E402
from minilora.quant.linear import dequantize_nf4  # noqa: E402
from minilora.quant.nf4 import quantize_nf4  # noqa: E402

SHAPES = [(1152, 6912), (4096, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    import bitsandbytes.functional as bnbF

    rows = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        q = quantize_nf4(w, 64, double_quant=True)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.packed, packed.view(-1)), "outputs differ: the comparison would be meaningless"
        cases = {
            "quantize": (
                lambda: quantize_nf4(w, 64, True),
                lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
            ),
            "dequantize": (lambda: dequantize_nf4(q, torch.bfloat16), lambda: bnbF.dequantize_4bit(packed, state)),
        }
        for op, (ours, theirs) in cases.items():
            med = interleaved_medians({"ours": ours, "bnb": theirs}, args.repeat)
            t_ours, t_bnb = med["ours"], med["bnb"]
            rows.append(
                {
                    "op": op,
                    "shape": list(shape),
                    "minilora_ms": t_ours * 1e3,
                    "bnb_ms": t_bnb * 1e3,
                    "speedup_vs_bnb": t_bnb / t_ours,
                }
            )
    print(f"{'op':<11}{'shape':>12}{'minilora ms':>13}{'bnb ms':>10}{'bnb/minilora':>14}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['op']:<11}{shape:>12}{r['minilora_ms']:>13.2f}{r['bnb_ms']:>10.2f}{r['speedup_vs_bnb']:>14.2f}")
    path = write_json("nf4_cpu", {"env": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
