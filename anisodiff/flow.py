"""Flow matching (rectified flow, SD3 / Flux): ``x_sigma = (1 - sigma) x0 + sigma n`` on the fused ops.

A :class:`FlowSchedule` (or any diffusers flow-matching scheduler, e.g.
``FlowMatchEulerDiscreteScheduler``) as the ``schedule`` of :func:`anisodiff.add_noise`,
:func:`anisodiff.shaped_noise` or :func:`anisodiff.apply_operator` makes their ``timesteps``
argument the per-sample noise level ``sigma`` in ``[0, 1]`` (float; the scheduler's shifted or
dynamically shifted sigmas are just such floats). What is accepted, and why (docs/design.md, "Flow
matching"):

* float sigmas: a scalar, ``[B]`` or a ``[B, 1, ..., 1]`` view (what the SD3 / Flux training scripts'
  ``get_sigmas`` returns), on any device;
* integer tensors are refused: on a flow path an integer is ambiguous (an index into
  ``scheduler.timesteps``, or a timestep ``sigma * num_train_timesteps``);
* the scheduler's float ``timesteps`` (``sigma * num_train_timesteps``) are refused where they can
  be told apart for free (CPU values above 1); convert them with :meth:`FlowSchedule.sigmas_from_timesteps`.
  On an accelerator the values are not read (no host sync): a sigma outside ``[0, 1]`` gives NaN for
  its sample, as an out-of-range timestep does on the VP path.

The lowering needs no kernel change: the float sigmas become a per-call coefficient table
``coef[B, 2 + k]`` on the device (``a = 1 - sigma``, ``b = sigma``, ``r_k = s_k tau(sigma)``) read
with ``timesteps = arange(B)``, so every kernel runs it in its one pass. The squeeze profile
``tau(sigma)`` is defined in :mod:`anisodiff.reference` (section 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import reference
from .plan import KernelArgs, kernel_args
from .schedule import VPSchedule
from .spec import NoiseSpec, Squeeze

__all__ = ["FlowSchedule", "is_flow_schedule", "as_flow_schedule", "check_sigmas", "check_flow_target",
           "flow_kernel_args", "flow_coefficients"]

# diffusers' schedulers of the rectified-flow path x = (1 - sigma) x0 + sigma n
_DIFFUSERS_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                           "FlowMatchLCMScheduler")


class FlowSchedule:
    """The rectified-flow path ``x_sigma = (1 - sigma) x0 + sigma n``, ``sigma`` in ``[0, 1]``.

    Args:
        reference: the VP schedule whose SDM profile ``beta_t / beta_max`` a ``Squeeze(...,
            schedule="beta")`` carries over to the flow path, at the VP timestep of the same
            signal-to-noise ratio (default: the SDM paper's ``VPSchedule.linear(1000)``). The
            ``"constant"``, ``"linear"`` (``tau = sigma``) and table profiles do not read it.
    """

    path = "flow"  # what anisodiff.reference.is_flow looks for

    def __init__(self, reference: VPSchedule | None = None):
        if reference is None:
            reference = VPSchedule.linear(1000)
        if not isinstance(reference, VPSchedule):
            raise TypeError(f"reference: expected anisodiff.VPSchedule or None, got {type(reference).__name__}")
        ac = reference.alphas_cumprod.double()
        if not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError("reference: the VP schedule's alphas_cumprod must decrease strictly inside "
                             "(0, 1), so that every SNR has one VP timestep (zero-terminal-SNR schedules "
                             "end at 0 and cannot serve)")
        self._reference = reference

    @property
    def reference(self) -> VPSchedule:
        return self._reference

    @staticmethod
    def sigmas_from_timesteps(timesteps, num_train_timesteps: int = 1000) -> torch.Tensor:
        """The sigmas of a diffusers flow scheduler's ``timesteps`` (``sigma * num_train_timesteps``)."""
        t = torch.as_tensor(timesteps)
        if not t.is_floating_point():
            t = t.to(torch.float32)
        return t / num_train_timesteps

    def to_dict(self) -> dict:
        return {"type": "flow", "reference": self._reference.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "FlowSchedule":
        if not isinstance(d, dict) or d.get("type") != "flow":
            raise ValueError("schedule: expected an object {'type': 'flow', 'reference': {...}}")
        ref = d.get("reference")
        return cls(None if ref is None else VPSchedule.from_dict(ref))

    def _key(self):
        return (self._reference.betas.numpy().tobytes(), self._reference.alphas_cumprod.numpy().tobytes())

    def __eq__(self, other) -> bool:
        return isinstance(other, FlowSchedule) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"FlowSchedule(reference={self._reference!r})"


_DEFAULT = FlowSchedule()


def is_flow_schedule(schedule) -> bool:
    """A :class:`FlowSchedule`, or a diffusers flow-matching scheduler (by class name, so the core
    never imports diffusers)."""
    if isinstance(schedule, FlowSchedule):
        return True
    return any(cls.__name__ in _DIFFUSERS_FLOW_CLASSES for cls in type(schedule).__mro__)


def as_flow_schedule(schedule) -> FlowSchedule:
    """The :class:`FlowSchedule` of a flow schedule: itself, the ``flow_schedule`` an anisodiff
    scheduler carries, or the default one for a plain diffusers scheduler (whose sigmas the caller
    passes: nothing else of it enters the forward process)."""
    if isinstance(schedule, FlowSchedule):
        return schedule
    own = getattr(schedule, "flow_schedule", None)
    return own if isinstance(own, FlowSchedule) else _DEFAULT


def check_flow_target(target: str) -> None:
    if target == "v":
        raise ValueError("target: 'v' (a n - b x0) is a VP target; on a flow-matching schedule train on "
                         "target='flow' (the velocity n - x0), 'epsilon' (n) or 'x0'")


def check_sigmas(sigmas, batch: int, device: torch.device, required: bool) -> torch.Tensor | None:
    """float64 ``[B]`` sigmas on ``device`` (None when not given and not required). CPU values are
    range-checked here; device values are not read (out-of-range ones give NaN, see
    :func:`flow_coefficients`)."""
    if sigmas is None:
        if required:
            raise ValueError("timesteps: required; on a flow-matching schedule this is sigma in [0, 1] per "
                             "sample")
        return None
    s = sigmas.detach() if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas)
    if not isinstance(sigmas, torch.Tensor) and s.is_floating_point():
        s = torch.as_tensor(sigmas, dtype=torch.float64)  # Python floats keep their 53 bits
    if not s.is_floating_point():
        raise TypeError(
            f"timesteps: on a flow-matching schedule this is sigma in [0, 1] per sample (float), got {s.dtype}: "
            "integers are ambiguous (indices into scheduler.timesteps, or timesteps sigma * "
            "num_train_timesteps); pass scheduler.sigmas[indices] or "
            "FlowSchedule.sigmas_from_timesteps(timesteps, num_train_timesteps)")
    if s.dim() == 0:
        s = s.expand(batch)
    elif s.shape[0] != batch or any(d != 1 for d in s.shape[1:]):
        raise ValueError(f"timesteps: expected sigmas of shape [], [{batch}] or [{batch}, 1, ..., 1], got "
                         f"{tuple(s.shape)}")
    s = s.reshape(batch)
    if s.device.type == "cpu" and s.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = float(s.min()), float(s.max())
        if not (0.0 <= lo and hi <= 1.0):  # (NaN fails too)
            hint = ""
            if hi > 1.0:
                hint = (" (values above 1 look like scheduler.timesteps = sigma * num_train_timesteps: use "
                        "FlowSchedule.sigmas_from_timesteps, or the matching scheduler.sigmas)")
            raise ValueError(f"timesteps: sigmas must lie in [0, 1], got min {lo}, max {hi}{hint}")
    return s.to(device=device, dtype=torch.float64, non_blocking=True)


def _constant_profile(spec: NoiseSpec) -> NoiseSpec:
    """The spec with its squeeze profile replaced by "constant": what the cached VP lowering needs to
    build the axes and weights (the per-sample strengths come from :func:`flow_coefficients`)."""
    sq = spec.squeeze
    if sq is None or (isinstance(sq.schedule, str) and sq.schedule == "constant"):
        return spec
    return NoiseSpec(Squeeze(sq.axes, sq.strength, sq.variant, "constant"), spec.spectral,
                     normalize=spec.normalize, radius=spec.radius, offset=spec.offset, temporal=spec.temporal)


@dataclass(frozen=True)
class _FlowStatic:
    """What a flow call needs besides its sigmas: the kernel arguments of the spec (axes, weights,
    ...) and, with a squeeze, its strengths and the knots of tau(sigma), on the device."""
    args: KernelArgs
    strengths: torch.Tensor | None  # float64 [k]
    u_knots: torch.Tensor | None    # float64 [n]
    tau_knots: torch.Tensor | None  # float64 [n]
    snr: bool                       # knots in u = -log SNR (the "beta" profile) instead of sigma


def _static(spec: NoiseSpec, schedule: FlowSchedule, C: int, H: int, W: int, device: str,
            frames: int | None = None) -> _FlowStatic:
    """The call-independent part (cached); a trace-time constant under torch.compile. ``frames``: F
    of a video call (only a spatio-temporal spec's tables depend on it)."""
    return _static_cached(spec, schedule, C, H, W, device, frames if spec.temporal else None)


_static._dynamo_marked_constant = True  # (see ops._lowered)


@lru_cache(maxsize=64)
def _static_cached(spec: NoiseSpec, schedule: FlowSchedule, C: int, H: int, W: int, device: str,
                   frames: int | None) -> _FlowStatic:
    args = kernel_args(_constant_profile(spec), None, C, H, W, device, frames)
    if args.axes.shape[1] == 0:  # no squeeze (or s = 0): a and b only
        return _FlowStatic(args, None, None, None, False)
    dev = torch.device(device)
    u, tau, snr = reference.flow_profile_knots(spec.squeeze, schedule.reference)
    strengths = torch.tensor(spec.squeeze.strength, dtype=torch.float64)
    return _FlowStatic(args, strengths.to(dev), u.to(dev), tau.to(dev), snr)


def flow_coefficients(sigmas: torch.Tensor, strengths, u_knots, tau_knots, snr: bool) -> torch.Tensor:
    """float32 ``[B, 2 + k]``: ``1 - sigma, sigma, s_k tau(sigma)`` per sample, computed on the
    sigmas' device (no host sync). A sigma outside ``[0, 1]`` (or NaN) gives a NaN row, so its
    sample comes out NaN instead of silently wrong."""
    valid = (sigmas >= 0) & (sigmas <= 1)
    s = torch.where(valid, sigmas, torch.full_like(sigmas, float("nan")))
    columns = [(1.0 - s)[:, None], s[:, None]]
    if strengths is not None:
        u = 2.0 * (torch.log(s) - torch.log1p(-s)) if snr else s
        tau, _ = reference.interpolate_knots(u, u_knots, tau_knots)
        columns.append(tau[:, None] * strengths[None, :])
    return torch.cat(columns, dim=1).to(torch.float32).contiguous()


def flow_kernel_args(spec: NoiseSpec, schedule: FlowSchedule, sigmas, batch: int, C: int, H: int, W: int,
                     device: torch.device, required: bool, frames: int | None = None) -> tuple[KernelArgs, torch.Tensor]:
    """``(KernelArgs, timesteps)`` for a flow call: the per-call table of :func:`flow_coefficients`
    and ``timesteps = arange(B)`` (row b is sample b). Without sigmas (allowed where nothing depends
    on sigma) the static table is used with row 0."""
    static = _static(spec, schedule, int(C), int(H), int(W), str(torch.device(device)), frames)
    args = static.args
    s = check_sigmas(sigmas, batch, device, required)
    if s is None:
        return args, torch.zeros(batch, dtype=torch.int64, device=device)
    coef = flow_coefficients(s, static.strengths, static.u_knots, static.tau_knots, static.snr)
    rows = KernelArgs(coef=coef, axes=args.axes, weights=args.weights, gammas=args.gammas, variant=args.variant,
                      normalize=args.normalize, num_timesteps=batch)  # (not dataclasses.replace: dynamo)
    return rows, torch.arange(batch, dtype=torch.int64, device=device)
