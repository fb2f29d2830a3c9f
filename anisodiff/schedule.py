"""Diffusion schedules and the per-timestep coefficient table the kernels read.

For every timestep t the kernels need ``a_t``, ``b_t`` (``x_t = a_t x0 + b_t n``) and the squeeze
strengths ``r_k(t) = s_k tau(t)``. They are tabulated once per (spec, schedule) into a ``[T, 2 + k]``
float32 table, and the kernels gather rows by timestep on the device: no host sync, no per-sample
Python.
"""
from __future__ import annotations

import torch

from .reference import squeeze_profile
from .spec import NoiseSpec

__all__ = ["VPSchedule", "as_schedule", "coefficient_table"]


class VPSchedule:
    """Variance-preserving (DDPM) schedule: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n``.

    Args:
        betas: 1-D tensor of ``T`` values in (0, 1).
        alphas_cumprod: optional ``abar``; by default ``cumprod(1 - betas)`` in float32, exactly as
            diffusers' ``DDPMScheduler`` computes it.
    """

    def __init__(self, betas, alphas_cumprod=None):
        betas = torch.as_tensor(betas).detach().to("cpu", torch.float32).clone()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        # beta = 1 is allowed: zero-terminal-SNR schedules (diffusers rescale_betas_zero_snr) end on it
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas: every value must lie in (0, 1]")
        self.betas = betas
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32).clone()
        if ac.shape != betas.shape:
            raise ValueError(f"alphas_cumprod: expected shape {tuple(betas.shape)}, got {tuple(ac.shape)}")
        if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod: every value must lie in [0, 1]")
        self.alphas_cumprod = ac

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "VPSchedule":
        """diffusers' ``beta_schedule="linear"``: ``linspace(beta_start, beta_end, T)`` in float32."""
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T: expected a positive int, got {T!r}")
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float32))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def to_dict(self) -> dict:
        return {"type": "vp", "betas": self.betas.tolist(), "alphas_cumprod": self.alphas_cumprod.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "VPSchedule":
        if not isinstance(d, dict) or d.get("type") != "vp" or "betas" not in d:
            raise ValueError("schedule: expected an object {'type': 'vp', 'betas': [...]}")
        return cls(d["betas"], d.get("alphas_cumprod"))

    def __repr__(self) -> str:
        return f"VPSchedule(T={self.num_train_timesteps})"


def as_schedule(schedule) -> VPSchedule | None:
    """Accept a :class:`VPSchedule`, a diffusers scheduler (anything with ``betas`` and
    ``alphas_cumprod``) or None."""
    if schedule is None or isinstance(schedule, VPSchedule):
        return schedule
    betas = getattr(schedule, "betas", None)
    ac = getattr(schedule, "alphas_cumprod", None)
    if betas is not None and ac is not None:
        return VPSchedule(betas, ac)
    raise TypeError("schedule: expected anisodiff.VPSchedule or a diffusers scheduler with "
                    f"`betas` and `alphas_cumprod`, got {type(schedule).__name__}")


def coefficient_table(spec: NoiseSpec, schedule: VPSchedule | None) -> torch.Tensor:
    """float32 ``[T, 2 + k]``: columns ``a_t, b_t, r_1(t) .. r_k(t)``.

    Without a schedule, ``a = 0`` and ``b = 1`` (only the shaped noise is defined).
    """
    squeeze = spec.squeeze
    k = 0 if squeeze is None else squeeze.k
    if squeeze is not None:
        tau = squeeze_profile(squeeze, schedule)
        T = tau.numel()
    else:
        tau = None
        T = 1 if schedule is None else schedule.num_train_timesteps
    table = torch.zeros(T, 2 + k, dtype=torch.float64)
    if schedule is not None:
        ac = schedule.alphas_cumprod  # float32, as diffusers keeps it
        table[:, 0] = ac.to(torch.float64).sqrt()
        table[:, 1] = (1.0 - ac).to(torch.float64).sqrt()
    else:
        table[:, 1] = 1.0
    if k:
        s = torch.tensor(squeeze.strength, dtype=torch.float64)
        table[:, 2:] = tau[:, None] * s[None, :]
    return table.to(torch.float32)
