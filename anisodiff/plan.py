"""Lowering a (spec, schedule, plane size) to the small tensors the kernels read.

Every backend consumes the same arguments: a per-timestep coefficient table, the axes, the weight
tables with the calibration folded in, and the per-draw mixing gains. They come from the
reference's own definitions (one source of truth) and are cached per device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import reference
from .schedule import VPSchedule, as_schedule, coefficient_table
from .spec import NoiseSpec

__all__ = ["KernelArgs", "kernel_args", "TARGET_CODES", "MAX_AXES", "MAX_DYNAMIC_RANGE"]

TARGET_CODES = {name: code for code, name in enumerate(reference.TARGETS)}
MAX_AXES = 8  # csrc/include/anisodiff/squeeze.h kMaxAxes
# float32 keeps ~7 digits: a weight table whose non-DC bins span more than this leaves the typical
# frequencies below float32 resolution next to the largest one. The DC bin does not count: every
# kernel applies it to the plane mean, outside the FFT of the other bins (so PowerLaw(alpha) with
# the papers' 1e-10 floor runs at any alpha, and so does a large offset-noise weight).
MAX_DYNAMIC_RANGE = 1e4


@dataclass(frozen=True)
class KernelArgs:
    coef: torch.Tensor            # float32 [T, 2 + k]: a_t, b_t, r_1(t) .. r_k(t)
    axes: torch.Tensor            # float32 [C, k]
    weights: torch.Tensor | None  # float32 [D, H, W] (spatio-temporal: [D, F, H, W]), calibration
                                  # folded in; None = identity
    gammas: tuple[float, ...]     # per-draw gain after normalisation
    variant: int                  # 0 sdm, 1 heisenberg
    normalize: int                # 0 folded into weights / none, 1 per-sample std per plane,
                                  # 2 per (b, c) F x H x W volume (spatio-temporal)
    num_timesteps: int            # rows of coef (a plain int: traceable under torch.compile)


def _schedule_key(schedule: VPSchedule | None):
    if schedule is None:
        return None
    return (schedule.betas.numpy().tobytes(), schedule.alphas_cumprod.numpy().tobytes())


def _check_float32_range(w: torch.Tensor, spec: NoiseSpec) -> None:
    """Refuse tables the float32 kernels cannot apply at the reference's accuracy: non-finite in
    float32, or non-DC bins spanning more than MAX_DYNAMIC_RANGE (max / median)."""
    if not torch.isfinite(w.float()).all():
        raise ValueError(f"spectral: the weights of {spec.spectral!r} overflow float32; use "
                         "backend='reference'")
    rest = w.flatten()[1:]
    positive = rest[rest > 0]
    if positive.numel() == 0:
        return  # DC only: applied exactly, as a gain on the plane mean
    ratio = float(positive.max() / positive.median())
    if ratio > MAX_DYNAMIC_RANGE:
        raise ValueError(
            f"spectral: the non-DC weights of {spec.spectral!r} span a dynamic range of {ratio:.3g} "
            f"(max / median), more than the float32 kernels resolve ({MAX_DYNAMIC_RANGE:g}); "
            "use backend='reference'")


@lru_cache(maxsize=64)
def _cached(spec_json: str, sched_key, channels: int, H: int, W: int, device: str,
            frames: int | None) -> KernelArgs:
    spec = NoiseSpec.from_json(spec_json)
    schedule = None
    if sched_key is not None:
        betas = torch.frombuffer(bytearray(sched_key[0]), dtype=torch.float32)
        ac = torch.frombuffer(bytearray(sched_key[1]), dtype=torch.float32)
        schedule = VPSchedule(betas, ac)
    dev = torch.device(device)
    sq = spec.squeeze
    use_squeeze = sq is not None and not sq.is_identity  # s = 0 is the identity: skip it exactly
    if use_squeeze and sq.k > MAX_AXES:
        raise ValueError(f"axes: the kernels take at most {MAX_AXES} principal axes, got k={sq.k} "
                         "(use backend='reference')")
    coef = coefficient_table(spec if use_squeeze else NoiseSpec(), schedule)
    axes = sq.axes.to(torch.float32) if use_squeeze else torch.zeros(channels, 0)

    # frames: set for a spatio-temporal spec only (kernel_args), whose tables are [D, F, H, W] and
    # whose per-sample std is per volume (normalize 2; csrc/ops_common.cpp fill_spatial). F = 1 is
    # the per-frame lowering exactly (the 3-D radius, calibration, DC and offset are the frame's),
    # so it takes the per-frame kernel path.
    volume = frames is not None and frames > 1
    grid = (frames, H, W) if volume else (H, W)
    weights, gammas = None, (1.0,)
    stages = reference.spatial_stages(spec, H, W, frames)
    if stages is not None:
        gammas = tuple(gamma for _, gamma in stages)
        if len(stages) == 1 and stages[0][0] is None:
            pass  # a scalar gain, no transform
        else:
            planes = [torch.ones(grid, dtype=torch.float64) if w is None else w.reshape(grid)
                      for w, _ in stages]
            for w in planes:
                _check_float32_range(w, spec)
            weights = torch.stack(planes).to(torch.float32).to(dev)
    variant = 1 if (use_squeeze and sq.variant == "heisenberg") else 0
    normalize = (2 if volume else 1) if spec.normalize == "per_sample" else 0
    return KernelArgs(coef.to(dev), axes.contiguous().to(dev), weights, gammas, variant, normalize,
                      coef.shape[0])


def kernel_args(spec: NoiseSpec, schedule, channels: int, H: int, W: int, device,
                frames: int | None = None) -> KernelArgs:
    """Kernel arguments for ``spec`` on ``[*, channels, H, W]`` planes (``[*, channels, frames, H, W]``
    video). ``schedule``: a :class:`VPSchedule`, a diffusers scheduler or None. ``frames``: F of a
    video tensor; only a spatio-temporal spec (``spec.temporal``) needs it (its weight tables are
    over (f_t, f_y, f_x)) and only its cache entries are keyed on it. Cached."""
    schedule = as_schedule(schedule)
    if spec.temporal:
        if frames is None:
            raise ValueError("spec.temporal: the spatio-temporal spectrum's kernel arguments depend on "
                             "the frame count; pass frames=F of the [B, C, F, H, W] tensor")
        frames = int(frames)
    else:
        frames = None  # per-frame weights: one cache entry for every F
    return _cached(spec.to_json(), _schedule_key(schedule), int(channels), int(H), int(W),
                   str(torch.device(device)), frames)
