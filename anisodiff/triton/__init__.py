"""The Triton backend (``backend="triton"``): fused kernels on the canonical noise stream.

Triton is an optional dependency. Importing this package imports nothing heavy; the kernels and
the ``torch.ops.anisodiff_triton`` custom ops are registered by :mod:`anisodiff.triton.ops`, which
:mod:`anisodiff.ops` imports the first time the backend is used. On a CPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which the test suite
uses; "auto" never picks it there.
"""
from __future__ import annotations

import importlib.util

__all__ = ["is_installed", "load"]


def is_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def load():
    """Import the kernels and register the custom ops; returns the :mod:`anisodiff.triton.ops` module."""
    from . import ops
    return ops
