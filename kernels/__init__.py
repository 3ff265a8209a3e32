"""Triton kernels, one file per kernel, each with a launcher that validates its inputs.

Import as `minilora.kernels.<name>`. Every kernel has a pure-PyTorch reference in minilora/
that the tests compare it against. common.py holds what the kernels share; dispatch.py decides
when a kernel runs instead of its reference, and checks each kernel once per process on the
hardware it meets.
"""
