"""Measure one configuration's steady-state training-step peak RSS in a fresh process (run as a script
by tests/test_planner.py; prints JSON). The model is built on the meta device and each linear is
quantized from its own random weight, so building it never holds the float32 model at once."""

import copy
import json
import sys

import torch


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(cfg, dtype):
    from minilora.models.transformer import Transformer
    from minilora.quant.linear import NF4Linear

    with torch.device("meta"):
        model = Transformer(cfg)
    quantized = {}  # one quantization per shape (NF4 quantization is slow); the planner needs no values
    for name, mod in list(model.named_modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, torch.nn.Linear) and f"{name}.{child}" != "lm_head":
                shape = (lin.out_features, lin.in_features)
                if shape not in quantized:
                    quantized[shape] = NF4Linear.from_weight(torch.randn(shape) * 0.02, compute_dtype=dtype)
                setattr(mod, child, copy.deepcopy(quantized[shape]))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(-0.05, 0.05)  # in place: no temporary copy of the embeddings
    model.tie_weights()
    return model.to(dtype)


def main(spec: dict) -> dict:
    torch.set_num_threads(1)
    from minilora.data.packing import Batch
    from minilora.lora.surgery import apply_lora, lora_parameters
    from minilora.models.config import ModelConfig
    from minilora.optim.paged_adamw import PagedAdamW
    from minilora.train.loss import chunked_lm_loss
    from minilora.train.process_memory import warm_runtime

    cfg = ModelConfig(**spec["config"])
    dtype = getattr(torch, spec["dtype"])
    runtime = warm_runtime(torch.device("cpu"), dtype)  # what train.py --plan measures
    model = build(cfg, dtype)
    apply_lora(model, r=spec["r"], alpha=2 * spec["r"], dropout=0.0, verbose=False)
    model.train()
    opt = PagedAdamW(lora_parameters(model), lr=1e-4, state_bits=spec["optimizer_bits"])
    B, T = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    ones = torch.ones_like(ids)
    batch = Batch(ids, ids.clone(), ones, torch.arange(T).expand(B, T), ones.clone(), B * (T - 1))
    # [full, selective, reuse] block counts (reuse: blocks keeping their dequantized weights)
    settings = [k if isinstance(k, list) else [k] for k in spec["recompute_blocks"]]
    settings = [k + [0] * (3 - len(k)) for k in settings]  # selective and reuse default to none
    if spec.get("budgets"):  # the parent sends budgets computed from this process's runtime
        from minilora.train.memory_plan import MARGIN, plan_memory
        from minilora.train.planner import choose_settings

        print(json.dumps({"runtime": runtime}), flush=True)
        budgets = json.loads(sys.stdin.readline())

        def fits(k, s, w, budget):
            plan = plan_memory(
                cfg,
                batch_size=B,
                seq_len=T,
                dtype=dtype,
                recompute_blocks=k,
                selective_blocks=s,
                reuse_blocks=w,
                runtime=runtime,
            )
            return plan.peak <= budget * MARGIN

        L, reuse = cfg.num_hidden_layers, spec.get("reuse", "off")
        chosen = [choose_settings(lambda k, s, w, b=b: fits(k, s, w, b), L, reuse=reuse) for b in budgets]
        settings = [list(c) for c in chosen if c is not None]
    peaks = []
    # Smallest plan first: what one setting leaves in the allocator is then at most what the next uses.
    for k, s, w in settings:
        model.set_gradient_checkpointing(k, selective=s)
        model.set_weight_reuse(w)
        for step in range(spec["steps"]):
            if step == 1:  # the first step allocated the optimizer states: measure the steady state
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
            loss, n = chunked_lm_loss(model, batch, spec["loss_chunk"])
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks.append(status("VmHWM:"))
    return {"runtime": runtime, "peaks": peaks, "recompute_blocks": settings}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
