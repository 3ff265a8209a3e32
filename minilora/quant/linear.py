"""NF4Linear: a frozen linear layer whose weight is stored as NF4 (see minilora/quant/nf4.py).

Letters: N tokens (all leading dims of x flattened), K in_features, M out_features.

    y = x W^T (+ b),   W = dequantize(NF4 codes) in the compute dtype

Quantization is a module swap (gpt-fast's pattern): `NF4Linear.from_linear(linear)` replaces an
nn.Linear; the packed codes and quantization state live in buffers, so `.to(device)` and
`state_dict()` carry them. Nothing here is trainable; LoRA (minilora/lora/layers.py) adds the trainable
part beside it.

Memory: by default the autograd function keeps only the NF4 tensor (a reference to the module's
buffers) between forward and backward, and dequantizes again in the backward, so a dequantized bf16
weight (2 bytes/param, four times the NF4 codes) never stays alive across the step. Dequantizing is
recomputing the weight; `keep_dequantized` trades that time for memory: the forward's dequantized
weight is saved for the backward (where dL/dx is needed), the same bits without the second pass. The
memory planner (minilora/train/planner.py) turns it on per block when the budget allows.

A kept W is also held from one step to the next (held_weight): the base is frozen, so it stays exact
until the codes themselves change, and every forward after the first dequantizes nothing. In a block
that keeps its activations the W is alive at the step's peak (the end of the forward) anyway, so
holding it costs no peak memory; in a recomputed block it costs its bytes for the whole step, which
the planner counts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minilora.kernels import dispatch
from minilora.quant.nf4 import NF4Tensor, dequantize_nf4_cpu, dequantize_nf4_reference, quantize_nf4


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the original dtype), the same values on every path.

    The Triton kernel where kernels/dispatch.py allows it (CUDA, once the kernel has passed its
    self-check); otherwise the tuned CPU path on the CPU and the reference elsewhere.
    """
    if not isinstance(q, NF4Tensor):
        raise ValueError(f"dequantize_nf4 takes an NF4Tensor (what quantize_nf4 returns), not a {type(q).__name__}.")
    kernel = dispatch.dequant_kernel(q)
    if kernel is not None:
        return kernel(q, q.dtype if dtype is None else dtype)
    return (dequantize_nf4_cpu if q.packed.device.type == "cpu" else dequantize_nf4_reference)(q, dtype)


def _plus_product(add: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (..., P) @ (P, Q) -> (..., Q), plus `add` (..., Q) in the same dtype when given: then one
    addmm, whose float32 accumulator starts from `add`, so the sum is rounded once (oneDNN on the
    CPU, cuBLAS on CUDA; tests/test_lora_fused.py checks it), where product + add would round twice."""
    if add is None:
        return a @ b
    return torch.addmm(add.reshape(-1, b.shape[1]), a.reshape(-1, b.shape[0]), b).view(add.shape)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ add) -> (..., M), W (M, K) held as NF4, computed in x.dtype.

    The fused Triton kernel (kernels/nf4_matmul.py) when kernels/dispatch.py picks it (CUDA, few
    tokens, the kernel passed its self-check), then + add; otherwise dequantize, then one matmul
    whose sum includes add (_plus_product: rounded once).
    """
    fused = dispatch.matmul_kernel(x, q)
    if fused is not None:
        return fused(x, q) if add is None else fused(x, q) + add
    return _plus_product(add, x, dequantize_nf4(q, x.dtype).t())  # (..., M)


def nf4_matmul_keep(
    x: torch.Tensor, q: NF4Tensor, keep: bool, add: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(nf4_matmul(x, q, add), W or None): with keep, the dequantized weight W (M, K) in x.dtype that the
    product used, for the backward to reuse; None where the fused kernel ran (it dequantizes in
    registers, so there is no W to keep) or without keep."""
    if not keep or dispatch.matmul_kernel(x, q) is not None:
        return nf4_matmul(x, q, add), None
    w = dequantize_nf4(q, x.dtype)  # (M, K)
    return _plus_product(add, x, w.t()), w  # (..., M): nf4_matmul's product, bit for bit


def nf4_matmul_t(
    g: torch.Tensor, q: NF4Tensor, w: torch.Tensor | None = None, add: torch.Tensor | None = None
) -> torch.Tensor:
    """g (..., M) @ W (+ add) -> (..., K): the input gradient, in g.dtype (the same choice of path, and
    add joined as in nf4_matmul); with w, the weight the forward kept (nf4_matmul_keep), the same
    values as dequantizing again."""
    if w is None:
        fused = dispatch.matmul_kernel(g, q, transposed=True)
        if fused is not None:
            return fused(g, q) if add is None else fused(g, q) + add
    w = dequantize_nf4(q, g.dtype) if w is None else w.to(g.dtype)  # .to: a no-op unless g's dtype differs
    return _plus_product(add, g, w)  # (..., M) @ (M, K) -> (..., K)


class NF4MatMulFn(torch.autograd.Function):
    """y = x W^T with W frozen and stored as NF4.

    Forward:  y = x W^T                       x (N, K), W (M, K), y (N, M)
    Backward: dL/dx = dL/dy W                 (N, M) @ (M, K) -> (N, K)
              dL/dW is not needed (W is frozen), so only the NF4 tensor is kept, not x; with the
              layer's keep_dequantized (and x needing a gradient) also the dequantized W (held from
              step to step: NF4Linear.keep_product), so backward does not dequantize.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.q = layer.weight_nf4  # codes + state: no activation
        y, w = layer.keep_product(x, layer.keep_dequantized and ctx.needs_input_grad[0])
        ctx.save_for_backward(w)  # None unless kept; saved tensors, so checkpoint's recompute drops it too
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (w,) = ctx.saved_tensors
        grad_x = nf4_matmul_t(grad_y, ctx.q, w) if ctx.needs_input_grad[0] else None
        return grad_x, None


# The buffers an NF4Linear holds, in NF4Tensor's order: packed codes, absmax (8-bit codes when double
# quantized), the second-level absmax and the offset (None without double quantization).
NF4_BUFFERS = ("weight_packed", "weight_absmax", "weight_absmax2", "weight_offset")
# The dtype the uint8 codes are viewed as where they must be parameters of a floating dtype (FSDP's
# sharded parameters, minilora/parallel/distributed.py): the same bytes, one byte per element, never
# computed with. weight_nf4 views them back.
BYTE_VIEW = torch.float8_e4m3fn


def as_bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself, or the uint8 view of codes stored as BYTE_VIEW."""
    return t.view(torch.uint8) if t is not None and t.dtype == BYTE_VIEW else t


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight. See the module docstring."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(
                f"NF4Linear needs a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}."
            )
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.compute_dtype = compute_dtype
        self._held: tuple | None = None  # (what it was made from, W) while kept: held_weight
        self.keep_dequantized = False  # weight reuse, set per block by the planner (module docstring)
        for name, t in zip(NF4_BUFFERS, (weight.packed, weight.absmax, weight.absmax2, weight.offset)):
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        return cls(quantize_nf4(weight, blocksize, double_quant), bias, compute_dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        return cls.from_weight(linear.weight.data, linear.bias, blocksize, double_quant, compute_dtype)

    @property
    def weight_nf4(self) -> NF4Tensor:
        return NF4Tensor(
            as_bytes(self.weight_packed),
            as_bytes(self.weight_absmax),
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
            self.weight_absmax2,
            self.weight_offset,
        )

    @property
    def keep_dequantized(self) -> bool:
        """Weight reuse (module docstring): keep the dequantized W from forward to backward, and hold it
        from one step to the next. Turning it off frees the held W."""
        return self._keep

    @keep_dequantized.setter
    def keep_dequantized(self, keep: bool) -> None:
        self._keep = bool(keep)
        if not keep:
            self._held = None

    def held_weight(self, dtype: torch.dtype, make: bool) -> torch.Tensor | None:
        """The dequantized W (M, K) in `dtype` this layer holds between steps (keep_dequantized), or None.

        Made where the forward keeps W for the backward anyway (`make`: keep, and dL/dx needed), so a
        layer holds exactly what the planner counts as kept; used by every forward once it exists. Made
        again when the codes change (another storage, or written in place: a .to(), a load). Never for
        codes in FSDP's byte view: those are gathered anew each step, and a whole W held on every rank
        would undo the sharding (the forward's W is then kept until the backward only)."""
        packed, absmax = self.weight_packed, self.weight_absmax
        if not self.keep_dequantized or packed.dtype == BYTE_VIEW:
            return None
        made_from = (dtype, packed.device, packed.data_ptr(), packed._version, absmax.data_ptr(), absmax._version)
        if self._held is not None and self._held[0] == made_from:
            return self._held[1]
        self._held = None  # a stale W goes before a new one is made
        if make:
            self._held = (made_from, dequantize_nf4(self.weight_nf4, dtype))
        return None if self._held is None else self._held[1]

    def keep_product(
        self, x: torch.Tensor, keep: bool, add: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nf4_matmul_keep(x, W, keep, add) for this layer's W, reading the W it holds where it holds one
        (held_weight, made here when keep): the same W, so the same bits, without dequantizing."""
        held = self.held_weight(x.dtype, make=keep)  # (M, K) or None
        if held is not None:
            return _plus_product(add, x, held.t()), held  # (..., M)
        return nf4_matmul_keep(x, self.weight_nf4, keep, add)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as a dense (M, K) tensor (for merging and inspection; not used in forward)."""
        return dequantize_nf4(self.weight_nf4, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        y = NF4MatMulFn.apply(x, self)  # (..., M)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(in_dtype)

    def to_bnb(self, compute_dtype: torch.dtype | None = None) -> nn.Module:
        """A bitsandbytes Linear4bit (nf4) holding exactly these bytes and bias (interop, and the
        oracle of the tests and benchmarks); compute_dtype defaults to the weight's dtype."""
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # bitsandbytes is a test/interop dependency only
            raise ImportError("NF4Linear.to_bnb needs bitsandbytes: pip install bitsandbytes.") from e
        q = self.weight_nf4
        packed, state = q.to_bnb()
        lin = bnb.nn.Linear4bit(
            q.shape[1],
            q.shape[0],
            bias=self.bias is not None,
            quant_type="nf4",
            compute_dtype=compute_dtype or q.dtype,
            compress_statistics=q.double_quant,
            device=packed.device,
        )
        lin.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=q.blocksize,
            compress_statistics=q.double_quant,
            quant_type="nf4",
            bnb_quantized=True,
            module=lin,
        )
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        dq = self.weight_absmax2 is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
            f"blocksize={self.blocksize}, double_quant={dq}, bias={self.bias is not None}"
        )
