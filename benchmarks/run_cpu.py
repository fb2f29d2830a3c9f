#!/usr/bin/env python
"""Side-by-side timing of anisodiff's fused ops against the baselines (benchmarks/baselines.py).

    python benchmarks/run_cpu.py [--suite ops|train|sampling|all ...] [--quick | --smoke]
                                 [--json PATH] [--plot PATH] [--threads N]
                                 [--batch B ...] [--shapes CxHxW ... | --size N] [--kinds ...]
                                 [--ops ...] [--dtypes ...] [--no-compile] [--given-noise]
                                 [--wait-idle SECONDS] [--max-other-load CPUS] [--details]
                                 [--unet ...] [--train-batch B] [--sample-batch B] ...

A thin wrapper around :mod:`anisodiff.bench`, the driver of ``anisodiff bench`` (same options,
same tables, same JSON), that writes to ``benchmarks/results/<device>-<hostname>[-<suites>].json``
and ``.png`` unless ``--json`` / ``--plot`` say otherwise. Numbers are whatever the run measured: nothing is
extrapolated or hard-coded. Methodology: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from anisodiff import bench
# the machine-info and load helpers used to live here; kept importable for old scripts
from anisodiff.bench import busy_cpus, machine_info, other_load, wait_for_idle  # noqa: F401

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_cpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(
        p, json_help="where to write the JSON (default: benchmarks/results/<device>-<hostname>.json)",
        plot_help="where to write the picture (default: benchmarks/results/<device>-<hostname>.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = [sys.executable] + sys.argv if argv is None else ["benchmarks/run_cpu.py"] + list(argv)
    try:
        bench.execute(args, default_folder=RESULTS, prefix="", argv=command)
    except bench.BenchError as exc:
        print(f"run_cpu.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
