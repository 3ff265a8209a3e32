"""Small helpers shared by the benchmarks: timing medians, JSON output, environment facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def median_time(fn, repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds (synchronizing CUDA if used)."""
    return interleaved_medians({"fn": fn}, repeat, warmup)["fn"]


def interleaved_medians(fns: dict, repeat: int = 7, warmup: int = 2) -> dict:
    """Median seconds of each fn, timed round-robin (a, b, a, b, ...) so that bursts of load on a
    shared machine hit every contestant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: current RSS, VmHWM: peak RSS of this address space,
    which unlike getrusage's ru_maxrss does not inherit a parent's peak over fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def environment() -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bitsandbytes": ver("bitsandbytes"),
        "transformers": ver("transformers"),
        "peft": ver("peft"),
        "triton": ver("triton"),
    }


def cpu_info() -> dict:
    """The CPU's model name and the vector/matrix flags that change which kernels run (AVX, FMA, AMX)."""
    model, flags = "unknown", []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "fma", "f16c", "amx")))
    return {"model": model, "flags": flags, "threads": torch.get_num_threads()}


def gemm_rates(n: int = 640, k: int = 576, m: int = 1536, repeat: int = 15) -> dict:
    """GFLOP/s of one (n, k) @ (k, m) GEMM in bf16 and in float32 on this machine, at torch's current
    thread count (the default shape is a 135M-class MLP projection of 640 tokens): the ceiling a
    training step's utilisation is measured against, taken in the same run as the step."""
    rates = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        x, w = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
        rates[name] = 2 * n * k * m / median_time(lambda: x @ w, repeat=repeat, warmup=3) / 1e9
    return rates


def write_json(name: str, payload: dict, path: str | None = None) -> str:
    """Write `payload` atomically (minilora/fileio.py) to `path`, by default bench/results/<name>.json;
    returns the path."""
    from minilora.fileio import write_text_atomic

    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    write_text_atomic(path, json.dumps(payload, indent=2))
    return path


def run_json_worker(module: str, impl: str, ckpt: str, argv: list[str], env: dict) -> dict:
    """`python -m MODULE ARGV --worker IMPL --ckpt CKPT` in a fresh process (each side of a memory
    comparison starts from an empty heap); its last JSON line on stdout is the measurement."""
    cmd = [sys.executable, "-m", module, *argv, "--worker", impl, "--ckpt", ckpt]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])
