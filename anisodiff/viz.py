"""Seeing the noise: measured versus analytic statistics, and the demo figure.

Three statistics describe what an operator ``A(t) = S(t) (x) T_w`` does to white noise:

* the per-pixel variance along a colour axis ``v`` (``v^T Sigma_c v``, where ``Sigma_c`` is the C x C
  covariance of one pixel's channels) and orthogonal to it: the SDM/HDM squeeze;
* the power spectrum (power per spatial frequency, unit mean for white noise) and the share of the
  power below ``LOW_HIGH_SPLIT`` cycles/pixel: the SAGD weights;
* the relative Frobenius distance between the sample covariance and the analytic one: everything.

The measurements need only torch; the figure needs matplotlib (the ``viz`` extra), imported lazily.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import reference
from .spec import NoiseSpec

__all__ = [
    "LOW_HIGH_SPLIT", "Z_SCORE", "Comparison", "CovarianceCheck", "check_covariance",
    "empirical_covariance", "power_spectrum", "analytic_power_spectrum", "channel_covariance",
    "analytic_channel_covariance", "axis_variances", "radial_average", "low_frequency_share",
    "FigureRow", "figure_row", "format_table", "plot_demo", "TOLERANCE_RULE",
]

LOW_HIGH_SPLIT = 0.25  # cycles/pixel: "low" frequencies are r < 0.25, "high" ones r >= 0.25
Z_SCORE = 5.0          # a check passes within this many standard errors
TOLERANCE_RULE = (
    f"PASS when each measured value lies within {Z_SCORE:g} standard errors of the analytic one "
    "(standard error of a quadratic statistic n^T A n over N draws: sqrt(2 tr((A Sigma)^2) / N), "
    "delta method for the power share) and the relative Frobenius error is below its expected value "
    f"sqrt((||Sigma||^2 + tr(Sigma)^2) / N) / ||Sigma|| plus {Z_SCORE:g} standard deviations; "
    "all standard errors come from the analytic Sigma, so they shrink as 1/sqrt(N)")


# ---------------------------------------------------------------------------------------------
# 1. Covariance check on a small shape (dense Sigma)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """An analytic value, its measured estimate and the allowed distance between them."""

    analytic: float
    measured: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return abs(self.measured - self.analytic) <= self.tolerance

    def to_dict(self) -> dict:
        return {"analytic": self.analytic, "measured": self.measured, "tolerance": self.tolerance,
                "passed": self.passed}


@dataclass(frozen=True)
class CovarianceCheck:
    """Measured versus analytic covariance of one operator (see :func:`check_covariance`)."""

    rel_error: float
    rel_error_tolerance: float
    axis_variance: Comparison
    orthogonal_variance: Comparison
    low_share: Comparison

    @property
    def passed(self) -> bool:
        return (self.rel_error <= self.rel_error_tolerance and self.axis_variance.passed
                and self.orthogonal_variance.passed and self.low_share.passed)

    def to_dict(self) -> dict:
        return {
            "rel_frobenius_error": {"measured": self.rel_error, "tolerance": self.rel_error_tolerance},
            "axis_variance": self.axis_variance.to_dict(),
            "orthogonal_variance": self.orthogonal_variance.to_dict(),
            "low_frequency_share": self.low_share.to_dict(),
            "high_frequency_share": {"analytic": 1.0 - self.low_share.analytic,
                                     "measured": 1.0 - self.low_share.measured},
            "status": "PASS" if self.passed else "FAIL",
        }


def empirical_covariance(chunks) -> tuple[torch.Tensor, int]:
    """Zero-mean sample covariance ``sum x x^T / N`` (float64) of flattened samples, accumulated
    over an iterable of ``[b, C, H, W]`` chunks. Returns ``(Sigma_emp, N)``."""
    gram, count = None, 0
    for chunk in chunks:
        x = chunk.reshape(chunk.shape[0], -1).double()
        gram = x.T @ x if gram is None else gram + x.T @ x
        count += x.shape[0]
    if gram is None:
        raise ValueError("chunks: no samples")
    return gram / count, count


def _quadratic_check(sigma, sigma_emp, n_samples, numerator, denominator=None) -> Comparison:
    """``q = tr(num Sigma) / tr(den Sigma)`` (den = none: ``q = tr(num Sigma)``), analytic versus
    measured. Standard error by the delta method: ``B = (num - q den) / tr(den Sigma)``,
    ``se = sqrt(2 tr((B Sigma)^2) / N)``."""
    analytic = torch.trace(numerator @ sigma)
    measured = torch.trace(numerator @ sigma_emp)
    scale = 1.0
    if denominator is not None:
        scale = torch.trace(denominator @ sigma)
        analytic = analytic / scale
        measured = measured / torch.trace(denominator @ sigma_emp)
    b = numerator if denominator is None else numerator - analytic * denominator
    bs = (b @ sigma) / scale
    se = math.sqrt(2.0 * float((bs * bs.T).sum()) / n_samples)
    return Comparison(float(analytic), float(measured), Z_SCORE * se)


def _low_pass_projector(H: int, W: int) -> torch.Tensor:
    """``[HW, HW]`` real matrix that keeps the frequencies with ``r < LOW_HIGH_SPLIT``."""
    mask = (reference.radius(H, W) < LOW_HIGH_SPLIT).double()
    basis = torch.eye(H * W, dtype=torch.float64).reshape(H * W, H, W)
    return reference.filter_planes(basis, mask).reshape(H * W, H * W)


def check_covariance(sigma: torch.Tensor, sigma_emp: torch.Tensor, n_samples: int,
                     axis: torch.Tensor, shape) -> CovarianceCheck:
    """Compare a sample covariance with the analytic ``Sigma`` (both ``[CHW, CHW]``, float64).

    Args:
        sigma: analytic covariance (``anisodiff.covariance``).
        sigma_emp: zero-mean sample covariance of ``n_samples`` draws.
        axis: unit colour axis ``v`` (``[C]``) for the along/orthogonal variances.
        shape: ``(C, H, W)``.
    """
    C, H, W = shape
    HW = H * W
    v = axis.double().reshape(C, 1)
    eye_hw = torch.eye(HW, dtype=torch.float64)
    along = torch.kron(v @ v.T, eye_hw) / HW
    orthogonal = torch.kron(torch.eye(C, dtype=torch.float64) - v @ v.T, eye_hw) / ((C - 1) * HW)
    low = torch.kron(torch.eye(C, dtype=torch.float64), _low_pass_projector(H, W))

    fro2 = float((sigma * sigma).sum())
    tr = float(torch.trace(sigma))
    fro4 = float(((sigma @ sigma) ** 2).sum())
    expected = math.sqrt((fro2 + tr * tr) / n_samples / fro2)
    rel_sd = math.sqrt(fro2 * fro2 + fro4) / (fro2 + tr * tr)  # of ||Sigma_emp - Sigma||
    rel_error = float(torch.linalg.norm(sigma_emp - sigma) / math.sqrt(fro2))
    return CovarianceCheck(
        rel_error=rel_error,
        rel_error_tolerance=expected * (1.0 + Z_SCORE * rel_sd),
        axis_variance=_quadratic_check(sigma, sigma_emp, n_samples, along),
        orthogonal_variance=_quadratic_check(sigma, sigma_emp, n_samples, orthogonal),
        low_share=_quadratic_check(sigma, sigma_emp, n_samples, low,
                                   torch.eye(C * HW, dtype=torch.float64)),
    )


def format_table(checks: dict[str, CovarianceCheck], axis_name: str) -> str:
    """The covariance checks as a fixed-width text table."""
    head = (f"{'':12s} {'rel. error':>15s}   {'variance along ' + axis_name:^24s}   "
            f"{'variance orthogonal':^24s}   {'power low:high (r<0.25)':^25s}\n"
            f"{'operator':12s} {'meas.':>6s} {'(max)':>8s}   {'exact':>7s} {'meas.':>7s} {'(+-tol)':>8s}   "
            f"{'exact':>7s} {'meas.':>7s} {'(+-tol)':>8s}   {'exact':>9s} {'meas.':>9s} {'(+-tol)':>5s}"
            f"   result")
    rows = [head, "-" * len(head.splitlines()[1])]
    for name, c in checks.items():
        a, o, lo = c.axis_variance, c.orthogonal_variance, c.low_share
        rows.append(
            f"{name:12s} {c.rel_error:6.4f} ({c.rel_error_tolerance:6.4f})   "
            f"{a.analytic:7.4f} {a.measured:7.4f} ({a.tolerance:6.4f})   "
            f"{o.analytic:7.4f} {o.measured:7.4f} ({o.tolerance:6.4f})   "
            f"{_share(lo.analytic):>9s} {_share(lo.measured):>9s} ({100 * lo.tolerance:4.1f})   "
            f"{'PASS' if c.passed else 'FAIL'}")
    return "\n".join(rows)


def _share(low: float) -> str:
    return f"{100 * low:.1f}:{100 * (1 - low):.1f}"


# ---------------------------------------------------------------------------------------------
# 2. Spectra and channel variances on any plane size (no dense Sigma)
# ---------------------------------------------------------------------------------------------
def power_spectrum(samples: torch.Tensor) -> torch.Tensor:
    """Measured power per frequency bin ``[H, W]`` (unshifted fftfreq grid), averaged over batch and
    channels, scaled so that its mean is the per-pixel variance (white unit noise: 1 everywhere)."""
    H, W = samples.shape[-2:]
    return (torch.fft.fft2(samples.double()).abs() ** 2).mean(dim=(0, 1)) / (H * W)


def _spatial_power(spec: NoiseSpec, H: int, W: int) -> torch.Tensor:
    """Per-channel power of the spatial factor ``T_w`` per bin, ``sum_d gamma_d^2 c_d^2 w_d^2``
    (``"per_sample"`` normalisation is taken as its expectation, the calibrated value)."""
    sw = reference.spectral_weights(spec, H, W)
    if sw is None:
        return torch.ones(H, W, dtype=torch.float64)
    weights, gammas = sw
    power = torch.zeros(H, W, dtype=torch.float64)
    for w, gamma in zip(weights, gammas):
        c = 1.0 if spec.normalize == "none" else reference.calibration(w)
        power += (gamma * c * w) ** 2
    return power


def _channel_gain(spec: NoiseSpec, channels: int, timestep: int, schedule) -> torch.Tensor:
    """``S(t) S(t)^T`` (``[C, C]``, float64); the identity without a squeeze."""
    if spec.squeeze is None:
        return torch.eye(channels, dtype=torch.float64)
    r = reference.squeeze_strengths(spec.squeeze, torch.tensor([timestep]), schedule)
    S = reference.squeeze_matrices(spec.squeeze, r)[0]
    return S @ S.T


def analytic_channel_covariance(spec: NoiseSpec, channels: int, H: int, W: int, *, timestep: int,
                                schedule) -> torch.Tensor:
    """Per-pixel channel covariance ``S(t) S(t)^T`` times the per-pixel spatial variance
    (``[C, C]``, float64)."""
    return _channel_gain(spec, channels, timestep, schedule) * float(_spatial_power(spec, H, W).mean())


def analytic_power_spectrum(spec: NoiseSpec, channels: int, H: int, W: int, *, timestep: int,
                            schedule) -> torch.Tensor:
    """Analytic counterpart of :func:`power_spectrum`: the spatial power per bin times the mean
    channel gain ``tr(S S^T) / C``."""
    gain = float(torch.trace(_channel_gain(spec, channels, timestep, schedule))) / channels
    return _spatial_power(spec, H, W) * gain


def channel_covariance(samples: torch.Tensor) -> torch.Tensor:
    """Measured per-pixel channel covariance ``[C, C]`` (zero mean, averaged over batch and pixels)."""
    B, C, H, W = samples.shape
    x = samples.double()
    return torch.einsum("bchw,bdhw->cd", x, x) / (B * H * W)


def axis_variances(cov: torch.Tensor, axis: torch.Tensor) -> tuple[float, float]:
    """``(v^T cov v, mean variance over the directions orthogonal to v)`` for a unit axis v."""
    v = axis.double().reshape(-1)
    along = float(v @ cov @ v)
    return along, (float(torch.trace(cov)) - along) / (cov.shape[0] - 1)


def radial_average(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean power in rings of equal width ``1 / min(H, W)`` cycles/pixel, DC excluded.
    Returns ``(ring centres, mean power)`` for the non-empty rings."""
    H, W = power.shape
    r = reference.radius(H, W).reshape(-1)
    width = 1.0 / min(H, W)
    index = torch.round(r / width).long()
    keep = index > 0
    count = torch.bincount(index[keep], minlength=int(index.max()) + 1)
    total = torch.bincount(index[keep], weights=power.reshape(-1)[keep], minlength=count.numel())
    nonempty = count > 0
    centres = torch.arange(count.numel(), dtype=torch.float64) * width
    return centres[nonempty], total[nonempty] / count[nonempty]


def low_frequency_share(power: torch.Tensor) -> float:
    """Share of the power at ``r < LOW_HIGH_SPLIT`` cycles/pixel."""
    H, W = power.shape
    return float(power[reference.radius(H, W) < LOW_HIGH_SPLIT].sum() / power.sum())


# ---------------------------------------------------------------------------------------------
# 3. The demo figure
# ---------------------------------------------------------------------------------------------
@dataclass
class FigureRow:
    """What the figure shows for one operator (see :func:`figure_row`)."""

    title: str
    caption: str
    sample: torch.Tensor            # [C, H, W], one draw
    power_measured: torch.Tensor    # [H, W]
    power_analytic: torch.Tensor    # [H, W]
    axis_variance: tuple[float, float]         # (analytic, measured)
    orthogonal_variance: tuple[float, float]   # (analytic, measured)


def figure_row(title: str, caption: str, spec: NoiseSpec, samples: torch.Tensor, axis: torch.Tensor,
               *, timestep: int, schedule) -> FigureRow:
    """Measure ``samples`` (``[B, C, H, W]``, drawn with ``spec`` at ``timestep``) for the figure."""
    _, C, H, W = samples.shape
    exact = analytic_channel_covariance(spec, C, H, W, timestep=timestep, schedule=schedule)
    exact_along, exact_orth = axis_variances(exact, axis)
    meas_along, meas_orth = axis_variances(channel_covariance(samples), axis)
    return FigureRow(title, caption, samples[0], power_spectrum(samples),
                     analytic_power_spectrum(spec, C, H, W, timestep=timestep, schedule=schedule),
                     (exact_along, meas_along), (exact_orth, meas_orth))


def _display_rgb(sample: torch.Tensor):
    """``[3, H, W]`` noise as an ``[H, W, 3]`` image in [0, 1]: one 1st-99th percentile stretch
    shared by the channels, so colour balance is kept."""
    x = sample.double()
    lo, hi = torch.quantile(x.reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float64))
    return ((x - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_demo(rows: list[FigureRow], path, axis_name: str, dpi: int = 72) -> str:
    """Draw one row per operator (sample, radial spectrum, 2-D spectrum, colour variances) and
    save a PNG to ``path``. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(rows), 4, figsize=(15, 3.3 * len(rows)),
                             gridspec_kw={"width_ratios": [1, 1.5, 1.2, 1.1]}, squeeze=False)
    for ax_row, row in zip(axes, rows):
        _plot_sample(ax_row[0], row)
        _plot_radial(ax_row[1], row)
        image = _plot_power_2d(ax_row[2], row, np)
        fig.colorbar(image, ax=ax_row[2], fraction=0.046, pad=0.03, label="log10 power")
        _plot_variances(ax_row[3], row, axis_name)
    fig.suptitle("anisodiff demo: the same white noise through five forward-noise operators "
                 "(C = 3 colour channels, linear VP schedule, t = 999)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def _plot_sample(ax, row: FigureRow) -> None:
    ax.imshow(_display_rgb(row.sample), interpolation="nearest")
    ax.set_title(f"{row.title}\n{row.caption}", fontsize=9, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_radial(ax, row: FigureRow) -> None:
    r, measured = radial_average(row.power_measured)
    _, exact = radial_average(row.power_analytic)
    ax.loglog(r, exact.clamp_min(1e-3), "k-", lw=1.5, label="analytic")
    ax.loglog(r, measured.clamp_min(1e-3), "o", ms=3, color="tab:orange", label="measured")
    ax.axhline(1.0, color="0.6", ls=":", lw=1, label="white noise")
    ax.axvline(LOW_HIGH_SPLIT, color="tab:blue", ls="--", lw=1)
    low_m, low_a = low_frequency_share(row.power_measured), low_frequency_share(row.power_analytic)
    ax.text(0.03, 0.05, f"power below r = {LOW_HIGH_SPLIT}: {100 * low_m:.0f}% "
            f"(analytic {100 * low_a:.0f}%)", transform=ax.transAxes, fontsize=8, color="tab:blue")
    ax.set_ylim(3e-3, 3e1)
    ax.set_xlabel("radial frequency r (cycles/pixel)", fontsize=8)
    ax.set_ylabel("power per frequency", fontsize=8)
    ax.set_title("radially averaged power spectrum", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")


def _plot_power_2d(ax, row: FigureRow, np):
    power = torch.fft.fftshift(row.power_measured).numpy()
    image = ax.imshow(np.log10(np.maximum(power, 1e-3)), cmap="magma", vmin=-2, vmax=1.5,
                      extent=(-0.5, 0.5, 0.5, -0.5), interpolation="nearest")
    ax.set_title("2-D power spectrum (measured; DC at centre)", fontsize=9)
    ax.set_xlabel("f_x (cycles/pixel)", fontsize=8)
    ax.set_ylabel("f_y", fontsize=8)
    ax.tick_params(labelsize=7)
    return image


def _plot_variances(ax, row: FigureRow, axis_name: str) -> None:
    labels = [f"along {axis_name}\n(luminance)", "orthogonal\n(colour)"]
    exact = [row.axis_variance[0], row.orthogonal_variance[0]]
    measured = [row.axis_variance[1], row.orthogonal_variance[1]]
    ax.bar([0, 1], measured, width=0.55, color=["0.55", "tab:purple"], label="measured")
    ax.hlines(exact, [-0.35, 0.65], [0.35, 1.35], colors="k", lw=2, label="analytic")
    for x, value in enumerate(measured):
        ax.text(x, value + 0.05, f"{value:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="0.6", ls=":", lw=1)
    ax.set_xticks([0, 1], labels, fontsize=8)
    ax.set_ylim(0, 2.7)
    ax.set_ylabel("per-pixel variance", fontsize=8)
    ax.set_title("noise variance per colour direction", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
