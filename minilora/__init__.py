"""minilora: a from-scratch LoRA/QLoRA fine-tuning stack.

`kernels/` and `models/` sit at the top level of the repository but belong to this package:
the install (`pip install -e .`) maps them to `minilora.kernels` and `minilora.models`.
"""

import os

__version__ = "0.1.0"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "examples")  # the offline demo's data and tokenizer, beside the package
