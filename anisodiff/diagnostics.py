"""Terminal-SNR diagnostics: does the shaped noise drown the data at t = T?

A sampler starts from the shaped prior ``x_T ~ N(0, b_T^2 Sigma_n)`` and can only recover the data if
the forward process really reaches it, i.e. the signal-to-noise ratio ``a_T^2 / b_T^2 x (data power /
noise power)`` is small in EVERY direction of the noise. A spec can break this where white noise does
not: with the papers' DC floor ``eps = 1e-10``, ``PowerLaw(-0.3)`` on a 4x4 plane gives the DC bin the
weight ``1e3``, and the calibration (unit mean variance) then leaves every other frequency with ~4e-5
of the noise power, so at t = T of the linear schedule those bands keep an SNR near 1.

:func:`terminal_snr` computes the SNR along t in two exact views of the Gaussian noise
``n ~ N(0, S(t)^2 (x) Sigma_w)`` (``Sigma_w`` diagonal in the DFT basis with eigenvalues
``P_n(f)``, :func:`anisodiff.reference.spatial_power`):

* **per principal direction** ``e_j`` of the data's channel covariance (variance ``mu_j``), over all
  frequencies: ``SNR_j(t) = a_t^2 mu_j / (b_t^2 (e_j^T S(t)^2 e_j) mean_f P_n(f))``;
* **per frequency band** (ring ``R`` of :mod:`anisodiff.bands`, DC its own band), over all channels:
  ``SNR_R(t) = a_t^2 sum_{f in R} sum_c P_c(f) / (b_t^2 tr(S(t)^2) sum_{f in R} P_n(f))``, with the
  data's per-channel power spectrum ``P_c`` (:class:`anisodiff.Spectrum`).

* **per band and principal direction** (where the data's per-band cross-spectra are known,
  :attr:`Spectrum.band_cross`, up to 16 channels): ``SNR_jR(t) = a_t^2 e_j^T B_R e_j /
  (b_t^2 (e_j^T S(t)^2 e_j) sum_{f in R} P_n(f))`` with ``B_R = sum_{f in R} Re E[X(f) X(f)^H] /
  (H W)``. Both marginals above are weighted means of these, so a squeezed direction in one band
  shows here even when neither marginal flags it.

All are ratios of the energy of the data term and of the noise term of ``x_t`` in that subspace, as
the dense covariances give them (``tests/test_terminal_snr.py`` checks them against
:func:`anisodiff.reference.covariance`). A band with no noise at all has SNR ``inf`` (its data is never
noised). A random-strength offset enters with its mean covariance (strength ``o / sqrt(3)``). ``x_T``'s variance in a subspace is ``(1 + SNR)`` times what the prior assumes there, so the
default threshold :data:`SNR_THRESHOLD` = 0.1 flags a mismatch of more than 10% at the start of
sampling. Without data statistics the data is taken as white with unit variance per channel
(:meth:`DataStatistics.white`, what a well-scaled latent approximates).

Schedules: a :class:`~anisodiff.VPSchedule` or any diffusers scheduler with ``betas`` and
``alphas_cumprod`` (``t`` = its training timesteps; a zero-terminal-SNR schedule,
``rescale_betas_zero_snr=True``, has ``a_T = 0`` and SNR 0), or a flow-matching scheduler with
``sigmas`` and no ``alphas_cumprod`` (diffusers' ``FlowMatchEulerDiscreteScheduler``:
``x = (1 - sigma) x0 + sigma n``, ``t`` indexes its sigmas in ascending order; sigma = 1 at the end
gives SNR 0), or an ``anisodiff.FlowSchedule`` (evaluated at ``sigma = i / 1000``, i = 1..1000). A
squeeze that varies with sigma reads ``tau(sigma)`` (:mod:`anisodiff.reference`, section 6) of the
FlowSchedule (of :func:`anisodiff.flow.as_flow_schedule` for a diffusers scheduler), as
:func:`anisodiff.add_noise` does.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from . import bands, reference
from .flow import FlowSchedule, as_flow_schedule
from .schedule import VPSchedule, as_schedule
from .spec import NoiseSpec, PowerLaw, check_format_version

__all__ = ["DataStatistics", "TerminalSNR", "terminal_snr", "print_warnings", "named_schedule",
           "SNR_THRESHOLD", "SNR_SCHEDULES", "DATA_STATISTICS_FORMAT"]

SNR_THRESHOLD = 0.1
WHITE_CROSS_CHANNELS = 64  # DataStatistics.white keeps per-band cross-spectra up to this many
DATA_STATISTICS_FORMAT = "anisodiff.DataStatistics"
# the schedules `anisodiff fit` / `show` evaluate the SNR on (T = 1000, diffusers' beta schedules)
SNR_SCHEDULES = ("linear", "scaled_linear")
_ZERO_SNR_FIX = "or a zero-terminal-SNR schedule (diffusers: rescale_betas_zero_snr=True)"


# ---------------------------------------------------------------------------------------------
# What the diagnostics need to know about the data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DataStatistics:
    """The data's second moments as the terminal SNR reads them (float64, CPU).

    ``covariance``: the centred ``C x C`` pixel covariance (:attr:`ChannelPCA.covariance`).
    ``band_power``: ``[R + 1]`` per ring of :func:`anisodiff.bands.ring_index` (ring 0 = DC), the
    data's power ``sum_{f in ring} sum_c P_c(f)`` (:attr:`Spectrum.power` summed). ``shape``: the
    ``(H, W)`` plane these bands belong to. ``band_covariance``: optional ``[R + 1, C, C]``, the
    per-band cross-spectra (:attr:`Spectrum.band_cross`; their traces are ``band_power``).
    """

    covariance: torch.Tensor
    band_power: torch.Tensor
    shape: tuple
    band_covariance: torch.Tensor | None = None

    def __post_init__(self):
        cov, power = self.covariance, self.band_power
        if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] < 1:
            raise ValueError(f"data_stats.covariance: expected a C x C matrix, got shape "
                             f"{list(cov.shape)}")
        H, W = self.shape
        expected = int(bands.ring_index(H, W).max()) + 1
        if power.dim() != 1 or power.numel() != expected:
            raise ValueError(f"data_stats.band_power: a {H}x{W} plane has {expected} bands, got "
                             f"shape {list(power.shape)}")
        if not (torch.isfinite(cov).all() and torch.isfinite(power).all()) or (power < 0).any():
            raise ValueError("data_stats: covariance and band_power must be finite, band_power >= 0")
        bc = self.band_covariance
        if bc is not None and (bc.shape != (expected, *cov.shape) or not torch.isfinite(bc).all()):
            raise ValueError(f"data_stats.band_covariance: expected finite values of shape "
                             f"{[expected, *cov.shape]}, got {list(bc.shape)}")

    @property
    def channels(self) -> int:
        return self.covariance.shape[0]

    @classmethod
    def from_fit(cls, pca, spectrum) -> "DataStatistics":
        """From :func:`anisodiff.fit_statistics`' ``(ChannelPCA, Spectrum)``."""
        C, H, W = spectrum.power.shape
        if pca.covariance.shape != (C, C):
            raise ValueError(f"data_stats: the PCA has {pca.covariance.shape[0]} channels, the "
                             f"spectrum {C}")
        band_power = bands.ring_sums(spectrum.power.sum(dim=0), bands.ring_index(H, W))
        cross = getattr(spectrum, "band_cross", None)
        return cls(pca.covariance.double().cpu().clone(), band_power, (H, W),
                   None if cross is None else cross.double().cpu().clone())

    @classmethod
    def white(cls, channels: int, H: int, W: int, variance: float = 1.0) -> "DataStatistics":
        """White data with ``variance`` per channel, uncorrelated channels: ``P_c(f) = variance``."""
        cov = variance * torch.eye(channels, dtype=torch.float64)
        ring = bands.ring_index(H, W)
        power = bands.ring_sums(torch.full((H, W), channels * variance, dtype=torch.float64), ring)
        cross = None
        if channels <= WHITE_CROSS_CHANNELS:  # B_R = variance * (bins of R) * I
            cross = (power / channels)[:, None, None] * torch.eye(channels, dtype=torch.float64)
        return cls(cov, power, (H, W), cross)

    def to_dict(self) -> dict:
        out = {"format": DATA_STATISTICS_FORMAT, "version": 1, "shape": list(self.shape),
               "covariance": self.covariance.tolist(), "band_power": self.band_power.tolist()}
        if self.band_covariance is not None:
            out["band_covariance"] = self.band_covariance.tolist()
        return out

    @classmethod
    def from_dict(cls, d) -> "DataStatistics":
        if not isinstance(d, dict):
            raise ValueError(f"data_stats: expected a JSON object, got {type(d).__name__}")
        check_format_version(d, "data_stats", DATA_STATISTICS_FORMAT, 1)
        try:
            H, W = (int(s) for s in d["shape"])
            cov = torch.tensor(d["covariance"], dtype=torch.float64)
            power = torch.tensor(d["band_power"], dtype=torch.float64)
            cross = d.get("band_covariance")
            cross = None if cross is None else torch.tensor(cross, dtype=torch.float64)
        except KeyError as exc:
            raise ValueError(f"data_stats.{exc.args[0]}: missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data_stats: not a valid statistics object ({exc})") from None
        return cls(cov, power, (H, W), cross)


def _as_statistics(data_stats, shape, spec: NoiseSpec) -> DataStatistics:
    """``data_stats`` (None, a DataStatistics or a fit's (pca, spectrum)) checked against ``shape``
    ((C, H, W) or (C, F, H, W); per-frame planes) and the spec."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (3, 4) or min(shape) < 1:
            raise ValueError(f"shape: expected (C, H, W) or (C, F, H, W), got {shape}")
    if data_stats is None:
        if shape is None:
            raise ValueError("shape: required without data_stats, e.g. (4, 64, 64)")
        stats = DataStatistics.white(shape[0], shape[-2], shape[-1])
    elif isinstance(data_stats, DataStatistics):
        stats = data_stats
    elif isinstance(data_stats, (tuple, list)) and len(data_stats) == 2:
        stats = DataStatistics.from_fit(*data_stats)
    else:
        raise TypeError("data_stats: expected None, a DataStatistics or fit_statistics' "
                        f"(ChannelPCA, Spectrum), got {type(data_stats).__name__}")
    if shape is not None and (shape[0], shape[-2], shape[-1]) != (stats.channels, *stats.shape):
        raise ValueError(f"shape: {shape} does not match the data statistics "
                         f"({stats.channels} channels, {stats.shape[0]}x{stats.shape[1]} planes)")
    if spec.squeeze is not None and spec.squeeze.channels != stats.channels:
        raise ValueError(f"data_stats: {stats.channels} channels, but the spec's squeeze has "
                         f"{spec.squeeze.channels}")
    return stats


# ---------------------------------------------------------------------------------------------
# Schedules: (a_t^2, b_t^2) along t, and the VP schedule the squeeze profile reads
# ---------------------------------------------------------------------------------------------
FLOW_GRID = 1000  # a FlowSchedule is evaluated at sigma = i / 1000 (diffusers' default grid)


def _coefficients(schedule, spec: NoiseSpec):
    """``(a2 [T], b2 [T], times [T], profile_schedule, flow)``: the float64 coefficients along t,
    the squeeze's time argument at each t (VP timesteps, or flow sigmas) and the schedule its
    profile reads."""
    if isinstance(schedule, FlowSchedule):  # any sigma in [0, 1]
        sigmas = torch.arange(1, FLOW_GRID + 1, dtype=torch.float64) / FLOW_GRID
        return (1 - sigmas) ** 2, sigmas**2, sigmas, schedule, True
    if getattr(schedule, "alphas_cumprod", None) is None and getattr(schedule, "sigmas", None) is not None:
        sigmas = torch.as_tensor(schedule.sigmas).double().cpu().reshape(-1)
        sigmas = torch.sort(sigmas[sigmas > 0]).values  # ascending: t = 0 least noise
        if sigmas.numel() == 0 or (sigmas > 1).any():
            raise ValueError("schedule: a flow-matching schedule needs sigmas in (0, 1]")
        # the squeeze profile tau(sigma) of the scheduler's FlowSchedule (the default one for a
        # stock diffusers scheduler), as add_noise reads it
        return (1 - sigmas) ** 2, sigmas**2, sigmas, as_flow_schedule(schedule), True
    vp = as_schedule(schedule)
    if vp is None:
        raise ValueError("schedule: required (a VPSchedule, a diffusers scheduler, a FlowSchedule "
                         "or a flow-matching scheduler)")
    ac = vp.alphas_cumprod.double()
    return ac, 1 - ac, torch.arange(ac.numel()), vp, False


def _squeeze_eigenvalues(spec: NoiseSpec, times: torch.Tensor, schedule, flow: bool):
    """``(g [n], f [n, k])``: the eigenvalues of S on the complement of the axes and on them at
    ``times`` (those of :func:`anisodiff.reference.squeeze_matrices`)."""
    n, sq = times.numel(), spec.squeeze
    if not flow or sq is None:
        return reference.squeeze_eigenvalues(spec, times if not flow else torch.zeros_like(times),
                                             schedule, n)
    r = reference.squeeze_strengths(sq, times, schedule).expand(n, -1)  # s_k tau(sigma)
    C, k = sq.axes.shape
    g = torch.exp(r.sum(dim=1) / (C - k)) if sq.variant == "heisenberg" else torch.ones(n, dtype=torch.float64)
    return g, torch.exp(-r)


def named_schedule(name: str) -> VPSchedule:
    """diffusers' ``beta_schedule`` ``name`` with T = 1000: ``"linear"`` (DDPM, 1e-4 .. 0.02) or
    ``"scaled_linear"`` (Stable Diffusion: ``linspace(sqrt(0.00085), sqrt(0.012))^2``)."""
    if name == "linear":
        return VPSchedule.linear(T=1000)
    if name == "scaled_linear":
        return VPSchedule(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2)
    raise ValueError(f"schedule: must be one of {list(SNR_SCHEDULES)}, got {name!r}")


def _mean_offset(spec: NoiseSpec) -> NoiseSpec:
    """A random-strength offset (strength ``u o``, ``u ~ U[0, 1)`` per step) as its mean covariance:
    the noise covariance is affine in ``u^2``, so its mean is that of the fixed strength
    ``o / sqrt(3)`` (``E u^2 = 1/3``)."""
    offset = spec.offset
    if offset is None or not getattr(offset, "random_strength", False):
        return spec
    return NoiseSpec(spec.squeeze, spec.spectral, normalize=spec.normalize, radius=spec.radius,
                     offset=type(offset)(offset.strength / math.sqrt(3)), temporal=spec.temporal)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 / 0 = 0 (no signal) and x / 0 = inf (signal, no noise)."""
    out = num / den
    return torch.where(num == 0, torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TerminalSNR:
    """SNR of ``x_t`` per principal direction and per frequency band (all float64, CPU).

    ``timesteps [n]``: the t of the rows (all of the schedule by default); ``T``: the schedule
    length (t = T - 1 is the terminal step). ``directions [C, C]``: the data's principal channel
    directions (columns, by descending variance ``direction_variance [C]``; largest component > 0);
    ``direction_snr [n, C]``. ``band_radius [R + 1]``: nominal ring radius ``k / min(H, W)`` in
    cycles/pixel (0 = DC); ``band_snr [n, R + 1]``. ``joint_snr [n, R + 1, C]``: per band and
    principal direction (None without the data's per-band cross-spectra).
    ``terminal_direction_snr`` / ``terminal_band_snr`` / ``terminal_joint_snr``: the values at
    t = T - 1. ``noise_band_power [R + 1]``: ``sum_{f in ring} P_n(f)``.
    """

    spec: NoiseSpec
    shape: tuple
    T: int
    timesteps: torch.Tensor
    directions: torch.Tensor
    direction_variance: torch.Tensor
    direction_snr: torch.Tensor
    band_radius: torch.Tensor
    band_snr: torch.Tensor
    terminal_direction_snr: torch.Tensor
    terminal_band_snr: torch.Tensor
    noise_band_power: torch.Tensor
    joint_snr: torch.Tensor | None = None
    terminal_joint_snr: torch.Tensor | None = None
    terminal_along: torch.Tensor | None = None  # [C] e_j^T S(T-1)^2 e_j

    def offenders(self, threshold: float = SNR_THRESHOLD) -> list[tuple[str, object, float]]:
        """``(kind, index, snr)`` for every band (``"band"``, ring index) and principal direction
        (``"direction"``, 0-based) whose terminal SNR exceeds ``threshold``, and, per band that
        neither flags, its worst principal direction above it among those not flagged
        (``"band_direction"``, ``(ring, j)``), worst first."""
        threshold = float(threshold)
        if not threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {threshold}")
        found = [("band", i, float(v)) for i, v in enumerate(self.terminal_band_snr) if v > threshold]
        found += [("direction", j, float(v)) for j, v in enumerate(self.terminal_direction_snr)
                  if v > threshold]
        if self.terminal_joint_snr is not None:
            bad_bands = {i for kind, i, _ in found if kind == "band"}
            bad_dirs = torch.zeros(self.terminal_joint_snr.shape[1], dtype=torch.bool)
            for kind, j, _ in found:
                if kind == "direction":
                    bad_dirs[j] = True
            for ring, row in enumerate(self.terminal_joint_snr):
                if ring in bad_bands:
                    continue
                row = torch.where(bad_dirs, torch.zeros_like(row), row)
                j = int(row.argmax())
                if row[j] > threshold:
                    found.append(("band_direction", (ring, j), float(row[j])))
        return sorted(found, key=lambda item: -item[2])

    def warnings(self, threshold: float = SNR_THRESHOLD) -> list[str]:
        """One line per offending band, direction or (band, direction) (see :meth:`offenders`),
        naming it and the fix."""
        lines = []
        for kind, index, snr in self.offenders(threshold):
            if kind == "band":
                where, fix = self._band_name(index), self._band_fix(index)
            elif kind == "direction":
                where, fix = self._direction_name(index), self._direction_fix(index)
            else:
                ring, j = index
                where = f"{self._band_name(ring)} {self._direction_name(j)}"
                squeezed = self.terminal_along is not None and float(self.terminal_along[j]) < 1
                fix = self._direction_fix(j) if squeezed else self._band_fix(ring)
            lines.append(f"terminal SNR {snr:.3g} > {threshold:g} at t = {self.T - 1} {where}: "
                         f"x_T still holds data there (variance {1 + snr:.3g} times the shaped "
                         f"prior's), so a sampler started from the prior misses it. Fix: {fix}")
        return lines

    # -- naming and fixes ---------------------------------------------------------------------
    def _band_name(self, ring: int) -> str:
        H, W = self.shape[-2:]
        if ring == 0:
            return f"in the DC band (the plane means) of the {H}x{W} planes"
        n = min(H, W)
        return (f"in the band r = {ring}/{n} cycles/pixel (ring {ring} of "
                f"{self.band_radius.numel() - 1}, r in [{(ring - 0.5) / n:.3g}, "
                f"{(ring + 0.5) / n:.3g}])")

    def _direction_name(self, j: int) -> str:
        v = self.directions[:, j]
        shown = ", ".join(f"{x:+.2f}" for x in v[:8].tolist()) + (", ..." if v.numel() > 8 else "")
        return (f"along principal direction {j + 1} of the data (v = [{shown}], variance "
                f"{float(self.direction_variance[j]):.3g})")

    def _band_fix(self, ring: int) -> str:
        spec, (H, W) = self.spec, self.shape[-2:]
        if self.noise_band_power[ring] == 0:
            return ("the spectral part puts no noise in this band, so its data is never noised: "
                    "widen the band (or use a spectral part that covers every frequency), "
                    + _ZERO_SNR_FIX)
        total = float(self.noise_band_power.sum())
        dc_share = float(self.noise_band_power[0]) / total
        sp = spec.spectral
        hints = []
        if isinstance(sp, PowerLaw) and sp.alpha < 0 and dc_share > 0.5:
            r = reference.radius(H, W, spec.radius)
            floor = 0.5 * float(r[r > 0].min())
            hints.append(f"the DC bin holds {100 * dc_share:.4g}% of the noise power (PowerLaw "
                         f"alpha={sp.alpha:g}, eps={sp.eps:g}): raise the DC floor eps (e.g. "
                         f"eps={floor:.3g}, half the lowest frequency) or use an alpha closer to 0")
        elif isinstance(sp, PowerLaw):
            hints.append(f"an alpha closer to 0 (now {sp.alpha:g}) puts more noise in this band")
        elif sp is not None:
            hints.append("give this band more weight in the spectral part")
        if spec.offset is not None and dc_share > 0.5:
            hints.append(f"a smaller offset strength (now {spec.offset.strength:g})")
        if spec.normalize == "none" and total / (H * W) < 1:
            hints.append("normalize='calibrated' (unit mean noise variance)")
        if not hints:
            hints.append("the data has much power here for this schedule: scale the data down "
                         "(e.g. by the VAE's scaling_factor)")
        return "; ".join(hints) + "; " + _ZERO_SNR_FIX

    def _direction_fix(self, j: int) -> str:
        spec = self.spec
        hints = []
        along = None if self.terminal_along is None else float(self.terminal_along[j])
        if spec.squeeze is not None and along is not None and along < 1:
            hints.append(f"the squeeze ({spec.squeeze.variant}, strength "
                         f"{list(spec.squeeze.strength)}) shrinks the noise variance along it to "
                         f"{along:.3g} of white: a smaller strength (or s < 0, antisqueeze) on "
                         "this axis")
        if spec.normalize == "none" and float(self.noise_band_power.mean()) < 1:
            hints.append("normalize='calibrated' (unit mean noise variance)")
        if not hints:
            hints.append(f"the data's variance along it ({float(self.direction_variance[j]):.3g}) "
                         "is large for this schedule: scale the data down (e.g. by the VAE's "
                         "scaling_factor)")
        return "; ".join(hints) + "; " + _ZERO_SNR_FIX


def terminal_snr(spec: NoiseSpec, schedule, data_stats=None, shape=None, *,
                 timesteps=None) -> TerminalSNR:
    """The SNR of ``x_t`` per principal direction of the data and per frequency band, along t and
    at t = T - 1 (see the module docstring for the formulas).

    Args:
        spec: the :class:`~anisodiff.NoiseSpec`.
        schedule: a VPSchedule, a diffusers VP scheduler or a flow-matching scheduler.
        data_stats: ``fit_statistics(...)``'s ``(ChannelPCA, Spectrum)``, a :class:`DataStatistics`,
            or None for white unit-variance data (then ``shape`` is required).
        shape: ``(C, H, W)`` or ``(C, F, H, W)`` (video: the spatial part acts per frame, so F does
            not enter); default: the data statistics' shape.
        timesteps: the t of the rows of the along-t tables (default: every t of the schedule).

    Returns a :class:`TerminalSNR`; ``.warnings(threshold)`` gives the lines ``anisodiff fit`` and
    ``anisodiff show`` print.
    """
    if not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec: expected anisodiff.NoiseSpec, got {type(spec).__name__}")
    stats = _as_statistics(data_stats, shape, spec)
    C, (H, W) = stats.channels, stats.shape
    a2, b2, times, profile, flow = _coefficients(schedule, spec)
    T = a2.numel()
    ts = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).reshape(-1).long()
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps: must lie in [0, {T - 1}]")

    values, vectors = torch.linalg.eigh(stats.covariance)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    pivot = vectors.abs().argmax(dim=0)
    vectors = vectors * torch.sign(vectors[pivot, torch.arange(C)])

    noise_power = reference.spatial_power(_mean_offset(spec), H, W)  # eigenvalues of Sigma_w
    noise_band = bands.ring_sums(noise_power, bands.ring_index(H, W))

    # S(t)^2 = g^2 (I - V V^T) + V diag(f^2) V^T: its quadratic forms without a [T, C, C] tensor
    V = torch.zeros(C, 0, dtype=torch.float64) if spec.squeeze is None else spec.squeeze.axes
    on_axes = (V.T @ vectors) ** 2  # [k, C]: (v_k . e_j)^2
    cross = stats.band_covariance
    data_joint = None if cross is None else torch.einsum("ci,rcd,di->ri", vectors, cross, vectors)

    def snr_at(t: torch.Tensor):
        g, f = _squeeze_eigenvalues(spec, times[t], profile, flow)
        g2, f2 = g[:, None] ** 2, f**2
        along = g2 * (1 - on_axes.sum(dim=0))[None, :] + f2 @ on_axes  # e_j^T S^2 e_j, [n, C]
        trace = g2[:, 0] * (C - V.shape[1]) + f2.sum(dim=1)            # tr S^2, [n]
        a, b = a2[t][:, None], b2[t][:, None]
        direction = _ratio(a * values[None, :], b * along * noise_power.mean())
        band = _ratio(a * stats.band_power[None, :], b * trace[:, None] * noise_band[None, :])
        joint = None
        if data_joint is not None:  # [n, R + 1, C]
            joint = _ratio(a[:, :, None] * data_joint[None],
                           b[:, :, None] * noise_band[None, :, None] * along[:, None, :])
        return direction, band, joint, along

    direction, band, joint, _ = snr_at(ts)
    t_direction, t_band, t_joint, t_along = snr_at(torch.tensor([T - 1]))
    full_shape = tuple(shape) if shape is not None else (C, H, W)
    return TerminalSNR(spec, full_shape, T, ts, vectors, values, direction,
                       bands.ring_radii(H, W), band, t_direction[0], t_band[0], noise_band,
                       joint, None if t_joint is None else t_joint[0], t_along[0])


def print_warnings(snr: TerminalSNR, threshold: float, command: str) -> int:
    """Print ``snr``'s warnings to stderr, one line each (``anisodiff fit: warning: ...``); returns
    how many."""
    lines = snr.warnings(threshold)
    for line in lines:
        print(f"anisodiff {command}: warning: {line}", file=sys.stderr)
    return len(lines)
