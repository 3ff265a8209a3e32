"""Triton kernels, one file per kernel, each with a launcher that validates its inputs.

Import as `minilora.kernels.<name>`. Every kernel has a pure-PyTorch reference in minilora/
that the tests compare it against.
"""
