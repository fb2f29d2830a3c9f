"""``anisodiff show``: the noise of a spec JSON, drawn at a few timesteps of the linear VP schedule
(T = 1000): one sample, its pixels in colour space along the first squeeze axis, and the radial and
2-D power spectra, each against the analytic value (:mod:`anisodiff.viz` draws the picture)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from . import reference, viz
from ._argtypes import UsageError
from ._progress import progress
from .ops import shaped_noise
from .schedule import VPSchedule
from .spec import NoiseSpec, PowerLaw, SpectralTable

__all__ = ["SHOW_T", "SHOW_SIZE", "run"]

SHOW_T = 1000  # show uses VPSchedule.linear(T=1000)
SHOW_SIZE = 64


def _show_shape(spec: NoiseSpec, channels: int | None, size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` from the spec and the options; a UsageError where they disagree."""
    C = channels or (spec.squeeze.channels if spec.squeeze is not None else 3)
    if spec.squeeze is not None and C != spec.squeeze.channels:
        raise UsageError(f"--channels {C}: the spec's squeeze has {spec.squeeze.channels} channels")
    if C < 2:
        raise UsageError("show needs at least 2 channels (the colour panel plots two directions)")
    H = W = size or SHOW_SIZE
    if isinstance(spec.spectral, SpectralTable):
        table_hw = spec.spectral.shape
        if size is not None and (H, W) != table_hw:
            raise UsageError(f"--size {size}: the spec's SpectralTable is "
                             f"{table_hw[0]}x{table_hw[1]}")
        H, W = table_hw
    return C, H, W


def _show_axis(spec: NoiseSpec, C: int) -> tuple[torch.Tensor, str]:
    """The first squeeze axis (else the luminance axis) and its label."""
    if spec.squeeze is None:
        return torch.ones(C, dtype=torch.float64) / math.sqrt(C), f"(1,...,1)/√{C}"
    v = spec.squeeze.axes[:, 0]
    return v, "v1 = (" + ", ".join(f"{x:.2f}" for x in v.tolist()) + ")"


def _show_caption(spec: NoiseSpec, t: int, schedule) -> str:
    parts = []
    if spec.squeeze is not None:
        r = reference.squeeze_strengths(spec.squeeze, torch.tensor([t]), schedule)[0]
        parts.append(f"{spec.squeeze.variant} squeeze r(t) = "
                     + ", ".join(f"{x:+.3f}" for x in r.tolist()))
    if isinstance(spec.spectral, PowerLaw):
        parts.append(f"power law alpha = {spec.spectral.alpha:.3f}, eps = {spec.spectral.eps:.3g}")
    elif spec.spectral is not None:
        parts.append(repr(spec.spectral))
    return "; ".join(parts) or "white noise"


def _show_rows(spec: NoiseSpec, shape, timesteps, seed: int, schedule,
               axis) -> list[viz.FigureRow]:
    C, H, W = shape
    batch = max(16, min(256, 2**21 // (C * H * W)))
    steps = timesteps if spec.time_varying else timesteps[:1]
    bar = progress(len(steps), "drawing noise")
    rows = []
    try:
        for t in steps:
            title = f"t = {t}" if spec.time_varying else "every t (this spec does not change with t)"
            samples = shaped_noise((batch, C, H, W), spec, timesteps=t, schedule=schedule,
                                   seed=seed)
            rows.append(viz.figure_row(title, _show_caption(spec, t, schedule), spec, samples,
                                       axis, timestep=t, schedule=schedule))
            bar.update()
    finally:
        bar.close()
    return rows


def _print_rows(rows: list[viz.FigureRow], rows_power) -> None:
    split = viz.LOW_HIGH_SPLIT
    for row, (measured, exact) in zip(rows, rows_power):
        (along, along_m), (orth, orth_m) = row.axis_variance, row.orthogonal_variance
        print(f"  {row.title}: variance along the axis {along_m:.4f} (exact {along:.4f}), "
              f"orthogonal {orth_m:.4f} (exact {orth:.4f}), power at r < {split}: "
              f"{100 * measured:.1f}% (exact {100 * exact:.1f}%)")


def run(spec_path: str, out: Path, *, timesteps=(0, 500, 999), size: int | None = None,
        channels: int | None = None, seed: int = 0) -> int:
    """``anisodiff show``: draw the noise of the spec JSON at ``spec_path`` at ``timesteps`` (once
    for a spec that does not change with t), print the measured and exact statistics and save the
    picture to ``out``. Returns the exit code (1: no matplotlib); a bad spec or option raises
    :class:`~anisodiff._argtypes.UsageError`."""
    out = Path(out)
    try:
        spec = NoiseSpec.load(spec_path)
    except OSError as exc:
        raise UsageError(f"{spec_path}: cannot read the spec ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except (KeyError, TypeError) as exc:  # a field missing or of the wrong type
        raise UsageError(f"{spec_path}: not a valid spec ({type(exc).__name__}: {exc})") from None
    C, H, W = shape = _show_shape(spec, channels, size)
    schedule = VPSchedule.linear(T=SHOW_T)
    axis, axis_name = _show_axis(spec, C)
    try:
        rows = _show_rows(spec, shape, timesteps, seed, schedule, axis)
    except ValueError as exc:  # e.g. a squeeze schedule table of another length
        raise UsageError(f"{spec_path}: {exc}") from None
    print(f"anisodiff show: {spec_path}, {C}x{H}x{W} planes, linear VP schedule (T = {SHOW_T}), "
          f"axis {axis_name}")
    _print_rows(rows, [(viz.low_frequency_share(r.power_measured),
                        viz.low_frequency_share(r.power_analytic)) for r in rows])
    if importlib.util.find_spec("matplotlib") is None:
        print("anisodiff show: error: the picture needs matplotlib: pip install matplotlib "
              "(or anisodiff[viz])", file=sys.stderr)
        return 1
    title = (f"anisodiff show: {Path(spec_path).name} ({C} channels, {H}x{W} pixels, linear VP "
             "schedule)")
    print(f"picture: {viz.plot_demo(rows, out, title=title, axis=axis, axis_name=axis_name)}")
    return 0
