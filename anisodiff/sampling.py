"""Sampling with shaped noise: one object holding a spec and its schedule.

:class:`AnisotropicNoise` is what a training loop and a sampler share: ``add_noise`` for training,
``sample_prior`` for x_T, ``ddpm_step`` / ``ddim_step`` for the reverse process, ``score`` for
guidance or likelihoods, and ``save_pretrained`` / ``from_pretrained`` so a saved model keeps its
noise. ``ddpm_step`` runs the fused one-pass kernel of the backend ``backend="auto"`` picks for the
tensors' device and spec (``torch.ops.anisodiff.ddpm_step`` on CPU / CUDA,
``torch.ops.anisodiff_triton.ddpm_step`` with Triton; see :mod:`anisodiff._autoselect`), else
:func:`anisodiff.reference.ddpm_step` (vectorised float64 PyTorch, no per-sample Python); all draw the
same noise for the same stream.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import torch

from . import reference
from ._autoselect import spec_kind
from ._ext import require_backend
from .flow import FlowSchedule, as_flow_schedule, check_sigmas, is_flow_schedule
from .ops import (_KERNEL_DTYPES, _backend_for, _check_noise, _library, _needs, _plane, add_noise,
                  shaped_noise, white_noise)
from .plan import _schedule_key, kernel_args
from .rng import stream_tensor
from .schedule import VPSchedule, as_schedule
from .spec import NoiseSpec, check_format_version, read_json_file

__all__ = ["AnisotropicNoise", "CONFIG_NAME", "fused_ddpm_step", "can_fuse_step", "step_op_args"]

CONFIG_NAME = "anisodiff_noise.json"
_FORMAT = "anisodiff.AnisotropicNoise"


class AnisotropicNoise:
    """A :class:`NoiseSpec` bound to a diffusion schedule.

    Args:
        spec: the noise shape.
        schedule: a :class:`VPSchedule` or a diffusers scheduler (its ``betas`` and
            ``alphas_cumprod`` are copied), or a flow-matching schedule (:class:`FlowSchedule`, or a
            diffusers flow-matching scheduler): then ``add_noise`` takes float sigmas, the prior is at
            sigma = 1 and :meth:`flow_step` samples (DDPM / DDIM steps and the VP score do not apply).
    """

    def __init__(self, spec: NoiseSpec, schedule):
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
        schedule = as_flow_schedule(schedule) if is_flow_schedule(schedule) else as_schedule(schedule)
        if schedule is None:
            raise ValueError("schedule: required (anisodiff.VPSchedule or a diffusers scheduler)")
        self.spec = spec
        self.schedule = schedule

    @property
    def is_flow(self) -> bool:
        """True when the schedule is a flow-matching path (``x = (1 - sigma) x0 + sigma n``)."""
        return isinstance(self.schedule, FlowSchedule)

    @property
    def num_train_timesteps(self) -> int:
        self._require_vp("num_train_timesteps")
        return self.schedule.num_train_timesteps

    def _require_vp(self, what: str) -> None:
        if self.is_flow:
            raise TypeError(f"schedule: {what} needs a VP schedule; this AnisotropicNoise has a flow-matching "
                            "schedule (sample it with flow_step)")

    # -- training ---------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, timesteps, *, generator: torch.Generator | None = None,
                  target: str = "epsilon", input_perturbation: float = 0.0, backend: str = "auto"):
        """``(x_t, target)``, see :func:`anisodiff.add_noise` (on a flow schedule ``timesteps`` are the
        float sigmas and ``target="flow"`` gives the velocity ``n - x0``; ``input_perturbation``:
        DDPM-IP's gamma, x_t gets ``n + gamma n'`` and the target keeps ``n``)."""
        return add_noise(x0, timesteps, self.spec, self.schedule, generator=generator, target=target,
                         input_perturbation=input_perturbation, backend=backend)

    # -- sampling ---------------------------------------------------------------------------
    def sample_prior(self, shape, *, generator: torch.Generator | None = None, device=None,
                     dtype=None) -> torch.Tensor:
        """x_T drawn from the shaped prior ``A(T - 1) z`` (essential when a band has zero weight); on a
        flow schedule the pure noise ``A(sigma = 1) z``."""
        B = int(shape[0])
        if self.is_flow:
            t = torch.ones(B, dtype=torch.float64)
        else:
            t = torch.full((B,), self.num_train_timesteps - 1, dtype=torch.int64)
        return shaped_noise(shape, self.spec, timesteps=t, schedule=self.schedule, generator=generator,
                            device=device, dtype=dtype)

    def _white(self, like: torch.Tensor, generator) -> torch.Tensor:
        """Fresh white noise for one step (two draws for an independent two-band spec): the stream the
        fused step reads for the same generator state (draw d in counter word 2, as every kernel)."""
        seed = int(stream_tensor(None, generator, 0)[0])
        if self.spec.draws == 1:
            return white_noise(tuple(like.shape), seed=seed, device=like.device)
        return torch.stack([reference.white_noise(like.shape, seed, 0, draw=d, device=like.device)
                            for d in range(self.spec.draws)])

    def ddpm_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *,
                  prev_timestep=None, generator: torch.Generator | None = None, mode: str = "official",
                  clip_sample: bool = True, clip_range: float = 1.0, backend: str = "auto"):
        """One ancestral step ``x_t -> x_prev`` for a model that predicts the shaped noise.

        ``mode="official"`` reproduces the SDM code (isotropic posterior coefficients, step noise
        ``A(t) z``, x0_hat clipped in ``S(t)^-1`` coordinates); ``mode="exact"`` uses the exact
        Gaussian posterior of the time-varying marginal per eigen-direction. Both are standard DDPM
        with shaped step noise for a time-invariant spec. ``prev_timestep`` defaults to ``t - 1``.
        Returns ``(prev_sample, pred_original_sample)``. ``backend="auto"`` runs the fused one-pass
        kernel of the fastest backend for the tensors' device and the spec (cpu; cuda, then triton;
        :mod:`anisodiff._autoselect`), or the float64 reference for other dtypes and devices;
        ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"`` force one.
        """
        self._require_vp("ddpm_step")
        _check_step_tensors(model_output, sample)
        _check_step_timesteps(timestep, prev_timestep, self.num_train_timesteps)
        if backend == "reference":
            fused = None
        elif backend == "auto":
            fused = can_fuse_step(model_output, sample, self.spec)
        else:
            fused = _required_step_backend(backend, model_output, sample, self.spec)
        if fused is None:
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
        self._require_vp("ddim_step")
        _check_step_tensors(model_output, sample)
        _check_step_timesteps(timestep, prev_timestep, self.num_train_timesteps)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
        noise = self._white(sample, generator) if eta > 0 else None
        return reference.ddim_step(model_output, timestep, sample, self.spec, self.schedule,
                                   prev_timestep=prev_timestep, eta=eta, noise=noise,
                                   clip_sample=clip_sample, clip_range=clip_range)

    def score(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """``grad log q_t = -Sigma_t^+ eps_hat / sqrt(1 - abar_t)`` (pseudo-inverse on zero bands)."""
        self._require_vp("score")
        return reference.score(model_output, timestep, sample, self.spec, self.schedule)

    def flow_step(self, model_output: torch.Tensor, sigma, sigma_next, sample: torch.Tensor, *,
                  stochastic: bool = False, generator: torch.Generator | None = None,
                  backend: str = "auto") -> torch.Tensor:
        """One step ``sigma -> sigma_next`` of a flow-matching sampler, for a model trained on
        ``target="flow"`` (``v_hat = E[n - x0 | x]``). ``sigma``, ``sigma_next``: floats or ``[B]``.

        Deterministic (default): Euler on the flow ODE, ``x + (sigma_next - sigma) v``, with
        ``v = v_hat`` for a time-invariant spec (in float32, as diffusers' step) and the exact path
        velocity :func:`anisodiff.reference.flow_velocity` for a time-varying squeeze.
        ``stochastic=True`` (diffusers' ``stochastic_sampling``): ``x0_hat = x - sigma v_hat``, then
        the fused ``add_noise(x0_hat, sigma_next)``, i.e. fresh SHAPED noise at ``sigma_next``.
        Returns the next sample in ``sample``'s dtype."""
        if not self.is_flow:
            raise TypeError("schedule: flow_step needs a flow-matching schedule (anisodiff.FlowSchedule or a "
                            "diffusers flow-matching scheduler); use ddpm_step / ddim_step on a VP schedule")
        _check_step_tensors(model_output, sample)
        B = sample.shape[0]
        s = check_sigmas(_as_float(sigma), B, torch.device("cpu"), True)
        s_next = check_sigmas(_as_float(sigma_next), B, torch.device("cpu"), True)
        view = (B,) + (1,) * (sample.dim() - 1)
        if stochastic:
            dtype = torch.promote_types(sample.dtype, torch.float32)  # float32 math, as diffusers' step
            x0_hat = sample.to(dtype) - s.to(dtype).view(view).to(sample.device) * model_output.to(dtype)
            if backend == "auto" and dtype not in _KERNEL_DTYPES:
                backend = "reference"
            x_next, _ = add_noise(x0_hat, s_next, self.spec, self.schedule, generator=generator, backend=backend)
            return x_next.to(sample.dtype)
        if self.spec.time_varying:
            return reference.flow_euler_step(model_output, s, s_next, sample, self.spec, self.schedule)
        dt = (s_next - s).float().view(view).to(sample.device)
        return (sample.float() + dt * model_output.float()).to(sample.dtype)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": 1, "spec": self.spec.to_dict(),
                "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "AnisotropicNoise":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"noise config: expected an object with format {_FORMAT!r}")
        check_format_version(d, "noise config", _FORMAT, 1)
        sched = d.get("schedule")
        flow = isinstance(sched, dict) and sched.get("type") == "flow"
        return cls(NoiseSpec.from_dict(d.get("spec")),
                   FlowSchedule.from_dict(sched) if flow else VPSchedule.from_dict(sched))

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
        """Read ``<directory>/anisodiff_noise.json`` (JSON only, at most ``MAX_JSON_BYTES``)."""
        path = os.path.join(directory, CONFIG_NAME)
        d = read_json_file(path, "noise config")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return f"AnisotropicNoise({self.spec!r}, {self.schedule!r})"


def _as_float(value):
    """A step's sigma: a Python number (``1`` and ``0`` included: flow_step has no integer timesteps
    to confuse them with) as a float64 tensor; tensors as they are (integer ones are refused)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    return value


def can_fuse_step(model_output: torch.Tensor, sample: torch.Tensor, spec: NoiseSpec | None = None) -> str | None:
    """The kernel backend ("cpu", "cuda" or "triton") that ``backend="auto"`` runs the fused DDPM
    step on for these tensors (and ``spec``: its kind and plane size can rule Triton out), or None
    when auto would use the reference (a dtype the kernels do not take, no kernel for the device)."""
    if sample.dtype not in _KERNEL_DTYPES or model_output.dtype not in _KERNEL_DTYPES:
        return None
    if model_output.device != sample.device or sample.dim() not in (4, 5):
        return None
    kind = spec_kind(spec) if spec is not None else "spectral"
    dims = tuple(sample.shape)
    chosen = require_backend("auto", sample.device, kind, _plane(dims), _needs(dims, 0.0, spec))
    return None if chosen == "reference" else chosen


def _required_step_backend(backend: str, model_output: torch.Tensor, sample: torch.Tensor, spec) -> str:
    """``backend`` ("cpu", "cuda" or "triton") if it can run the fused step here, else a clear error."""
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"backend: must be 'auto', 'cpu', 'cuda', 'triton' or 'reference', got {backend!r}")
    _backend_for(backend, sample.device, spec, tuple(sample.shape), 0.0, "sample")  # raises, naming the reason
    for name, t in (("sample", sample), ("model_output", model_output)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name}: the {backend} ddpm_step takes float32, float16 or bfloat16, got "
                            f"{t.dtype} (cast it, or use backend='reference')")
    if model_output.device != sample.device:
        raise ValueError(f"model_output: is on {model_output.device} but sample is on {sample.device}")
    return backend


def _check_step_tensors(model_output, sample) -> None:
    """Floating-point tensors of one shape (integer ones would come back truncated)."""
    for name, t in (("model_output", model_output), ("sample", sample)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output: expected the sample's shape {list(sample.shape)}, got "
                         f"{list(model_output.shape)}")


def _check_step_timesteps(timestep, prev_timestep, num_train_timesteps: int) -> None:
    """t in [0, T) and prev in [-1, T) (-1: the last step; any prev < -1 counts as -1, as a ported
    diffusers loop passes ``t - T // n``), for ints or CPU tensors; device tensors are not read
    here (the step reads a shared one once, see :func:`_scalar`)."""
    for name, value, lo in (("timestep", timestep, 0), ("prev_timestep", prev_timestep, -1)):
        if value is None:
            continue
        t = torch.as_tensor(value)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer timesteps, got {t.dtype}")
        if t.device.type == "cpu" and t.numel() > 0:
            low, high = int(t.min()), int(t.max())
            if lo < 0:
                low = max(low, lo)  # prev: every value < 0 is the last step
            if low < lo or high >= num_train_timesteps:
                raise ValueError(f"{name}: values must lie in [{lo}, {num_train_timesteps}), got min {low}, "
                                 f"max {high}")


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
    """The int of a Python int or a one-element integer tensor, else None (per-sample values).
    A one-element DEVICE tensor (diffusers keeps ``scheduler.timesteps`` on the GPU) is read once
    here: one small host sync per step, and the step's table then comes from the cache."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.reshape(()).item())
    return None


def _step_tables(spec, schedule, t: int, prev: int, mode: str, device: torch.device, C: int, H: int, W: int,
                 frames: int | None = None):
    frames = frames if spec.temporal else None  # only spatio-temporal tables depend on F
    key = (spec.to_json(), _schedule_key(schedule), t, prev, mode, str(device), C, H, W, frames)
    hit = _STEP_CACHE.get(key)
    if hit is not None:
        _STEP_CACHE.move_to_end(key)
        return hit
    row = _step_params(spec, schedule, torch.tensor([t]), torch.tensor([prev]), mode)
    entry = (_to_device(row, device), _step_axes(spec, C, device),
             kernel_args(reference._spatial_spec(spec), None, C, H, W, device, frames))
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
    ``torch.ops.anisodiff_triton.ddpm_step``; both take the same arguments. "auto" picks as
    :func:`can_fuse_step` and raises when no kernel runs these tensors (use
    :meth:`AnisotropicNoise.ddpm_step`, which then falls back to the reference)."""
    if mode not in reference.SAMPLING_MODES:
        raise ValueError(f"mode: must be one of {list(reference.SAMPLING_MODES)}, got {mode!r}")
    if backend == "auto":
        backend = can_fuse_step(model_output, sample, spec)
        if backend is None:
            raise RuntimeError(f"backend: no fused ddpm_step kernel runs {sample.dtype} tensors on "
                               f"{sample.device} here; use AnisotropicNoise.ddpm_step (it falls back to "
                               "the reference) or anisodiff.reference.ddpm_step")
    else:
        _required_step_backend(backend, model_output, sample, spec)
    schedule = as_schedule(schedule)
    _check_step_timesteps(timestep, prev_timestep, schedule.num_train_timesteps)
    device = sample.device
    op_args = step_op_args(spec, schedule, timestep, prev_timestep, mode, clip_sample, clip_range,
                           sample.shape, device)
    if noise is not None:
        noise = _check_noise(noise, spec, sample.shape, device, backend)
        noise = noise[None] if spec.draws == 1 else noise
        stream = torch.tensor([0, 0], dtype=torch.int64)
    elif stream is None:
        raise ValueError("stream/noise: give the stream [seed, offset] or white noise")
    return _library(backend).ddpm_step(sample, model_output, *op_args, stream, noise)


def step_op_args(spec: NoiseSpec, schedule, timestep, prev_timestep, mode: str, clip_sample: bool,
                 clip_range: float, shape, device) -> tuple:
    """The ddpm_step op's arguments between ``model_output`` and ``stream``: ``(params, axes,
    weights, gammas, normalize, clip, clip_range)`` on ``device`` for samples of ``shape``. One
    timestep shared by the batch takes the cached per-step row (:func:`_step_tables`)."""
    schedule = as_schedule(schedule)
    B, C, H, W = shape[0], shape[1], shape[-2], shape[-1]  # [B, C, H, W] or video [B, C, F, H, W]
    frames = int(shape[2]) if len(shape) == 5 else None
    device = torch.device(device)
    t_int = _scalar(timestep)
    prev_int = (t_int - 1 if t_int is not None else None) if prev_timestep is None else _scalar(prev_timestep)
    prev_int = None if prev_int is None else max(prev_int, -1)  # every prev < 0 is the last step
    if t_int is not None and prev_int is not None:
        row, axes, spatial = _step_tables(spec, schedule, t_int, prev_int, mode, device, C, H, W, frames)
        params = row.expand(B, row.shape[1]).contiguous()
    else:
        t = torch.as_tensor(timestep).reshape(-1).long().cpu().expand(B)
        prev = (t - 1 if prev_timestep is None
                else torch.as_tensor(prev_timestep).reshape(-1).long().cpu().expand(B))
        params = _to_device(_step_params(spec, schedule, t, prev, mode), device)
        axes, spatial = (_step_axes(spec, C, device),
                         kernel_args(reference._spatial_spec(spec), None, C, H, W, device, frames))
    k = spec.squeeze.k if spec.squeeze is not None else 0
    clip = 0 if not clip_sample else (2 if mode == "official" and k else 1)
    return (params, axes, spatial.weights, list(spatial.gammas), spatial.normalize, clip, float(clip_range))


def _step_axes(spec: NoiseSpec, C: int, device) -> torch.Tensor:
    """float32 ``[C, k]`` axes of the squeeze (``[C, 0]`` without one) on ``device``."""
    k = spec.squeeze.k if spec.squeeze is not None else 0
    return (spec.squeeze.axes.to(torch.float32).contiguous() if k else torch.zeros(C, 0)).to(device)
