"""The ``anisodiff`` command line.

    anisodiff info    what this install was built with and which backends it can run
    anisodiff demo    five forward-noise operators: measured versus analytic covariance, a picture

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` listed in
``_SUBCOMMANDS``; later ones (``fit``, ``show``, ``bench``) slot in the same way. A bad argument
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

from . import __version__, viz
from ._ext import available_backends, build_info
from .ops import covariance, shaped_noise
from .schedule import VPSchedule
from .spec import Band, NoiseSpec, PowerLaw, Squeeze

__all__ = ["main", "build_parser", "demo_operators"]


class UsageError(Exception):
    """A bad argument found after parsing (reported with exit code 2)."""


def _int_in(minimum: int, maximum: int | None = None):
    """argparse type: an integer in ``[minimum, maximum]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


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
    p.add_argument("--samples", type=_int_in(500), default=DEFAULT_SAMPLES, metavar="N",
                   help="draws per operator for the covariance check (default: %(default)s)")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0,
                   help="Philox seed of the noise stream (default: %(default)s)")
    p.add_argument("--size", type=_int_in(8, 256), default=64,
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
# entry point
# ---------------------------------------------------------------------------------------------
_SUBCOMMANDS = {"info": (_add_info, _run_info), "demo": (_add_demo, _run_demo)}


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
