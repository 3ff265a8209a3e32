"""Which path computes an operation that has a Triton kernel, the kernel or PyTorch: decided here and
nowhere else.

Five kernels, each with a PyTorch reference that always works:

    nf4_dequant    dequantize_nf4 (kernels/nf4_dequant.py)          reference: minilora.quant.nf4
    nf4_matmul     y  = x W^T, the fused forward (kernels/nf4_matmul.py)   reference: dequantize, F.linear
    nf4_matmul_t   dx = g W, its input gradient (same file)                reference: dequantize, g @ W
    lora_shrink    h = A[idx] x per token, mixed-adapter batches (kernels/lora_bgmv.py)   reference: same file
    lora_expand    y += s[idx] B[idx] h per token (same file)                            reference: same file

A kernel runs only on a device type in KERNEL_DEVICES (CUDA; the tests add the CPU, where
TRITON_INTERPRET=1 runs Triton in Python), only when Triton imports, and only once it has passed
its self-check (the two LoRA kernels serve a batch together: both must pass).

Self-check: the tests prove the kernels under the interpreter and compile them for sm_90a, but a
GPU, driver or Triton release they never met can still reject or miscompile them. So the first
time a process asks for a kernel, the kernel runs once on a small probe on that device (an NF4
weight of PROBE_SHAPE, double quantized, and PROBE_TOKENS tokens; for the LoRA kernels, PROBE_ADAPTERS
adapters and a zero slot on the tokens of PROBE_IDX) and is compared with its PyTorch
reference in every dtype it serves, within the tolerances below. On an exception or a larger
difference, one warning names the kernel, the device and the Triton, CUDA and driver versions,
and that kernel's calls take the PyTorch path for the rest of the process.

The environment variable MINILORA_KERNELS sets the policy:

    unset or auto   as above
    off             never run a Triton kernel: the PyTorch paths only
    strict          a kernel that fails its self-check raises KernelCheckError instead of warning
"""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import threading
import warnings

import torch

ENV = "MINILORA_KERNELS"
MODES = ("auto", "off", "strict")
KERNELS = ("nf4_dequant", "nf4_matmul", "nf4_matmul_t", "lora_shrink", "lora_expand")
KERNEL_DEVICES = ("cuda",)  # device types whose tensors may take the kernels; the tests add "cpu"

PROBE_SHAPE = (64, 512)  # W (M, K): K % BLOCKSIZE == 0, the fused kernel's fast path, as in real layers
PROBE_BLOCKSIZE = 64
PROBE_TOKENS = 5  # few tokens: the calls that use_fused sends to the fused kernel

# Largest accepted difference from the reference, per output dtype.
# Dequantization, in units in the last place (ulps). float32: 0, because the kernel computes the
# reference's float32 operations with the reference's roundings (launched without FMA fusion).
# bf16/fp16: 1, because Triton's interpreter casts float32 to 16 bits by truncation where PyTorch
# and GPUs round to nearest even; every other cause of difference (a wrong nibble, absmax or cast)
# moves outputs by many ulps.
DEQUANT_ULPS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 1}
# Fused matmul, relative to scale = |a| @ |W| per output: 3 eps. Kernel and reference multiply the
# same weights rounded to the activation dtype (the interpreter's truncating cast may move each one
# ulp: <= eps * scale), the products of two 16-bit numbers are exact in float32, the float32 sums
# differ only in order (<= R 2^-24 * scale, R = 512 here: 3e-5, far below eps), and each side
# rounds its result once (<= eps / 2 * scale each). A wrong tile, code or absmax errs by about the
# scale itself. Only bf16 and fp16: use_fused never sends float32 activations to the kernel.
MATMUL_TOL = {torch.bfloat16: 3 * torch.finfo(torch.bfloat16).eps, torch.float16: 3 * torch.finfo(torch.float16).eps}

# The LoRA kernels' probe: adapters of rank PROBE_RANK (K, M) = PROBE_LORA_SHAPE, stacked with an
# all-zero slot (index PROBE_ADAPTERS), and tokens in segments: long and short runs, base (-1) tokens,
# the zero slot, an adapter that comes back after others.
PROBE_ADAPTERS, PROBE_RANK, PROBE_LORA_SHAPE = 3, 16, (128, 64)
PROBE_IDX = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, -1, -1, 2, 2, 2, 3, 1, 0)
# Both are float32 dot products with exact inputs (16-bit x widens exactly), so kernel and reference
# differ only in the order of the additions: each is within gamma_n of the exact value relative to the
# sum of |terms| (n = K for the shrink, any order, split or not), so they differ by at most
# 2 gamma_K |A| |x| (shrink) and 2 (gamma_{R+2} |s| |B| |h| + u |y|) (expand: the R-term dot, its
# product with s and the add to y, u = 2^-24). At the probe's K = 128 that is 1.5e-5 of |A| |x|; a wrong
# adapter, tile or segment errs by about |A| |x| itself. LORA_TOL_TERMS names the n of gamma_n.
LORA_TOL_TERMS = {"lora_shrink": PROBE_LORA_SHAPE[0], "lora_expand": PROBE_RANK + 2}


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its self-check; its calls take the PyTorch path."""


class KernelCheckError(RuntimeError):
    """A Triton kernel failed its self-check while MINILORA_KERNELS=strict."""


_VERDICTS: dict[str, str | None] = {}  # kernel name -> None (passed its self-check) or why it failed
_LOCK = threading.Lock()


def kernel_mode() -> str:
    """MINILORA_KERNELS: auto (also when unset or empty), off or strict; a ValueError otherwise."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not valid; set it to auto, off or strict, or unset it.")
    return mode


def dequant_kernel(q):
    """dequantize_nf4_triton when it may dequantize the NF4Tensor q, else None (use PyTorch)."""
    if not _may_run(q.packed.device):
        return None
    mod = _module("nf4_dequant")
    if mod is None or not _passed("nf4_dequant", q.packed.device):
        return None
    return mod.dequantize_nf4_triton


def matmul_kernel(a: torch.Tensor, q, transposed: bool = False):
    """nf4_matmul_triton (nf4_matmul_t_triton when transposed) when the fused kernel should compute
    a W^T (a W) for these shapes, else None (dequantize, then a PyTorch matmul)."""
    if not _may_run(a.device):
        return None
    mod = _module("nf4_matmul")
    if mod is None or not mod.use_fused(a, q, transposed):
        return None
    name = "nf4_matmul_t" if transposed else "nf4_matmul"
    return getattr(mod, name + "_triton") if _passed(name, a.device) else None


def bgmv_kernels(x: torch.Tensor):
    """(lora_shrink_triton, lora_expand_triton) when both may compute the LoRA term of a mixed-adapter
    batch with input x, else None (the PyTorch gather and bmm of minilora/lora/mixed_term.py)."""
    if not _may_run(x.device) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    mod = _module("lora_bgmv")
    if mod is None or not (_passed("lora_shrink", x.device) and _passed("lora_expand", x.device)):
        return None
    return mod.lora_shrink_triton, mod.lora_expand_triton


def _may_run(device: torch.device) -> bool:
    return kernel_mode() != "off" and device.type in KERNEL_DEVICES


def _module(name: str):
    """minilora.kernels.<name>, or None where Triton is not installed (the PyTorch path is always correct)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def _passed(name: str, device: torch.device) -> bool:
    """Whether kernel `name` passed its self-check, running the check on `device` the first time."""
    if name not in _VERDICTS:
        with _LOCK:
            if name not in _VERDICTS:
                why = self_check(name, device)
                _VERDICTS[name] = why
                if why is not None and kernel_mode() != "strict":
                    warnings.warn(
                        f"minilora: {_failure(name, device, why)}; using the PyTorch path for it "
                        f"from now on (set {ENV}=off to skip the kernels).",
                        KernelFallbackWarning,
                        stacklevel=4,
                    )
    why = _VERDICTS[name]
    if why is not None and kernel_mode() == "strict":
        raise KernelCheckError(
            f"{ENV}=strict: {_failure(name, device, why)}; unset {ENV} to fall back "
            "to PyTorch, or report it with these versions."
        )
    return why is None


def _failure(name: str, device: torch.device, why: str) -> str:
    return f"the Triton kernel {name} failed its self-check on {describe(device)} with {versions()} [{why}]"


# --- the self-check ----------------------------------------------------------------------------


def self_check(name: str, device) -> str | None:
    """Run kernel `name` once on the probe on `device`, beside its PyTorch reference.

    Returns None when they agree within DEQUANT_ULPS / MATMUL_TOL / LORA_TOL_TERMS, else one line saying why not
    (the exception, or the largest difference). Never raises for a failing kernel.
    """
    if name not in KERNELS:
        raise ValueError(f"self_check: unknown kernel {name!r}; use one of {', '.join(KERNELS)}.")
    device = torch.device(device)
    try:
        with torch.no_grad():
            if name.startswith("lora_"):
                return _check_bgmv(device, name)
            return _check_dequant(device) if name == "nf4_dequant" else _check_matmul(device, name == "nf4_matmul_t")
    except Exception as e:  # noqa: BLE001 - any failure of the kernel means: do not use it
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def _probe(device: torch.device):
    """The probe weight as an NF4Tensor on `device`, and a generator for the activations (CPU,
    seeded: the check leaves the global RNG alone)."""
    from minilora.quant.nf4 import quantize_nf4

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(PROBE_SHAPE, generator=gen) * 0.02  # (M, K)
    w[0, :PROBE_BLOCKSIZE] = 0  # an all-zero absmax block
    w[1, 3] = 1.0  # an outlier: a block with a large absmax
    return quantize_nf4(w, blocksize=PROBE_BLOCKSIZE, double_quant=True).to(device), gen


def _ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance between got and want in representable values of their dtype (+0 == -0)."""
    bits = {
        torch.float32: (torch.int32, 0x7FFFFFFF),
        torch.bfloat16: (torch.int16, 0x7FFF),
        torch.float16: (torch.int16, 0x7FFF),
    }
    idt, mag = bits[want.dtype]

    def ordered(t):  # the float's rank among the representable values: adjacent floats differ by 1
        i = t.contiguous().view(idt).long()
        m = i & mag
        return torch.where(i < 0, -m, m)

    return int((ordered(got) - ordered(want)).abs().max())


def _check_dequant(device: torch.device) -> str | None:
    from minilora.quant.nf4 import dequantize_nf4_reference

    q, _ = _probe(device)
    launch = _module("nf4_dequant").dequantize_nf4_triton
    for dtype, ulps in DEQUANT_ULPS.items():
        got, want = launch(q, dtype), dequantize_nf4_reference(q, dtype)
        if got.dtype != dtype or got.shape != want.shape:
            return f"{dtype} output has dtype {got.dtype} and shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        off = _ulps(got, want)
        if off > ulps:
            return f"{dtype} output differs from PyTorch by {off} ulps, tolerance {ulps}"
    return None


def _check_matmul(device: torch.device, transposed: bool) -> str | None:
    import torch.nn.functional as F

    from minilora.quant.nf4 import dequantize_nf4_reference

    q, gen = _probe(device)
    mod = _module("nf4_matmul")
    launch = mod.nf4_matmul_t_triton if transposed else mod.nf4_matmul_triton
    m, k = PROBE_SHAPE
    for dtype, tol in MATMUL_TOL.items():
        a = torch.randn(PROBE_TOKENS, m if transposed else k, generator=gen).to(device, dtype)  # (N, R)
        w = dequantize_nf4_reference(q, dtype)  # (M, K)
        want = a @ w if transposed else F.linear(a, w)  # (N, K) or (N, M): dequantize-then-matmul
        got = launch(a, q)
        if got.dtype != dtype or got.shape != want.shape:
            return f"{dtype} output has dtype {got.dtype} and shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        scale = a.double().abs() @ (w.double().abs() if transposed else w.double().abs().T)  # (N, O)
        err = (got.double() - want.double()).abs() / (scale + 1e-30)  # relative to |a| @ |W|
        worst = float(err.max()) if err.numel() else 0.0
        if not worst <= tol:  # also catches NaN
            return f"{dtype} output differs from PyTorch by {worst:.3g} x (|a| @ |W|), tolerance {tol:.3g}"
    return None


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u), u = 2^-24: the float32 rounding bound of a sum of n products."""
    u = 2.0**-24
    return n * u / (1 - n * u)


def _check_bgmv(device: torch.device, name: str) -> str | None:
    mod = _module("lora_bgmv")
    gen = torch.Generator().manual_seed(0)
    k, m = PROBE_LORA_SHAPE
    n_ad, r = PROBE_ADAPTERS, PROBE_RANK
    A = torch.randn(n_ad + 1, r, k, generator=gen)  # (L, R, K)
    B = torch.randn(n_ad + 1, m, r, generator=gen)  # (L, M, R)
    s = torch.rand(n_ad + 1, generator=gen) + 0.5  # (L,)
    A[n_ad], B[n_ad], s[n_ad] = 0, 0, 0  # the zero slot
    A[1, r // 2 :] = 0  # adapter 1 of half the rank, zero-padded as minilora/lora/mixed_term.py pads it
    B[1, :, r // 2 :] = 0
    A, B, s = A.to(device), B.to(device), s.to(device)
    idx = torch.tensor(PROBE_IDX, device=device)  # (N,)
    n = idx.numel()
    tol = 2 * _gamma(LORA_TOL_TERMS[name])
    pick = idx.clamp(min=0).cpu()
    off = (idx < 0).cpu()[:, None]  # base tokens: exactly 0 (shrink) or y unchanged (expand)
    if name == "lora_shrink":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(n, k, generator=gen).to(device, dtype)  # (N, K)
            got, want = mod.lora_shrink_triton(x, A, idx), mod.lora_shrink_reference(x, A, idx)  # (N, R)
            if got.dtype != torch.float32 or got.shape != want.shape:
                got_is = f"dtype {got.dtype} and shape {tuple(got.shape)}"
                return f"{dtype} input gives {got_is}, expected float32 and {tuple(want.shape)}"
            scale = torch.bmm(A.double().abs().cpu()[pick], x.double().abs().cpu()[:, :, None])[:, :, 0]  # (N, R)
            worst = _worst(got, want, scale.masked_fill(off, 0))
            if not worst <= tol:  # also catches NaN
                return f"{dtype} input: h differs from PyTorch by {worst:.3g} x (|A| |x|), tolerance {tol:.3g}"
        return None
    h = torch.randn(n, r, generator=gen).to(device)  # (N, R)
    y = torch.randn(n, m, generator=gen).to(device)  # (N, M)
    want = mod.lora_expand_reference(y, h, B, s, idx)
    got = mod.lora_expand_triton(y.clone(), h, B, s, idx)  # (N, M)
    if got.dtype != torch.float32 or got.shape != want.shape:
        return f"output has dtype {got.dtype} and shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    Bh = torch.bmm(B.double().abs().cpu()[pick], h.double().abs().cpu()[:, :, None])[:, :, 0]  # (N, M)
    scale = s.double().cpu()[pick][:, None] * Bh + 2.0**-24 / _gamma(LORA_TOL_TERMS[name]) * y.double().abs().cpu()
    worst = _worst(got, want, scale.masked_fill(off, 0))
    if not worst <= tol:
        return f"y differs from PyTorch by {worst:.3g} x (|s| |B| |h| + u |y| / gamma_(R+2)), tolerance {tol:.3g}"
    return None


def _worst(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """The largest |got - want| / scale (float64; where scale is 0 only an exact match passes)."""
    err = (got.double().cpu() - want.double().cpu()).abs()
    inexact = torch.where(err == 0, 0.0, float("inf"))  # where the bound is 0
    rel = torch.where(scale > 0, err / scale.clamp(min=1e-300), inexact)
    rel = torch.nan_to_num(rel, nan=float("inf"))  # a NaN output fails
    return float(rel.max()) if rel.numel() else 0.0


# --- what a failure report names -----------------------------------------------------------------


def describe(device: torch.device) -> str:
    """The device in words: the GPU's name and compute capability, or the CPU under the interpreter."""
    if device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}, {device})"
        except Exception:  # noqa: BLE001 - a failure report must not fail on its description
            return str(device)
    return f"{device} (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else str(device)


def versions() -> str:
    """'Triton X, torch Y (CUDA Z), NVIDIA driver W': the versions a kernel failure depends on."""
    try:
        triton_version = importlib.import_module("triton").__version__
    except ImportError:
        triton_version = "not installed"
    return (
        f"Triton {triton_version}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"NVIDIA driver {_driver_version()}"
    )


def _driver_version() -> str:
    """The kernel module's release (Linux /proc), else the CUDA version the driver supports, else 'none'."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"for CUDA {v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "none"


def main(device: str = "cuda") -> int:
    """Print each kernel's self-check on `device` (bench/gpu_suite.sh's env step); 1 if one fails."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("kernel self-check: torch sees no CUDA device; run it on a GPU machine.")
        return 2
    print(f"kernel self-check on {describe(dev)} with {versions()}:")
    failed = 0
    for name in KERNELS:
        why = self_check(name, dev)
        failed += why is not None
        print(f"  {name:13s} {'ok' if why is None else 'FAILED: ' + why}")
    return 1 if failed else 0
