"""k-diffusion adapter: a ``noise_sampler`` that draws shaped noise.

k-diffusion's ancestral and SDE samplers (``sample_euler_ancestral``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``, ...) take
``noise_sampler(sigma, sigma_next) -> Tensor`` and default to ``torch.randn_like(x)``. Pass
:func:`noise_sampler` instead, and start from a shaped ``x = sigmas[0] * shaped prior``. Training needs
no adapter: ``Denoiser.loss(reals, noise, sigma)`` takes the noise as an argument, so pass
``anisodiff.shaped_noise(reals.shape, spec, ...)``. ``sample_euler`` / ``sample_heun`` /
``sample_dpm_2`` draw their churn noise with ``torch.randn_like`` directly (not injectable); with
``s_churn = 0`` (the default) they draw none.

**Time-varying squeeze (SDM).** k-diffusion works in sigma, the model was trained on timesteps. For a
spec whose squeeze varies with t, give the VP ``schedule`` the model was trained with; each call uses
the squeeze at the training timestep whose ``sigma_t = sqrt((1 - abar_t) / abar_t)`` is nearest to
``sigma_next`` in log-sigma (the fresh noise becomes part of the sample at ``sigma_next``;
``sigma_next = 0`` maps to t = 0). Without a schedule a time-varying spec raises. Time-invariant
specs (SAGD, constant squeeze) need no schedule; for them the shaped sampler is exact: the update
formulas are unchanged when the network predicts the shaped noise.
"""
from __future__ import annotations

import math

import torch

from ..ops import apply_operator, shaped_noise
from ..schedule import VPSchedule, as_schedule
from ..spec import NoiseSpec

__all__ = ["noise_sampler", "ShapedNoiseSampler", "sigma_to_timestep"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(backend: str, dtype: torch.dtype) -> str:
    """The fused kernels produce float32/16/bf16; anything else runs on the reference."""
    return "reference" if backend == "auto" and dtype not in _KERNEL_DTYPES else backend


def sigma_to_timestep(sigma, schedule) -> torch.Tensor:
    """Nearest training timestep (int64, CPU) of the VP ``schedule`` for each ``sigma``, in
    log-sigma with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; ``sigma <= 0`` maps to 0."""
    sched = as_schedule(schedule)
    if sched is None:
        raise ValueError("schedule: required (anisodiff.VPSchedule or a diffusers scheduler)")
    ac = sched.alphas_cumprod.double()
    log_train = 0.5 * (torch.log1p(-ac) - torch.log(ac))  # log sigma_t; +inf where abar_t = 0
    s = torch.as_tensor(sigma).detach().double().reshape(-1).cpu()
    idx = (torch.log(s.clamp_min(1e-300))[:, None] - log_train[None, :]).abs().argmin(dim=1)
    return torch.where(s > 0, idx, torch.zeros_like(idx))


class ShapedNoiseSampler:
    """Callable ``(sigma, sigma_next) -> shaped noise`` of ``x``'s shape, device and dtype.
    Build it with :func:`noise_sampler`."""

    def __init__(self, x: torch.Tensor, spec: NoiseSpec, *, schedule=None, base=None, seed=None,
                 generator: torch.Generator | None = None, backend: str = "auto"):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("x: expected a [B, C, H, W] tensor (the sampler's latent)")
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
        self.schedule: VPSchedule | None = as_schedule(schedule)
        if spec.time_varying and self.schedule is None:
            raise ValueError(
                "schedule: this spec's squeeze varies with t, and k-diffusion passes sigmas; give "
                "schedule= (the VP schedule the model was trained with, an anisodiff.VPSchedule or a "
                "diffusers scheduler) so that each sigma maps to its nearest training timestep")
        if base is not None:
            if not callable(base):
                raise TypeError("base: expected a noise_sampler(sigma, sigma_next) callable")
            if seed is not None or generator is not None:
                raise ValueError("base/seed/generator: a base sampler draws its own noise; give one or the other")
            if spec.draws > 1:
                raise ValueError("base: an independent two-band spec needs two independent white draws per "
                                 "call, a base noise sampler gives one (use the built-in stream)")
        self.shape = tuple(x.shape)
        self.device, self.dtype = x.device, x.dtype
        self.spec, self.base = spec, base
        self.seed, self.generator = seed, generator
        self.backend = _backend(backend, x.dtype)
        self._offset = 0
        self._counters = math.ceil(math.prod(self.shape) / 4)  # stream counters one call consumes

    def _timesteps(self, sigma_next):
        if not self.spec.time_varying:
            return None
        t = sigma_to_timestep(sigma_next, self.schedule)
        return t.expand(self.shape[0]) if t.numel() == 1 else t

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t = self._timesteps(sigma_next)
        if self.base is not None:
            white = self.base(sigma, sigma_next)
            if tuple(white.shape) != self.shape:
                raise ValueError(f"base: returned shape {list(white.shape)}, expected {list(self.shape)}")
            return apply_operator(white, self.spec, timesteps=t, schedule=self.schedule,
                                  backend=_backend(self.backend, white.dtype))
        offset = 0
        if self.seed is not None:  # an explicit seed: continue the stream, never reuse counters
            offset, self._offset = self._offset, self._offset + self._counters
        return shaped_noise(self.shape, self.spec, timesteps=t, schedule=self.schedule, seed=self.seed,
                            generator=self.generator, offset=offset, device=self.device,
                            dtype=self.dtype, backend=self.backend)


def noise_sampler(x: torch.Tensor, spec: NoiseSpec, *, schedule=None, base=None, seed=None,
                  generator: torch.Generator | None = None, backend: str = "auto") -> ShapedNoiseSampler:
    """A k-diffusion ``noise_sampler(sigma, sigma_next)`` returning shaped noise ``A eps`` of x's shape.

    Args:
        x: the sampler's latent (shape, device and dtype of the noise).
        spec: the :class:`~anisodiff.NoiseSpec`.
        schedule: the VP schedule the model was trained with (``anisodiff.VPSchedule`` or a diffusers
            scheduler); required for a time-varying squeeze, which is taken at the training timestep
            nearest to ``sigma_next`` (module docstring).
        base: optional white sampler to shape, e.g. k-diffusion's ``BrownianTreeNoiseSampler`` (a
            constant linear map of Brownian increments is again Brownian, so SDE samplers keep their
            properties for time-invariant specs). Default: anisodiff's fused stream.
        seed: explicit stream key (consecutive calls continue the stream); ``generator``: draw a key
            per call from it (default: torch's global generator, so ``torch.manual_seed`` reproduces).
        backend: "auto" (see :mod:`anisodiff._autoselect`), "cpu", "cuda", "triton" or "reference".

    Runnable without k-diffusion (the commented line is the k-diffusion call)::

        import torch, anisodiff as ad
        from anisodiff.integrations import noise_sampler
        spec = ad.NoiseSpec(spectral=ad.PowerLaw(alpha=-0.2))
        sigmas = torch.tensor([14.6, 4.0, 1.0, 0.0])
        x = sigmas[0] * ad.shaped_noise((2, 3, 16, 16), spec, seed=1)    # the shaped prior
        ns = noise_sampler(x, spec, seed=2)
        n = ns(sigmas[0], sigmas[1])                                      # [2, 3, 16, 16]
        # x = k_diffusion.sampling.sample_euler_ancestral(model, x, sigmas, noise_sampler=ns)
        assert n.shape == x.shape
    """
    return ShapedNoiseSampler(x, spec, schedule=schedule, base=base, seed=seed, generator=generator,
                              backend=backend)
