"""Baselines: the forward-noise code users write today, without anisodiff.

The functions live in :mod:`anisodiff.bench.baselines` (so that the installed ``anisodiff bench``
command can run them); this module re-exports them for the scripts and tests in the source tree
(``benchmarks/run_cpu.py``, ``benchmarks/test_bench_cpu.py``, ``tests/test_baselines.py``). See
that module for what each baseline is and where it comes from.
"""
from __future__ import annotations

from anisodiff.bench.baselines import (  # noqa: F401  (re-exports)
    BASELINES,
    INPUT_PERTURBATION,
    LUMINANCE_AXIS,
    NOISE_OFFSET,
    PYRAMID_DISCOUNT,
    PYRAMID_ITERATIONS,
    SPEC_KINDS,
    TRAINER_BASELINES,
    Case,
    band_table,
    ddpm_input_perturbation,
    flow_matching,
    kohya_offset,
    kohya_offset_random,
    kohya_pyramid,
    kohya_pyramid_noise_like,
    eager_shaped_noise,
    eager_vectorised,
    isotropic_floor,
    make_case,
    make_compiled_eager,
    official_sdm,
    official_sdm_apply,
    official_sdm_ddpm_step,
    official_sdm_prior,
    official_sdm_squeeze_matrices,
    power_law_table,
    radius_table,
    sagd_appendix,
    supports,
)
from anisodiff.bench.baselines import __all__  # noqa: F401
