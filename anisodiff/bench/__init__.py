"""``anisodiff bench``: the fused ops against the code users write today, side by side.

    anisodiff bench [--device cpu|cuda] [--quick | --smoke] [--suite ops|train|sampling|all ...]
                    [--json OUT.json] [--plot OUT.png]

Suites: ``ops`` (default, :mod:`.ops_suite`) times the fused ops against the baselines; ``train``
(:mod:`.train_suite`: one optimizer step of the SDM paper's UNet with each noise implementation) and
``sampling`` (:mod:`.sampling_suite`: 50 DDPM steps with each sampler) need diffusers.

For every case (op x spec kind x batch size x plane shape x dtype) every implementation is timed in
ONE process, interleaved: each round runs one timing block of every implementation in turn (the
order rotated every round), so slow drift or a neighbour's load hits all of them alike; rounds
during which OTHER processes used more than ``--max-other-load`` CPUs (/proc/stat minus this
process's CPU time) are dropped for every implementation and replaced by extra rounds. Reported per
case and implementation: the median and inter-quartile range of the per-call time, the achieved
bandwidth over the op's traffic floor (``add_noise``: read x0, write x_t and the target = 3 tensors;
``shaped_noise``: write 1 tensor; ``ddpm_step``: read x_t and the model output, write x_prev and
x0_hat = 4 tensors), that bandwidth as a percentage of the machine's copy bandwidth
(measured in the same run, before and after the cases), the speed-up of the fused op over every
baseline and its overhead over the isotropic floor. Every fused backend of the device is timed
(``available_backends(device)`` minus ``reference``; the interpreted Triton backend on the CPU is
skipped; for ``ddpm_step`` only the backends with the op, :data:`STEP_BACKENDS`), side by side,
with the time ratio of each to the first. Everything is measured by this
run: no number is entered by hand or extrapolated. Methodology: benchmarks/README.md.

The timing logic is library code so the installed console script can run it;
``benchmarks/run_cpu.py`` is a thin wrapper with the source tree's default output paths.

One concept per module, in the order the data flows (no module imports one further down, except
:mod:`.driver`, which ties them together):

    errors          BenchError: what cannot run as asked (exit code 2)
    machine         CPU, torch, build and GPU facts; how busy the other processes keep the CPUs
    timing          clocks, copy bandwidth, calibrated blocks (Timer), interleaved rounds
    baselines       the code users write today (official SDM, SAGD appendix, eager, floors)
    cases           ops, spec kinds, dtypes, the inputs of a case, the matrix, the fused backends
    impls           what a case times: fused backends, baselines, torch.compile, as callables
    goals           the performance goals and their MET / NOT MET verdicts
    report          the JSON record's common keys and the text tables
    ops_suite       --suite ops: every case, every implementation, interleaved
    models          the UNets and statistics the train and sampling suites share
    train_suite     --suite train: one optimizer step with each noise implementation
    sampling_suite  --suite sampling: 50 DDPM steps with each sampler
    plot            the pictures (matplotlib)
    options         presets, argparse options, the settings of a run
    driver          execute(): one run from parsed options (anisodiff bench, benchmarks/run_cpu.py)

The names below are re-exported for ``from anisodiff import bench``; tests that replace a function
patch it in the module that defines it (e.g. ``anisodiff.bench.cases.fused_backends``).
"""
from __future__ import annotations

from .cases import (DTYPES, KIND_TITLES, KINDS, OPS, STEP_BACKENDS, STEP_PREV, STEP_T,
                    TRAFFIC_TENSORS, case_matrix, fused_backends, make_case, op_backends)
from .driver import command_argv, default_paths, execute
from .errors import BenchError
from .goals import backend_goal_lines, backend_goals, cuda_goals, goal_verdict
from .impls import (COMPILED_OPS, case_impls, compiled_fns, compiled_key, impls_for, is_fused,
                    make_callable, same_operator)
from .machine import busy_cpus, machine_info, other_load, wait_for_idle
from .ops_suite import run
from .options import CUDA_PRESETS, PRESETS, SUITES, add_arguments, resolve_settings
from .plot import plot_models, plot_report
from .report import format_table
from .timing import Timer, copy_bandwidth, interleave

__all__ = [
    "BenchError", "add_arguments", "resolve_settings", "run", "execute", "format_table",
    "plot_report", "plot_models", "machine_info", "copy_bandwidth", "make_case", "case_matrix",
    "case_impls", "make_callable", "compiled_fns", "compiled_key", "fused_backends", "op_backends",
    "impls_for", "is_fused", "same_operator", "interleave", "Timer", "backend_goals", "cuda_goals",
    "backend_goal_lines", "goal_verdict", "command_argv", "default_paths", "busy_cpus",
    "other_load", "wait_for_idle", "KINDS", "KIND_TITLES", "OPS", "STEP_T", "STEP_PREV",
    "STEP_BACKENDS", "TRAFFIC_TENSORS", "COMPILED_OPS", "DTYPES", "SUITES", "PRESETS",
    "CUDA_PRESETS",
]
