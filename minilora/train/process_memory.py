"""Memory this process holds, measured: what a plan's runtime term is and what its predicted peak is
compared with (minilora/train/memory_plan.py)."""

from __future__ import annotations

import torch


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux) in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory now (0 where unavailable)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_memory_bytes(device: torch.device) -> int:
    """What the plan's predicted peak is compared with: torch.cuda.max_memory_allocated on CUDA; on
    the CPU this process's own peak RSS (VmHWM; ru_maxrss would carry a parent's peak over fork + exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak


def warm_runtime(device: torch.device, dtype: torch.dtype, recompute: bool = True) -> int:
    """The runtime constant: memory a training process holds before its model (Python, torch, the
    math libraries and the code paths a step touches). One LoRA step of a tiny NF4 model loads them
    all; then this process's RSS is measured (CPU). 0 on CUDA (max_memory_allocated excludes it).
    recompute: the step recomputes a block, as the run will; torch's non-reentrant checkpoint loads
    torch._dynamo on first use (about 150 MB), which a run without recompute never loads."""
    if device.type != "cpu":
        return 0
    from minilora.data.packing import Batch
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.config import ModelConfig
    from minilora.models.loader import no_random_init, quantize_linears
    from minilora.models.transformer import Transformer
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.train.loss import chunked_lm_loss

    cfg = ModelConfig.from_name("tiny")
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"), no_random_init():  # as the loader builds it (init on meta loads more code)
            model = Transformer(cfg)
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.tie_weights()
        model.to(dtype)
        quantize_linears(model, compute_dtype=dtype)
        apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
        model.set_gradient_checkpointing(1 if recompute else 0)
        opt = PagedAdamW(lora_parameters(model), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
        ones = torch.ones_like(ids)
        batch = Batch(ids, ids, ones, torch.arange(16, device=device).expand(2, 16), ones, 30)
        loss, n = chunked_lm_loss(model, batch, 8)
        (loss / n).backward()
        opt.step()
    del model, opt, loss
    return rss_bytes()


def free_memory(device: torch.device) -> int:
    """Bytes the run may still use: free RAM (MemAvailable) on the CPU, mem_get_info on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
