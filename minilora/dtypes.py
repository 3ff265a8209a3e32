"""Dtypes, one home: the names config files use for them, the machine's choice for `--dtype auto`,
and the dtype a run computed in, read back from its config.json.

A run's dtype is resolved once, by train.py, and recorded as config.json's "resolved_dtype"; eval.py
and the exports read that record (run_dtype) instead of resolving "auto" again, because "auto"
depends on the machine: a run trained in bf16 on a CPU with bf16 matrix units must be scored and
exported from the same bf16 base, whatever machine reads it later.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # torch.bfloat16 -> "bfloat16", as config.json spells it


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name config.json, the plan and the benchmarks print."""
    return str(dtype).removeprefix("torch.")


def cpu_bf16_units() -> dict[str, bool]:
    """Which native bf16 matrix units this CPU has, as torch reports them. get_cpu_capability() says
    only "AVX512" on such CPUs, so this asks torch.cpu's feature probes (cpuinfo underneath)."""
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {k: bool(getattr(torch.cpu, fn, lambda: False)()) for k, fn in probe.items()}


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices with bf16 and on CPUs with bf16 matrix units; float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if any(cpu_bf16_units().values()) else torch.float32


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """auto -> auto_dtype on this device; otherwise the named torch dtype."""
    if name == "auto":
        return auto_dtype(torch.device(device_type))
    return DTYPES[name]


def run_dtype(run_config: dict) -> torch.dtype:
    """The dtype a run loaded its base in and computed with: config.json's "resolved_dtype", which
    train.py writes. A config without it (written before that record existed) is resolved on this
    machine as train.py would have."""
    name = run_config.get("resolved_dtype")
    if name is None:
        return resolve_dtype(run_config.get("dtype", "auto"), "cuda" if torch.cuda.is_available() else "cpu")
    return DTYPES[name]
