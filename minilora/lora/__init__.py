"""LoRA: the layers (layers.py) and the model surgery (surgery.py), DoRA's magnitude (dora.py), the adapter
format PEFT reads and writes (adapter.py, its files checked in adapter_files.py), several named adapters on
one base (named.py, multi.py).

    from minilora.lora import apply_lora, lora_disabled, lora_parameters, merge_lora, save_adapter, load_adapter
    merge_lora(model); unmerge_lora(model)   # fold the default adapter into the base weights, and back
    with lora_disabled(model): ...   # every LoRA layer off: the frozen base (DPO's reference)
    load_adapter(model, dir_b, name="b"); model(ids, adapter_ids=[0, 1, -1])   # one adapter per row
"""

from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.layers import LoRALinear
from minilora.lora.named import adapter_names, delete_adapter, set_adapter
from minilora.lora.surgery import apply_lora, lora_disabled, lora_parameters, merge_lora, unmerge_lora

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
    "unmerge_lora",
]
