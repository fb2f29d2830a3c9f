"""pytest-benchmark setup for the CPU benchmarks: machine info (CPU model, cores, torch threads,
anisodiff build, load average) in the report header and in the saved JSON
(``--benchmark-json`` / ``--benchmark-autosave``)."""
from __future__ import annotations

import pathlib
import sys

import torch

import anisodiff as ad
from anisodiff import bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # `import baselines`


def pytest_report_header(config):
    info = bench.machine_info()
    return (f"anisodiff {ad.__version__} build: {ad.build_info()}\n"
            f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
            f"cpu {info['cpu_model']!r} x{info['logical_cpus']}, loadavg {info['loadavg']}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["anisodiff"] = bench.machine_info()
