"""Triton kernels, one file per kernel, each with a launcher that validates its inputs.

Import as `minilora.kernels.<name>`. Every kernel has a pure-PyTorch reference in minilora/quant/
that the tests compare it against. common.py holds what the kernels share; dispatch.py decides
when a kernel runs instead of its reference, and checks each kernel once per process on the
hardware it meets.

Run from the repository root, Python also sees this folder as a top-level package `kernels`, the
name of the PyPI package through which bitsandbytes and transformers fetch hub kernels. So, imported
under that name, it hands the import over to the installed package. Without one it stays importable
(transformers probes the name by importing whatever find_spec saw, and an ImportError there breaks
its own import); bitsandbytes then finds no `get_kernel` in it, as it finds none without the package.
"""

if __name__ == "kernels":  # `import kernels` found this folder because the repository root is on sys.path
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds afterwards
        _spec.loader.exec_module(_installed)
