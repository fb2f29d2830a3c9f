"""The ``anisodiff`` command line: it parses the options and hands them to the module of the command.

    anisodiff info    what this install was built with and which backends it can run
    anisodiff demo    train a tiny diffusion model with isotropic, SDM, HDM and power-law noise
                      on built-in images, sample it and compare: table, JSON, pictures (demo.py)
    anisodiff check   five forward-noise operators: measured versus analytic covariance, a picture
                      (check.py)
    anisodiff fit     fit a spec to data (images or cached latents): principal colour axes and power
                      spectrum -> spec.json, terminal-SNR warnings (fit.py)
    anisodiff show    draw the noise of a spec.json: samples, spectra, colour-axis variances,
                      terminal-SNR warnings (show.py)
    anisodiff bench   time the fused ops against the baselines: table, JSON, picture (bench/)

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` listed in
``_SUBCOMMANDS``; ``_run_<name>`` checks what argparse cannot and calls the command's ``run``. A bad
argument or unreadable input exits with code 2 and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import bench, check, datasets, demo, diagnostics, fit, show
from ._argtypes import UsageError, finite_float, int_in
from ._ext import available_backends, build_info
from ._version import __version__
from .spec import RADIUS_CONVENTIONS, SQUEEZE_SCHEDULES

__all__ = ["main", "build_parser"]

# what the demo takes (measured: see the README, "The demo")
DEMO_TIME = "About 2 minutes on 2 idle CPU cores (many times that on a busy machine)"
QUICK_TIME = "about 20 s on a busy 2-core machine, mostly importing torch"


def _check_output(path: Path, option: str) -> Path:
    """``path`` if its folder exists (checked before any long work), else a UsageError."""
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder, expected a file name")
    return path


def _make_out_dir(text: str) -> Path:
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    return out


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


def _snr_threshold(text: str) -> float:
    """argparse type: a finite SNR threshold > 0."""
    return _positive_float(text)


def _add_snr_options(p, what: str) -> None:
    """The terminal-SNR options of `fit` and `show`."""
    p.add_argument("--snr-threshold", type=_snr_threshold, default=diagnostics.SNR_THRESHOLD,
                   metavar="X",
                   help=f"warn (stderr, one line each) for every frequency band and principal "
                        f"direction of {what} whose SNR at t = T stays above X: x_T's variance "
                        f"there is (1 + SNR) times what the shaped prior assumes, so the default "
                        f"flags a mismatch above 10%% (default: %(default)s)")
    p.add_argument("--snr-schedule", choices=diagnostics.SNR_SCHEDULES, default="linear",
                   help="VP beta schedule (T = 1000) of the terminal-SNR check: linear (DDPM) or "
                        "scaled_linear (Stable Diffusion) (default: %(default)s)")


def _threads(text: str) -> int | str:
    """argparse type: ``auto`` or a thread count in [1, 1024]."""
    return text if text == "auto" else int_in(1, 1024)(text)


def _add_demo(subparsers) -> None:
    full, quick = demo.DEMO_PRESET, demo.QUICK_PRESET
    p = subparsers.add_parser(
        "demo", help="train a tiny diffusion model with four kinds of forward noise and compare",
        description="On the built-in procedural images (1/f^2 spectrum, natural colour statistics; "
                    "no download): fit the principal colour axis and the spectrum, train a small "
                    "UNet four times from the same seed (isotropic noise, SDM and HDM with "
                    "s = -0.4 along the fitted axis, SAGD power law alpha = -0.04), sample each "
                    "with its shaped prior and DDIM/DDPM steps, and report the final training "
                    "loss, Fréchet distances to held-out real images (pixels and a fixed "
                    "random-feature space) and the radial power-spectrum error. Writes a table, "
                    "demo_report.json, demo_samples.png and demo_spectra.png, printing the expected "
                    f"time first. {DEMO_TIME}; --quick {QUICK_TIME}. Tiny models, short runs: a "
                    "demo, not a benchmark.")
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
    p.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                   help="CPU threads for torch: auto times a few training and sampling steps at 1 "
                        "thread and at one per core and keeps the faster for each phase (on a "
                        "machine busy with other jobs, torch's threads wait on each other and 1 is "
                        "often faster); N fixes the count, for runs that repeat bit for bit "
                        "(default: %(default)s)")
    p.add_argument("--out", default="anisodiff_demo", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a run of a few seconds with tiny sizes (what the tests run); explicit "
                        "options win")
    p.add_argument("--no-plot", action="store_true", help="skip the pictures (table and JSON only)")


def _run_demo(args) -> int:
    try:
        opts = demo.resolve_options(args.quick, **{name: getattr(args, name)
                                                   for name in demo.DemoPreset.__dataclass_fields__})
        device = demo.resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = _make_out_dir(args.out)
    return demo.run(opts, out, sampler=args.sampler, lr=args.lr, seed=args.seed, device=device,
                    threads=args.threads, plot=not args.no_plot, quick=args.quick)


# ---------------------------------------------------------------------------------------------
# anisodiff check
# ---------------------------------------------------------------------------------------------
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
    p.add_argument("--samples", type=int_in(500), default=check.DEFAULT_SAMPLES, metavar="N",
                   help="draws per operator for the covariance check (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="Philox seed of the noise stream (default: %(default)s)")
    p.add_argument("--size", type=int_in(8, 256), default=64,
                   help="plane size of the picture, in pixels (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the picture (table and JSON only)")


def _run_check(args) -> int:
    return check.run(_make_out_dir(args.out), samples=args.samples, seed=args.seed,
                     size=args.size, plot=not args.no_plot)


# ---------------------------------------------------------------------------------------------
# anisodiff fit
# ---------------------------------------------------------------------------------------------
def _add_fit(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="fit a noise spec to data (principal colour axes, power spectrum)",
        description="Read DATA once, fit the principal colour axes of its pixel covariance (for the "
                    "SDM/HDM squeeze) and its power spectrum (for the SAGD weights), print them with "
                    "per-channel statistics and write a NoiseSpec JSON; then warn where the written "
                    "spec leaves the data a high SNR at t = T. 8-bit images are mapped to [-1, 1]; "
                    "arrays and latents are used as stored.")
    p.add_argument("data", metavar="DATA",
                   help="a folder of PNG/JPEG images (searched recursively; one size, or --size), "
                        "a uint8 .npy/.npz array [N, H, W, C], cached latents (a float .npy/.npz, "
                        ".pt/.pth or .safetensors file, or a folder of them; [C, H, W] per file, "
                        "[N, C, H, W], or video [N, C, F, H, W] with per-frame statistics; any "
                        "channel count) or a built-in dataset: "
                        f"{', '.join(datasets.BUILTIN_DATASETS)} (1/f^2 images with correlated "
                        "colours, generated from --seed)")
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
    p.add_argument("--spectral", choices=fit.SPECTRAL_CHOICES, default="none",
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
                   help="images (latents) per batch; latent files are read in chunks of B "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="seed of the procedural dataset (default: %(default)s)")
    p.add_argument("--key", default=None, metavar="NAME",
                   help="the entry of multi-tensor latent files (.npz, .pt dicts, .safetensors) "
                        f"(default: the only one, else the first of {', '.join(datasets.LATENT_KEYS)})")
    p.add_argument("--report", default=None, metavar="STATS.json",
                   help="also write every statistic as JSON: per-channel mean, std, alpha, the "
                        "PCA, the radial spectrum, the terminal SNR (`anisodiff show --stats` "
                        "reads it)")
    _add_snr_options(p, "the written spec on DATA")


def _run_fit(args) -> int:
    report = None if args.report is None else _check_output(Path(args.report), "--report")
    return fit.run(args.data, _check_output(Path(args.out), "-o"), k=args.k,
                   strength=args.strength, variant=args.variant, schedule=args.schedule,
                   spectral=args.spectral, eps=args.eps, radius=args.radius, size=args.size,
                   limit=args.limit, batch_size=args.batch_size, seed=args.seed, key=args.key,
                   report=report, snr_threshold=args.snr_threshold,
                   snr_schedule=args.snr_schedule)


# ---------------------------------------------------------------------------------------------
# anisodiff show
# ---------------------------------------------------------------------------------------------
def _timesteps(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated timesteps in [0, show.SHOW_T)."""
    parse = int_in(0, show.SHOW_T - 1)
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
                    "with t is drawn once. Warns where the spec leaves the data (white unit-variance "
                    "data, or --stats) a high SNR at t = T.")
    p.add_argument("spec", metavar="SPEC.json", help="a NoiseSpec JSON file")
    p.add_argument("-o", "--out", default="noise.png", metavar="PNG",
                   help="where to write the picture (default: %(default)s)")
    p.add_argument("--timesteps", type=_timesteps, default=(0, 500, 999), metavar="T,T,...",
                   help="timesteps to draw (default: 0,500,999)")
    p.add_argument("--size", type=int_in(8, 512), default=None, metavar="N",
                   help=f"plane size (default: {show.SHOW_SIZE}, or the size of a SpectralTable)")
    p.add_argument("--channels", type=int_in(2, 64), default=None, metavar="C",
                   help="channels (default: the squeeze's, else 3)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="Philox seed of the noise (default: %(default)s)")
    p.add_argument("--stats", default=None, metavar="STATS.json",
                   help="data statistics for the terminal-SNR check: the --report of `anisodiff "
                        "fit` (sets the channels and the plane size); default: white data with "
                        "unit variance per channel")
    _add_snr_options(p, "the spec on the data")


def _run_show(args) -> int:
    return show.run(args.spec, _check_output(Path(args.out), "-o"), timesteps=args.timesteps,
                    size=args.size, channels=args.channels, seed=args.seed, stats=args.stats,
                    snr_threshold=args.snr_threshold, snr_schedule=args.snr_schedule)


# ---------------------------------------------------------------------------------------------
# anisodiff bench
# ---------------------------------------------------------------------------------------------
def _add_bench(subparsers) -> None:
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
