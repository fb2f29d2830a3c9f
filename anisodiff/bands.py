"""Frequency bands of an ``H x W`` plane: the rings of the unshifted ``fftfreq`` grid.

One definition serves the fitted radial spectrum (:mod:`anisodiff.fit`) and the per-band terminal
SNR (:mod:`anisodiff.diagnostics`), so a band named in a warning is the band of the fit's profile.
Ring ``k`` holds the bins with ``round(r * min(H, W)) == k`` (``r`` in cycles/pixel): rings of width
``1 / min(H, W)``, ring 0 being the DC bin alone.
"""
from __future__ import annotations

import torch

from . import reference

__all__ = ["ring_index", "ring_sums", "ring_radii"]


def ring_index(H: int, W: int) -> torch.Tensor:
    """``[H, W]`` int64 ring number ``round(r * min(H, W))`` (r in cycles/pixel); ring 0 is DC."""
    return torch.round(reference.radius(H, W) * min(H, W)).long()


def ring_sums(values: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Per ring: the sum of ``values`` (``[..., H, W]``) over the ring's bins, ``[..., R + 1]``
    float64 (empty rings sum to 0)."""
    size = int(ring.max()) + 1
    flat = values.double().reshape(-1, ring.numel())
    out = torch.zeros(flat.shape[0], size, dtype=torch.float64)
    out.index_add_(1, ring.reshape(-1), flat)
    return out.reshape(*values.shape[:-2], size)


def ring_radii(H: int, W: int) -> torch.Tensor:
    """``[R + 1]`` nominal radius of each ring in cycles/pixel, ``k / min(H, W)`` (0 for DC)."""
    size = int(ring_index(H, W).max()) + 1
    return torch.arange(size, dtype=torch.float64) / min(H, W)
