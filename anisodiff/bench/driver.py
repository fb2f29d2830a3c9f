"""One benchmark run from parsed options, shared by ``anisodiff bench`` and ``benchmarks/run_cpu.py``
(:func:`execute`): resolve the settings, check the outputs before any long work, run the suites,
print the tables, write the JSON record and the pictures."""
from __future__ import annotations

import argparse
import json
import pathlib
import socket
import sys
import time

import torch

from . import cases
from .errors import BenchError
from .machine import busy_cpus, loadavg, wait_for_idle
from .models import require_diffusers
from .ops_suite import run
from .options import resolve_settings
from .plot import plot_models, plot_report
from .report import base_report, format_sampling, format_table, format_train
from .sampling_suite import run_sampling
from .train_suite import run_train

__all__ = ["execute", "default_paths", "models_plot_path", "command_argv", "check_output"]


def default_paths(device: str, folder: pathlib.Path = pathlib.Path("."), prefix: str = "anisodiff-bench-",
                  suites=("ops",)):
    """``<prefix><device>-<host>[-<suites>].json`` and ``.png`` in ``folder`` (the suites named
    unless the run is the op benchmark alone)."""
    host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in socket.gethostname())
    stem = f"{prefix}{device}-{host or 'local'}"
    if list(suites) != ["ops"]:
        stem += "-" + "-".join(suites)
    return folder / f"{stem}.json", folder / f"{stem}.png"


def models_plot_path(plot_path: pathlib.Path, suites) -> pathlib.Path:
    """Where the train / sampling picture goes: ``--plot`` itself when the op benchmark did not
    run, else next to it (``<stem>-train-sampling.png``)."""
    if "ops" not in suites:
        return plot_path
    rest = "-".join(x for x in suites if x != "ops")
    return plot_path.with_name(f"{plot_path.stem}-{rest}{plot_path.suffix or '.png'}")


def command_argv(parser: argparse.ArgumentParser, args, prog: list[str]) -> list[str]:
    """The command line that gives ``args``: ``prog`` and every option that differs from its
    default (the run records it; in-process calls like ``main([...])`` leave ``sys.argv`` alone)."""
    out = list(prog)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "bench_parser"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") \
            else action.option_strings[0]
        if isinstance(value, bool):
            out.append(flag)
        elif isinstance(value, list):
            out += [flag] + ["x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out


def check_output(path: pathlib.Path, option: str) -> pathlib.Path:
    if not path.parent.is_dir():
        raise BenchError(f"{option} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise BenchError(f"{option} {path}: is a folder, expected a file name")
    return path


def execute(args, *, default_folder: pathlib.Path = pathlib.Path("."), prefix: str = "anisodiff-bench-",
            argv: list[str] | None = None, out=None, progress=None) -> dict:
    """Resolve the options, check the outputs (before any long work), run, print the table (to
    ``out``, default stdout; progress lines to ``progress``, default stderr), write the JSON and the
    picture. Raises :class:`BenchError` for what cannot run as asked."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    s = resolve_settings(args)
    suites = s["suites"]
    json_default, plot_default = default_paths(s["device"], default_folder, prefix, suites)
    json_path = check_output(args.json or json_default, "--json")
    plot_path = None if args.no_plot else check_output(args.plot or plot_default, "--plot")
    if plot_path is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise BenchError("the picture needs matplotlib: pip install matplotlib (or "
                             "anisodiff[viz]), or pass --no-plot")
    backends, _ = cases.fused_backends(s["device"])  # fail fast: no CUDA device, no compiled ops
    models = [x for x in suites if x != "ops"]
    if models:
        require_diffusers()
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    t0 = time.perf_counter()
    if "ops" in suites:
        report = run(s, progress=progress, argv=argv)
        print(format_table(report, details=args.details), file=out)
    else:
        busy_before = wait_for_idle(s["wait_idle"]) if s["wait_idle"] > 0 else busy_cpus(0.5)
        settings = {k: v for k, v in s.items() if k in ("mode", "device", "threads", "suites",
                                                        "max_other_load", "wait_idle")}
        settings.update(threads=torch.get_num_threads(), fused_backend=backends[0],
                        fused_backends=backends)
        report = {**base_report(s, argv, s["device"]), "settings": settings,
                  "loadavg_before": loadavg(), "busy_cpus_before": busy_before,
                  "copy_bandwidth": None, "elapsed_s": 0.0, "results": [], "cases": [], "goal": [],
                  "backend_goals": []}
    if "train" in suites:
        report["train_step"] = run_train(s["train"], backends=backends, progress=progress)
        print(("\n" if "ops" in suites else "") + format_train(report["train_step"]), file=out)
    if "sampling" in suites:
        report["sampling"] = run_sampling(s["sampling"], backends=backends,
                                                      progress=progress)
        print("\n" + format_sampling(report["sampling"]), file=out)
    report["total_elapsed_s"] = time.perf_counter() - t0
    if "ops" not in suites:
        report.update(loadavg_after=loadavg(), busy_cpus_after=busy_cpus(0.5))
    pictures = []
    if plot_path is not None:
        if "ops" in suites:
            pictures.append(str(plot_path))
        if models:
            pictures.append(str(models_plot_path(plot_path, suites)))
    report["pictures"] = pictures
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {json_path} ({report['total_elapsed_s']:.1f} s in all)", file=out)
    if plot_path is not None:
        if "ops" in suites:
            print(f"picture: {plot_report(report, plot_path)}", file=out)
        if models:
            print(f"picture: {plot_models(report, models_plot_path(plot_path, suites))}",
                  file=out)
    return report
