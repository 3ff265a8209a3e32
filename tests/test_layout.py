"""The package layout: the top-level kernels/ and models/ folders ship inside minilora, as
minilora.kernels and minilora.models, never as top-level packages of their own."""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import minilora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subpackages_resolve_to_top_level_folders():
    for name in ("kernels", "models"):
        mod = importlib.import_module(f"minilora.{name}")
        assert os.path.realpath(os.path.dirname(mod.__file__)) == os.path.realpath(os.path.join(ROOT, name)), (
            mod.__file__
        )


def test_kernels_and_models_not_installed_top_level():
    # A top-level `kernels` or `models` from minilora's install would shadow (or be shadowed by)
    # unrelated PyPI packages (transformers itself requires one named `kernels`). Such a name may
    # resolve to the checkout's own folder only where the checkout's root is on sys.path (running
    # from it); anywhere else it is another package's, or absent.
    root = os.path.realpath(ROOT)
    root_on_path = any(os.path.realpath(p or os.getcwd()) == root for p in sys.path)
    for name in ("kernels", "models"):
        mine = os.path.realpath(importlib.util.find_spec(f"minilora.{name}").origin)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None and os.path.realpath(spec.origin) == mine:
            assert root_on_path, f"top-level {name!r} resolves to minilora's own {mine}"


def test_version():
    assert minilora.__version__.count(".") == 2


def _run_from_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    # -c puts the working directory, the repository root, first on sys.path, as running a script there does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_top_level_kernels_import_resolves_to_the_installed_pypi_package(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("WHO = 'pypi'\n\ndef get_kernel(name):\n    return name\n")
    out = _run_from_root(
        "import kernels, minilora.kernels.dispatch as d\n"
        "print(kernels.WHO, kernels.get_kernel('x'), d.__name__, d.__file__)",
        extra_path=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    who, got, name, path = out.stdout.split()
    assert (who, got, name) == ("pypi", "x", "minilora.kernels.dispatch")
    assert os.path.realpath(path) == os.path.realpath(os.path.join(ROOT, "kernels", "dispatch.py"))


def test_transformers_and_bitsandbytes_import_from_the_root_without_the_pypi_kernels():
    # transformers imports whatever find_spec("kernels") finds to read its version: that import must succeed
    out = _run_from_root("import transformers.integrations.hub_kernels, bitsandbytes, peft; print('ok')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]


@pytest.mark.parametrize("installed", [False, True])
def test_a_checkout_runs_uninstalled_and_never_borrows_another_checkouts_folders(tmp_path, installed):
    # A copy of the checkout, run the way the README runs it (a script from its root): uninstalled
    # (the editable install's finder removed), or beside this checkout's editable install, which maps
    # the two names to this checkout's folders. The copy's own kernels/ and models/ must serve
    # minilora.kernels and minilora.models either way.
    copy = tmp_path / "checkout"
    for name in ("minilora", "kernels", "models"):
        shutil.copytree(os.path.join(ROOT, name), copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), copy)
    code = (
        "import sys\n"
        f"if not {installed}:\n"
        "    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n"
        "import minilora.kernels.dispatch as d, minilora.models.transformer as t, minilora.quant.linear\n"
        "print(d.__file__); print(t.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels, models = out.stdout.split()
    assert os.path.realpath(kernels) == os.path.realpath(copy / "kernels" / "dispatch.py")
    assert os.path.realpath(models) == os.path.realpath(copy / "models" / "transformer.py")
