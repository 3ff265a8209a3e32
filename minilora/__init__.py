"""minilora: a from-scratch LoRA/QLoRA fine-tuning stack.

`kernels/` and `models/` sit at the top level of the repository but belong to this package:
the install (`pip install -e .`) maps them to `minilora.kernels` and `minilora.models`.
"""

__version__ = "0.1.0"
