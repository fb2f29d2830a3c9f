"""The ``anisodiff`` command line.

    anisodiff info    what this install was built with and which backends it can run
    anisodiff demo    train a tiny diffusion model with isotropic, SDM, HDM and power-law noise
                      on built-in images, sample it and compare: table, JSON, pictures
    anisodiff check   five forward-noise operators: measured versus analytic covariance, a picture
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, datasets, demo, reference, viz
from ._ext import available_backends, build_info
from .fit import fit_statistics
from .ops import covariance, shaped_noise
from .sampling import AnisotropicNoise
from ._argtypes import finite_float, int_in
from .schedule import VPSchedule
from .spec import (RADIUS_CONVENTIONS, SQUEEZE_SCHEDULES, Band, NoiseSpec, PowerLaw, SpectralTable,
                   Squeeze)

__all__ = ["main", "build_parser", "check_operators"]


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
    """Stand-in for tqdm: a line on stderr every 5% of the total (every step of a short one)."""

    LINES = 20

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self._shown = total, desc, 0, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done * self.LINES >= (self._shown + 1) * self.total or self.done >= self.total:
            self._shown = self.done * self.LINES // max(1, self.total)
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

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
@dataclass(frozen=True)
class DemoPreset:
    """Defaults of the options that set the size of the demo (the full run, or --quick)."""

    steps: int
    batch_size: int
    size: int
    samples: int
    sample_steps: int
    train_images: int
    width: int


# Full run: 2-3 minutes on 2 CPU cores (measured: see README); --quick: seconds (tests).
DEMO_PRESET = DemoPreset(steps=800, batch_size=64, size=16, samples=1000, sample_steps=50,
                         train_images=8192, width=16)
QUICK_PRESET = DemoPreset(steps=8, batch_size=16, size=8, samples=64, sample_steps=4,
                          train_images=256, width=8)
SAMPLE_GRID_COLUMNS = 12


def _honesty_note(params: int, opts: dict) -> str:
    return (f"These are tiny models ({params:,} parameters) trained for {opts['steps']} steps on "
            f"synthetic {opts['size']}x{opts['size']} images: the demo shows the machinery working "
            "end to end, not which noise is better. Treat differences between the rows as "
            "anecdotal (rerun with another --seed to see how much they move); no FID claim is "
            "made.")


def _device(text: str) -> str:
    """argparse type: "auto", "cpu", "cuda" or "cuda:N" (availability is checked later)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is not None and device.type == "mps":  # anisodiff's reference path needs float64
        raise argparse.ArgumentTypeError("mps is not supported (no float64 there); use cpu")
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_demo(subparsers) -> None:
    full, quick = DEMO_PRESET, QUICK_PRESET
    p = subparsers.add_parser(
        "demo", help="train a tiny diffusion model with four kinds of forward noise and compare",
        description="On the built-in procedural images (1/f^2 spectrum, natural colour statistics; "
                    "no download): fit the principal colour axis and the spectrum, train a small "
                    "UNet four times from the same seed (isotropic noise, SDM and HDM with "
                    "s = -0.4 along the fitted axis, SAGD power law alpha = -0.04), sample each "
                    "with its shaped prior and DDIM/DDPM steps, and report the final training "
                    "loss, Fréchet distances to held-out real images (pixels and a fixed "
                    "random-feature space) and the radial power-spectrum error. Writes a table, "
                    "demo_report.json, demo_samples.png and demo_spectra.png. 2-4 minutes on 2 CPU "
                    "cores; --quick takes seconds. Tiny models, short runs: a demo, not a "
                    "benchmark.")
    p.add_argument("--steps", type=int_in(1), default=None, metavar="N",
                   help=f"training steps per configuration (default: {full.steps}; --quick "
                        f"{quick.steps})")
    p.add_argument("--batch-size", type=int_in(1, 65536), default=None, metavar="B",
                   help=f"training batch size (default: {full.batch_size}; --quick "
                        f"{quick.batch_size})")
    p.add_argument("--size", type=int_in(8, 64), default=None, metavar="N",
                   help=f"image side in pixels, a multiple of 4 (default: {full.size}; --quick "
                        f"{quick.size})")
    p.add_argument("--samples", type=int_in(16, 100_000), default=None, metavar="N",
                   help=f"images generated per configuration, and real images per held-out set "
                        f"(default: {full.samples}; --quick {quick.samples})")
    p.add_argument("--sample-steps", type=int_in(1, 1000), default=None, metavar="N",
                   help=f"sampler steps (default: {full.sample_steps}; --quick "
                        f"{quick.sample_steps})")
    p.add_argument("--sampler", choices=demo.SAMPLERS, default="ddim",
                   help="ddim (eta = 0, deterministic) or ddpm (ancestral, exact posterior) "
                        "(default: %(default)s)")
    p.add_argument("--train-images", type=int_in(1, 1_000_000), default=None, metavar="N",
                   help=f"size of the training set (default: {full.train_images}; --quick "
                        f"{quick.train_images})")
    p.add_argument("--width", type=int_in(4, 256), default=None, metavar="C",
                   help=f"UNet channels at full resolution, a multiple of 4 (default: "
                        f"{full.width}; --quick {quick.width})")
    p.add_argument("--lr", type=_positive_float, default=2e-3,
                   help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**62), default=0,
                   help="seed of the data, the initial weights, the data order and every noise "
                        "draw (default: %(default)s)")
    p.add_argument("--device", type=_device, default="auto",
                   help="cpu, cuda, cuda:N, or auto: cuda when available, else cpu "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core; on a "
                        "machine busy with other jobs, 1 can be much faster)")
    p.add_argument("--out", default="anisodiff_demo", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a few-second run with tiny sizes (smoke tests); explicit options win")
    p.add_argument("--no-plot", action="store_true", help="skip the pictures (table and JSON only)")


def _demo_device(text: str) -> torch.device:
    """The torch device for --device, or a UsageError saying why it cannot be used."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise UsageError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


def _demo_options(args) -> dict:
    """The size options: the preset's value unless given, then the checks argparse cannot do."""
    preset = QUICK_PRESET if args.quick else DEMO_PRESET
    opts = {name: getattr(args, name) if getattr(args, name) is not None else getattr(preset, name)
            for name in DemoPreset.__dataclass_fields__}
    if opts["size"] % 4:
        raise UsageError(f"--size {opts['size']}: must be a multiple of 4 (the UNet halves the "
                         "image twice)")
    if opts["width"] % 4:
        raise UsageError(f"--width {opts['width']}: must be a multiple of 4 (group norm)")
    if opts["batch_size"] > opts["train_images"]:
        raise UsageError(f"--batch-size {opts['batch_size']}: larger than the training set "
                         f"(--train-images {opts['train_images']})")
    return opts


@dataclass
class _DemoData:
    train: torch.Tensor      # [N, 3, H, W]
    real: torch.Tensor       # held-out set the generated images are compared with
    real_floor: torch.Tensor  # a second held-out set: real vs real gives the metrics' floor


def _demo_data(opts: dict, seed: int) -> _DemoData:
    n, size, m = opts["train_images"], opts["size"], opts["samples"]
    images = demo.real_images(n + 2 * m, size, seed)
    return _DemoData(images[:n], images[n:n + m], images[n + m:])


def _evaluate(samples: torch.Tensor, data: _DemoData, features, real_features, real_power) -> dict:
    """The three sample metrics of one set of images against the held-out real set."""
    _, power = demo.radial_power(samples)
    return {
        "fd_pixels": demo.frechet_distance(demo.pixel_features(samples),
                                           demo.pixel_features(data.real)),
        "fd_random_features": demo.frechet_distance(features(samples), real_features),
        "spectrum_error": demo.spectrum_error(power, real_power),
        "radial_power": power.tolist(),
    }


def _train_and_sample(configs, data: _DemoData, opts: dict, args, device, schedule) -> list:
    per_run = opts["steps"] + opts["sample_steps"]
    bar = _progress(len(configs) * per_run, "demo")
    settings = demo.TrainSettings(opts["steps"], opts["batch_size"], args.lr, args.seed, device,
                                  width=opts["width"])
    shape = tuple(data.train.shape[1:])
    runs = []
    try:
        for i, config in enumerate(configs, 1):
            bar.set_description(f"[{i}/{len(configs)}] {config.name}: training")
            noise = AnisotropicNoise(config.spec, schedule)
            model, run = demo.train(data.train, noise, settings, name=config.name,
                                    on_step=bar.update)
            bar.set_description(f"[{i}/{len(configs)}] {config.name}: sampling")
            start = time.perf_counter()
            run.samples = demo.sample(model, noise, opts["samples"], shape,
                                      steps=opts["sample_steps"], sampler=args.sampler,
                                      seed=args.seed, device=device, on_step=bar.update)
            run.sample_seconds = time.perf_counter() - start
            if not torch.isfinite(run.samples).all():
                raise demo.TrainingDiverged(
                    f"{config.name}: the samples are not finite (NaN or Inf): the model did not "
                    "train well; try a smaller --lr or more --steps")
            runs.append(run)
    finally:
        bar.close()
    return runs


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _print_demo_table(configs, runs, metrics: dict, floor: dict) -> None:
    header = ("config", "final loss", "rel. loss", "FD pixels", "FD rand. feat.", "spectrum err",
              "train s", "sample s")
    rows = [(c.name, _fmt(r.final_loss()), _fmt(r.final_relative_loss()),
             _fmt(metrics[c.name]["fd_pixels"]), _fmt(metrics[c.name]["fd_random_features"]),
             _fmt(metrics[c.name]["spectrum_error"]), f"{r.train_seconds:.1f}",
             f"{r.sample_seconds:.1f}") for c, r in zip(configs, runs)]
    rows.append(("real vs real", "-", "-", _fmt(floor["fd_pixels"]),
                 _fmt(floor["fd_random_features"]), _fmt(floor["spectrum_error"]), "-", "-"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    print()


DEMO_NOTES = (
    "final loss: training MSE between the predicted and the true (shaped) noise, mean over the "
    "last 10% of the steps; rel. loss: the same divided by the mean square of the noise target "
    "(antisqueezed noise has more variance, so raw losses of different noises do not compare).",
    f"FD pixels: Fréchet distance between Gaussians fitted to generated and held-out real images, "
    f"each image reduced to its {demo.PIXEL_GRID}x{demo.PIXEL_GRID} block means per channel "
    f"({3 * demo.PIXEL_GRID ** 2} numbers). FD rand. feat.: the same on {demo.FEATURE_WIDTH} "
    "features of a fixed random conv net (2 conv layers, global pooling; the same weights in every "
    "run). spectrum err: mean over the rings of |ln(P_generated / P_real)| of the radially "
    "averaged power spectrum (0.1 = about 10% off).",
    "real vs real: the same metrics between two disjoint held-out sets of real images of the same "
    "size: what the finite sample size alone gives; a model can only be judged above it.",
)


def _print_demo_header(opts: dict, args, device, pca, spectrum, model_params: int) -> None:
    size, n = opts["size"], opts["samples"]
    share = float(pca.eigenvalues[0] / pca.eigenvalues.sum())
    axis = ", ".join(f"{x:+.3f}" for x in pca.axes[:, 0].tolist())
    lines = [
        f"anisodiff demo{' --quick' if args.quick else ''}: a tiny diffusion model trained with 4 "
        f"kinds of forward noise on the built-in procedural images ({size}x{size} RGB, 1/f^2 "
        "spectrum, ImageNet colour statistics; no download), same seed for every run: same "
        "initial weights, data order, timesteps and white noise; only the shaping differs.",
        f"data: {opts['train_images']:,} training images, 2 x {n:,} held-out real images. Fitted "
        f"on the training set: principal colour axis v1 = ({axis}) ({100 * share:.1f}% of the colour "
        f"variance; SDM/HDM squeeze along it), spectrum P(r) ~ r^(2 alpha) with alpha = "
        f"{spectrum.alpha:.3f} (the power-law run uses the papers' mild alpha = "
        f"{demo.POWER_LAW_ALPHA}, not the fitted one).",
        f"model: TinyUNet, {model_params:,} parameters, predicts the shaped noise; {opts['steps']} "
        f"steps x {opts['batch_size']} images, AdamW lr {args.lr:g} (warm-up, cosine), EMA weights "
        f"sampled; linear VP schedule, T = 1000. Sampling: {n:,} images, {opts['sample_steps']} "
        f"{'DDIM (eta = 0)' if args.sampler == 'ddim' else 'DDPM (exact posterior)'} steps from "
        f"the shaped prior; device {device}.",
    ]
    for line in lines:
        print(textwrap.fill(line, width=100))
    print()


def _demo_report(args, opts, device, configs, runs, metrics, floor, fitted, radii, real_power,
                 figures, note, wall, cpu) -> dict:
    def curve(losses):  # about 100 points: the JSON stays small
        stride = max(1, len(losses) // 100)
        return [sum(losses[i:i + stride]) / len(losses[i:i + stride])
                for i in range(0, len(losses), stride)]

    return {
        "anisodiff_version": __version__,
        "note": note,
        "setting": {**opts, "sampler": args.sampler, "lr": args.lr, "seed": args.seed,
                    "device": str(device), "quick": args.quick,
                    "schedule": "VPSchedule.linear(T=1000)",
                    "sampling_timesteps": [t for t, _ in demo.sampling_timesteps(
                        1000, opts["sample_steps"])],
                    "model": "anisodiff.demo.TinyUNet", "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "metric_definitions": {"final_loss": DEMO_NOTES[0], "metrics": DEMO_NOTES[1],
                               "real_vs_real": DEMO_NOTES[2]},
        "fitted": fitted,
        "real_vs_real": floor,
        "radii": radii.tolist(),
        "real_radial_power": real_power.tolist(),
        "configs": {c.name: {"title": c.title, "spec": c.spec.to_dict(),
                             "final_loss": r.final_loss(),
                             "final_relative_loss": r.final_relative_loss(),
                             **metrics[c.name], "loss_curve": curve(r.losses),
                             "train_seconds": r.train_seconds, "sample_seconds": r.sample_seconds}
                    for c, r in zip(configs, runs)},
        "figures": figures,
        "seconds": {"wall": wall, "cpu": cpu},
    }


def _demo_figures(configs, runs, data: _DemoData, metrics, radii, real_power, floor_power, out,
                  opts, args) -> dict:
    cols = min(SAMPLE_GRID_COLUMNS, opts["samples"])
    rows = [(f"{c.title}   (FD pixels {metrics[c.name]['fd_pixels']:.3g}, FD random features "
             f"{metrics[c.name]['fd_random_features']:.3g}, spectrum error "
             f"{metrics[c.name]['spectrum_error']:.3g})", r.samples[:cols])
            for c, r in zip(configs, runs)]
    rows.append(("real (held-out) images", data.real[:cols]))
    size = opts["size"]
    what = (f"{opts['steps']} training steps, {opts['sample_steps']} {args.sampler.upper()} steps, "
            f"seed {args.seed}")
    samples = viz.plot_sample_grid(
        rows, out / "demo_samples.png",
        title=f"anisodiff demo: samples of a tiny UNet per forward noise ({size}x{size}, {what}; "
              "same white prior draw in every row)")
    spectra = viz.plot_radial_spectra(
        radii, real_power, {c.title: metrics[c.name]["radial_power"] for c in configs},
        out / "demo_spectra.png", floor=floor_power,
        title=f"anisodiff demo: radially averaged power spectra, generated vs real ({what})")
    return {"samples": samples, "spectra": spectra}


def _run_demo(args) -> int:
    opts = _demo_options(args)
    device = _demo_device(args.device)
    out = _make_out_dir(args.out)
    plot = not args.no_plot and importlib.util.find_spec("matplotlib") is not None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if device.type == "cuda":  # the same numbers on every run (cuDNN picks kernels otherwise)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    data = _demo_data(opts, args.seed)
    pca, spectrum = fit_statistics(data.train.split(1024), k=1, progress=False)
    configs = demo.demo_configs(pca.axes)
    schedule = demo.linear_schedule()
    params = sum(p.numel() for p in demo.TinyUNet(schedule, 3, opts["width"]).parameters())
    _print_demo_header(opts, args, device, pca, spectrum, params)

    try:
        runs = _train_and_sample(configs, data, opts, args, device, schedule)
    except demo.TrainingDiverged as exc:
        print(f"anisodiff demo: error: {exc}", file=sys.stderr)
        return 1
    features = demo.RandomFeatures()
    real_features = features(data.real)
    radii, real_power = demo.radial_power(data.real)
    floor = _evaluate(data.real_floor, data, features, real_features, real_power)
    floor_power = floor.pop("radial_power")
    metrics = {c.name: _evaluate(r.samples, data, features, real_features, real_power)
               for c, r in zip(configs, runs)}

    _print_demo_table(configs, runs, metrics, floor)
    note = _honesty_note(params, opts)
    for paragraph in (*DEMO_NOTES, note):
        print(textwrap.fill(paragraph, width=100))
    print()

    figures = None
    if not args.no_plot and not plot:
        print("No pictures: matplotlib is not installed. Install it with `pip install matplotlib` "
              "(or `pip install anisodiff[viz]`).")
    elif plot:
        figures = _demo_figures(configs, runs, data, metrics, radii, real_power,
                                torch.tensor(floor_power), out, opts, args)
        print(f"pictures: {figures['samples']}, {figures['spectra']}")
    fitted = {"axis": pca.axes[:, 0].tolist(), "eigenvalues": pca.eigenvalues.tolist(),
              "alpha": spectrum.alpha}
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    report = _demo_report(args, opts, device, configs, runs, metrics, floor, fitted, radii,
                          real_power, figures, note, wall, cpu)
    report_path = out / "demo_report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"report:   {report_path}")
    print(f"took {wall:.0f} s ({cpu:.0f} s of CPU time, {torch.get_num_threads()} threads)")
    return 0


# ---------------------------------------------------------------------------------------------
# anisodiff check
# ---------------------------------------------------------------------------------------------
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


def _add_check(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="measured vs analytic noise statistics for five operators, and a picture",
        description="Draw noise from five operators (isotropic, SDM, HDM, SAGD power law, SAGD "
                    "band-pass; C = 3, luminance axis, linear VP schedule at t = 999), compare its "
                    "covariance with the analytic one, and draw samples and spectra. Exits with 1 "
                    "if a check fails.")
    p.add_argument("--out", default="anisodiff_check", metavar="DIR",
                   help="output directory for check.png and check_report.json (default: "
                        "%(default)s)")
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


def _check_report(args, operators, checks: dict[str, viz.CovarianceCheck], figure) -> dict:
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


def _make_out_dir(text: str) -> Path:
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    return out


def _run_check(args) -> int:
    out = _make_out_dir(args.out)
    schedule = VPSchedule.linear()
    operators = check_operators()
    C, H, W = CHECK_SHAPE
    print(textwrap.fill(
        f"anisodiff check: C = {C} colour channels, principal axis v = {AXIS_NAME} (luminance), "
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
        figure = _draw_figure(operators, args.size, args.seed, schedule, out / "check.png")
        print(f"picture: {figure}")

    report = _check_report(args, operators, checks, figure)
    report_path = out / "check_report.json"
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
                    "minutes on 2 cores; --quick: well under a minute. --suite train / sampling / all "
                    "adds a UNet training step and a 50-step DDPM sampler with each noise (needs "
                    "diffusers). See benchmarks/README.md.")
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
                "check": (_add_check, _run_check), "fit": (_add_fit, _run_fit),
                "show": (_add_show, _run_show), "bench": (_add_bench, _run_bench)}


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
