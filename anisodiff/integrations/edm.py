"""NVlabs EDM / EDM2 adapter: a shaped ``randn_like`` replacement.

EDM's ``edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, ...)`` draws its
churn noise with the injectable ``randn_like(x)``; the initial ``latents`` are an argument (EDM's
``generate.py`` passes ``rnd.randn(...)``, then the sampler multiplies them by ``t_steps[0]``). So
shaped sampling is: shape the latents, and pass :func:`randn_like`. For training, EDM's loss classes
(``training.loss.EDMLoss``, chosen by dotted name in ``loss_kwargs``) draw ``n = randn_like(y) * sigma``;
a subclass that calls the shaped ``randn_like`` instead is the injection point.

``randn_like(x)`` receives no sigma, so the shape is fixed per sampler: time-invariant specs (SAGD,
constant squeeze) are exact; a time-varying squeeze needs an explicit ``timesteps=`` (and the
``schedule``) at which it is frozen, and raises otherwise.
"""
from __future__ import annotations

import math

import torch

from ..ops import apply_operator, shaped_noise
from ..schedule import VPSchedule, as_schedule
from ..spec import NoiseSpec

__all__ = ["randn_like", "ShapedRandnLike"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ShapedRandnLike:
    """Callable ``randn_like(x) -> A eps`` (x's shape, device and dtype). Build it with
    :func:`randn_like`. :meth:`shape_noise` applies the operator to given white noise (e.g. EDM's latents)."""

    def __init__(self, spec: NoiseSpec, *, base=None, timesteps=None, schedule=None, seed=None,
                 generator: torch.Generator | None = None, backend: str = "auto"):
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
        self.schedule: VPSchedule | None = as_schedule(schedule)
        if spec.time_varying and (timesteps is None or self.schedule is None):
            raise ValueError(
                "timesteps/schedule: this spec's squeeze varies with t but randn_like(x) receives no "
                "sigma; pass a fixed timesteps= and the schedule= to freeze the squeeze at, or use a "
                "time-invariant spec")
        if base is not None:
            if not callable(base):
                raise TypeError("base: expected a randn_like(x) callable, e.g. StackedRandomGenerator.randn_like")
            if seed is not None or generator is not None:
                raise ValueError("base/seed/generator: a base randn_like draws its own noise; give one or the other")
        self.spec, self.base = spec, base
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps)
        self.seed, self.generator, self.backend = seed, generator, backend
        self._offset = 0

    def _backend(self, dtype) -> str:
        return "reference" if self.backend == "auto" and dtype not in _KERNEL_DTYPES else self.backend

    def _t(self, batch: int):
        if self.timesteps is None or not self.spec.time_varying:
            return None
        return self.timesteps.expand(batch) if self.timesteps.numel() == 1 else self.timesteps

    def shape_noise(self, white: torch.Tensor) -> torch.Tensor:
        """``A eps`` for given white noise (``[2, *shape]`` for an independent two-band spec)."""
        batch = white.shape[0] if self.spec.draws == 1 else white.shape[1]
        return apply_operator(white, self.spec, timesteps=self._t(batch), schedule=self.schedule,
                              backend=self._backend(white.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("x: expected a [B, C, H, W] tensor")
        if self.base is not None:
            draws = [self.base(x) for _ in range(self.spec.draws)]
            return self.shape_noise(draws[0] if len(draws) == 1 else torch.stack(draws))
        offset = 0
        if self.seed is not None:  # an explicit seed: continue the stream, never reuse counters
            offset = self._offset
            self._offset += math.ceil(x.numel() / 4)
        return shaped_noise(tuple(x.shape), self.spec, timesteps=self._t(x.shape[0]),
                            schedule=self.schedule, seed=self.seed, generator=self.generator,
                            offset=offset, device=x.device, dtype=x.dtype,
                            backend=self._backend(x.dtype))


def randn_like(spec: NoiseSpec, *, base=None, timesteps=None, schedule=None, seed=None,
               generator: torch.Generator | None = None, backend: str = "auto") -> ShapedRandnLike:
    """A drop-in for ``torch.randn_like`` that returns shaped noise ``A eps``.

    Args:
        spec: the :class:`~anisodiff.NoiseSpec`.
        base: optional white ``randn_like(x)`` to shape, e.g. EDM's ``StackedRandomGenerator.randn_like``
            (keeps its per-seed batches). Default: anisodiff's fused stream.
        timesteps, schedule: freeze a time-varying squeeze at these training timesteps (module
            docstring); not needed for time-invariant specs.
        seed: explicit stream key (consecutive calls continue the stream); ``generator``: draw a key
            per call from it (default: torch's global generator).
        backend: "auto" (see :mod:`anisodiff._autoselect`), "cpu", "cuda", "triton" or "reference".

    Runnable without EDM (the commented lines are the EDM calls)::

        import torch, anisodiff as ad
        from anisodiff.integrations import randn_like
        spec = ad.NoiseSpec(spectral=ad.Band(0.0, 0.25))
        rl = randn_like(spec, seed=0)
        latents = rl(torch.empty(4, 3, 16, 16))      # shaped x_T (edm_sampler scales it by t_steps[0])
        # rnd = StackedRandomGenerator(device, seeds)
        # rl = randn_like(spec, base=rnd.randn_like); latents = rl.shape_noise(rnd.randn([4, 3, 16, 16]))
        # images = edm_sampler(net, latents, class_labels, randn_like=rl, S_churn=40)
        assert latents.shape == (4, 3, 16, 16)
    """
    return ShapedRandnLike(spec, base=base, timesteps=timesteps, schedule=schedule, seed=seed,
                           generator=generator, backend=backend)
