"""Sampling with shaped noise: one object holding a spec and its schedule.

:class:`AnisotropicNoise` is what a training loop and a sampler share: ``add_noise`` for training,
``sample_prior`` for x_T, ``ddpm_step`` / ``ddim_step`` for the reverse process, ``score`` for
guidance or likelihoods, and ``save_pretrained`` / ``from_pretrained`` so a saved model keeps its
noise. ``ddpm_step`` runs the fused one-pass kernel (``torch.ops.anisodiff.ddpm_step``) where a
compiled backend exists for the tensors' device, else :func:`anisodiff.reference.ddpm_step`
(vectorised float64 PyTorch, no per-sample Python); both draw the same noise for the same stream.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch

from . import reference
from ._ext import available_backends, has_compiled_ops
from .ops import _KERNEL_DTYPES, _library, add_noise, shaped_noise, white_noise
from .plan import _schedule_key, kernel_args
from .rng import stream_tensor
from .schedule import VPSchedule, as_schedule
from .spec import NoiseSpec

__all__ = ["AnisotropicNoise", "CONFIG_NAME", "fused_ddpm_step", "can_fuse_step"]

CONFIG_NAME = "anisodiff_noise.json"
_FORMAT = "anisodiff.AnisotropicNoise"


class AnisotropicNoise:
    """A :class:`NoiseSpec` bound to a diffusion schedule.

    Args:
        spec: the noise shape.
        schedule: a :class:`VPSchedule` or a diffusers scheduler (its ``betas`` and
            ``alphas_cumprod`` are copied).
    """

    def __init__(self, spec: NoiseSpec, schedule):
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
        schedule = as_schedule(schedule)
        if schedule is None:
            raise ValueError("schedule: required (anisodiff.VPSchedule or a diffusers scheduler)")
        self.spec = spec
        self.schedule = schedule

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    # -- training ---------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, timesteps, *, generator: torch.Generator | None = None,
                  target: str = "epsilon", backend: str = "auto"):
        """``(x_t, target)``, see :func:`anisodiff.add_noise`."""
        return add_noise(x0, timesteps, self.spec, self.schedule, generator=generator, target=target,
                         backend=backend)

    # -- sampling ---------------------------------------------------------------------------
    def sample_prior(self, shape, *, generator: torch.Generator | None = None, device=None,
                     dtype=None) -> torch.Tensor:
        """x_T drawn from the shaped prior ``A(T - 1) z`` (essential when a band has zero weight)."""
        B = int(shape[0])
        t = torch.full((B,), self.num_train_timesteps - 1, dtype=torch.int64)
        return shaped_noise(shape, self.spec, timesteps=t, schedule=self.schedule, generator=generator,
                            device=device, dtype=dtype)

    def _white(self, like: torch.Tensor, generator) -> torch.Tensor:
        """Fresh white noise for one step (two draws for an independent two-band spec)."""
        shape = tuple(like.shape) if self.spec.draws == 1 else (self.spec.draws, *like.shape)
        seed = int(stream_tensor(None, generator, 0)[0])
        return white_noise(shape, seed=seed).to(like.device)

    def ddpm_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *,
                  prev_timestep=None, generator: torch.Generator | None = None, mode: str = "official",
                  clip_sample: bool = True, clip_range: float = 1.0, backend: str = "auto"):
        """One ancestral step ``x_t -> x_prev`` for a model that predicts the shaped noise.

        ``mode="official"`` reproduces the SDM code (isotropic posterior coefficients, step noise
        ``A(t) z``, x0_hat clipped in ``S(t)^-1`` coordinates); ``mode="exact"`` uses the exact
        Gaussian posterior of the time-varying marginal per eigen-direction. Both are standard DDPM
        with shaped step noise for a time-invariant spec. ``prev_timestep`` defaults to ``t - 1``.
        Returns ``(prev_sample, pred_original_sample)``. ``backend="auto"`` runs the fused one-pass
        kernel (``torch.ops.anisodiff.ddpm_step``) where it exists (CPU, float32/16/bf16), else the
        float64 reference; ``"triton"`` runs ``torch.ops.anisodiff_triton.ddpm_step`` (never chosen
        by "auto").
        """
        if backend not in ("auto", "cpu", "cuda", "triton", "reference"):
            raise ValueError(f"backend: must be 'auto', 'cpu', 'cuda', 'triton' or 'reference', got {backend!r}")
        if backend == "triton":
            fused = "triton" if _can_run_triton_step(model_output, sample) else None
        else:
            fused = can_fuse_step(model_output, sample)
        if backend in ("cpu", "cuda", "triton") and fused != backend:
            where = ("a cuda device (or the CPU under TRITON_INTERPRET=1) with triton installed"
                     if backend == "triton" else f"a {backend} device with the {backend} ops built")
            raise RuntimeError(f"backend: the fused {backend} ddpm_step needs float32/float16/bfloat16 "
                               f"tensors on {where} "
                               f"(available here: {available_backends(sample.device)})")
        if backend == "reference" or fused is None:
            return reference.ddpm_step(model_output, timestep, sample, self.spec, self.schedule,
                                       prev_timestep=prev_timestep, noise=self._white(sample, generator),
                                       mode=mode, clip_sample=clip_sample, clip_range=clip_range)
        return fused_ddpm_step(model_output, timestep, sample, self.spec, self.schedule,
                               prev_timestep=prev_timestep, stream=stream_tensor(None, generator, 0, sample.device),
                               mode=mode, clip_sample=clip_sample, clip_range=clip_range, backend=fused)

    def ddim_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *,
                  prev_timestep=None, eta: float = 0.0, generator: torch.Generator | None = None,
                  clip_sample: bool = False, clip_range: float = 1.0):
        """One DDIM step (``eta = 0``: deterministic). Returns ``(prev_sample, pred_original_sample)``."""
        noise = self._white(sample, generator) if eta > 0 else None
        return reference.ddim_step(model_output, timestep, sample, self.spec, self.schedule,
                                   prev_timestep=prev_timestep, eta=eta, noise=noise,
                                   clip_sample=clip_sample, clip_range=clip_range)

    def score(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """``grad log q_t = -Sigma_t^+ eps_hat / sqrt(1 - abar_t)`` (pseudo-inverse on zero bands)."""
        return reference.score(model_output, timestep, sample, self.spec, self.schedule)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": 1, "spec": self.spec.to_dict(),
                "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "AnisotropicNoise":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"noise config: expected an object with format {_FORMAT!r}")
        if d.get("version", 1) > 1:
            raise ValueError(f"noise config: version {d.get('version')} is newer than this anisodiff; upgrade")
        return cls(NoiseSpec.from_dict(d.get("spec")), VPSchedule.from_dict(d.get("schedule")))

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``<directory>/anisodiff_noise.json`` (JSON only); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "AnisotropicNoise":
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return f"AnisotropicNoise({self.spec!r}, {self.schedule!r})"


def can_fuse_step(model_output: torch.Tensor, sample: torch.Tensor) -> str | None:
    """The compiled backend ("cpu" or "cuda") that runs the fused DDPM step for these tensors, or
    None (no compiled ops for their device, or a dtype the kernels do not take)."""
    if not has_compiled_ops() or sample.dtype not in _KERNEL_DTYPES or model_output.dtype not in _KERNEL_DTYPES:
        return None
    if model_output.device != sample.device:
        return None
    kind = sample.device.type
    return kind if kind in ("cpu", "cuda") and kind in available_backends(sample.device) else None


def _can_run_triton_step(model_output: torch.Tensor, sample: torch.Tensor) -> bool:
    """Whether ``torch.ops.anisodiff_triton.ddpm_step`` runs for these tensors (backend="triton")."""
    return (sample.dtype in _KERNEL_DTYPES and model_output.dtype in _KERNEL_DTYPES
            and model_output.device == sample.device and "triton" in available_backends(sample.device))


def _step_params(spec: NoiseSpec, schedule: VPSchedule, t: torch.Tensor, prev: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 ``[B, 2 + 4 (1 + k)]``: a_t, b_t, then (perp, axes) of S(t), C0, Ct and Sig per sample."""
    B = t.shape[0]
    coeffs = reference.ddpm_coefficients(spec, schedule, t, prev, mode)
    ab_t = reference._alphas(schedule, t, B)
    columns = [ab_t.sqrt()[:, None], (1 - ab_t).sqrt()[:, None]]
    for name in ("s", "c0", "ct", "sig"):
        perp, axes = coeffs[name]
        columns += [perp[:, None], axes]
    return torch.cat(columns, dim=1).to(torch.float32).contiguous()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: the host does not wait for the copy
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# A sampling loop steps the same (t, prev) for the whole batch: its per-step table row, the axes
# and the spatial lowering are computed once per (spec, schedule, t, prev, mode, device, plane) and
# reused (on the device), so a step costs one kernel launch plus a broadcast of one row.
_STEP_CACHE: OrderedDict = OrderedDict()
_STEP_CACHE_SIZE = 8192  # a few sampling schedules of 1000 steps; one entry is ~100 bytes + keys


def _scalar(value) -> int | None:
    """The int of a Python int or a one-element integer tensor, else None (per-sample values)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.reshape(()).item()) if value.device.type == "cpu" else None
    return None


def _step_tables(spec, schedule, t: int, prev: int, mode: str, device: torch.device, C: int, H: int, W: int):
    key = (spec.to_json(), _schedule_key(schedule), t, prev, mode, str(device), C, H, W)
    hit = _STEP_CACHE.get(key)
    if hit is not None:
        _STEP_CACHE.move_to_end(key)
        return hit
    row = _step_params(spec, schedule, torch.tensor([t]), torch.tensor([prev]), mode)
    k = spec.squeeze.k if spec.squeeze is not None else 0
    axes = spec.squeeze.axes.to(torch.float32).contiguous() if k else torch.zeros(C, 0)
    entry = (_to_device(row, device), axes.to(device), kernel_args(reference._spatial_spec(spec), None, C, H, W, device))
    _STEP_CACHE[key] = entry
    if len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    return entry


def fused_ddpm_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, spec: NoiseSpec, schedule, *,
                    prev_timestep=None, stream: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    mode: str = "official", clip_sample: bool = True, clip_range: float = 1.0,
                    backend: str = "auto"):
    """:func:`anisodiff.reference.ddpm_step` as one pass of the compiled kernel: read x_t and the
    model output, draw and shape the step noise (the canonical stream ``stream = [seed, offset]``, or
    the caller's WHITE ``noise``), write x_prev and x0_hat. The per-sample channel matrices come from
    :func:`anisodiff.reference.ddpm_coefficients` (a few [B]-sized ops on the host, no per-sample
    Python), then travel to the sample's device as one small table; for one timestep shared by the
    batch (a sampling loop) that table row is cached per step. ``backend``: "auto", "cpu" or "cuda"
    run ``torch.ops.anisodiff.ddpm_step`` (the compiled op of the tensors' device), "triton"
    ``torch.ops.anisodiff_triton.ddpm_step``; both take the same arguments."""
    if backend not in ("auto", "cpu", "cuda", "triton"):
        raise ValueError(f"backend: must be 'auto', 'cpu', 'cuda' or 'triton', got {backend!r}")
    if mode not in reference.SAMPLING_MODES:
        raise ValueError(f"mode: must be one of {list(reference.SAMPLING_MODES)}, got {mode!r}")
    schedule = as_schedule(schedule)
    B, C, H, W = sample.shape
    device = sample.device
    t_int = _scalar(timestep)
    prev_int = (t_int - 1 if t_int is not None else None) if prev_timestep is None else _scalar(prev_timestep)
    if t_int is not None and prev_int is not None:
        row, axes, spatial = _step_tables(spec, schedule, t_int, prev_int, mode, device, C, H, W)
        params = row.expand(B, row.shape[1]).contiguous()
    else:
        t = torch.as_tensor(timestep).reshape(-1).long().cpu().expand(B)
        prev = (t - 1 if prev_timestep is None
                else torch.as_tensor(prev_timestep).reshape(-1).long().cpu().expand(B))
        params = _to_device(_step_params(spec, schedule, t, prev, mode), device)
        k = spec.squeeze.k if spec.squeeze is not None else 0
        axes = (spec.squeeze.axes.to(torch.float32).contiguous() if k else torch.zeros(C, 0)).to(device)
        spatial = kernel_args(reference._spatial_spec(spec), None, C, H, W, device)
    k = spec.squeeze.k if spec.squeeze is not None else 0
    clip = 0 if not clip_sample else (2 if mode == "official" and k else 1)
    if noise is not None:
        noise = noise[None] if spec.draws == 1 else noise
        stream = torch.tensor([0, 0], dtype=torch.int64)
    elif stream is None:
        raise ValueError("stream/noise: give the stream [seed, offset] or white noise")
    return _library(backend).ddpm_step(sample, model_output, params, axes, spatial.weights,
                                       list(spatial.gammas), spatial.normalize, clip, float(clip_range),
                                       stream, noise)
