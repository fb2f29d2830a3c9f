"""``anisodiff check``: five forward-noise operators, their measured covariance against the analytic
one, and a picture.

The operators (:func:`check_operators`: isotropic, SDM, HDM, SAGD power law, SAGD band-pass; C = 3,
the luminance axis, the linear VP schedule at t = 999, where the squeeze is at full strength) are
drawn ``samples`` times on [3, 8, 8] planes from one continuing noise stream; the sample covariance
is compared with the dense analytic ``anisodiff.covariance`` (192 x 192) with tolerances derived
from the sample size (:mod:`anisodiff.viz`: the variance along the axis and orthogonal to it, the
share of low-frequency power, the relative Frobenius error). :func:`run` prints the table, writes
``check_report.json`` and draws ``check.png`` (one white draw through each operator).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from . import viz
from ._ext import available_backends
from ._progress import progress
from ._version import __version__
from .ops import covariance, shaped_noise
from .schedule import VPSchedule
from .spec import Band, NoiseSpec, PowerLaw, Squeeze

__all__ = ["CheckOperator", "check_operators", "run", "DEFAULT_SAMPLES", "POWER_LAW_EPS"]

CHANNELS = 3
LUMINANCE_AXIS = torch.ones(CHANNELS, dtype=torch.float64) / math.sqrt(CHANNELS)
AXIS_NAME = "(1,1,1)/sqrt3"
TIMESTEP = 999            # last step of the linear VP schedule: tau(t) = beta_t / beta_max = 1
CHECK_SHAPE = (CHANNELS, 8, 8)   # dense Sigma is 192 x 192
CHUNK = 50_000            # draws per call while accumulating the sample covariance
POWER_LAW_EPS = 0.01      # see check_operators
DEFAULT_SAMPLES = 200_000


@dataclass(frozen=True)
class CheckOperator:
    """One operator of the check: its spec and how the table and the figure name it."""

    name: str       # key in the table and the JSON report
    title: str      # figure row title
    caption: str    # what the reader sees
    spec: NoiseSpec


def check_operators() -> list[CheckOperator]:
    """The five operators of ``anisodiff check``, all on C = 3 with the luminance axis.

    The power law uses alpha = -0.5 so the effect is visible (the papers sweep |alpha| <= 0.08) and
    a DC floor eps = 0.01 instead of the papers' 1e-10: at alpha = -0.5 the papers' floor gives the
    DC bin the weight 1e5, and the noise would be a flat colour per channel (about 100% DC power).
    """
    v = LUMINANCE_AXIS.reshape(CHANNELS, 1)
    return [
        CheckOperator("isotropic", "isotropic (standard DDPM)",
                     "white: every colour direction and frequency alike", NoiseSpec()),
        CheckOperator("sdm", "SDM, s = -0.4 (mild antisqueeze)",
                     "greyer: extra luminance noise, colour noise unchanged",
                     NoiseSpec(Squeeze(v, -0.4))),
        CheckOperator("hdm", "HDM (Heisenberg), s = -0.4",
                     "greyest: extra luminance, less colour noise (det S = 1)",
                     NoiseSpec(Squeeze(v, -0.4, variant="heisenberg"))),
        CheckOperator("power_law", "SAGD power law, alpha = -0.5 (papers: |alpha| <= 0.08)",
                     "smooth blobs: power grows towards low frequencies",
                     NoiseSpec(spectral=PowerLaw(-0.5, eps=POWER_LAW_EPS))),
        CheckOperator("band_pass", "SAGD band-pass, 0.1 <= r <= 0.3 cycles/pixel",
                     "ripples of 3-10 pixels: only a ring of frequencies",
                     NoiseSpec(spectral=Band(0.1, 0.3))),
    ]


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
    bar = progress(len(operators) * math.ceil(n / CHUNK), "covariance check")
    checks = {}
    for op in operators:
        sigma = covariance(op.spec, CHECK_SHAPE, timesteps=TIMESTEP, schedule=schedule)
        chunks = _noise_chunks(op.spec, CHECK_SHAPE, n, seed=seed, schedule=schedule,
                               progress=bar)
        sigma_emp, count = viz.empirical_covariance(chunks)
        checks[op.name] = viz.check_covariance(sigma, sigma_emp, count, LUMINANCE_AXIS, CHECK_SHAPE)
    bar.close()
    return checks


def _draw_figure(operators, size: int, seed: int, schedule, path: Path) -> str:
    batch = max(16, min(256, 2**21 // (CHANNELS * size * size)))  # ~2M values: a smooth spectrum
    rows = []
    for op in operators:
        samples = shaped_noise((batch, CHANNELS, size, size), op.spec, timesteps=TIMESTEP,
                               schedule=schedule, seed=seed)
        rows.append(viz.figure_row(op.title, op.caption, op.spec, samples, LUMINANCE_AXIS,
                                   timestep=TIMESTEP, schedule=schedule))
    title = (f"anisodiff check: one white noise draw through {len(operators)} forward-noise "
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


def _check_report(samples: int, seed: int, operators, checks: dict[str, viz.CovarianceCheck],
                  figure) -> dict:
    return {
        "anisodiff_version": __version__,
        "setting": {"channels": CHANNELS, "check_shape": list(CHECK_SHAPE), "samples": samples,
                    "seed": seed, "timestep": TIMESTEP, "schedule": "VPSchedule.linear()",
                    "axis": LUMINANCE_AXIS.tolist(), "low_high_split": viz.LOW_HIGH_SPLIT,
                    "backend": available_backends("cpu")[0]},
        "tolerance_rule": viz.TOLERANCE_RULE,
        "operators": {op.name: {"title": op.title, "spec": op.spec.to_dict(),
                                **checks[op.name].to_dict()} for op in operators},
        "all_passed": all(c.passed for c in checks.values()),
        "figure": figure,
    }


def run(out: Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0, size: int = 64,
        plot: bool = True) -> int:
    """``anisodiff check``: the covariance check of :func:`check_operators` (printed, and written to
    ``out/check_report.json``) and, with ``plot`` and matplotlib, ``out/check.png``. Returns the
    exit code: 0 when every check passes, 1 otherwise. ``out`` must exist."""
    out = Path(out)
    schedule = VPSchedule.linear()
    operators = check_operators()
    C, H, W = CHECK_SHAPE
    print(textwrap.fill(
        f"anisodiff check: C = {C} colour channels, principal axis v = {AXIS_NAME} (luminance), "
        f"linear VP schedule, t = {TIMESTEP} (full squeeze strength), backend "
        f"{available_backends('cpu')[0]!r}. Covariance check: {samples} draws of "
        f"[{C}, {H}, {W}] per operator against the dense analytic Sigma ({C * H * W} x {C * H * W}) "
        "of anisodiff.covariance.", width=100) + "\n")
    checks = _check_operators(operators, samples, seed, schedule)
    _print_table(checks)

    figure = None
    if plot and importlib.util.find_spec("matplotlib") is None:
        print("No picture: matplotlib is not installed. Install it with `pip install matplotlib` "
              "(or `pip install anisodiff[viz]`).")
    elif plot:
        print(f"Drawing the picture ({size}x{size} planes) ...", file=sys.stderr, flush=True)
        figure = _draw_figure(operators, size, seed, schedule, out / "check.png")
        print(f"picture: {figure}")

    report = _check_report(samples, seed, operators, checks, figure)
    report_path = out / "check_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"report:  {report_path}")
    print("All checks PASS." if report["all_passed"] else "Some checks FAIL: see the table above.")
    return 0 if report["all_passed"] else 1
