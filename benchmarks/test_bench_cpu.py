"""pytest-benchmark cases: fused CPU ``anisodiff.add_noise`` vs the baselines (benchmarks/baselines.py).

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only -k "B64"           # headline size
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-json out.json

Matrix: spec kind {sdm: SDM squeeze-only s=-0.4, sdm_powerlaw: SDM s=-0.4 + power law alpha=-0.04,
hdm: HDM s=-0.4, band: Band(0, 0.25)} x implementation {anisodiff_cpu (fused), eager_vectorised,
eager_rfft, official_sdm (squeeze-only kinds), sagd_appendix (kinds with a spectral part; for
sdm_powerlaw only the spatial half), isotropic_floor, compiled_eager (B=64 only, where torch.compile
works)} x B {16, 64, 128}, fp32 [B, 3, 32, 32]. Each (spec kind, B) is one comparison group.

These are measurements, never timed assertions: nothing here fails because something is slow.
For side-by-side ratios in one run use ``python benchmarks/run_cpu.py``.
"""
from __future__ import annotations

import functools
import time
import warnings

import pytest
import torch

import anisodiff as ad
import baselines as bl

BATCHES = (16, 64, 128)
SIZE = 32
IMPLS = ("anisodiff_cpu", "eager_vectorised", "eager_rfft", "compiled_eager", "official_sdm",
         "sagd_appendix", "isotropic_floor")
WARMUP_S = 0.2

pytestmark = pytest.mark.skipif(not ad.build_info().get("cpu"),
                                reason="anisodiff's compiled CPU ops are not built")


def _wanted(kind: str, impl: str, B: int) -> bool:
    if impl == "compiled_eager":
        return B == 64
    return bl.supports(impl, kind)


CASES = [(kind, impl, B) for kind in bl.SPEC_KINDS for B in BATCHES for impl in IMPLS
         if _wanted(kind, impl, B)]


@functools.lru_cache(maxsize=None)
def _case(kind: str, B: int):
    return bl.make_case(kind, B, 3, SIZE, SIZE, seed=0)


@functools.lru_cache(maxsize=1)
def _compiled():
    warnings.filterwarnings("ignore", message=".*Torchinductor does not support code generation for complex.*")
    return bl.make_compiled_eager()


def _fn(kind: str, impl: str, B: int):
    case = _case(kind, B)
    args, kw = case.baseline_args(impl), case.baseline_kwargs()
    if impl == "anisodiff_cpu":
        return lambda: ad.add_noise(case.x0, case.timesteps, case.spec, case.schedule, backend="cpu")
    if impl == "eager_rfft":
        return lambda: bl.eager_vectorised(*args, **kw, rfft=True)
    if impl == "compiled_eager":
        fn, why = _compiled()
        if fn is None:
            pytest.skip(why)
        return lambda: fn(*args, **kw)
    fn = bl.BASELINES[impl]
    return lambda: fn(*args, **kw)


@pytest.mark.parametrize("kind,impl,B", CASES, ids=[f"{k}-{i}-B{b}" for k, i, b in CASES])
def test_add_noise(benchmark, kind, impl, B):
    fn = _fn(kind, impl, B)
    t0 = time.perf_counter()
    fn()  # first call: torch.compile compiles here
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calls = 1
    while calls < 3 or time.perf_counter() - t0 < WARMUP_S:  # warm-up: caches, allocator, threads
        fn()
        calls += 1
    case = _case(kind, B)
    benchmark.group = f"{kind}: {case.title}, B={B}, 3x{SIZE}x{SIZE} fp32"
    benchmark.extra_info.update({
        "kind": kind, "impl": impl, "B": B, "shape": [B, 3, SIZE, SIZE], "dtype": "float32",
        "torch_num_threads": torch.get_num_threads(), "first_call_s": first_call_s,
        "note": "sagd_appendix computes only the spatial part" if
                (impl == "sagd_appendix" and kind == "sdm_powerlaw") else "",
    })
    out = benchmark(fn)
    assert out[0].shape == case.x0.shape  # a smoke check on the result, not on the time
