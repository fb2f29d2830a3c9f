"""The public functional API: validation, seeds, backend choice, and the torch.ops registrations
(their fake kernels and x0 autograd live in :mod:`anisodiff.op_support`).

Every function validates its arguments before any kernel runs and raises an exception that names the
offending argument.

torch.compile: the spec lowering (:func:`_lowered`) is evaluated once at trace time and becomes a
constant of the graph; specs are immutable, so that constant cannot go stale. Seeds drawn from the
default generator, and int seeds/offsets that change every step, stay graph inputs.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from . import reference
from ._autoselect import missing_features, spec_kind
from ._ext import has_compiled_ops, require_backend
from .flow import FlowSchedule, as_flow_schedule, check_flow_target, check_sigmas, flow_kernel_args, is_flow_schedule
from .op_support import register_compiled_ops
from .plan import TARGET_CODES, kernel_args
from .rng import check_offset, check_seed, stream_tensor
from .schedule import VPSchedule, as_schedule
from .spec import NoiseSpec, brief

__all__ = ["white_noise", "apply_operator", "shaped_noise", "add_noise", "covariance"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IDENTITY = NoiseSpec()
_WHITE_ROW = 4096  # white_noise runs as [n / 4096, 1, 1, 4096] so the CPU kernel can use every thread


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _check_spec(spec) -> NoiseSpec:
    if not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
    return spec


def _check_sizes(shape, name: str = "shape") -> tuple[int, ...]:
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {brief(shape)}") from None
    if any(s < 0 for s in dims):
        raise ValueError(f"{name}: sizes must be non-negative, got {list(dims)}")
    return dims


def _check_shape(shape) -> tuple[int, ...]:
    dims = _check_sizes(shape)
    if len(dims) not in (4, 5):
        raise ValueError(f"shape: expected [B, C, H, W] or a video [B, C, F, H, W] (4 or 5 sizes), got "
                         f"{list(dims)}")
    return dims


def _check_data_dims(t: torch.Tensor, name: str) -> None:
    if t.dim() not in (4, 5):
        raise ValueError(f"{name}: expected a 4-D [B, C, H, W] or 5-D video [B, C, F, H, W] tensor, got "
                         f"shape {list(t.shape)}")


def _plane(dims) -> tuple[int, int, int]:
    """(C, H, W) of [B, C, H, W] or [B, C, F, H, W]: what the backend limits are about."""
    return dims[1], dims[-2], dims[-1]


def _needs(dims, perturb: float = 0.0, spec: NoiseSpec | None = None) -> tuple[str, ...]:
    """The features (anisodiff._autoselect.FEATURES) of a call on data of shape ``dims``."""
    needs = []
    if len(dims) == 5 and dims[2] > 1:
        needs.append("frames")
    if perturb > 0:
        needs.append("perturb")
    if spec is not None and spec.temporal and spec_kind(spec) == "spectral":  # (white noise is white)
        needs.append("temporal")
    return tuple(needs)


def _backend_for(backend: str, device, spec: NoiseSpec, dims, perturb: float, name: str) -> str:
    """require_backend, plus a clear error when the named backend lacks a feature of the call."""
    if spec.temporal and len(dims) != 5:
        raise ValueError(f"{name}: the spatio-temporal spectrum (spec.temporal=True) filters video "
                         f"volumes [B, C, F, H, W], got a {len(dims)}-D shape {list(dims)}; use a spec "
                         "with temporal=False for images")
    needs = _needs(dims, perturb, spec)
    chosen = require_backend(backend, device, spec_kind(spec), _plane(dims), needs)
    missing = missing_features(chosen, needs)
    if missing:
        arg = ("input_perturbation" if "perturb" in missing else
               "spec" if "temporal" in missing else name)
        what = {"frames": f"video tensors with F > 1 (got shape {list(dims)})",
                "perturb": "input perturbation",
                "temporal": "the spatio-temporal spectrum (spec.temporal=True)"}
        raise ValueError(f"{arg}: the {chosen} backend does not implement "
                         f"{' or '.join(what[m] for m in missing)} yet; use backend='auto' or "
                         "'reference'" + ("" if "temporal" in missing else " or 'cpu'"))
    return chosen


def _check_perturbation(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"input_perturbation: expected a finite number >= 0, got {brief(gamma)}")
    return float(gamma)


def _check_dtype(dtype, backend: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if backend != "reference" and dtype not in _KERNEL_DTYPES:
        raise TypeError(f"dtype: the {backend} kernel produces float32, float16 or bfloat16, got {dtype}")
    return dtype


def _check_float_tensor(t, name: str, backend: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if backend != "reference" and t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name}: the {backend} kernel takes float32, float16 or bfloat16, got "
                        f"{t.dtype} (cast it, or use backend='reference')")
    return t


def _check_schedule(schedule, required: bool):
    if schedule is None:
        if required:
            raise ValueError("schedule: add_noise needs a schedule (anisodiff.VPSchedule or a "
                             "diffusers scheduler)")
        return None
    if is_flow_schedule(schedule):  # flow matching: timesteps are float sigmas (anisodiff/flow.py)
        return as_flow_schedule(schedule)
    if isinstance(schedule, VPSchedule) or (hasattr(schedule, "betas") and hasattr(schedule, "alphas_cumprod")):
        return schedule  # converted (and validated) once, in the cached lowering
    raise TypeError("schedule: expected anisodiff.VPSchedule or a diffusers scheduler with `betas` "
                    f"and `alphas_cumprod`, got {type(schedule).__name__}")


def _check_timesteps(timesteps, batch: int, num_rows: int, device: torch.device,
                     required: bool) -> torch.Tensor:
    """int64 ``[B]`` row indices into the coefficient table."""
    if timesteps is None:
        if required:
            raise ValueError("timesteps: required here (the noise or the schedule depends on t)")
        return torch.zeros(batch, dtype=torch.int64, device=device)
    t = torch.as_tensor(timesteps)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"timesteps: expected integer timesteps, got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"timesteps: expected a scalar or shape [{batch}], got {tuple(t.shape)}")
    if num_rows == 1:  # nothing depends on t (no schedule, time-independent spec): every t is row 0
        return torch.zeros(batch, dtype=torch.int64, device=device)
    # Host-side check where it is free; device tensors (and compiled graphs) are checked by the kernel.
    if t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"timesteps: values must lie in [0, {num_rows}), got min {lo}, max {hi}")
    return t.to(device=device, dtype=torch.int64).contiguous()


def _check_target(target: str) -> int:
    if target not in TARGET_CODES:
        raise ValueError(f"target: must be one of {list(TARGET_CODES)}, got {brief(target)}")
    return TARGET_CODES[target]


def _check_noise(noise, spec: NoiseSpec, shape, device, backend: str, name: str = "noise") -> torch.Tensor:
    noise = _check_float_tensor(noise, name, backend)
    want = tuple(shape) if spec.draws == 1 else (spec.draws, *shape)
    if tuple(noise.shape) != want:
        extra = " (an independent two-band spec consumes two white draws)" if spec.draws > 1 else ""
        raise ValueError(f"{name}: expected WHITE noise of shape {list(want)}{extra}, got "
                         f"{list(noise.shape)}")
    if noise.device != torch.device(device):
        raise ValueError(f"{name}: is on {noise.device} but the data is on {device}")
    if noise.requires_grad:
        raise ValueError(f"{name}: gradients with respect to the white noise are not supported")
    return noise


def _check_channels(spec: NoiseSpec, channels: int, name: str) -> None:
    if spec.squeeze is not None and spec.squeeze.channels != channels:
        raise ValueError(f"{name}: has {channels} channels but the squeeze axes have "
                         f"{spec.squeeze.channels} rows")


def _stream(seed, generator, offset, noise, device=None) -> torch.Tensor:
    """The ``[seed, offset]`` tensor: on the CPU, or on ``device`` when a CUDA generator there
    draws the seed (see :func:`anisodiff.rng.stream_tensor`)."""
    if noise is not None:
        if seed is not None or generator is not None:
            raise ValueError("seed/generator: not used when white noise is passed; give one or the other")
        return stream_tensor(0, None, 0)
    return stream_tensor(seed, generator, offset, device)


def _lowered(spec: NoiseSpec, schedule, C: int, H: int, W: int, device: torch.device, frames=None):
    """The kernel arguments; a trace-time constant under torch.compile. ``frames``: F of a video
    call (the spatio-temporal spectrum's tables depend on it)."""
    return kernel_args(spec, schedule, C, H, W, device, frames)


_lowered._dynamo_marked_constant = True  # = torch._dynamo.assume_constant_result, without importing dynamo


def _library(backend: str):
    """The torch.ops namespace of a kernel backend: anisodiff (cpu, cuda) or anisodiff_triton."""
    if backend == "triton":
        from .triton import ops as _triton_ops  # noqa: F401 (registers the ops; triton is optional)
        return torch.ops.anisodiff_triton
    return torch.ops.anisodiff


def _frames(dims) -> int | None:
    """F of a [B, C, F, H, W] call, None for [B, C, H, W]."""
    return int(dims[2]) if len(dims) == 5 else None


def _rows(spec: NoiseSpec, schedule, timesteps, B: int, C: int, H: int, W: int, device, required: bool,
          frames=None):
    """(KernelArgs, each sample's row of its coefficient table): the cached per-timestep table, or
    for a flow-matching schedule a per-call table of the float sigmas (anisodiff/flow.py)."""
    if isinstance(schedule, FlowSchedule):
        return flow_kernel_args(spec, schedule, timesteps, B, C, H, W, device, required, frames)
    args = _lowered(spec, schedule, int(C), int(H), int(W), device, frames)
    return args, _check_timesteps(timesteps, B, args.num_timesteps, device, required)


def _reference_rows(spec: NoiseSpec, schedule, timesteps, B: int, device, required: bool):
    """(schedule, timesteps on the CPU or None) for reference.py: int timesteps of a VP schedule, or
    the float64 sigmas of a flow-matching schedule."""
    if isinstance(schedule, FlowSchedule):
        return schedule, check_sigmas(timesteps, B, torch.device("cpu"), required)
    ts = _check_timesteps(timesteps, B, _num_rows(spec, schedule), device, required)
    return as_schedule(schedule), (ts.cpu() if timesteps is not None else None)


def _num_rows(spec: NoiseSpec, schedule) -> int:
    """Rows of the coefficient table, for the reference backend (which builds no table)."""
    if schedule is not None:
        return as_schedule(schedule).num_train_timesteps
    sq = spec.squeeze
    if sq is not None and not isinstance(sq.schedule, str):
        return sq.schedule.numel()
    return 1


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def white_noise(shape: Sequence[int], *, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The canonical white stream (docs/design.md section 2), float32: element ``i`` of the row-major
    tensor is lane ``i & 3`` of Philox4x32-10 ``randn4x(seed, offset + (i >> 2))`` — Triton's
    ``tl.randn4x`` (identical Philox words; normals equal to within ~1e-6 float rounding).

    Args:
        shape: any shape; the stream index is the row-major element index.
        seed: the Philox key, an int in [0, 2**63).
        offset: first 64-bit counter of the stream (advance it by ``ceil(numel / 4)`` to continue).
        device: where the tensor is returned.
    """
    seed = check_seed(seed)
    offset = check_offset(offset)
    dims = _check_sizes(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = math.prod(dims)
    backend = require_backend("auto", device, "elementwise")
    if backend != "reference" and n > 0:
        # The stream index is linear, so any [rows, 1, 1, row] view of it is the same stream.
        row = min(n, _WHITE_ROW)
        rows = -(-n // row)
        flat = shaped_noise((rows, 1, 1, row), _IDENTITY, seed=seed, offset=offset, device=device,
                            backend=backend)
        return flat.reshape(-1)[:n].reshape(dims)
    return reference.white_noise(dims, seed, offset, device=device)


def apply_operator(eps: torch.Tensor, spec: NoiseSpec, *, timesteps=None, schedule=None,
                   backend: str = "auto") -> torch.Tensor:
    """``A(t) eps`` for caller-supplied white noise ``eps``.

    Args:
        eps: white noise ``[B, C, H, W]`` or a video ``[B, C, F, H, W]`` (with a leading draw dim of
            2 for an independent two-band spec).
            Non-finite values spread to the whole plane (the spatial filter mixes every pixel of
            a plane) and, on the CPU kernel, to the plane filtered alongside it in the same sample.
        spec: the :class:`NoiseSpec`.
        timesteps: ``[B]`` integer timesteps (or a scalar); required when the squeeze varies with t.
        schedule: a :class:`VPSchedule` or diffusers scheduler; needed by ``schedule="beta"``.
        backend: "auto" (see :mod:`anisodiff._autoselect`), "cpu", "cuda", "triton" or "reference".
    Returns the shaped noise in ``eps``'s dtype.
    """
    spec = _check_spec(spec)
    if not isinstance(eps, torch.Tensor):
        raise TypeError(f"eps: expected a torch.Tensor, got {type(eps).__name__}")
    shape = eps.shape if spec.draws == 1 else eps.shape[1:]
    if len(shape) not in (4, 5):
        lead = " with a leading draw dim of 2" if spec.draws > 1 else ""
        raise ValueError(f"eps: expected [B, C, H, W] or [B, C, F, H, W]{lead}, got shape {list(eps.shape)}")
    return _shaped(tuple(shape), spec, timesteps, schedule, None, None, 0, eps.device, eps.dtype,
                   backend, eps, "eps")


def shaped_noise(shape: Sequence[int], spec: NoiseSpec, *, timesteps=None, schedule=None, seed=None,
                 generator: torch.Generator | None = None, offset: int = 0, device=None, dtype=None,
                 backend: str = "auto") -> torch.Tensor:
    """Draw shaped noise ``n = A(t) eps`` of ``shape = [B, C, H, W]`` or ``[B, C, F, H, W]``.

    Args:
        shape: ``[B, C, H, W]``, or ``[B, C, F, H, W]`` for video: the squeeze acts on C, the spatial
            filter and per-sample normalisation on each H x W frame (docs/design.md section 6).
        spec: the :class:`NoiseSpec`.
        timesteps: ``[B]`` integer timesteps (or a scalar); required when the squeeze varies with t,
            ignored when nothing depends on t.
        schedule: a :class:`VPSchedule` or diffusers scheduler (needed by the "beta"/"linear" squeeze
            profiles).
        seed: explicit Philox key; ``generator``: draw the key from this generator instead (default:
            torch's global generator). ``offset``: first counter of the stream.
        device, dtype: of the result (default CPU, float32).
        backend: "auto" (the fastest available for the device and spec, see
            :mod:`anisodiff._autoselect`), "cpu", "cuda", "triton" or "reference".
    """
    spec = _check_spec(spec)
    dims = _check_shape(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = torch.float32 if dtype is None else dtype
    return _shaped(dims, spec, timesteps, schedule, seed, generator, offset, device, dtype, backend,
                   None, "noise")


def _shaped(dims, spec: NoiseSpec, timesteps, schedule, seed, generator, offset, device, dtype,
            backend: str, noise, noise_name: str) -> torch.Tensor:
    B, (C, H, W) = dims[0], _plane(dims)
    _check_channels(spec, C, "shape" if noise is None else noise_name)
    backend = _backend_for(backend, device, spec, dims, 0.0, "shape" if noise is None else noise_name)
    schedule = _check_schedule(schedule, required=False)
    if noise is not None:
        noise = _check_noise(noise, spec, dims, device, backend, noise_name)
    dtype = _check_dtype(dtype, backend)
    stream = _stream(seed, generator, offset, noise, device)
    if math.prod(dims) == 0:
        return torch.empty(dims, device=device, dtype=dtype)
    if backend == "reference":
        sched, t_ref = _reference_rows(spec, schedule, timesteps, B, device, spec.time_varying)
        if noise is not None:
            return reference.apply_operator(noise, spec, t_ref, sched).to(device, dtype)
        seed_v, offset_v = (int(v) for v in stream)
        return reference.shaped_noise(dims, spec, t_ref, sched, seed=seed_v, offset=offset_v,
                                      device=device, dtype=dtype)
    args, ts = _rows(spec, schedule, timesteps, B, C, H, W, device, spec.time_varying, _frames(dims))
    packed = None if noise is None else (noise[None] if spec.draws == 1 else noise)
    return _library(backend).shaped_noise(
        list(dims), ts, args.coef, args.axes, args.weights, list(args.gammas), args.variant,
        args.normalize, stream, packed, dtype)


def add_noise(x0: torch.Tensor, timesteps, spec: NoiseSpec, schedule, *, noise=None, seed=None,
              generator: torch.Generator | None = None, offset: int = 0, target: str = "epsilon",
              input_perturbation: float = 0.0,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) A(t) eps``.

    Args:
        x0: clean data ``[B, C, H, W]`` or a video ``[B, C, F, H, W]`` (float32/float16/bfloat16;
            math in float32). Any strides, channels_last / channels_last_3d included; outputs keep
            x0's memory format. NaN/Inf in x0 stay in their own elements. Video: the squeeze acts
            on C, the spatial filter on each H x W frame (docs/design.md section 6).
        timesteps: ``[B]`` integer timesteps in ``[0, T)`` (or a scalar).
        spec: the :class:`NoiseSpec`.
        schedule: a :class:`VPSchedule` or a diffusers scheduler (``betas``/``alphas_cumprod``).
        noise: optional caller-supplied WHITE noise of x0's shape (``[2, *x0.shape]`` for an
            independent two-band spec); by default eps comes from the canonical stream.
        seed / generator / offset: the stream (see :func:`shaped_noise`); a generator advances, so
            consecutive calls never reuse counters.
        target: ``"epsilon"`` (the shaped noise, what both papers train on), ``"v"``
            (``a n - b x0``), ``"x0"`` or ``"flow"`` (``n - x0``; the flow-matching velocity when
            the schedule is a flow path).
        input_perturbation: gamma >= 0 (DDPM-IP, diffusers' ``--input_perturbation``): x_t gets
            ``n + gamma n'`` with ``n' = A(t) eps'`` a second draw of the same stream (also when
            ``noise`` is given), the target is computed from n alone (docs/design.md section 7).
        backend: "auto" (the fastest available for x0's device and the spec, see
            :mod:`anisodiff._autoselect`), "cpu", "cuda", "triton" or "reference".
    Returns ``(x_t, target)`` in x0's dtype.
    """
    spec = _check_spec(spec)
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0: expected a torch.Tensor, got {type(x0).__name__}")
    _check_data_dims(x0, "x0")
    gamma = _check_perturbation(input_perturbation)
    B, (C, H, W) = x0.shape[0], _plane(x0.shape)
    backend = _backend_for(backend, x0.device, spec, tuple(x0.shape), gamma, "x0")
    _check_float_tensor(x0, "x0", backend)
    schedule = _check_schedule(schedule, required=True)
    _check_channels(spec, C, "x0")
    code = _check_target(target)
    if isinstance(schedule, FlowSchedule):
        check_flow_target(target)
    if noise is not None:
        noise = _check_noise(noise, spec, x0.shape, x0.device, backend)
    # the perturbation eps' always comes from the stream, also when the caller gives eps
    stream = _stream(seed, generator, offset, noise if gamma == 0 else None, x0.device)
    if backend == "reference":
        sched, ts = _reference_rows(spec, schedule, timesteps, B, x0.device, True)
        seed_v, offset_v = (int(v) for v in stream)
        return reference.add_noise(x0, ts, spec, sched, noise=noise, seed=seed_v,
                                   offset=offset_v, target=target, input_perturbation=gamma)
    if x0.numel() == 0:
        return torch.empty_like(x0), torch.empty_like(x0)
    args, ts = _rows(spec, schedule, timesteps, B, C, H, W, x0.device, True, _frames(x0.shape))
    packed = None if noise is None else (noise[None] if spec.draws == 1 else noise)
    return _library(backend).add_noise(
        x0, ts, args.coef, args.axes, args.weights, list(args.gammas), args.variant,
        args.normalize, code, stream, packed, gamma)


def covariance(spec: NoiseSpec, shape: Sequence[int], *, timesteps=None, schedule=None) -> torch.Tensor:
    """Dense analytic covariance ``Sigma = A(t) A(t)^T`` (float64) of one flattened noise sample of
    shape ``[C, H, W]`` (a leading B in ``shape`` is ignored), or of one ``[C, F, H, W]`` video
    sample for ``shape = [B, C, F, H, W]`` (frames independent: ``S S^T (x) I_F (x) Sigma_w``):
    ``[N, N]`` with ``N = C H W`` (``C F H W``), or ``[B, N, N]`` for a 1-D tensor of timesteps.
    For small shapes (tests, teaching)."""
    spec = _check_spec(spec)
    dims = _check_sizes(shape)
    if len(dims) not in (3, 4, 5) or any(s <= 0 for s in dims):
        raise ValueError(f"shape: expected positive [C, H, W], [B, C, H, W] or [B, C, F, H, W], got "
                         f"{list(dims)}")
    n = math.prod(dims[-4:]) if len(dims) == 5 else math.prod(dims[-3:])
    if n > 4096:
        raise ValueError(f"shape: {'C*F*H*W' if len(dims) == 5 else 'C*H*W'} = {n} is too large for a "
                         "dense covariance (max 4096)")
    _check_channels(spec, dims[1] if len(dims) == 5 else dims[-3], "shape")
    schedule = _check_schedule(schedule, required=False)
    if not isinstance(schedule, FlowSchedule):
        schedule = as_schedule(schedule)
    if timesteps is not None:
        t = torch.as_tensor(timesteps)
        if t.dim() > 1:
            raise ValueError(f"timesteps: expected a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
        if isinstance(schedule, FlowSchedule):  # float sigmas in [0, 1] (anisodiff/flow.py)
            check_sigmas(t.reshape(-1), t.numel(), torch.device("cpu"), False)
            if not isinstance(timesteps, torch.Tensor):
                timesteps = torch.as_tensor(timesteps, dtype=torch.float64)  # (not via float32)
        else:  # the same integer and range checks as the noise ops ([0, T) where the noise depends on t)
            _check_timesteps(t, max(1, t.numel()), _num_rows(spec, schedule), torch.device("cpu"), False)
    elif spec.time_varying:
        raise ValueError("timesteps: required, the squeeze strength varies with t")
    return reference.covariance(spec, dims, timesteps, schedule)


if has_compiled_ops():
    register_compiled_ops()
