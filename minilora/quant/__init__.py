"""Quantization: the NF4 format with double quantization (nf4.py), the code tables it is built from
(maps.py: the NF4 and dynamic 8-bit maps; blockwise8.py: 8-bit blockwise quantization), and the
frozen 4-bit linear layer that computes from the packed codes (linear.py).

    from minilora.quant import quantize_nf4, dequantize_nf4, NF4Tensor, NF4Linear
"""

from minilora.quant.linear import NF4Linear, dequantize_nf4
from minilora.quant.nf4 import NF4Tensor, quantize_nf4

__all__ = ["NF4Linear", "NF4Tensor", "dequantize_nf4", "quantize_nf4"]
