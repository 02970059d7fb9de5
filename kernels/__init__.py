"""Triton kernels of pyattn, installed as ``pyattn.kernels``.

Importing this package needs Triton; ``pyattn`` itself imports it only when the triton backend
is asked for, so ``import pyattn`` works without Triton installed.
"""
