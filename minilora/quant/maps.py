"""The two lookup tables of bitsandbytes-style quantization, written out here.

NF4 (NormalFloat4, QLoRA paper, arXiv 2305.14314): 16 values at quantiles of N(0, 1), rescaled
to [-1, 1], with an exact 0. A 4-bit code is an index into this table, not a float encoding.
The values are the float32 constants bitsandbytes uses (its `create_normal_map(offset=0.9677083,
use_extra_value=True)`), so codes are interchangeable with bitsandbytes bit for bit.

Dynamic map (Dettmers 2015, arXiv 1511.04561): an 8-bit "dynamic exponent" type. For exponent
i = 0..6 the magnitudes 10^(i-6) * m are used, m the midpoints of linspace(0.1, 1, 2^i + 1)
(signed: both signs), plus 0 and 1.0, sorted: 256 values spanning 1e-7..1. It quantizes the
per-block absmax values in double quantization (blocks of 256) and 8-bit optimizer states.
"""

import functools

import torch

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor, index = 4-bit code."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """The 256-entry 8-bit dynamic quantization map (float32, sorted ascending), cached per device:
    treat it as read-only.

    Signed: for each exponent i = 0..6, 2^i + 1 boundaries b = linspace(0.1, 1) give 2^i midpoints
    m; values +-10^(i-6) * m; then 0 and 1.0: 2 * (1 + 2 + ... + 64) + 2 = 256 values. Unsigned:
    2^(i+1) midpoints per exponent and no negatives: (2 + 4 + ... + 128) + 2 = 256 values.
    """
    data: list[float] = []
    for i in range(7):  # magnitudes 10^-6 .. 10^0
        n_fraction = 2**i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (i - 6)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


dynamic_map = functools.lru_cache(maxsize=16)(dynamic_map)
