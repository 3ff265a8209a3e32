"""minilora: a from-scratch LoRA/QLoRA fine-tuning stack.

The repository keeps `kernels/` and `models/` at the top level (see DESIGN.md), but they are
part of this package: an install maps them to `minilora.kernels` and `minilora.models`.
In a plain checkout with no install, the fallback below makes the same names resolve to the
top-level folders, so `python train.py` works either way. Library code always imports them
as `minilora.kernels` / `minilora.models`, never as bare `kernels` / `models`.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "models")) and _os.path.isfile(
    _os.path.join(_root, "models", "__init__.py")
) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    # A checkout: let `minilora.models` / `minilora.kernels` find the top-level folders.
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
