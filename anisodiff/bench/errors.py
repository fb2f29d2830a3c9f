"""The one error of the benchmark: what cannot run as asked (the CLI turns it into exit code 2)."""
from __future__ import annotations

__all__ = ["BenchError"]


class BenchError(Exception):
    """The benchmark cannot run as asked (no CUDA device, ops not built, a bad option)."""
