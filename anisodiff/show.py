"""``anisodiff show``: the noise of a spec JSON, drawn at a few timesteps of the linear VP schedule
(T = 1000): one sample, its pixels in colour space along the first squeeze axis, and the radial and
2-D power spectra, each against the analytic value (:mod:`anisodiff.viz` draws the picture). Before
drawing it checks the terminal SNR (:mod:`anisodiff.diagnostics`) of the spec on white unit-variance
data, or on the statistics ``anisodiff fit --report`` wrote, and warns on stderr."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from . import diagnostics, reference, viz
from ._argtypes import UsageError
from ._progress import progress
from .ops import shaped_noise
from .schedule import VPSchedule
from .spec import NoiseSpec, PowerLaw, SpectralTable, read_json_file

__all__ = ["SHOW_T", "SHOW_SIZE", "run"]

SHOW_T = 1000  # show uses VPSchedule.linear(T=1000)
SHOW_SIZE = 64


def _load_stats(path) -> diagnostics.DataStatistics:
    """The data statistics of a ``fit --report`` JSON (or a bare DataStatistics JSON)."""
    try:
        d = read_json_file(path, "data statistics")
        if isinstance(d, dict) and "data_statistics" in d:
            d = d["data_statistics"]
        return diagnostics.DataStatistics.from_dict(d)
    except OSError as exc:
        raise UsageError(f"--stats {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"--stats {path}: {exc}") from None


def _show_shape(spec: NoiseSpec, channels: int | None, size: int | None,
                stats: diagnostics.DataStatistics | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` from the spec, the data statistics and the options; a UsageError where they
    disagree."""
    if stats is not None:
        if channels is not None and channels != stats.channels:
            raise UsageError(f"--channels {channels}: the --stats data has {stats.channels}")
        if size is not None and (size, size) != tuple(stats.shape):
            raise UsageError(f"--size {size}: the --stats data has {stats.shape[0]}x"
                             f"{stats.shape[1]} planes")
        channels = stats.channels
    C = channels or (spec.squeeze.channels if spec.squeeze is not None else 3)
    if spec.squeeze is not None and C != spec.squeeze.channels:
        raise UsageError(f"--channels {C}: the spec's squeeze has {spec.squeeze.channels} channels")
    if C < 2:
        raise UsageError("show needs at least 2 channels (the colour panel plots two directions)")
    H = W = size or SHOW_SIZE
    if stats is not None:
        H, W = stats.shape
    if isinstance(spec.spectral, SpectralTable):
        table_hw = spec.spectral.shape
        if (size is not None or stats is not None) and (H, W) != table_hw:
            option = f"--size {size}" if stats is None else "--stats"
            raise UsageError(f"{option}: {H}x{W} planes, but the spec's SpectralTable is "
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


def _check_snr(spec: NoiseSpec, shape, stats, threshold: float, schedule_name: str) -> None:
    """The terminal-SNR summary (stdout) and one warning per offending band/direction (stderr)."""
    data = stats if stats is not None else diagnostics.DataStatistics.white(*shape)
    snr = diagnostics.terminal_snr(spec, diagnostics.named_schedule(schedule_name), data)
    found = snr.offenders(threshold)
    what = "the --stats data" if stats is not None else "white unit-variance data"
    print(f"  terminal SNR at t = {snr.T - 1} ({schedule_name} VP schedule) on {what}: max over "
          f"bands {float(snr.terminal_band_snr.max()):.3g}, over principal directions "
          f"{float(snr.terminal_direction_snr.max()):.3g}"
          + ("" if snr.terminal_joint_snr is None else
             f", over (band, direction) pairs {float(snr.terminal_joint_snr.max()):.3g}")
          + f"; threshold {threshold:g}: "
          + ("ok" if not found else f"{len(found)} above, see the warnings"))
    diagnostics.print_warnings(snr, threshold, "show")


def run(spec_path: str, out: Path, *, timesteps=(0, 500, 999), size: int | None = None,
        channels: int | None = None, seed: int = 0, stats=None,
        snr_threshold: float = diagnostics.SNR_THRESHOLD, snr_schedule: str = "linear") -> int:
    """``anisodiff show``: draw the noise of the spec JSON at ``spec_path`` at ``timesteps`` (once
    for a spec that does not change with t), print the measured and exact statistics and save the
    picture to ``out``. First the terminal SNR of the spec on the data (the ``stats`` JSON of
    ``anisodiff fit --report``, else white unit-variance data) on the ``snr_schedule`` VP schedule:
    one warning line on stderr per band or principal direction above ``snr_threshold``. Returns the
    exit code (1: no matplotlib); a bad spec or option raises
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
    data_stats = None if stats is None else _load_stats(stats)
    C, H, W = shape = _show_shape(spec, channels, size, data_stats)
    schedule = VPSchedule.linear(T=SHOW_T)
    axis, axis_name = _show_axis(spec, C)
    print(f"anisodiff show: {spec_path}, {C}x{H}x{W} planes, linear VP schedule (T = {SHOW_T}), "
          f"axis {axis_name}")
    try:
        _check_snr(spec, shape, data_stats, snr_threshold, snr_schedule)
        rows = _show_rows(spec, shape, timesteps, seed, schedule, axis)
    except ValueError as exc:  # e.g. a squeeze schedule table of another length
        raise UsageError(f"{spec_path}: {exc}") from None
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
