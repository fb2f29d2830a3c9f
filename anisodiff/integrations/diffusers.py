"""diffusers integration: schedulers whose noise is shaped, and pipelines that start from the shaped prior.

Needs ``pip install diffusers`` (tested with diffusers 0.42). The core of anisodiff never imports
diffusers; only this module does.

Each scheduler subclasses its diffusers namesake and adds one constructor argument, ``noise_spec``
(a :class:`~anisodiff.NoiseSpec`, its dict or its JSON). It lives in the scheduler config as a JSON
dict, so ``save_pretrained`` / ``from_pretrained`` / ``from_config`` round-trip it, and
``scheduler.noise_spec`` is the rebuilt :class:`~anisodiff.NoiseSpec`::

    scheduler = AnisoDDPMScheduler(num_train_timesteps=1000, noise_spec=spec)
    scheduler = AnisoDDPMScheduler.from_config(pipe.scheduler.config, noise_spec=spec)

What changes against the parent class:

* ``add_noise(x0, noise, t)`` (Euler too) and ``scale_noise(x0, t, noise)`` (flow matching) take
  ``noise`` as WHITE noise and return the noisy sample with the SHAPED noise ``A(t) noise``;
  ``shape_noise(noise, t)`` returns ``A(t) noise``, the epsilon training target (flow matching:
  ``shape_noise(noise, t) - x0``); ``get_velocity`` shapes its noise the same way.
* ``step`` draws its fresh noise white with diffusers' ``randn_tensor(generator=...)`` (so seeded
  pipelines reproduce) and shapes it. DDPM runs the fused step kernel on that noise (the math of
  :func:`anisodiff.reference.ddpm_step`, which it falls back to for float64 or devices without
  compiled ops; ``sampling_mode="official"``, the SDM code, or ``"exact"``, a config entry), DDIM to
  :func:`anisodiff.reference.ddim_step`, both with the scheduler's own timestep spacing. Euler shapes
  the ``s_churn`` noise, flow matching the ``stochastic_sampling`` re-noising; their deterministic
  updates are the parent's (exact for time-invariant specs when the model predicts shaped noise).
* ``prior_noise(shape, generator=...)``: the unit-scale shaped prior ``A(t_first) z`` (pass it as
  ``latents=`` to pipelines that take latents; they multiply by ``init_noise_sigma`` themselves).
* With a white spec (``NoiseSpec()``, the default) every method is the parent's, bit for bit, and
  the constructor accepts every config the parent accepts: the betas are checked (each in
  ``(0, 1]``, as :class:`~anisodiff.VPSchedule` requires) only where the shaped noise reads them,
  i.e. DDPM/DDIM with any other spec and Euler with a time-varying squeeze, and then at
  construction. ``tests/test_diffusers_parity.py`` checks the parity over a grid of configs.

DDPM/DDIM with an anisotropic spec support ``prediction_type="epsilon"`` (the papers' setting) and
raise ``NotImplementedError`` for other prediction types, thresholding and learned variances.

**Time-varying squeeze (SDM) on Euler.** The noise drawn at a scheduler timestep uses the squeeze
strength at the corresponding training timestep: Euler rounds its (fractional) timestep to the
nearest training timestep (``timestep_type="continuous"`` maps its ``0.25 log sigma`` through the
nearest sigma); the churn noise uses the current timestep, the prior the first. Only the noise is
squeezed: the deterministic Euler update is the standard one, an approximation when the squeeze
varies with t (use DDPM/DDIM for the exact time-varying posterior).

**Flow matching** is exact for every spec: the noise at a scheduler timestep is ``A(sigma)`` at
that timestep's ``sigma = timestep / num_train_timesteps``, with the squeeze profile ``tau(sigma)``
of :mod:`anisodiff.flow` (``"linear"``: ``tau = sigma``; ``"beta"``: the SDM profile at the VP
timestep of equal SNR; a table of any length on ``sigma = i / (T - 1)``), the same as
``anisodiff.add_noise(x0, sigmas, spec, scheduler, target="flow")`` trains with. The re-noising of
``stochastic_sampling`` uses the next sigma (where the noise lands), the prior the first sigma.
For a time-varying squeeze the deterministic step adds the path's own term to the velocity
(:func:`anisodiff.reference.flow_velocity`: ``d x_sigma / dsigma = n - x0 + sigma S' S^-1 n``);
for a time-invariant spec it is the parent's step, bit for bit.

Pipelines: :class:`AnisoDDPMPipeline` and :class:`AnisoDDIMPipeline` are ``DDPMPipeline`` /
``DDIMPipeline`` whose ``x_T`` is ``init_noise_sigma * A(T - 1) z``. Save them with
``save_pretrained``; ``diffusers.DiffusionPipeline.from_pretrained(path)`` (or
``AnisoDDPMPipeline.from_pretrained``) loads them back, with the spec, in any process that has
imported anisodiff: importing this module registers the pipeline and scheduler classes as
attributes of the ``diffusers`` module, and ``import anisodiff`` imports it as soon as diffusers is
imported (:mod:`anisodiff.integrations.diffusers_registry` says why this is the mechanism).
"""
from __future__ import annotations

import inspect
import json
import os

import torch

try:
    from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline,
                           EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, ModelMixin,
                           SchedulerMixin)
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
    from diffusers.utils import logging as _dlogging
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "anisodiff.integrations.diffusers needs the diffusers package: pip install diffusers "
        f"(import failed: {exc})") from exc

from .. import reference
from ..flow import FlowSchedule
from ..ops import add_noise as _add_noise
from ..ops import apply_operator
from ..sampling import can_fuse_step, fused_ddpm_step
from ..schedule import VPSchedule
from ..spec import NoiseSpec
from .kdiffusion import sigma_to_timestep

# SchedulerMixin / ModelMixin / ConfigMixin must be names of this module: diffusers' pipeline loader
# looks the loading method of a component up among the base classes its library module exports.
__all__ = ["AnisoDDPMScheduler", "AnisoDDIMScheduler", "AnisoEulerDiscreteScheduler",
           "AnisoFlowMatchEulerDiscreteScheduler", "AnisoDDPMPipeline", "AnisoDDIMPipeline",
           "SchedulerMixin", "ModelMixin", "ConfigMixin"]

logger = _dlogging.get_logger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_spec(noise_spec) -> NoiseSpec:
    if noise_spec is None:
        return NoiseSpec()
    if isinstance(noise_spec, NoiseSpec):
        return noise_spec
    if isinstance(noise_spec, str):
        return NoiseSpec.from_json(noise_spec)
    if isinstance(noise_spec, dict):
        return NoiseSpec.from_dict(dict(noise_spec))
    raise TypeError("noise_spec: expected an anisodiff.NoiseSpec, its dict or JSON, or None, got "
                    f"{type(noise_spec).__name__}")


def _is_white(spec: NoiseSpec) -> bool:
    """True when A(t) is the identity for every t (then the parent's code runs, bit for bit)."""
    return (spec.spectral is None and spec.offset is None and spec.normalize != "per_sample"
            and (spec.squeeze is None or spec.squeeze.is_identity))


def _raw_init(base):
    """The parent's ``__init__`` without its ``@register_to_config`` wrapper (our own wrapper has
    already registered every argument)."""
    return inspect.unwrap(base.__init__)


def _init_signature(base, **extra) -> inspect.Signature:
    """The parent's constructor signature plus keyword-only ``extra`` arguments. diffusers reads
    it (``register_to_config``, ``from_config``) to know which config entries the class accepts,
    so the subclasses follow whatever the installed diffusers version defines."""
    sig = inspect.signature(_raw_init(base))
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
               for name, default in extra.items()]
    return sig.replace(parameters=params + var_kw)


def _scalar_index(t) -> int:
    return int(torch.as_tensor(t).reshape(-1)[0])


_SCHEDULER_NAMES = ("AnisoDDPMScheduler", "AnisoDDIMScheduler", "AnisoEulerDiscreteScheduler",
                    "AnisoFlowMatchEulerDiscreteScheduler")


def _config_file(path, subfolder, config_name: str) -> str:
    """The config file diffusers' ``load_config`` reads (for error messages)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if subfolder and os.path.isfile(os.path.join(path, subfolder, config_name)):
        return os.path.join(path, subfolder, config_name)
    return os.path.join(path, config_name)


def _check_saved_spec(config: dict, where: str) -> None:
    """A config saved by an anisodiff scheduler always has a ``noise_spec`` entry (null when white):
    refuse one without it or with a spec that does not parse, naming the file. Other configs (a stock
    ``DDPMScheduler``'s) load as white noise, as ``from_config`` does."""
    name = config.get("_class_name")
    if name not in _SCHEDULER_NAMES:
        return
    if "noise_spec" not in config:
        raise ValueError(f"{where}: noise_spec: missing; an {name} config saved by anisodiff always has "
                         "it (null for white noise), so this file was truncated or edited")
    try:
        _as_spec(config["noise_spec"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: noise_spec: {exc}") from None


class _AnisoSchedulerMixin:
    """Shared by the four schedulers: the spec, white draws with diffusers' generator, shaping."""

    noise_spec: NoiseSpec

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' ``load_config``, then a check of the saved ``noise_spec``, so a broken or missing
        entry fails naming the file (``from_pretrained``, also through ``DiffusionPipeline``, reads here)."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        _check_saved_spec(config, _config_file(pretrained_model_name_or_path, kwargs.get("subfolder"),
                                               cls.config_name))
        return out

    # -- construction -----------------------------------------------------------------------
    def _init_noise_spec(self, noise_spec) -> None:
        try:
            spec = _as_spec(noise_spec)
        except (TypeError, ValueError) as exc:  # name the config entry (load_config adds the file)
            message = str(exc) if str(exc).startswith("noise_spec") else f"noise_spec: {exc}"
            raise type(exc)(message) from None
        self.noise_spec = spec
        self._noise_vp_cache = None
        if self._needs_schedule():  # built (the betas validated) now: a bad config fails here
            vp = self._noise_vp
            if spec.time_varying:
                reference.squeeze_profile(spec.squeeze, vp)  # a table must have T entries
        # The config holds plain JSON (never the object), so save_pretrained writes it.
        self.register_to_config(noise_spec=None if noise_spec is None else json.loads(spec.to_json()))

    def _needs_schedule(self) -> bool:
        """Whether the shaped-noise code reads the VP schedule. A white spec never does, so the
        scheduler accepts whatever betas its diffusers parent accepts (``beta_end=2`` included)."""
        return not self.is_white and self.noise_spec.time_varying

    @property
    def _noise_vp(self) -> VPSchedule:
        """The :class:`~anisodiff.VPSchedule` of this scheduler, built on first use only (see
        :meth:`_needs_schedule`); it validates the betas."""
        if self._noise_vp_cache is None:
            self._noise_vp_cache = self._noise_schedule()
        return self._noise_vp_cache

    def _noise_schedule(self) -> VPSchedule:
        """The VP schedule the squeeze profile reads (betas for ``"beta"``, T for ``"linear"``)."""
        return VPSchedule(self.betas, self.alphas_cumprod)

    @property
    def is_white(self) -> bool:
        """True when the spec is white noise: every method is then the parent's, bit for bit."""
        return _is_white(self.noise_spec)

    # -- timesteps -> training timesteps (rows of the squeeze profile) -----------------------
    def _train_index(self, timesteps, batch: int) -> torch.Tensor:
        t = torch.as_tensor(timesteps).detach().reshape(-1).cpu()
        if t.is_floating_point():
            t = t.round()
        t = t.long()
        return t.expand(batch) if t.numel() == 1 else t

    def _prior_index(self) -> int:
        return self.config.num_train_timesteps - 1

    # -- noise ------------------------------------------------------------------------------
    def _draw_white(self, shape, generator, device, dtype) -> torch.Tensor:
        """White noise from diffusers' ``randn_tensor`` (two draws, stacked, for an independent
        two-band spec)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        draw_on = torch.device("cpu") if device.type == "mps" else device  # as DDPMPipeline does
        draws = [randn_tensor(tuple(shape), generator=generator, device=draw_on, dtype=dtype).to(device)
                 for _ in range(self.noise_spec.draws)]
        return draws[0] if len(draws) == 1 else torch.stack(draws)

    def _shape(self, white: torch.Tensor, index) -> torch.Tensor:
        if self.is_white:
            return white
        backend = "auto" if white.dtype in _KERNEL_DTYPES else "reference"
        t = index if self.noise_spec.time_varying else None
        schedule = self._noise_vp if self._needs_schedule() else None
        return apply_operator(white, self.noise_spec, timesteps=t, schedule=schedule, backend=backend)

    def shape_noise(self, noise: torch.Tensor, timesteps=None) -> torch.Tensor:
        """``A(t) noise`` for WHITE ``noise`` (``[2, B, C, H, W]`` for an independent two-band spec):
        the epsilon training target that matches ``add_noise(x0, noise, timesteps)``."""
        if self.is_white:
            return noise
        batch = noise.shape[0] if self.noise_spec.draws == 1 else noise.shape[1]
        index = None
        if self.noise_spec.time_varying:
            if timesteps is None:
                raise ValueError("timesteps: required, the squeeze of this noise_spec varies with t")
            index = self._train_index(timesteps, batch)
        return self._shape(noise, index)

    def prior_noise(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Unit-scale shaped prior ``A(t_first) z`` with ``z`` from ``randn_tensor(generator=...)``.
        ``x_T = init_noise_sigma * prior_noise(...)``; pipelines taking ``latents=`` do the scaling."""
        z = self._draw_white(shape, generator, device, dtype)
        index = None
        if self.noise_spec.time_varying:  # else A does not depend on t
            index = torch.full((int(shape[0]),), self._prior_index(), dtype=torch.int64)
        return self._shape(z, index)

    def _require_epsilon(self, what: str) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.prediction_type != "epsilon":
            raise NotImplementedError(
                f"{name}.{what}: prediction_type={cfg.prediction_type!r} with an anisotropic noise_spec is "
                "not implemented; train the network to predict the shaped noise (prediction_type="
                "'epsilon', the setting of both papers)")
        if cfg.thresholding:
            raise NotImplementedError(f"{name}.{what}: dynamic thresholding with an anisotropic "
                                      "noise_spec is not implemented (use clip_sample)")


# ---------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------
class _AnisoVPMixin(_AnisoSchedulerMixin):
    """add_noise / get_velocity of the VP schedulers (DDPM, DDIM): ``noise`` is WHITE and shaped."""

    def _needs_schedule(self) -> bool:
        return not self.is_white  # add_noise and step read abar_t from it, whatever the spec

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) A(t) noise`` for WHITE ``noise`` (one fused pass)."""
        if self.is_white:
            return super().add_noise(original_samples, noise, timesteps)
        backend = "auto" if original_samples.dtype in _KERNEL_DTYPES else "reference"
        x_t, _ = _add_noise(original_samples, timesteps, self.noise_spec, self._noise_vp, noise=noise,
                            backend=backend)
        return x_t

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-target for WHITE ``noise``: ``sqrt(abar_t) A(t) noise - sqrt(1 - abar_t) x0``."""
        return super().get_velocity(sample, self.shape_noise(noise, timesteps), timesteps)


class AnisoDDPMScheduler(_AnisoVPMixin, DDPMScheduler):
    """``DDPMScheduler`` with shaped noise. Extra config entries: ``noise_spec`` (a NoiseSpec, its
    dict or JSON; default white) and ``sampling_mode``: ``"official"`` (the SDM code: isotropic
    posterior coefficients, step noise ``A(t) z``, x0 clipped in ``S(t)^-1`` coordinates, default)
    or ``"exact"`` (the exact Gaussian posterior of the time-varying marginal). Both are textbook
    DDPM with shaped step noise for a time-invariant spec. See the module docstring."""

    def __init__(self, *args, noise_spec=None, sampling_mode: str = "official", **kwargs):
        _raw_init(DDPMScheduler)(self, *args, **kwargs)
        if sampling_mode not in reference.SAMPLING_MODES:
            raise ValueError(f"sampling_mode: must be one of {list(reference.SAMPLING_MODES)}, "
                             f"got {sampling_mode!r}")
        self._init_noise_spec(noise_spec)

    __init__.__signature__ = _init_signature(DDPMScheduler, noise_spec=None, sampling_mode="official")
    __init__ = register_to_config(__init__)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One ancestral step for a model that predicts the SHAPED noise, in one pass of the fused
        kernel where it runs (else :func:`anisodiff.reference.ddpm_step`, the same math). ``prev_timestep`` is diffusers' ``previous_timestep``
        (the next entry of ``self.timesteps`` after ``set_timesteps``, else ``t - 1``)."""
        if self.is_white:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        self._require_epsilon("step")
        if self.config.variance_type not in ("fixed_small", "fixed_small_log"):
            raise NotImplementedError(
                f"AnisoDDPMScheduler.step: variance_type={self.config.variance_type!r} with an anisotropic "
                "noise_spec is not implemented (supported: 'fixed_small', the DDPM posterior variance)")
        prev_t = self.previous_timestep(timestep)
        noise = None
        if _scalar_index(timestep) > 0:  # diffusers draws exactly when it would
            noise = self._draw_white(model_output.shape, generator, model_output.device, model_output.dtype)
        step_args = dict(prev_timestep=prev_t, mode=self.config.sampling_mode,
                         clip_sample=self.config.clip_sample, clip_range=self.config.clip_sample_range)
        fused = can_fuse_step(model_output, sample, self.noise_spec)
        if fused is not None:  # one pass of the fused kernel
            # t = 0 draws no noise (its posterior std is 0): any stream gives the same result.
            stream = torch.zeros(2, dtype=torch.int64) if noise is None else None
            prev_sample, x0 = fused_ddpm_step(model_output, timestep, sample, self.noise_spec, self._noise_vp,
                                              noise=noise, stream=stream, backend=fused, **step_args)
        else:
            prev_sample, x0 = reference.ddpm_step(model_output, timestep, sample, self.noise_spec,
                                                  self._noise_vp, noise=noise, **step_args)
        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
class AnisoDDIMScheduler(_AnisoVPMixin, DDIMScheduler):
    """``DDIMScheduler`` with shaped noise (extra config entry ``noise_spec``). ``step`` delegates to
    :func:`anisodiff.reference.ddim_step`: per eigen-direction of the squeeze, DDIM with the exact
    posterior std times ``eta``; ``variance_noise`` is WHITE noise (it is shaped here). For a
    time-invariant spec this is standard DDIM (eta = 0 needs no noise at all)."""

    def __init__(self, *args, noise_spec=None, **kwargs):
        _raw_init(DDIMScheduler)(self, *args, **kwargs)
        self._init_noise_spec(noise_spec)

    __init__.__signature__ = _init_signature(DDIMScheduler, noise_spec=None)
    __init__ = register_to_config(__init__)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        if self.is_white:
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' "
                             "after creating the scheduler")
        self._require_epsilon("step")
        cfg = self.config
        t = _scalar_index(timestep)
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps  # as DDIMScheduler.step
        if prev_t < 0 and not cfg.set_alpha_to_one:
            prev_t = 0  # final_alpha_cumprod = alphas_cumprod[0]
        if use_clipped_model_output and cfg.clip_sample:
            # re-derive eps from the clipped x0_hat (Glide), as DDIMScheduler does
            ab = self._noise_vp.alphas_cumprod[t].double()
            x, e = sample.double(), model_output.double()
            x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
            model_output = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(model_output.dtype)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that "
                                 "either `generator` or `variance_noise` stays `None`.")
            noise = variance_noise
            if noise is None:
                noise = self._draw_white(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample, x0 = reference.ddim_step(
            model_output, t, sample, self.noise_spec, self._noise_vp, prev_timestep=prev_t, eta=eta,
            noise=noise, clip_sample=cfg.clip_sample, clip_range=cfg.clip_sample_range)
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ---------------------------------------------------------------------------------------------
# Euler (VE form, x = x0 + sigma n)
# ---------------------------------------------------------------------------------------------
class AnisoEulerDiscreteScheduler(_AnisoSchedulerMixin, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with shaped noise (extra config entry ``noise_spec``):
    ``add_noise`` = ``x0 + sigma A(t) noise``, shaped ``s_churn`` noise in ``step``, shaped prior.
    A time-varying squeeze is taken at the nearest training timestep (module docstring)."""

    def __init__(self, *args, noise_spec=None, **kwargs):
        _raw_init(EulerDiscreteScheduler)(self, *args, **kwargs)
        self._init_noise_spec(noise_spec)

    __init__.__signature__ = _init_signature(EulerDiscreteScheduler, noise_spec=None)
    __init__ = register_to_config(__init__)

    def _train_index(self, timesteps, batch: int) -> torch.Tensor:
        T = self.config.num_train_timesteps
        t = torch.as_tensor(timesteps).detach().double().reshape(-1).cpu()
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            idx = sigma_to_timestep(torch.exp(4 * t), self._noise_vp)  # timesteps are 0.25 log sigma
        else:
            idx = t.round().clamp(0, T - 1).long()
        return idx.expand(batch) if idx.numel() == 1 else idx

    def _prior_index(self) -> int:
        return int(self._train_index(self.timesteps[0], 1)[0])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``x0 + sigma A(t) noise`` for WHITE ``noise``."""
        return super().add_noise(original_samples, self.shape_noise(noise, timesteps), timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-target for WHITE ``noise``."""
        return super().get_velocity(sample, self.shape_noise(noise, timesteps), timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """The parent's step; with ``s_churn > 0`` the churn noise is ``A(t) z`` at the current
        timestep (the rest of the update is unchanged)."""
        if self.is_white or s_churn <= 0:
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin,
                                s_tmax=s_tmax, s_noise=s_noise, generator=generator, return_dict=return_dict)
        # EulerDiscreteScheduler.step (diffusers 0.42) with the churn noise shaped
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure "
                           "correct denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            z = self._draw_white(model_output.shape, generator, model_output.device, model_output.dtype)
            index = None
            if self.noise_spec.time_varying:
                index = self._train_index(self.timesteps[self.step_index], model_output.shape[0])
            eps = self._shape(z, index) * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
        if self.config.prediction_type in ("original_sample", "sample"):
            pred_original_sample = model_output
        elif self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of "
                             "`epsilon`, or `v_prediction`")
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# ---------------------------------------------------------------------------------------------
# Flow matching (x = (1 - sigma) x0 + sigma n)
# ---------------------------------------------------------------------------------------------
class AnisoFlowMatchEulerDiscreteScheduler(_AnisoSchedulerMixin, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with shaped noise (extra config entry ``noise_spec``):
    ``scale_noise`` = ``(1 - sigma) x0 + sigma A(sigma) noise``, shaped re-noising when
    ``stochastic_sampling=True``, shaped prior, and for a time-varying squeeze the exact flow ODE
    velocity in ``step`` (module docstring). The flow target is ``shape_noise(noise, t) - x0``."""

    flow_schedule = FlowSchedule()  # tau(sigma) of the squeeze profiles (anisodiff.flow)

    def __init__(self, *args, noise_spec=None, **kwargs):
        _raw_init(FlowMatchEulerDiscreteScheduler)(self, *args, **kwargs)
        self._init_noise_spec(noise_spec)

    __init__.__signature__ = _init_signature(FlowMatchEulerDiscreteScheduler, noise_spec=None)
    __init__ = register_to_config(__init__)

    def _needs_schedule(self) -> bool:
        return False  # the flow path reads no VP schedule

    def _train_index(self, timesteps, batch: int) -> torch.Tensor:
        """The float64 sigmas ``timesteps / num_train_timesteps`` (what the shaped noise reads here)."""
        t = torch.as_tensor(timesteps).detach().double().reshape(-1).cpu()
        sigma = t / self.config.num_train_timesteps
        return sigma.expand(batch) if sigma.numel() == 1 else sigma

    def _shape(self, white: torch.Tensor, index) -> torch.Tensor:
        if self.is_white:
            return white
        backend = "auto" if white.dtype in _KERNEL_DTYPES else "reference"
        sigma = index if self.noise_spec.time_varying else None
        return apply_operator(white, self.noise_spec, timesteps=sigma, schedule=self.flow_schedule,
                              backend=backend)

    def prior_noise(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Unit-scale shaped prior ``A(sigma_first) z`` (``sigma_first = 1`` unless the config ends the
        schedule early) with ``z`` from ``randn_tensor(generator=...)``."""
        z = self._draw_white(shape, generator, device, dtype)
        return self._shape(z, self._train_index(self.timesteps[0], int(shape[0])))

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma A(sigma) noise`` for WHITE ``noise``."""
        if noise is None:
            raise ValueError("noise: required (white noise of the sample's shape)")
        return super().scale_noise(sample, timestep, self.shape_noise(noise, timestep))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, per_token_timesteps: torch.Tensor | None = None,
             return_dict: bool = True):
        """The parent's step, with ``stochastic_sampling`` re-noising with ``A(sigma_next) z`` and, for
        a time-varying squeeze, the deterministic update along :func:`anisodiff.reference.flow_velocity`."""
        stochastic = self.config.stochastic_sampling
        if self.is_white or not (stochastic or self.noise_spec.time_varying):
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin,
                                s_tmax=s_tmax, s_noise=s_noise, generator=generator,
                                per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        # FlowMatchEulerDiscreteScheduler.step (diffusers 0.42) with the noise shaped
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to "
                             "pass one of the `scheduler.timesteps` as a timestep.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        if per_token_timesteps is not None:
            if self.noise_spec.time_varying:
                raise NotImplementedError("per_token_timesteps with a time-varying squeeze is not implemented")
            per_token_sigmas = per_token_timesteps / self.config.num_train_timesteps
            sigmas = self.sigmas[:, None, None]
            lower_mask = sigmas < per_token_sigmas[None] - 1e-6
            lower_sigmas, _ = (lower_mask * sigmas).max(dim=0)
            current_sigma = per_token_sigmas[..., None]
            next_sigma = lower_sigmas[..., None]
        else:
            current_sigma = self.sigmas[self.step_index]
            next_sigma = self.sigmas[self.step_index + 1]
        if stochastic:
            x0 = sample - current_sigma * model_output
            z = self._draw_white(sample.shape, generator, sample.device, sample.dtype)
            index = None
            if self.noise_spec.time_varying:
                index = torch.as_tensor(next_sigma).double().reshape(-1).expand(sample.shape[0])
            prev_sample = (1.0 - next_sigma) * x0 + next_sigma * self._shape(z, index)
        else:  # time-varying squeeze, deterministic: Euler on the exact velocity
            prev_sample = reference.flow_euler_step(model_output, current_sigma, next_sigma, sample,
                                                    self.noise_spec, self.flow_schedule)
        self._step_index += 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------
def _require_aniso(scheduler, pipeline: str) -> None:
    if not isinstance(scheduler, _AnisoSchedulerMixin):
        raise TypeError(
            f"scheduler: {pipeline} needs an anisodiff scheduler, got {type(scheduler).__name__}; use e.g. "
            "AnisoDDPMScheduler.from_config(scheduler.config, noise_spec=spec)")


def _image_shape(unet, batch_size: int) -> tuple:
    size = unet.config.sample_size
    if isinstance(size, int):
        return (batch_size, unet.config.in_channels, size, size)
    return (batch_size, unet.config.in_channels, *size)


def _postprocess(pipe, image, output_type, return_dict):
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (image,)
    return ImagePipelineOutput(images=image)


class AnisoDDPMPipeline(DDPMPipeline):
    """``DDPMPipeline`` starting from the shaped prior ``x_T = init_noise_sigma * A(T - 1) z``; the
    scheduler must be an anisodiff scheduler (it draws the shaped step noise). With a white spec
    it reproduces ``DDPMPipeline`` bit for bit."""

    def __init__(self, unet, scheduler):
        _require_aniso(scheduler, "AnisoDDPMPipeline")
        super().__init__(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str | None = "pil", return_dict: bool = True):
        """As ``DDPMPipeline.__call__``: ``generator`` (one or a list, one per sample) seeds the prior
        and every step."""
        shape = _image_shape(self.unet, batch_size)
        image = self.scheduler.init_noise_sigma * self.scheduler.prior_noise(
            shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t).sample
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        return _postprocess(self, image, output_type, return_dict)


class AnisoDDIMPipeline(DDIMPipeline):
    """``DDIMPipeline`` starting from the shaped prior. Like ``DDIMPipeline`` it converts any
    anisodiff scheduler to :class:`AnisoDDIMScheduler` (the ``noise_spec`` carries over)."""

    def __init__(self, unet, scheduler):
        _require_aniso(scheduler, "AnisoDDIMPipeline")
        if not isinstance(scheduler, AnisoDDIMScheduler):
            scheduler = AnisoDDIMScheduler.from_config(scheduler.config)
        DiffusionPipeline.__init__(self)  # not DDIMPipeline.__init__: it converts to a plain DDIMScheduler
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, eta: float = 0.0, num_inference_steps: int = 50,
                 use_clipped_model_output: bool | None = None, output_type: str | None = "pil",
                 return_dict: bool = True):
        """As ``DDIMPipeline.__call__``."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested "
                             f"an effective batch size of {batch_size}. Make sure the batch size matches the "
                             "length of the generators.")
        shape = _image_shape(self.unet, batch_size)
        image = self.scheduler.init_noise_sigma * self.scheduler.prior_noise(
            shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t).sample
            image = self.scheduler.step(model_output, t, image, eta=eta,
                                        use_clipped_model_output=use_clipped_model_output,
                                        generator=generator).prev_sample
        return _postprocess(self, image, output_type, return_dict)


# ---------------------------------------------------------------------------------------------
# Registration: DiffusionPipeline.from_pretrained looks `_class_name` up on the diffusers module
# ---------------------------------------------------------------------------------------------
def _register_with_diffusers() -> None:
    import diffusers as _diffusers_module
    for cls in (AnisoDDPMPipeline, AnisoDDIMPipeline, AnisoDDPMScheduler, AnisoDDIMScheduler,
                AnisoEulerDiscreteScheduler, AnisoFlowMatchEulerDiscreteScheduler):
        current = _diffusers_module.__dict__.get(cls.__name__)
        lazy = getattr(_diffusers_module, "_class_to_module", {})  # diffusers' own, not yet imported
        if cls.__name__ in lazy or (current is not None and current is not cls):  # never shadow theirs
            logger.warning(f"diffusers already has a {cls.__name__}; anisodiff's is not registered")
            continue
        setattr(_diffusers_module, cls.__name__, cls)


_register_with_diffusers()
