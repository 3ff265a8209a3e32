"""The package layout: the top-level kernels/ and models/ folders ship inside minilora, as
minilora.kernels and minilora.models, never as top-level packages of their own."""

import importlib
import importlib.util
import os
import subprocess
import sys

import minilora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subpackages_resolve_to_top_level_folders():
    for name in ("kernels", "models"):
        mod = importlib.import_module(f"minilora.{name}")
        assert os.path.realpath(os.path.dirname(mod.__file__)) == os.path.realpath(os.path.join(ROOT, name)), (
            mod.__file__
        )


def test_kernels_and_models_not_installed_top_level():
    # A `kernels` or `models` on sys.path would shadow (or be shadowed by) unrelated PyPI
    # packages; only the checkout's own folders may provide those names.
    for name in ("kernels", "models"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            assert os.path.realpath(spec.origin).startswith(os.path.realpath(ROOT)), spec.origin


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
