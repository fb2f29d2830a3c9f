"""Seeds and offsets of the canonical noise stream (DESIGN.md section 2).

The stream is a pure function of ``(seed, offset)``. An explicit ``seed=`` is used as given. Without
one, a seed is drawn from the ``generator`` (default: torch's global CPU generator, so
``torch.manual_seed`` makes runs reproducible); drawing advances the generator, so consecutive calls
never reuse counters. Under torch.distributed the rank is folded into drawn seeds, so ranks that
share a generator seed still get different noise.
"""
from __future__ import annotations

import operator

import torch

__all__ = ["MAX_SEED", "MAX_OFFSET", "resolve_seed", "check_offset", "fold_in"]

MAX_SEED = 2**63 - 1
MAX_OFFSET = 2**62
_M64 = 2**64 - 1


def fold_in(seed: int, value: int) -> int:
    """Mix ``value`` into ``seed`` (splitmix64 finaliser), staying in [0, 2^63)."""
    z = (seed ^ ((value + 1) * 0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & MAX_SEED


def _distributed_rank() -> int | None:
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank() if dist.get_world_size() > 1 else None


def resolve_seed(seed, generator: torch.Generator | None) -> int:
    """The 63-bit Philox key for one call."""
    if seed is not None and generator is not None:
        raise ValueError("seed/generator: pass one of them, not both")
    if seed is not None:
        if isinstance(seed, bool):
            raise TypeError("seed: expected an int, got bool")
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}") from None
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: must lie in [0, 2**63), got {seed}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    gen = generator if generator is not None else torch.default_generator
    drawn = int(torch.randint(0, MAX_SEED, (), generator=gen, device=gen.device, dtype=torch.int64))
    rank = _distributed_rank()
    return drawn if rank is None else fold_in(drawn, rank)


def check_offset(offset) -> int:
    if isinstance(offset, bool):
        raise TypeError("offset: expected an int, got bool")
    try:
        offset = operator.index(offset)
    except TypeError:
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}") from None
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset: must lie in [0, 2**62), got {offset}")
    return offset
