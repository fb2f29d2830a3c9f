"""Drop-in integrations: diffusers schedulers and pipelines, k-diffusion and EDM adapters.

* :mod:`anisodiff.integrations.diffusers` (needs ``pip install diffusers``): ``AnisoDDPMScheduler``,
  ``AnisoDDIMScheduler``, ``AnisoEulerDiscreteScheduler``, ``AnisoFlowMatchEulerDiscreteScheduler``
  (a ``noise_spec=`` that saves with the scheduler config) and ``AnisoDDPMPipeline`` /
  ``AnisoDDIMPipeline`` (which start from the shaped prior).
* :mod:`anisodiff.integrations.kdiffusion`: :func:`noise_sampler`, a k-diffusion
  ``noise_sampler(sigma, sigma_next)`` that draws shaped noise.
* :mod:`anisodiff.integrations.edm`: :func:`randn_like`, a shaped ``randn_like(x)`` for NVlabs EDM's
  ``edm_sampler(..., randn_like=...)``.
* :mod:`anisodiff.integrations.checkpoint`: the spec in a safetensors checkpoint's metadata
  (:func:`save_file`, :func:`load_spec_from_safetensors`), with kohya's ``ss_noise_offset`` and
  friends where the spec has an equivalent; a kohya LoRA's flags read as the equivalent spec.
* :mod:`anisodiff.integrations.diffusers_registry`: what ``import anisodiff`` does so that
  ``diffusers.DiffusionPipeline.from_pretrained`` finds the anisodiff pipelines (never importing
  diffusers itself).

Importing this package never imports diffusers; the diffusers names below are loaded on first use.
"""
from __future__ import annotations

from .checkpoint import load_noise_from_safetensors, load_spec_from_safetensors, save_file
from .edm import randn_like
from .kdiffusion import ShapedNoiseSampler, noise_sampler, sigma_to_timestep

__all__ = ["noise_sampler", "ShapedNoiseSampler", "sigma_to_timestep", "randn_like",
           "save_file", "load_spec_from_safetensors", "load_noise_from_safetensors",
           "AnisoDDPMScheduler", "AnisoDDIMScheduler", "AnisoEulerDiscreteScheduler",
           "AnisoFlowMatchEulerDiscreteScheduler", "AnisoDDPMPipeline", "AnisoDDIMPipeline"]

_DIFFUSERS_NAMES = {"AnisoDDPMScheduler", "AnisoDDIMScheduler", "AnisoEulerDiscreteScheduler",
                    "AnisoFlowMatchEulerDiscreteScheduler", "AnisoDDPMPipeline", "AnisoDDIMPipeline"}


def __getattr__(name: str):
    if name in _DIFFUSERS_NAMES:
        from . import diffusers as _diffusers  # raises a clear ImportError without diffusers
        return getattr(_diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
