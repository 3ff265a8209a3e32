"""LoRA: the layers and the model surgery (layers.py), DoRA's magnitude (dora.py), and the adapter
format PEFT reads and writes (adapter.py), several named adapters on one base (named.py, multi.py).

    from minilora.lora import apply_lora, lora_disabled, lora_parameters, merge_lora, save_adapter, load_adapter
    with lora_disabled(model): ...   # every LoRA layer off: the frozen base (DPO's reference)
    load_adapter(model, dir_b, name="b"); model(ids, adapter_ids=[0, 1, -1])   # one adapter per row
"""

from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.layers import LoRALinear, apply_lora, lora_disabled, lora_parameters, merge_lora
from minilora.lora.named import adapter_names, delete_adapter, set_adapter

__all__ = [
    "LoRALinear",
    "adapter_names",
    "apply_lora",
    "delete_adapter",
    "load_adapter",
    "lora_disabled",
    "lora_parameters",
    "merge_lora",
    "save_adapter",
    "set_adapter",
]
