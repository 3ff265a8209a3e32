"""minilora: a from-scratch LoRA/QLoRA fine-tuning stack.

`kernels/` and `models/` sit at the top level of the repository but belong to this package:
the install (`pip install -e .`) maps them to `minilora.kernels` and `minilora.models`. A script run
from a checkout (`python train.py`) imports this package from the checkout, and the finder below
takes those two names from the same checkout, with or without an install.
"""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "examples")  # the offline demo's data and tokenizer, beside the package
DEMO_RUN = os.path.join("runs", "demo")  # where `python train.py` writes the offline demo's run (relative)


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds minilora.kernels and minilora.models in the checkout's top-level folders. Without it, a
    checkout that was not installed has no such modules, and one run beside another checkout's
    editable install would take that checkout's kernels and models."""

    FOLDERS = {"minilora.kernels": "kernels", "minilora.models": "models"}

    def find_spec(self, name, path=None, target=None):
        folder = self.FOLDERS.get(name)
        if folder is None:
            return None
        where = os.path.join(REPO_ROOT, folder)
        return importlib.util.spec_from_file_location(
            name, os.path.join(where, "__init__.py"), submodule_search_locations=[where]
        )


# Only in a checkout: an installed copy (site-packages/minilora) holds both folders itself, and the
# folders beside it there may be other packages (PyPI has one named `kernels`).
if os.path.isfile(os.path.join(REPO_ROOT, "pyproject.toml")) and os.path.isdir(os.path.join(REPO_ROOT, "kernels")):
    sys.meta_path.insert(0, _CheckoutFolders())
