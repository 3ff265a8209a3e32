"""The kernel dispatch and self-check (kernels/dispatch.py).

On the CPU the kernels run under TRITON_INTERPRET=1; the `kernels_on_cpu` fixture adds "cpu" to
dispatch.KERNEL_DEVICES (the test hook) and forgets earlier verdicts, so each test sees a fresh
process. Broken kernels are made by monkeypatching a launcher to raise or to return wrong values;
the dispatcher looks launchers up on their module at call time, so the check and the calls both
meet the broken one.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import triton

from minilora.kernels import dispatch, nf4_dequant, nf4_matmul
from minilora.kernels.common import interpreting
from minilora.quant.linear import dequantize_nf4
from minilora.quant.linear import nf4_matmul as matmul_op
from minilora.quant.linear import nf4_matmul_t as matmul_t_op
from minilora.quant.nf4 import NF4Tensor, dequantize_nf4_reference, quantize_nf4

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="the CPU tests run the kernels under TRITON_INTERPRET=1"
)
LAUNCHERS = {
    "nf4_dequant": (nf4_dequant, "dequantize_nf4_triton"),
    "nf4_matmul": (nf4_matmul, "nf4_matmul_triton"),
    "nf4_matmul_t": (nf4_matmul, "nf4_matmul_t_triton"),
}
NF4_KERNELS = tuple(LAUNCHERS)  # the LoRA kernels' dispatch is tested in tests/test_lora_bgmv.py


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_VERDICTS", {})
    monkeypatch.delenv(dispatch.ENV, raising=False)


def weight(m=24, k=128, blocksize=64):
    """An NF4 weight whose rows are whole absmax blocks (K % blocksize == 0): use_fused takes it."""
    return quantize_nf4(torch.randn(m, k, generator=torch.Generator().manual_seed(1)), blocksize=blocksize)


def activations(n, width, dtype=torch.bfloat16):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(2)).to(dtype)


def run_op(name, q):
    """The public operation that dispatches to kernel `name`, and its PyTorch-path result."""
    m, k = q.shape
    if name == "nf4_dequant":
        return dequantize_nf4(q, torch.bfloat16), dequantize_nf4_reference(q, torch.bfloat16)
    w = dequantize_nf4_reference(q, torch.bfloat16)  # (M, K)
    if name == "nf4_matmul":
        x = activations(3, k)  # (N, K), few tokens: the fused kernel's case
        return matmul_op(x, q), F.linear(x, w)  # (N, M)
    g = activations(3, m)  # (N, M)
    return matmul_t_op(g, q), g @ w  # (N, K)


def spy(monkeypatch, name, body):
    """Replace kernel `name`'s launcher by body(real launcher, *args); returns the list of calls."""
    module, attr = LAUNCHERS[name]
    real, calls = getattr(module, attr), []

    def launcher(*args, **kwargs):
        calls.append(args)
        return body(real, *args, **kwargs)

    monkeypatch.setattr(module, attr, launcher)
    return calls


def raising(real, *args, **kwargs):
    raise RuntimeError("PTX compile failed\nsecond line of the log")


def off_by_ulps(ulps):
    """A launcher that returns the real result with one element moved by `ulps` representable values."""

    def body(real, *args, **kwargs):
        out = real(*args, **kwargs)
        bits = out.view(torch.int32 if out.dtype == torch.float32 else torch.int16).view(-1)
        bits[69] += ulps  # past the probe's all-zero first block
        return out

    return body


def swapped_nibbles(real, a, q, **kwargs):
    """The real fused kernel reading the packed bytes with the nibble order swapped (a plausible bug)."""
    p = q.packed
    swapped = NF4Tensor((p << 4) | (p >> 4), q.absmax, q.shape, q.dtype, q.blocksize, q.absmax2, q.offset)
    return real(a, swapped, **kwargs)


def no_fallback_for(*names):
    """Record the other kernels as already failed, so the operations under test compute on PyTorch
    and their fallback results can be compared bit for bit."""
    for name in names:
        dispatch._VERDICTS[name] = "not under test"


# --- the default: the CPU never takes a kernel ------------------------------------------------------


def test_cpu_tensors_take_pytorch_without_the_test_hook(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    q = weight()
    assert dispatch.dequant_kernel(q) is None
    assert dispatch.matmul_kernel(activations(1, 128), q) is None
    assert dispatch.matmul_kernel(activations(1, 24), q, transposed=True) is None


# --- the self-check itself --------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("name", NF4_KERNELS)
def test_self_check_passes_for_the_real_kernels(name):
    assert dispatch.self_check(name, "cpu") is None


@needs_interpreter
@pytest.mark.parametrize(
    "name, body, expect",
    [
        ("nf4_dequant", raising, "RuntimeError: PTX compile failed"),
        ("nf4_dequant", off_by_ulps(1), "torch.float32 output differs from PyTorch by 1 ulps, tolerance 0"),
        ("nf4_matmul", raising, "RuntimeError: PTX compile failed"),
        ("nf4_matmul", swapped_nibbles, "torch.bfloat16 output differs from PyTorch by"),
        ("nf4_matmul_t", swapped_nibbles, "torch.bfloat16 output differs from PyTorch by"),
    ],
)
def test_self_check_reports_failures_in_one_line(monkeypatch, name, body, expect):
    spy(monkeypatch, name, body)
    why = dispatch.self_check(name, "cpu")
    assert why is not None and why.startswith(expect) and "\n" not in why, why


@needs_interpreter
def test_dequant_tolerance_is_one_ulp_in_16_bits(monkeypatch):
    """float32 must be exact; bf16/fp16 may differ by the interpreter's truncating cast, no more."""

    def only_16_bit(ulps):
        def body(real, q, dtype, **kwargs):
            out = real(q, dtype, **kwargs)
            if dtype != torch.float32:  # move one element that the kernel got exactly right
                ref = dequantize_nf4_reference(q, dtype).view(-1)
                i = int(torch.nonzero((out.view(-1) == ref) & (ref != 0))[0])
                out.view(-1).view(torch.int16)[i] += ulps
            return out

        return body

    spy(monkeypatch, "nf4_dequant", only_16_bit(1))
    assert dispatch.self_check("nf4_dequant", "cpu") is None
    monkeypatch.undo()
    spy(monkeypatch, "nf4_dequant", only_16_bit(2))
    why = dispatch.self_check("nf4_dequant", "cpu")
    assert why == "torch.bfloat16 output differs from PyTorch by 2 ulps, tolerance 1"


def test_ulps_counts_representable_values():
    bf = torch.bfloat16
    one = torch.tensor([1.0], dtype=bf)
    assert dispatch._ulps(one, one) == 0
    assert dispatch._ulps(one.view(torch.int16).add(1).view(bf), one) == 1
    assert dispatch._ulps(torch.tensor([-0.0]), torch.tensor([0.0])) == 0
    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)  # the smallest subnormal
    assert dispatch._ulps(-tiny, tiny) == 2
    assert dispatch._ulps(torch.tensor([float("nan")]), torch.tensor([1.0])) > 1 << 22


# --- dispatch: one warning, then the PyTorch path ------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("name", NF4_KERNELS)
@pytest.mark.parametrize("body", [raising, "wrong"], ids=["raises", "wrong_values"])
def test_failing_kernel_warns_once_and_falls_back(monkeypatch, kernels_on_cpu, name, body):
    if body == "wrong":
        body = off_by_ulps(1 << 10) if name == "nf4_dequant" else swapped_nibbles
    no_fallback_for(*(k for k in NF4_KERNELS if k != name))
    calls = spy(monkeypatch, name, body)
    q = weight()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got, want = run_op(name, q)
            assert torch.equal(got, want)  # the PyTorch path, bit for bit
    assert len(calls) == 1  # the self-check's call only
    assert [w.category for w in caught] == [dispatch.KernelFallbackWarning]
    msg = str(caught[0].message)
    assert "\n" not in msg and f"kernel {name} failed" in msg and f"Triton {triton.__version__}" in msg
    assert "NVIDIA driver" in msg and "CUDA" in msg and "using the PyTorch path" in msg


@needs_interpreter
def test_passing_kernel_is_used_after_its_check(monkeypatch, kernels_on_cpu):
    calls = spy(monkeypatch, "nf4_dequant", lambda real, *a, **k: real(*a, **k))
    q = weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing kernel warns nothing
        for _ in range(2):
            got = dequantize_nf4(q, torch.float32)
            assert torch.equal(got, dequantize_nf4_reference(q, torch.float32))
    assert len(calls) == 3 + 2  # the self-check (one call per output dtype), then the two calls
    assert dispatch._VERDICTS == {"nf4_dequant": None}


@needs_interpreter
def test_large_batches_never_trigger_the_fused_check(monkeypatch, kernels_on_cpu):
    """use_fused declines many tokens before any check: the dense path needs no fused kernel."""
    no_fallback_for("nf4_dequant")
    calls = spy(monkeypatch, "nf4_matmul", raising)
    q = weight()
    x = activations(nf4_matmul.FUSED_MAX_TOKENS + 1, 128)
    assert torch.equal(matmul_op(x, q), F.linear(x, dequantize_nf4_reference(q, torch.bfloat16)))
    assert calls == [] and "nf4_matmul" not in dispatch._VERDICTS


# --- MINILORA_KERNELS ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NF4_KERNELS)
def test_off_forces_pytorch(monkeypatch, kernels_on_cpu, name):
    monkeypatch.setenv(dispatch.ENV, "off")
    calls = spy(monkeypatch, name, raising)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = run_op(name, weight())
    assert torch.equal(got, want) and calls == [] and dispatch._VERDICTS == {}


@needs_interpreter
@pytest.mark.parametrize("name", NF4_KERNELS)
def test_strict_turns_the_failure_into_an_error(monkeypatch, kernels_on_cpu, name):
    monkeypatch.setenv(dispatch.ENV, "strict")
    no_fallback_for(*(k for k in NF4_KERNELS if k != name))
    dispatch._VERDICTS.pop(name, None)
    spy(monkeypatch, name, raising)
    q = weight()
    for _ in range(2):  # and again on the next call: strict never falls back
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(dispatch.KernelCheckError) as err:
                run_op(name, q)
        msg = str(err.value)
        assert msg.startswith(f"MINILORA_KERNELS=strict: the Triton kernel {name} failed its self-check")
        assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg


@needs_interpreter
@pytest.mark.parametrize("name", NF4_KERNELS)
def test_strict_with_passing_kernels_is_silent(monkeypatch, kernels_on_cpu, name):
    monkeypatch.setenv(dispatch.ENV, "STRICT")  # case does not matter
    no_fallback_for(*(k for k in NF4_KERNELS if k != name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = run_op(name, weight())
    assert dispatch._VERDICTS[name] is None
    if name == "nf4_dequant":  # the interpreter's bf16 cast truncates: within one ulp
        assert dispatch._ulps(got, want) <= 1
    else:
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=0.05, atol=0.05)


@needs_interpreter
def test_main_prints_each_kernel_and_fails_if_one_does(monkeypatch, capsys):
    spy(monkeypatch, "nf4_matmul_t", raising)
    assert dispatch.main("cpu") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kernel self-check on cpu") and f"Triton {triton.__version__}" in lines[0]
    assert [ln.split()[:2] for ln in lines[1:]] == [
        ["nf4_dequant", "ok"],
        ["nf4_matmul", "ok"],
        ["nf4_matmul_t", "FAILED:"],
        ["lora_shrink", "ok"],
        ["lora_expand", "ok"],
    ]


@pytest.mark.parametrize("value", ["fast", "1", "on", "none"])
def test_invalid_value_is_one_sentence_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV, value)
    q = weight()
    for call in (lambda: dequantize_nf4(q), lambda: matmul_op(activations(2, 128), q)):  # even on the CPU
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert msg == f"MINILORA_KERNELS={value!r} is not valid; set it to auto, off or strict, or unset it."


@pytest.mark.parametrize("value", ["", "auto", "Off", " strict "])
def test_valid_values(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV, value)
    assert dispatch.kernel_mode() == (value.strip().lower() or "auto")


# --- on a GPU: the real check ---------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_kernels_pass_their_self_check():
    for name in dispatch.KERNELS:
        assert dispatch.self_check(name, "cuda") is None, name
    q = weight().to("cuda")
    assert dispatch.dequant_kernel(q) is nf4_dequant.dequantize_nf4_triton
    assert dispatch.matmul_kernel(activations(4, 128).cuda(), q) is nf4_matmul.nf4_matmul_triton
