"""LoRA: the layers and the model surgery (layers.py), DoRA's magnitude (dora.py), and the adapter
format PEFT reads and writes (adapter.py).

    from minilora.lora import apply_lora, lora_disabled, lora_parameters, merge_lora, save_adapter, load_adapter
    with lora_disabled(model): ...   # every LoRA layer off: the frozen base (DPO's reference)
"""

from minilora.lora.adapter import load_adapter, save_adapter
from minilora.lora.layers import LoRALinear, apply_lora, lora_disabled, lora_parameters, merge_lora

__all__ = ["LoRALinear", "apply_lora", "load_adapter", "lora_disabled", "lora_parameters", "merge_lora", "save_adapter"]
