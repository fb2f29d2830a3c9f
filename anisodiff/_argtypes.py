"""argparse ``type=`` parsers shared by the command line (cli.py) and the benchmark options
(bench/options.py), and :class:`UsageError`, the bad argument a command finds after parsing."""
from __future__ import annotations

import argparse
import math

__all__ = ["UsageError", "int_in", "finite_float", "nonneg_float"]


class UsageError(ValueError):
    """A bad argument found after parsing: the command line prints it and exits with code 2."""


def int_in(minimum: int, maximum: int | None = None):
    """argparse type: an integer in ``[minimum, maximum]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    value = _float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = _float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value
