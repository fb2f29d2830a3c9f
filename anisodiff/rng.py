"""Seeds and offsets of the canonical noise stream (docs/design.md section 2).

The stream is a pure function of ``(seed, offset)``. An explicit ``seed=`` is used as given. Without
one, a seed is drawn from the ``generator`` (default: torch's global CPU generator, so
``torch.manual_seed`` makes runs reproducible); drawing advances the generator, so consecutive calls
never reuse counters. Under torch.distributed the rank is folded into drawn seeds, so ranks that
share a generator seed still get different noise (an explicit seed is never changed).

The ops take the stream as an int64 tensor ``[seed, offset]`` rather than two ints, so that a seed
drawn from a generator stays inside a ``torch.compile`` graph (no ``.item()``) and the kernels read
it at run time.
"""
from __future__ import annotations

import operator

import torch

__all__ = ["MAX_SEED", "MAX_OFFSET", "check_seed", "check_offset", "stream_tensor"]

MAX_SEED = 2**63 - 1
MAX_OFFSET = 2**62
_GOLDEN = 0x9E3779B97F4A7C15  # odd, so distinct ranks get distinct keys


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


def _symbolic(value) -> bool:
    """Inside a torch.compile trace an int argument may be symbolic (it changes every step); it is
    checked with torch._check and never specialised on, which would recompile per value."""
    return torch.compiler.is_compiling() and not isinstance(value, bool)


def check_seed(seed) -> int:
    if _symbolic(seed):
        torch._check(seed >= 0, lambda: "seed: must lie in [0, 2**63)")
        return seed
    seed = _as_int(seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: must lie in [0, 2**63), got {seed}")
    return seed


def check_offset(offset) -> int:
    if _symbolic(offset):
        torch._check(offset >= 0, lambda: "offset: must lie in [0, 2**62)")
        return offset
    offset = _as_int(offset, "offset")
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset: must lie in [0, 2**62), got {offset}")
    return offset


def _distributed_rank() -> int | None:
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank() if dist.get_world_size() > 1 else None


def stream_tensor(seed, generator: torch.Generator | None, offset, device=None) -> torch.Tensor:
    """int64 ``[seed, offset]`` for one call. On the CPU, except when the seed is drawn from a CUDA
    generator on ``device`` (the data's device): it then stays there, so drawing it needs no host
    synchronisation and a CUDA graph that captured the call draws a fresh seed on every replay."""
    offset = check_offset(offset)
    if seed is not None:
        if generator is not None:
            raise ValueError("seed/generator: pass one of them, not both")
        return torch.tensor([check_seed(seed), offset], dtype=torch.int64)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(0, MAX_SEED, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    if drawn.device.type != "cpu" and (device is None or torch.device(device) != drawn.device):
        drawn = drawn.cpu()  # the kernels of another device read the stream on the host
    rank = _distributed_rank()
    if rank is not None:
        drawn = (drawn + ((rank * _GOLDEN) & MAX_SEED)) & MAX_SEED
    # torch.full, not torch.tensor: building a device tensor from a Python value would synchronise
    return torch.cat([drawn, torch.full((1,), offset, dtype=torch.int64, device=drawn.device)])
