"""The ``anisodiff`` command line.

    anisodiff info    what this install was built with and which backends it can run
    anisodiff demo    five forward-noise operators: measured versus analytic covariance, a picture
    anisodiff fit     fit a spec to data: principal colour axes and power spectrum -> spec.json
    anisodiff show    draw the noise of a spec.json: samples, spectra, colour-axis variances
    anisodiff bench   time the fused ops against the baselines: table, JSON, picture

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` listed in
``_SUBCOMMANDS``. A bad argument or unreadable input
exits with code 2 and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, datasets, reference, viz
from ._ext import available_backends, build_info
from .fit import fit_statistics
from .ops import covariance, shaped_noise
from ._argtypes import finite_float, int_in
from .schedule import VPSchedule
from .spec import (RADIUS_CONVENTIONS, SQUEEZE_SCHEDULES, Band, NoiseSpec, PowerLaw, SpectralTable,
                   Squeeze)

__all__ = ["main", "build_parser", "demo_operators"]


class UsageError(Exception):
    """A bad argument found after parsing (reported with exit code 2)."""


def _check_output(path: Path, option: str) -> Path:
    """``path`` if its folder exists (checked before any long work), else a UsageError."""
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder, expected a file name")
    return path


# ---------------------------------------------------------------------------------------------
# progress (tqdm when installed, plain lines otherwise)
# ---------------------------------------------------------------------------------------------
class _PlainProgress:
    """Stand-in for tqdm: one line per step on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------
# anisodiff info
# ---------------------------------------------------------------------------------------------
def _add_info(subparsers) -> None:
    subparsers.add_parser("info", help="show the build (compiled ops, CPU ISA) and the backends",
                          description="Show what this anisodiff install was built with and which "
                                      "backends can run.")


def _run_info(args) -> int:
    print(f"anisodiff {__version__} (running on torch {torch.__version__})")
    for key, value in build_info().items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        print(f"  {key}: {value}")
    print(f"  backends (cpu): {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"  backends (cuda): {', '.join(available_backends('cuda'))}")
    return 0


# ---------------------------------------------------------------------------------------------
# anisodiff demo
# ---------------------------------------------------------------------------------------------
CHANNELS = 3
LUMINANCE_AXIS = torch.ones(CHANNELS, dtype=torch.float64) / math.sqrt(CHANNELS)
AXIS_NAME = "(1,1,1)/sqrt3"
TIMESTEP = 999            # last step of the linear VP schedule: tau(t) = beta_t / beta_max = 1
CHECK_SHAPE = (CHANNELS, 8, 8)   # dense Sigma is 192 x 192
CHUNK = 50_000            # draws per call while accumulating the sample covariance
POWER_LAW_EPS = 0.01      # see demo_operators
DEFAULT_SAMPLES = 200_000


@dataclass(frozen=True)
class DemoOperator:
    """One operator of the demo: its spec and how the table and the figure name it."""

    name: str       # key in the table and the JSON report
    title: str      # figure row title
    caption: str    # what the reader sees
    spec: NoiseSpec


def demo_operators() -> list[DemoOperator]:
    """The five operators of ``anisodiff demo``, all on C = 3 with the luminance axis.

    The power law uses alpha = -0.5 so the effect is visible (the papers sweep |alpha| <= 0.08) and
    a DC floor eps = 0.01 instead of the papers' 1e-10: at alpha = -0.5 the papers' floor gives the
    DC bin the weight 1e5, and the noise would be a flat colour per channel (about 100% DC power).
    """
    v = LUMINANCE_AXIS.reshape(CHANNELS, 1)
    return [
        DemoOperator("isotropic", "isotropic (standard DDPM)",
                     "white: every colour direction and frequency alike", NoiseSpec()),
        DemoOperator("sdm", "SDM, s = -0.4 (mild antisqueeze)",
                     "greyer: extra luminance noise, colour noise unchanged",
                     NoiseSpec(Squeeze(v, -0.4))),
        DemoOperator("hdm", "HDM (Heisenberg), s = -0.4",
                     "greyest: extra luminance, less colour noise (det S = 1)",
                     NoiseSpec(Squeeze(v, -0.4, variant="heisenberg"))),
        DemoOperator("power_law", "SAGD power law, alpha = -0.5 (papers: |alpha| <= 0.08)",
                     "smooth blobs: power grows towards low frequencies",
                     NoiseSpec(spectral=PowerLaw(-0.5, eps=POWER_LAW_EPS))),
        DemoOperator("band_pass", "SAGD band-pass, 0.1 <= r <= 0.3 cycles/pixel",
                     "ripples of 3-10 pixels: only a ring of frequencies",
                     NoiseSpec(spectral=Band(0.1, 0.3))),
    ]


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="measured vs analytic noise statistics for five operators, and a picture",
        description="Draw noise from five operators (isotropic, SDM, HDM, SAGD power law, SAGD "
                    "band-pass; C = 3, luminance axis, linear VP schedule at t = 999), compare its "
                    "covariance with the analytic one, and draw samples and spectra. Exits with 1 "
                    "if a check fails.")
    p.add_argument("--out", default="anisodiff_demo", metavar="DIR",
                   help="output directory for demo.png and demo_report.json (default: %(default)s)")
    p.add_argument("--samples", type=int_in(500), default=DEFAULT_SAMPLES, metavar="N",
                   help="draws per operator for the covariance check (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="Philox seed of the noise stream (default: %(default)s)")
    p.add_argument("--size", type=int_in(8, 256), default=64,
                   help="plane size of the picture, in pixels (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the picture (table and JSON only)")


def _noise_chunks(spec: NoiseSpec, shape, n: int, *, seed: int, schedule, progress):
    """``n`` draws of ``shape`` from one continuing stream ``(seed, offset)``, CHUNK at a time."""
    offset = 0
    for start in range(0, n, CHUNK):
        b = min(CHUNK, n - start)
        yield shaped_noise((b, *shape), spec, timesteps=TIMESTEP, schedule=schedule, seed=seed,
                           offset=offset)
        offset += math.ceil(b * math.prod(shape) / 4)
        progress.update()


def _check_operators(operators, n: int, seed: int, schedule) -> dict[str, viz.CovarianceCheck]:
    progress = _progress(len(operators) * math.ceil(n / CHUNK), "covariance check")
    checks = {}
    for op in operators:
        sigma = covariance(op.spec, CHECK_SHAPE, timesteps=TIMESTEP, schedule=schedule)
        chunks = _noise_chunks(op.spec, CHECK_SHAPE, n, seed=seed, schedule=schedule,
                               progress=progress)
        sigma_emp, count = viz.empirical_covariance(chunks)
        checks[op.name] = viz.check_covariance(sigma, sigma_emp, count, LUMINANCE_AXIS, CHECK_SHAPE)
    progress.close()
    return checks


def _draw_figure(operators, size: int, seed: int, schedule, path: Path) -> str:
    batch = max(16, min(256, 2**21 // (CHANNELS * size * size)))  # ~2M values: a smooth spectrum
    rows = []
    for op in operators:
        samples = shaped_noise((batch, CHANNELS, size, size), op.spec, timesteps=TIMESTEP,
                               schedule=schedule, seed=seed)
        rows.append(viz.figure_row(op.title, op.caption, op.spec, samples, LUMINANCE_AXIS,
                                   timestep=TIMESTEP, schedule=schedule))
    title = (f"anisodiff demo: one white noise draw through {len(operators)} forward-noise "
             f"operators (C = {CHANNELS}, {size}x{size} pixels, linear VP schedule, "
             f"t = {TIMESTEP})")
    return viz.plot_demo(rows, path, title=title, axis=LUMINANCE_AXIS, axis_name="(1,1,1)/√3")


def _print_table(checks: dict[str, viz.CovarianceCheck]) -> None:
    split = viz.LOW_HIGH_SPLIT
    notes = [
        "rel. error = ||Sigma_emp - Sigma||_F / ||Sigma||_F; variances are per pixel (v^T Sigma_c v, "
        "Sigma_c = covariance of one pixel's channels); % power = share of the power at "
        f"r < {split} : r >= {split} cycles/pixel, tolerance in percentage points.",
        f"{viz.TOLERANCE_RULE}.",
        f"power_law uses eps = {POWER_LAW_EPS} (the papers' 1e-10 would put ~100% of the power in "
        "the DC bin at alpha = -0.5).",
    ]
    print(viz.format_table(checks))
    print()
    for note in notes:
        print(textwrap.fill(note, width=100))
    print()


def _demo_report(args, operators, checks: dict[str, viz.CovarianceCheck], figure) -> dict:
    return {
        "anisodiff_version": __version__,
        "setting": {"channels": CHANNELS, "check_shape": list(CHECK_SHAPE), "samples": args.samples,
                    "seed": args.seed, "timestep": TIMESTEP, "schedule": "VPSchedule.linear()",
                    "axis": LUMINANCE_AXIS.tolist(), "low_high_split": viz.LOW_HIGH_SPLIT,
                    "backend": available_backends("cpu")[0]},
        "tolerance_rule": viz.TOLERANCE_RULE,
        "operators": {op.name: {"title": op.title, "spec": op.spec.to_dict(),
                                **checks[op.name].to_dict()} for op in operators},
        "all_passed": all(c.passed for c in checks.values()),
        "figure": figure,
    }


def _run_demo(args) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    schedule = VPSchedule.linear()
    operators = demo_operators()
    C, H, W = CHECK_SHAPE
    print(textwrap.fill(
        f"anisodiff demo: C = {C} colour channels, principal axis v = {AXIS_NAME} (luminance), "
        f"linear VP schedule, t = {TIMESTEP} (full squeeze strength), backend "
        f"{available_backends('cpu')[0]!r}. Covariance check: {args.samples} draws of "
        f"[{C}, {H}, {W}] per operator against the dense analytic Sigma ({C * H * W} x {C * H * W}) "
        "of anisodiff.covariance.", width=100) + "\n")
    checks = _check_operators(operators, args.samples, args.seed, schedule)
    _print_table(checks)

    figure = None
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        print("No picture: matplotlib is not installed. Install it with `pip install matplotlib` "
              "(or `pip install anisodiff[viz]`).")
    elif not args.no_plot:
        print(f"Drawing the picture ({args.size}x{args.size} planes) ...", file=sys.stderr,
              flush=True)
        figure = _draw_figure(operators, args.size, args.seed, schedule, out / "demo.png")
        print(f"picture: {figure}")

    report = _demo_report(args, operators, checks, figure)
    report_path = out / "demo_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"report:  {report_path}")
    print("All checks PASS." if report["all_passed"] else "Some checks FAIL: see the table above.")
    return 0 if report["all_passed"] else 1


# ---------------------------------------------------------------------------------------------
# anisodiff fit
# ---------------------------------------------------------------------------------------------
SPECTRAL_CHOICES = ("none", "power_law", "table")


def _add_fit(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="fit a noise spec to data (principal colour axes, power spectrum)",
        description="Read DATA once, fit the principal colour axes of its pixel covariance (for the "
                    "SDM/HDM squeeze) and its power spectrum (for the SAGD weights), print them and "
                    "write a NoiseSpec JSON. 8-bit images are mapped to [-1, 1].")
    p.add_argument("data", metavar="DATA",
                   help="a folder of PNG/JPEG images (searched recursively; one size, or --size), "
                        "an .npy/.npz array (uint8 is read as [N, H, W, C], float as [N, C, H, W]) "
                        f"or a built-in dataset: {', '.join(datasets.BUILTIN_DATASETS)} (1/f^2 "
                        "images with correlated colours, generated from --seed)")
    p.add_argument("-o", "--out", default="spec.json", metavar="SPEC.json",
                   help="where to write the spec (default: %(default)s)")
    p.add_argument("--k", type=int_in(1), default=1,
                   help="number of principal colour axes to squeeze (default: %(default)s)")
    p.add_argument("--strength", type=finite_float, default=-0.4,
                   help="squeeze strength s, < 0 antisqueezes; the SDM paper's best is the default "
                        "(default: %(default)s)")
    p.add_argument("--variant", choices=("sdm", "heisenberg"), default="sdm",
                   help="squeeze variant (default: %(default)s)")
    p.add_argument("--schedule", choices=SQUEEZE_SCHEDULES, default="beta",
                   help="squeeze time profile (default: %(default)s, the official SDM code)")
    p.add_argument("--spectral", choices=SPECTRAL_CHOICES, default="none",
                   help="spectral part of the spec: none, the fitted power law, or the measured "
                        "spectrum as a table (fixes the plane size). Default none: the SAGD papers "
                        "gained with mild tilts |alpha| <= 0.08, while natural data fits alpha ~ -1; "
                        "the fitted alpha is always printed (default: %(default)s)")
    p.add_argument("--eps", type=finite_float, default=None,
                   help="DC floor of the power law (default: half the lowest non-zero frequency)")
    p.add_argument("--radius", choices=RADIUS_CONVENTIONS, default="cycles",
                   help="radius convention of the spec and the printed radii (default: %(default)s)")
    p.add_argument("--size", type=int_in(2, 4096), default=None, metavar="N",
                   help="image folders: resize the shorter side to N and center-crop N x N; "
                        f"procedural: the image side (default {datasets.PROCEDURAL_DEFAULT_SIZE})")
    p.add_argument("--limit", type=int_in(1), default=None, metavar="N",
                   help="use the first N images (procedural: generate N, default "
                        f"{datasets.PROCEDURAL_DEFAULT_COUNT})")
    p.add_argument("--batch-size", type=int_in(1), default=256, metavar="B",
                   help="images per batch (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="seed of the procedural dataset (default: %(default)s)")


def _fitted_spec(args, pca, spectrum) -> NoiseSpec:
    """The spec the options ask for, from the fitted statistics."""
    squeeze = pca.squeeze(args.strength, args.variant, args.schedule)
    spectral = None
    if args.spectral == "power_law":
        spectral = spectrum.power_law(args.eps)
    elif args.spectral == "table":
        spectral = spectrum.table()
    return NoiseSpec(squeeze, spectral, radius=args.radius)


def _print_fit(args, pca, spectrum, spec: NoiseSpec, out: Path) -> None:
    C, H, W = spectrum.power.shape
    share = pca.eigenvalues / pca.eigenvalues.sum()
    print(f"anisodiff fit: {spectrum.images:,} images of {C}x{H}x{W} from {args.data} "
          f"({pca.count:,} pixels)")
    print(f"  mean pixel:  {_vector(pca.mean)}")
    print("  eigenvalues: " + "  ".join(f"{e:.4g} ({100 * p:.1f}%)"
                                        for e, p in zip(pca.eigenvalues.tolist(), share.tolist())))
    for i in range(pca.axes.shape[1]):
        print(f"  axis v{i + 1}:     {_vector(pca.axes[:, i])}  (sign: largest component > 0)")
    per_channel = ", ".join(f"{a:.3f}" for a in spectrum.channel_alpha)
    print(f"  spectrum:    P(r) ~ r^(2 alpha), alpha = {spectrum.alpha:.3f} (per channel "
          f"{per_channel}); least squares over {spectrum.radii.numel()} radial bins, r = "
          f"{float(spectrum.radii[0]):.3g}..{float(spectrum.radii[-1]):.3g} ({args.radius}), DC "
          "excluded")
    if args.spectral == "none":
        print(textwrap.fill(
            "  spectral part: none (the default). To make the noise follow the data spectrum use "
            "--spectral power_law or table; the SAGD papers gained with mild tilts, |alpha| <= 0.08.",
            width=100, subsequent_indent="  "))
    print(f"wrote {out}: {spec!r}")


def _vector(v: torch.Tensor) -> str:
    return "[" + ", ".join(f"{x:+.4f}" for x in v.tolist()) + "]"


def _run_fit(args) -> int:
    out = _check_output(Path(args.out), "-o")
    if args.eps is not None and args.spectral != "power_law":
        raise UsageError("--eps applies only to --spectral power_law")
    try:
        images = datasets.open_images(args.data, size=args.size, limit=args.limit, seed=args.seed)
        loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size)
        pca, spectrum = fit_statistics(loader, k=args.k, radius=args.radius)
        spec = _fitted_spec(args, pca, spectrum)
    except ValueError as exc:  # datasets.DataError, k > C, heisenberg with k = C, bad eps ...
        raise UsageError(str(exc)) from None
    spec.save(out)
    _print_fit(args, pca, spectrum, spec, out)
    return 0


# ---------------------------------------------------------------------------------------------
# anisodiff show
# ---------------------------------------------------------------------------------------------
SHOW_T = 1000  # show uses VPSchedule.linear(T=1000)
SHOW_SIZE = 64


def _timesteps(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated timesteps in [0, SHOW_T)."""
    parse = int_in(0, SHOW_T - 1)
    values = tuple(parse(part.strip()) for part in text.split(","))
    if len(values) > 8:
        raise argparse.ArgumentTypeError(f"at most 8 timesteps, got {len(values)}")
    return values


def _add_show(subparsers) -> None:
    p = subparsers.add_parser(
        "show", help="draw the noise of a spec: samples, power spectra, colour-axis variances",
        description="Draw noise with a spec JSON (e.g. from `anisodiff fit`) at a few timesteps of "
                    "the linear VP schedule (T = 1000) and save a picture: one sample, its pixels in "
                    "colour space along the first squeeze axis, and the radial and 2-D power "
                    "spectra, each measured against the analytic value. A spec that does not change "
                    "with t is drawn once.")
    p.add_argument("spec", metavar="SPEC.json", help="a NoiseSpec JSON file")
    p.add_argument("-o", "--out", default="noise.png", metavar="PNG",
                   help="where to write the picture (default: %(default)s)")
    p.add_argument("--timesteps", type=_timesteps, default=(0, 500, 999), metavar="T,T,...",
                   help="timesteps to draw (default: 0,500,999)")
    p.add_argument("--size", type=int_in(8, 512), default=None, metavar="N",
                   help=f"plane size (default: {SHOW_SIZE}, or the size of a SpectralTable)")
    p.add_argument("--channels", type=int_in(2, 64), default=None, metavar="C",
                   help="channels (default: the squeeze's, else 3)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="Philox seed of the noise (default: %(default)s)")


def _show_shape(spec: NoiseSpec, args) -> tuple[int, int, int]:
    """``(C, H, W)`` from the spec and the options; a UsageError where they disagree."""
    C = args.channels or (spec.squeeze.channels if spec.squeeze is not None else 3)
    if spec.squeeze is not None and C != spec.squeeze.channels:
        raise UsageError(f"--channels {C}: the spec's squeeze has {spec.squeeze.channels} channels")
    if C < 2:
        raise UsageError("show needs at least 2 channels (the colour panel plots two directions)")
    H = W = args.size or SHOW_SIZE
    if isinstance(spec.spectral, SpectralTable):
        table_hw = spec.spectral.shape
        if args.size is not None and (H, W) != table_hw:
            raise UsageError(f"--size {args.size}: the spec's SpectralTable is "
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


def _show_rows(spec: NoiseSpec, shape, args, schedule, axis) -> list[viz.FigureRow]:
    C, H, W = shape
    batch = max(16, min(256, 2**21 // (C * H * W)))
    steps = args.timesteps if spec.time_varying else args.timesteps[:1]
    progress = _progress(len(steps), "drawing noise")
    rows = []
    try:
        for t in steps:
            title = f"t = {t}" if spec.time_varying else "every t (this spec does not change with t)"
            samples = shaped_noise((batch, C, H, W), spec, timesteps=t, schedule=schedule,
                                   seed=args.seed)
            rows.append(viz.figure_row(title, _show_caption(spec, t, schedule), spec, samples,
                                       axis, timestep=t, schedule=schedule))
            progress.update()
    finally:
        progress.close()
    return rows


def _print_rows(rows: list[viz.FigureRow], rows_power) -> None:
    split = viz.LOW_HIGH_SPLIT
    for row, (measured, exact) in zip(rows, rows_power):
        (along, along_m), (orth, orth_m) = row.axis_variance, row.orthogonal_variance
        print(f"  {row.title}: variance along the axis {along_m:.4f} (exact {along:.4f}), "
              f"orthogonal {orth_m:.4f} (exact {orth:.4f}), power at r < {split}: "
              f"{100 * measured:.1f}% (exact {100 * exact:.1f}%)")


def _run_show(args) -> int:
    out = _check_output(Path(args.out), "-o")
    try:
        spec = NoiseSpec.load(args.spec)
    except OSError as exc:
        raise UsageError(f"{args.spec}: cannot read the spec ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except (KeyError, TypeError) as exc:  # a field missing or of the wrong type
        raise UsageError(f"{args.spec}: not a valid spec ({type(exc).__name__}: {exc})") from None
    C, H, W = shape = _show_shape(spec, args)
    schedule = VPSchedule.linear(T=SHOW_T)
    axis, axis_name = _show_axis(spec, C)
    try:
        rows = _show_rows(spec, shape, args, schedule, axis)
    except ValueError as exc:  # e.g. a squeeze schedule table of another length
        raise UsageError(f"{args.spec}: {exc}") from None
    print(f"anisodiff show: {args.spec}, {C}x{H}x{W} planes, linear VP schedule (T = {SHOW_T}), "
          f"axis {axis_name}")
    _print_rows(rows, [(viz.low_frequency_share(r.power_measured),
                        viz.low_frequency_share(r.power_analytic)) for r in rows])
    if importlib.util.find_spec("matplotlib") is None:
        print("anisodiff show: error: the picture needs matplotlib: pip install matplotlib "
              "(or anisodiff[viz])", file=sys.stderr)
        return 1
    title = (f"anisodiff show: {Path(args.spec).name} ({C} channels, {H}x{W} pixels, linear VP "
             "schedule)")
    print(f"picture: {viz.plot_demo(rows, out, title=title, axis=axis, axis_name=axis_name)}")
    return 0


# ---------------------------------------------------------------------------------------------
# anisodiff bench
# ---------------------------------------------------------------------------------------------
def _add_bench(subparsers) -> None:
    from . import bench

    p = subparsers.add_parser(
        "bench", help="time the fused ops against the code users write today (table, JSON, picture)",
        description="Time anisodiff's fused add_noise and shaped_noise against the eager PyTorch "
                    "users write today (and the official SDM / SAGD code patterns, torch.compile, "
                    "the isotropic floor), interleaved in one process: op x spec kind x batch x "
                    "shape x dtype. Prints a table (median, IQR, GB/s, % of the measured copy "
                    "bandwidth, speed-ups) and writes a JSON record and a picture. Full run: a few "
                    "minutes on 2 cores; --quick: well under a minute. See benchmarks/README.md.")
    bench.add_arguments(
        p, json_help="where to write the JSON record (default: anisodiff-bench-<device>-<host>.json)",
        plot_help="where to write the picture (default: anisodiff-bench-<device>-<host>.png)")
    p.set_defaults(bench_parser=p)


def _run_bench(args) -> int:
    from . import bench

    try:
        bench.execute(args, argv=bench.command_argv(args.bench_parser, args, ["anisodiff", "bench"]))
    except bench.BenchError as exc:
        raise UsageError(str(exc)) from None
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
_SUBCOMMANDS = {"info": (_add_info, _run_info), "demo": (_add_demo, _run_demo),
                "fit": (_add_fit, _run_fit), "show": (_add_show, _run_show),
                "bench": (_add_bench, _run_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anisodiff", description="Anisotropic forward noise for diffusion models.")
    parser.add_argument("--version", action="version", version=f"anisodiff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run) in _SUBCOMMANDS.items():
        add(subparsers)
        subparsers.choices[name].set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a bad argument)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the message
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"anisodiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
