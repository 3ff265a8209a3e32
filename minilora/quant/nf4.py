"""NF4 quantization with double quantization: a pure-PyTorch reference, bit-exact with bitsandbytes.

Letters: n number of weight elements, nb = ceil(n / blocksize) first-level blocks,
nb2 = ceil(nb / 256) second-level blocks.

Quantize (QLoRA, arXiv 2305.14314), per block b of `blocksize` consecutive elements of w.flatten():

    absmax_b = max_i |w_i|                      (float32)
    x_i      = clamp(w_i / absmax_b, -1, 1)
    code_i   = argmin_k |x_i - NF4[k]|          (4 bits; ties go to the lower code)

Two codes share a byte, the first (even index) in the high nibble. An odd n is padded with one
zero (code 7, NF4[7] = 0), exactly as bitsandbytes pads.

Double quantization stores the nb float32 absmax values in 8 bits:

    offset   = mean(absmax)                     (float32 scalar)
    c_b      = absmax_b - offset                (centred, signed)
    absmax2_j = max_{b in block j} |c_b|        (float32, blocks of 256)
    acode_b  = 8-bit code of c_b / absmax2_j in the signed dynamic map, chosen through
               bitsandbytes' 65536-bin lookup table (minilora/quant/blockwise8.py)

Dequantize:  absmax_b = DYN[acode_b] * absmax2_j + offset ;  w_i = NF4[code_i] * absmax_b,
computed in float32 and cast once to the output dtype.

Storage per parameter: 4 bits + 32 / blocksize (plain) or 4 + 8 / blocksize + 32 / (256 blocksize)
(double quantized): 4.5 and about 4.127 bits at blocksize 64.

The arithmetic mirrors bitsandbytes' CPU path operation for operation (full blocks multiply by
the reciprocal of absmax, the ragged last block divides, absmax is clamped to 1e-38 before use,
the 8-bit absmax codes go through its lookup table), because the results must match it bit
for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass

import torch

from minilora.dtypes import DTYPE_NAMES, DTYPES
from minilora.quant.blockwise8 import BLOCK, quantize_blockwise8
from minilora.quant.maps import dynamic_map, nf4_code

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096
BLOCKSIZE2 = BLOCK  # second-level block of double quantization: 256, as in bitsandbytes


@dataclass
class NF4Tensor:
    """A weight stored as NF4 codes plus its quantization state (bitsandbytes' layout).

    packed:   uint8 (ceil(n/2),)   two 4-bit codes per byte, first in the high nibble
    absmax:   float32 (nb,)        per-block absmax, or uint8 (nb,) codes when double quantized
    absmax2:  float32 (nb2,)       second-level absmax (double quant only)
    offset:   float32 ()           mean of the first-level absmax (double quant only)
    shape, dtype: the original weight's shape and dtype
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self):
        """ValueError in one sentence for parts that do not fit together (sizes only, no pass over the
        data): dequantizing such a state reads past its codes, or scales blocks by the wrong numbers."""
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Tensor: blocksize {self.blocksize!r} is not one of {sorted(BLOCKSIZES)}.")
        n = math.prod(self.shape)
        nb = -(-n // self.blocksize)
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"NF4Tensor: packed holds {self.packed.numel()} bytes but shape {tuple(self.shape)} needs "
                f"{(n + 1) // 2}."
            )
        if self.absmax.numel() != nb:
            raise ValueError(f"NF4Tensor: absmax holds {self.absmax.numel()} scales but {n} values need {nb}.")
        if (self.absmax2 is None) != (self.offset is None) or (self.absmax.dtype == torch.uint8) != (
            self.absmax2 is not None
        ):
            raise ValueError(
                "NF4Tensor: double quantization stores uint8 absmax codes with absmax2 and offset, single float32 "
                "absmax without them; these parts mix the two."
            )
        nb2 = -(-nb // BLOCKSIZE2)
        if self.absmax2 is not None and self.absmax2.numel() != nb2:
            raise ValueError(
                f"NF4Tensor: absmax2 holds {self.absmax2.numel()} scales but {nb} absmax codes need {nb2}."
            )

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_float(self) -> torch.Tensor:
        """First-level absmax as float32 (nb,), undoing double quantization."""
        return absmax_float(self)

    def to(self, device) -> NF4Tensor:
        def mv(t):
            return None if t is None else t.to(device)

        return NF4Tensor(
            mv(self.packed), mv(self.absmax), self.shape, self.dtype, self.blocksize, mv(self.absmax2), mv(self.offset)
        )

    def nbytes(self) -> int:
        """Bytes of storage: codes + absmax (+ second level and offset)."""
        extra = 0 if self.absmax2 is None else self.absmax2.numel() * 4 + 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    # --- bitsandbytes interop -------------------------------------------------------------
    def to_bnb(self):
        """Return (packed (ceil(n/2), 1) uint8, bitsandbytes QuantState), sharing storage."""
        try:
            from bitsandbytes.functional import QuantState
        except ImportError as e:  # bitsandbytes is a test/interop dependency only
            raise ImportError("NF4Tensor.to_bnb needs bitsandbytes: pip install bitsandbytes.") from e
        dev = self.packed.device
        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.absmax2,
                code=dynamic_map(True, device=dev).clone(),
                blocksize=BLOCKSIZE2,
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=nf4_code(dev),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed.view(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Tensor:
        """Wrap bitsandbytes' packed codes and QuantState, with no requantization."""
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"from_bnb: quant_type is {quant_state.quant_type!r}; only 'nf4' is supported.")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        s2 = quant_state.state2 if quant_state.nested else None
        if s2 is not None and s2.blocksize != BLOCKSIZE2:
            raise ValueError(f"from_bnb: second-level blocksize {s2.blocksize} is not {BLOCKSIZE2}.")
        return cls(
            packed=packed.reshape(-1),
            absmax=quant_state.absmax,
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            absmax2=None if s2 is None else s2.absmax.float(),
            offset=None if s2 is None else quant_state.offset.float().reshape(()),
        )

    # --- serialization (safetensors, no pickle) --------------------------------------------
    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "packed": self.packed, prefix + "absmax": self.absmax}
        if self.double_quant:
            out[prefix + "absmax2"] = self.absmax2
            out[prefix + "offset"] = self.offset.reshape(1)
        return out

    def metadata(self) -> dict[str, str]:
        return {
            "shape": json.dumps(list(self.shape)),
            "dtype": DTYPE_NAMES[self.dtype],
            "blocksize": str(self.blocksize),
            "double_quant": str(self.double_quant).lower(),
            "format": "nf4",
        }

    @classmethod
    def from_state_tensors(cls, tensors: dict, metadata: dict, prefix: str = "") -> NF4Tensor:
        dq = metadata["double_quant"] == "true"
        return cls(
            packed=tensors[prefix + "packed"],
            absmax=tensors[prefix + "absmax"],
            shape=torch.Size(json.loads(metadata["shape"])),
            dtype=DTYPES[metadata["dtype"]],
            blocksize=int(metadata["blocksize"]),
            absmax2=tensors[prefix + "absmax2"] if dq else None,
            offset=tensors[prefix + "offset"].reshape(()) if dq else None,
        )

    def save(self, path: str) -> None:
        """Write to a safetensors file atomically (minilora/fileio.py: temp file, then rename)."""
        from safetensors.torch import save_file

        from minilora.fileio import write_file_atomic

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))

    @classmethod
    def load(cls, path: str, device="cpu") -> NF4Tensor:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "nf4":
                raise ValueError(f"{path} is not an NF4 tensor file written by NF4Tensor.save.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_state_tensors(tensors, meta)


def _check_input(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}.")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4: dtype {w.dtype} is not supported; pass float32, bfloat16 or float16.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize!r} is not supported; use a power of two from 32 to 4096.")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: the tensor is empty; there is nothing to quantize.")


def _check_finite(absmax: torch.Tensor) -> None:
    # a block's absmax is NaN or inf exactly when the block holds one: nb checks instead of n
    if not torch.isfinite(absmax).all():
        raise ValueError("quantize_nf4: the tensor contains NaN or inf; fix the weights before quantizing.")


def _blockwise_absmax_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float32 (n,) -> (absmax (nb,), scaled (n,) in [-1, 1]), bitsandbytes' arithmetic."""
    n = x.numel()
    full = n - n % blocksize
    xb = x[:full].view(-1, blocksize)  # (nb_full, blocksize)
    absmax = xb.abs().amax(dim=1)  # (nb_full,)
    scaled = torch.clamp(xb * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:  # ragged last block: its stored absmax is the clamped one, and it divides
        am = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    return absmax, scaled


_BINS = 2048  # bins per unit of the direct lookup below; NF4 midpoints are >= 0.08 apart
_CODE_LUT: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _code_lut(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut (2 * _BINS + 1,) int32, mids (16,) float32 padded with +inf)."""
    if device not in _CODE_LUT:
        code = nf4_code(device)
        mids = (code[:-1] + code[1:]) / 2  # (15,) float32, exactly bitsandbytes' bounds
        edges = torch.arange(2 * _BINS + 1, dtype=torch.float64, device=device) / _BINS - 1  # bin starts
        # mids strictly below each bin's start, with a margin for the float32 rounding of the bin
        lut = torch.searchsorted(mids.double(), edges - 1e-6, right=False).to(torch.int32)
        _CODE_LUT[device] = lut, torch.cat([mids, mids.new_full((1,), float("inf"))])
    return _CODE_LUT[device]


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """scaled (m,) in [-1, 1] -> uint8 codes (m,): nearest NF4 value, ties to the lower code.

    The code is #{k : mid_k < x}, what bitsandbytes' torch.bucketize(x, mids) returns. A direct
    lookup replaces the binary search: bin b = floor((x + 1) * 2048) holds at most one midpoint
    (they are 0.08 apart, bins 0.0005 wide), so with c = #{mids below the bin} the answer is
    c + (x > mid_c): exact, ties included, and a few elementwise passes instead of a search.
    """
    lut, mids = _code_lut(scaled.device)
    b = scaled.add(1).mul_(_BINS).to(torch.int32)  # (m,) bin, truncation (x >= -1)
    c = lut.index_select(0, b)  # (m,) int32 midpoints below the bin (index_select: a fast gather)
    return c.add_(torch.gt(scaled, mids.index_select(0, c))).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float32/bf16/fp16 tensor of any shape to NF4 (see the module docstring)."""
    _check_input(w, blocksize)
    x = w.detach().reshape(-1).float()  # (n,)
    absmax, scaled = _blockwise_absmax_scale(x, blocksize)
    _check_finite(absmax)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad value 0 -> code 7
    q = _nf4_codes(scaled)  # (2 * ceil(n/2),)
    packed = (q[0::2] << 4) | q[1::2]  # (ceil(n/2),) high nibble first
    if not double_quant:
        return NF4Tensor(packed, absmax, torch.Size(w.shape), w.dtype, blocksize)
    offset = absmax.mean()  # () float32
    acodes, absmax2 = quantize_blockwise8(absmax - offset, signed=True)  # blocks of 256
    return NF4Tensor(packed, acodes, torch.Size(w.shape), w.dtype, blocksize, absmax2, offset)


def absmax_float(q: NF4Tensor) -> torch.Tensor:
    """First-level absmax (nb,) float32: DYN[acode] * absmax2[block] + offset, or as stored."""
    if not q.double_quant:
        return q.absmax.float()
    nb = q.absmax.numel()
    nb2 = q.absmax2.numel()
    dmap = dynamic_map(True, device=q.absmax.device)
    vals = dmap.index_select(0, q.absmax.int())  # (nb,)
    vals = torch.nn.functional.pad(vals, (0, nb2 * BLOCKSIZE2 - nb)).view(nb2, BLOCKSIZE2)  # (nb2, 256)
    return (vals * q.absmax2.unsqueeze(1)).view(-1)[:nb] + q.offset  # (nb,)


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dequantize: output dtype {dtype} is not supported; use float32, bfloat16 or float16.")


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w_i = NF4[code_i] * absmax_{i // blocksize} in float32, cast once to `dtype` (default q.dtype).

    The readable definition, which the tuned CPU path and the Triton kernels are tested against.
    """
    dtype = q.dtype if dtype is None else dtype
    _check_out_dtype(dtype)
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)[: q.numel]  # (n,) high nibble first
    absmax = absmax_float(q).repeat_interleave(q.blocksize)[: q.numel]  # (n,) each element's block absmax
    w = nf4_code(q.packed.device)[codes.long()] * absmax  # (n,) float32
    return w.to(dtype).view(q.shape)


DEQUANT_CHUNK = 1 << 18  # elements per chunk of dequantize_nf4_cpu: its temporaries stay in cache
DEQUANT_THREADS = 1  # threads of dequantize_nf4_cpu's elementwise ops (see its docstring)
_PAIR_LUT: dict[torch.device, torch.Tensor] = {}


def _pair_lut(device: torch.device) -> torch.Tensor:
    """(256,) float64 view: for each byte, its two NF4 values (high nibble first) as two float32s' bytes."""
    if device not in _PAIR_LUT:
        code, b = nf4_code(device), torch.arange(256, device=device)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1)  # (256, 2) float32
        _PAIR_LUT[device] = pairs.contiguous().view(torch.float64).view(-1)  # one gather decodes a byte
    return _PAIR_LUT[device]


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the body with at most n intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dequantize_nf4_cpu(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize_nf4_reference's result, bit for bit, tuned for the CPU.

    Streams through the flat weight in chunks of DEQUANT_CHUNK elements (a multiple of the
    blocksize) so the int32/float32 temporaries stay in cache. Per chunk: bytes -> int32 -> gather
    from the 256-entry pair table -> (blocks, blocksize) *= absmax -> copy (the cast) into the output.

    The gather reads the pair table viewed as float64 with int32 indices, because PyTorch's CPU
    index_select has a tight loop for floating tables with int32 indices and a slower generic one
    otherwise. The float64 view only moves bits: no arithmetic touches it (a pair ending in NF4 0.0
    spells a float64 subnormal, which copies keep even in flush-denormal mode; tested), and no pair
    of finite float32s spells a float64 NaN.

    The elementwise ops run on DEQUANT_THREADS threads (restored afterwards): each op is small, and
    an OpenMP fork/join per op stalls for a whole scheduler slice when another process holds a core.
    bench/nf4_cpu.py measures this path beside bitsandbytes.
    """
    dtype = q.dtype if dtype is None else dtype
    _check_out_dtype(dtype)
    dev, n, bs = q.packed.device, q.numel, q.blocksize
    out = torch.empty(n, dtype=dtype, device=dev)
    step = max(bs, DEQUANT_CHUNK - DEQUANT_CHUNK % bs)
    with _torch_threads(DEQUANT_THREADS):
        lut, absmax = _pair_lut(dev), absmax_float(q)  # (256,), (nb,)
        idx = torch.empty((step + 1) // 2, dtype=torch.int32, device=dev)  # reused by every chunk
        pairs = torch.empty((step + 1) // 2, dtype=torch.float64, device=dev)
        for e0 in range(0, n, step):  # e0 is a multiple of bs, so chunks start on block bounds
            e1 = min(n, e0 + step)
            nbytes = (e1 + 1) // 2 - e0 // 2
            idx[:nbytes].copy_(q.packed[e0 // 2 : e0 // 2 + nbytes])  # (bytes,) uint8 -> int32
            torch.index_select(lut, 0, idx[:nbytes], out=pairs[:nbytes])
            vals = pairs[:nbytes].view(torch.float32)[: e1 - e0]  # (e1 - e0,) float32
            full = (e1 - e0) - (e1 - e0) % bs
            vals[:full].view(-1, bs).mul_(absmax[e0 // bs : (e0 + full) // bs].unsqueeze(1))  # (blocks, bs)
            if full < e1 - e0:  # ragged last block of the tensor
                vals[full:].mul_(absmax[-1])
            out[e0:e1].copy_(vals)  # the single cast to dtype
    return out.view(q.shape)
