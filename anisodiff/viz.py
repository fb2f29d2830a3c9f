"""Seeing the noise: measured versus analytic statistics, and the demo figure.

Three statistics describe what an operator ``A(t) = S(t) (x) T_w`` does to white noise:

* the per-pixel variance along a colour axis ``v`` (``v^T Sigma_c v``, where ``Sigma_c`` is the
  C x C covariance of one pixel's channels) and orthogonal to it: the SDM/HDM squeeze;
* the power spectrum (power per spatial frequency, unit mean for white noise) and the share of the
  power below ``LOW_HIGH_SPLIT`` cycles/pixel: the SAGD weights;
* the relative Frobenius distance between the sample covariance and the analytic one: everything.

The measurements need only torch; the figure needs matplotlib (the ``viz`` extra), imported lazily.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import torch

from . import reference
from .spec import NoiseSpec

__all__ = [
    "LOW_HIGH_SPLIT", "Z_SCORE", "Comparison", "CovarianceCheck", "check_covariance",
    "empirical_covariance", "power_spectrum", "analytic_power_spectrum", "channel_covariance",
    "analytic_channel_covariance", "axis_variances", "radial_average", "low_frequency_share",
    "FigureRow", "figure_row", "format_table", "plot_demo", "TOLERANCE_RULE", "plot_sample_grid",
    "plot_radial_spectra",
]

LOW_HIGH_SPLIT = 0.25  # cycles/pixel: "low" frequencies are r < 0.25, "high" ones r >= 0.25
Z_SCORE = 5.0          # a check passes within this many standard errors
DISPLAY_CROP = 64      # the sample panels show at most this many pixels a side
TOLERANCE_RULE = (
    f"PASS when each measured value lies within {Z_SCORE:g} standard errors of the analytic one "
    "(standard error of a quadratic statistic n^T A n over N draws: sqrt(2 tr((A Sigma)^2) / N), "
    "delta method for the power share) and the relative Frobenius error is below its expected "
    f"value sqrt((||Sigma||^2 + tr(Sigma)^2) / N) / ||Sigma|| plus {Z_SCORE:g} standard "
    "deviations; all standard errors come from the analytic Sigma, so they shrink as 1/sqrt(N)")


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
            "rel_frobenius_error": {"measured": self.rel_error,
                                    "tolerance": self.rel_error_tolerance},
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


def format_table(checks: dict[str, CovarianceCheck]) -> str:
    """The covariance checks as a fixed-width text table, one row per operator (v: the axis)."""
    split = f"{LOW_HIGH_SPLIT:g}"
    groups = [("", ["operator"]), ("rel. error", ["meas.", "max"]),
              ("variance along v", ["exact", "meas.", "+-tol"]),
              ("variance orthogonal to v", ["exact", "meas.", "+-tol"]),
              (f"% power r<{split} : r>={split}", ["exact", "meas.", "+-tol"]), ("", ["result"])]
    rows = []
    for name, c in checks.items():
        a, o, lo = c.axis_variance, c.orthogonal_variance, c.low_share
        rows.append([[name], [f"{c.rel_error:.4f}", f"{c.rel_error_tolerance:.4f}"],
                     [f"{a.analytic:.4f}", f"{a.measured:.4f}", f"{a.tolerance:.4f}"],
                     [f"{o.analytic:.4f}", f"{o.measured:.4f}", f"{o.tolerance:.4f}"],
                     [_share(lo.analytic), _share(lo.measured), f"{100 * lo.tolerance:.2f}"],
                     ["PASS" if c.passed else "FAIL"]])
    widths = [[max(len(head), *(len(r[g][i]) for r in rows)) for i, head in enumerate(cols)]
              for g, (_, cols) in enumerate(groups)]
    for (title, _), ws in zip(groups, widths):  # widen a group's columns to fit its title
        missing = len(title) - (sum(ws) + len(ws) - 1)
        for i in range(max(0, missing)):
            ws[i % len(ws)] += 1

    def line(cells) -> str:
        first, *rest = zip(cells, widths)
        return "   ".join([first[0][0].ljust(first[1][0])] + [
            " ".join(c.rjust(w) for c, w in zip(group, ws)) for group, ws in rest])

    spans = ["   ".join(title.center(sum(ws) + len(ws) - 1)
                        for (title, _), ws in zip(groups, widths))]
    header = line([cols for _, cols in groups])
    body = [line(r) for r in rows]
    return "\n".join(text.rstrip() for text in spans + [header, "-" * len(header)] + body)


def _share(low: float) -> str:
    return f"{100 * low:.1f} : {100 * (1 - low):.1f}"


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
    spatial_variance = float(_spatial_power(spec, H, W).mean())
    return _channel_gain(spec, channels, timestep, schedule) * spatial_variance


def analytic_power_spectrum(spec: NoiseSpec, channels: int, H: int, W: int, *, timestep: int,
                            schedule) -> torch.Tensor:
    """Analytic counterpart of :func:`power_spectrum`: the spatial power per bin times the mean
    channel gain ``tr(S S^T) / C``."""
    gain = float(torch.trace(_channel_gain(spec, channels, timestep, schedule))) / channels
    return _spatial_power(spec, H, W) * gain


def channel_covariance(samples: torch.Tensor) -> torch.Tensor:
    """Measured per-pixel channel covariance ``[C, C]`` (zero mean; mean over batch and pixels)."""
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
    """Measure ``samples`` (``[B, C, H, W]`` drawn with ``spec`` at ``timestep``) for the figure."""
    _, C, H, W = samples.shape
    exact = analytic_channel_covariance(spec, C, H, W, timestep=timestep, schedule=schedule)
    exact_along, exact_orth = axis_variances(exact, axis)
    meas_along, meas_orth = axis_variances(channel_covariance(samples), axis)
    return FigureRow(title, caption, samples[0], power_spectrum(samples),
                     analytic_power_spectrum(spec, C, H, W, timestep=timestep, schedule=schedule),
                     (exact_along, meas_along), (exact_orth, meas_orth))


def _crop(sample: torch.Tensor) -> torch.Tensor:
    return sample[..., :DISPLAY_CROP, :DISPLAY_CROP]


def _display_image(sample: torch.Tensor):
    """``[C, H, W]`` noise as an image in [0, 1] with a 1st-99th percentile stretch: ``[H, W, 3]`` RGB
    for C = 3 (one stretch shared by the channels, so colour balance is kept), else channel 0 as an
    ``[H, W]`` grey image."""
    x = sample.double() if sample.shape[0] == 3 else sample[0].double()
    lo, hi = torch.quantile(x.reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float64))
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return (x.permute(1, 2, 0) if x.dim() == 3 else x).numpy()


def _orthogonal_direction(v: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A unit colour direction orthogonal to the unit axis ``v`` and its label: channel 0 minus
    channel 1 (red - green for RGB), else the first channel direction not parallel to ``v``; its
    ``v`` component removed (then marked "⊥ v" in the label). Needs C >= 2."""
    C = v.numel()
    if C < 2:
        raise ValueError("a colour direction orthogonal to the axis needs C >= 2 channels")
    eye = torch.eye(C, dtype=torch.float64)
    if C == 3:
        names = ("red - green", "red", "green", "blue")
    else:
        names = ("channel 0 - channel 1", *(f"channel {i}" for i in range(C)))
    candidates = [(c - (c @ v) * v, float(c @ v), name)
                  for c, name in zip([eye[0] - eye[1], *eye], names)]
    u, along, name = next(item for item in candidates if item[0].norm() > 1e-6)
    return u / u.norm(), name if abs(along) < 1e-9 else f"{name}, ⊥ v"


def plot_demo(rows: list[FigureRow], path, *, title: str, axis: torch.Tensor, axis_name: str,
              dpi: int = 72) -> str:
    """Save a PNG with one row per operator: a sample as an RGB image, its pixels in colour space
    (along ``axis`` against an orthogonal colour direction), the radially averaged and the 2-D
    power spectrum. Needs matplotlib; the samples need C >= 2 channels (C = 3 is drawn as RGB,
    others as channel 0). Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 3.5 * len(rows)), layout="constrained")
    fig.suptitle(title, fontsize=14)
    for subfig, row in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
        subfig.suptitle(f"{row.title}  —  {row.caption}", x=0.01, ha="left", fontsize=12,
                        fontweight="bold")
        axes = subfig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1.5, 1.15]})
        _plot_sample(axes[0], row)
        _plot_colours(axes[1], row, axis, axis_name)
        _plot_radial(axes[2], row)
        image = _plot_power_2d(axes[3], row)
        subfig.colorbar(image, ax=axes[3], shrink=0.9, label="log10 power")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def _plot_sample(ax, row: FigureRow) -> None:
    shown = _crop(row.sample)
    ax.imshow(_display_image(shown), interpolation="nearest", cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    crop = "" if shown.shape == row.sample.shape else f" ({shown.shape[-2]}x{shown.shape[-1]} crop)"
    what = "an RGB image" if shown.shape[0] == 3 else "channel 0"
    ax.set_title(f"one sample as {what}{crop}", fontsize=9)


def _plot_colours(ax, row: FigureRow, axis: torch.Tensor, axis_name: str) -> None:
    """Scatter of the pixels' component along ``axis`` against one orthogonal colour component,
    with the analytic 2-sigma ellipse."""
    v = axis.double().reshape(-1)
    u, u_name = _orthogonal_direction(v)
    pixels = _crop(row.sample).double().reshape(v.numel(), -1)
    ax.plot(u @ pixels, v @ pixels, ".", ms=1.5, alpha=0.4, color="tab:purple")
    (along, along_m), (orth, orth_m) = row.axis_variance, row.orthogonal_variance
    angle = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    ax.plot(2 * math.sqrt(orth) * torch.cos(angle), 2 * math.sqrt(along) * torch.sin(angle), "k--",
            lw=1.2, label="analytic 2-sigma")
    ax.text(0.03, 0.97, f"variance along v: {along_m:.2f} (exact {along:.2f})\n"
            f"orthogonal: {orth_m:.2f} (exact {orth:.2f})", transform=ax.transAxes, va="top",
            fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_xlim(-5, 5)
    ax.set_ylim(-5, 5)
    ax.set_aspect("equal")
    ax.set_title("the pixels of that image in colour space", fontsize=9)
    ax.set_xlabel(f"colour component ({u_name})", fontsize=8)
    ax.set_ylabel(f"component along v = {axis_name}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")


def _plot_radial(ax, row: FigureRow) -> None:
    from matplotlib.ticker import NullFormatter

    r, measured = radial_average(row.power_measured)
    _, exact = radial_average(row.power_analytic)
    ax.loglog(r, exact.clamp_min(1e-3), "k-", lw=1.5, label="analytic")
    ax.loglog(r, measured.clamp_min(1e-3), "o", ms=3, color="tab:orange", label="measured")
    ax.axhline(1.0, color="0.6", ls=":", lw=1, label="white noise")
    ax.axvline(LOW_HIGH_SPLIT, color="tab:blue", ls="--", lw=1)
    low_m, low_a = low_frequency_share(row.power_measured), low_frequency_share(row.power_analytic)
    ax.text(0.03, 0.04, f"{100 * low_m:.0f}% of the power at r < {LOW_HIGH_SPLIT} "
            f"(analytic {100 * low_a:.0f}%)", transform=ax.transAxes, fontsize=8, color="tab:blue")
    ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.5], ["0.02", "0.05", "0.1", "0.2", "0.5"])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0.8 * float(r[0]), 0.75)
    values = torch.cat([exact, measured])
    shown = values[values > 1e-3]  # bins at the 1e-3 floor (empty bands) stay below the axis
    low = 0.5 * float(shown.min()) if shown.numel() else 3e-3
    ax.set_ylim(min(3e-3, low), max(3e1, 2.0 * float(values.max())))
    ax.set_title("radially averaged power spectrum", fontsize=9)
    ax.set_xlabel("radial frequency r (cycles/pixel)", fontsize=8)
    ax.set_ylabel("power per frequency", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")


def _plot_power_2d(ax, row: FigureRow):
    H, W = row.power_measured.shape
    power = torch.fft.fftshift(row.power_measured).clamp_min(1e-3).log10().numpy()
    fy, fx = (torch.fft.fftshift(torch.fft.fftfreq(n)) for n in (H, W))
    extent = (fx[0] - 0.5 / W, fx[-1] + 0.5 / W, fy[-1] + 0.5 / H, fy[0] - 0.5 / H)  # bin edges
    image = ax.imshow(power, cmap="magma", vmin=-2, vmax=1.5, extent=[float(e) for e in extent])
    ax.set_title("2-D power spectrum, measured (centre = DC)", fontsize=9)
    ax.set_xlabel("f_x (cycles/pixel)", fontsize=8)
    ax.set_ylabel("f_y (cycles/pixel)", fontsize=8)
    ax.tick_params(labelsize=7)
    return image


# ---------------------------------------------------------------------------------------------
# 4. The training demo's figures
# ---------------------------------------------------------------------------------------------
def _montage(images: torch.Tensor, gap: int = 1):
    """``[n, 3, H, W]`` images in ``[-1, 1]`` side by side, ``gap`` white pixels apart, as an
    ``[H, n (W + gap) - gap, 3]`` array in [0, 1]. Values are clipped, never stretched, so every row
    of a figure shares one colour scale."""
    n, _, H, W = images.shape
    canvas = torch.ones(3, H, n * (W + gap) - gap, dtype=torch.float64)
    for i, image in enumerate(images.double()):
        canvas[:, :, i * (W + gap):i * (W + gap) + W] = ((image + 1) / 2).clamp(0, 1)
    return canvas.permute(1, 2, 0).numpy()


def plot_sample_grid(rows: list[tuple[str, torch.Tensor]], path, *, title: str,
                     dpi: int = 100) -> str:
    """Save a PNG with one row of images per ``(label, [n, 3, H, W] images in [-1, 1])``. Needs
    matplotlib. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(images.shape[0] for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(8.0, 0.75 * n), 1.25 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    fig.suptitle(textwrap.fill(title, width=int(14 * fig.get_figwidth())), fontsize=10)
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(_montage(images), interpolation="nearest")
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_axis_off()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def plot_radial_spectra(radii: torch.Tensor, real: torch.Tensor, generated: dict, path, *,
                        title: str, floor: torch.Tensor | None = None, dpi: int = 100) -> str:
    """Save a PNG with two panels: the radially averaged power spectra of the real images and of
    each generated set (``{label: power}``), and their ratio to the real one (``floor``: the ratio
    of a second real set, what sampling alone gives). Needs matplotlib. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, ScalarFormatter

    r = torch.as_tensor(radii, dtype=torch.float64).numpy()
    real = torch.as_tensor(real, dtype=torch.float64)
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    fig.suptitle(textwrap.fill(title, width=180), fontsize=10)
    ax_p.loglog(r, real.numpy(), "k-", lw=2.5, label="real (held-out)")
    ax_r.axhline(1.0, color="k", lw=1.5)
    if floor is not None:
        ratio = torch.as_tensor(floor, dtype=torch.float64) / real
        ax_r.loglog(r, ratio.numpy(), color="0.6", ls="--", lw=1.2,
                    label="a second real set (sampling noise)")
    markers = "osD^v<>"
    for i, (label, power) in enumerate(generated.items()):
        power = torch.as_tensor(power, dtype=torch.float64)
        style = {"marker": markers[i % len(markers)], "ms": 4, "lw": 1.2, "label": label}
        ax_p.loglog(r, power.numpy(), **style)
        ax_r.loglog(r, (power / real).numpy(), **style)
    ax_p.set_title("power per frequency (image and channel average)", fontsize=9)
    ax_p.set_ylabel("power", fontsize=8)
    ax_r.set_title("generated / real (1 = exact)", fontsize=9)
    ax_r.set_ylabel("ratio", fontsize=8)
    low, high = ax_r.get_ylim()
    ax_r.yaxis.set_major_formatter(ScalarFormatter())
    # label the minor ticks (0.8, 0.9, 1.1 ...) only where they do not crowd
    minor = FormatStrFormatter("%.1f") if high / low < 4 else NullFormatter()
    ax_r.yaxis.set_minor_formatter(minor)
    ticks = [x for x in (0.02, 0.05, 0.1, 0.2, 0.5) if r[0] / 1.2 <= x <= r[-1] * 1.2]
    for ax in (ax_p, ax_r):
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(r[0] / 1.15, r[-1] * 1.15)
        ax.set_xlabel("radial frequency r (cycles/pixel)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
