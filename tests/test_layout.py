"""The package layout: the top-level kernels/ and models/ folders ship inside minilora, as
minilora.kernels and minilora.models, never as top-level packages of their own."""

import importlib
import importlib.util
import os

import minilora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subpackages_resolve_to_top_level_folders():
    for name in ("kernels", "models"):
        mod = importlib.import_module(f"minilora.{name}")
        assert os.path.realpath(os.path.dirname(mod.__file__)) == os.path.realpath(
            os.path.join(ROOT, name)
        ), mod.__file__


def test_kernels_and_models_not_installed_top_level():
    # A `kernels` or `models` on sys.path would shadow (or be shadowed by) unrelated PyPI
    # packages; only the checkout's own folders may provide those names.
    for name in ("kernels", "models"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            assert os.path.realpath(spec.origin).startswith(os.path.realpath(ROOT)), spec.origin


def test_version():
    assert minilora.__version__.count(".") == 2
