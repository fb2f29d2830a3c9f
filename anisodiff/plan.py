"""Lowering a (spec, schedule, plane size) to the small tensors the kernels read.

Every backend consumes the same arguments: a per-timestep coefficient table, the axes, the weight
tables with the calibration folded in, and the per-draw mixing gains. They are built from the
reference's own weight definitions (one source of truth) and cached per device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import reference
from .schedule import VPSchedule, coefficient_table
from .spec import NoiseSpec

__all__ = ["KernelArgs", "kernel_args", "TARGET_CODES"]

TARGET_CODES = {"epsilon": 0, "v": 1, "x0": 2, "flow": 3}


@dataclass(frozen=True)
class KernelArgs:
    coef: torch.Tensor            # float32 [T, 2 + k]: a_t, b_t, r_1(t) .. r_k(t)
    axes: torch.Tensor            # float32 [C, k]
    weights: torch.Tensor | None  # float32 [D, H, W], calibration folded in; None = identity
    gammas: tuple[float, ...]     # per-draw gain after normalisation
    variant: int                  # 0 sdm, 1 heisenberg
    normalize: int                # 0 folded into weights / none, 1 per-sample std

    @property
    def num_timesteps(self) -> int:
        return self.coef.shape[0]


def _schedule_key(schedule: VPSchedule | None):
    if schedule is None:
        return None
    return (schedule.betas.numpy().tobytes(), schedule.alphas_cumprod.numpy().tobytes())


@lru_cache(maxsize=64)
def _cached(spec_json: str, sched_key, channels: int, H: int, W: int, device: str) -> KernelArgs:
    spec = NoiseSpec.from_json(spec_json)
    schedule = None
    if sched_key is not None:
        betas = torch.frombuffer(bytearray(sched_key[0]), dtype=torch.float32)
        ac = torch.frombuffer(bytearray(sched_key[1]), dtype=torch.float32)
        schedule = VPSchedule(betas, ac)
    dev = torch.device(device)
    sq = spec.squeeze
    use_squeeze = sq is not None and not sq.is_identity  # s = 0 is the identity: skip it exactly
    if sq is not None and sq.channels != channels:
        raise ValueError(f"x0: has {channels} channels but the squeeze axes have {sq.channels} rows")
    coef = coefficient_table(spec if use_squeeze else NoiseSpec(), schedule)
    axes = sq.axes.to(torch.float32) if use_squeeze else torch.zeros(channels, 0)

    sw = reference.spectral_weights(spec, H, W)
    weights, gammas = None, (1.0,)
    if sw is not None:
        raw, gam = sw
        planes = []
        for d in range(raw.shape[0]):
            w = raw[d]
            if spec.normalize == "calibrated":
                w = w * reference.calibration(w)
            planes.append(w)
        gammas = tuple(gam)
        constant = len(planes) == 1 and bool((planes[0] == planes[0].flatten()[0]).all())
        if constant:  # a constant weight is a scalar gain: no transform, so alpha = 0 is exact
            gain = float(planes[0].flatten()[0])
            gammas = (gammas[0] * (1.0 if spec.normalize == "per_sample" else gain),)
        else:
            weights = torch.stack(planes).to(torch.float32).to(dev)
    variant = 1 if (use_squeeze and sq.variant == "heisenberg") else 0
    return KernelArgs(coef.to(dev), axes.contiguous().to(dev), weights, gammas, variant,
                      1 if spec.normalize == "per_sample" else 0)


def kernel_args(spec: NoiseSpec, schedule: VPSchedule | None, channels: int, H: int, W: int,
                device: torch.device) -> KernelArgs:
    return _cached(spec.to_json(), _schedule_key(schedule), channels, H, W, str(torch.device(device)))
