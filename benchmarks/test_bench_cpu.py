"""pytest-benchmark cases: the SAME cases as ``anisodiff bench`` (the anisodiff.bench package), CPU.

    python -m pytest benchmarks/ --benchmark-only                      # the --quick matrix + train
    python -m pytest benchmarks/ --benchmark-only -k "sdm and fp32"
    ANISODIFF_BENCH_PRESET=full python -m pytest benchmarks/ --benchmark-only --benchmark-json out.json

The parametrisation is generated from the benchmark driver: ``bench.case_matrix`` (op x spec kind x
B x shape x dtype of a preset, every op of ``bench.OPS``: add_noise, shaped_noise, ddpm_step;
``quick`` by default, ``ANISODIFF_BENCH_PRESET=full|quick|smoke``) and ``bench.case_impls`` (the
fused backends of the CPU that have the op, the baselines, torch.compile where the
preset has it), each callable built by ``bench.make_callable`` - so these cases and ``anisodiff
bench [--quick]`` cannot drift apart. Each (op, kind, B, shape, dtype) is one pytest-benchmark
group. ``test_train_step`` adds the train-step suite's variants (anisodiff/bench/train_suite.py, the
preset's CPU configuration: tiny UNet) when diffusers is installed.

These are measurements, never timed assertions: nothing here fails because something is slow.
pytest-benchmark times each case on its own (its calibration, rounds in a row); for side-by-side
interleaved ratios in one run, with the load filter, use ``anisodiff bench`` (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time

import pytest
import torch

import anisodiff as ad
from anisodiff import bench
from anisodiff.bench import impls

PRESET = os.environ.get("ANISODIFF_BENCH_PRESET", "quick")
if PRESET not in bench.PRESETS:
    raise pytest.UsageError(f"ANISODIFF_BENCH_PRESET: one of {sorted(bench.PRESETS)}, got {PRESET!r}")
DEVICE = "cpu"
WARMUP_S = 0.2
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

pytestmark = pytest.mark.skipif(not ad.build_info().get("cpu"),
                                reason="anisodiff's compiled CPU ops are not built")


def _settings(suites=("ops",)) -> dict:
    """The settings ``anisodiff bench --<preset>`` resolves to (cpu)."""
    p = argparse.ArgumentParser()
    bench.add_arguments(p, json_help="", plot_help="")
    argv = ["--suite", *suites] + ([] if PRESET == "full" else [f"--{PRESET}"])
    return bench.resolve_settings(p.parse_args(argv))


SETTINGS = _settings()
try:
    BACKENDS = bench.fused_backends(DEVICE)[0]
except bench.BenchError:  # not built: every case is skipped by pytestmark
    BACKENDS = ["cpu"]
# every torch.compile key the driver would make (bench.compiled_key: per op), compiled lazily
COMPILE_NAMES = ({bench.compiled_key(op, n): None for op in bench.COMPILED_OPS if op in SETTINGS["ops"]
                  for n in SETTINGS["compile_impls"]} if SETTINGS["compile"] else {})


def _primary(op: str) -> str:
    """The op's primary fused backend (ddpm_step: the first backend that has the op)."""
    return bench.op_backends(op, BACKENDS)[0][0]


def _impl_label(name: str, op: str = "add_noise") -> str:
    if name == "fused":
        return f"anisodiff_{_primary(op)}"
    if name.startswith("fused:"):
        return "anisodiff_" + name.split(":", 1)[1]
    return name


CASES = [(op, kind, B, shape, dt, impl)
         for op, kind, B, shape, dt in bench.case_matrix(SETTINGS)
         if bench.op_backends(op, BACKENDS)[0]
         for impl in bench.case_impls(op, kind, shape, dt, SETTINGS, COMPILE_NAMES, BACKENDS)[0]]


def _case_id(c) -> str:
    op, kind, B, shape, dt, impl = c
    return f"{op}-{kind}-B{B}-{'x'.join(map(str, shape))}-{dt}-{_impl_label(impl, op)}"


@functools.lru_cache(maxsize=None)
def _case(kind: str, B: int, shape: tuple, dt: str, step: bool = False):
    return bench.make_case(kind, B, *shape, bench.DTYPES[dt], DEVICE, step=step)


@functools.lru_cache(maxsize=1)
def _compiled() -> dict:
    return bench.compiled_fns({**SETTINGS, "device": DEVICE})[0]


def _fn(op, kind, B, shape, dt, impl):
    case = _case(kind, B, shape, dt, op == "ddpm_step")
    compiled = {}
    if bench.compiled_key(op, impl) in COMPILE_NAMES:
        if bench.compiled_key(op, impl) not in _compiled():
            pytest.skip(f"{impl}: torch.compile does not work here")
        # the op's {impl: fn}, as the driver hands it to make_callable
        compiled = bench.case_impls(op, kind, shape, dt, SETTINGS, _compiled(), BACKENDS)[1]
    fn = bench.make_callable(op, impl, case, bench.DTYPES[dt], DEVICE, _primary(op), compiled)
    try:
        fn()
    except RuntimeError:  # a dtype torch lacks (bf16 FFTs on the CPU): as the driver, in float32
        if bench.is_fused(impl) or dt == "fp32":
            raise
        fn = bench.make_callable(op, impl, case, bench.DTYPES[dt], DEVICE, _primary(op), compiled,
                                 upcast=True)
    return fn, case


def _warm(fn) -> float:
    t0 = time.perf_counter()
    fn()  # first call: torch.compile compiles here
    first = time.perf_counter() - t0
    t0, calls = time.perf_counter(), 1
    while calls < 3 or time.perf_counter() - t0 < WARMUP_S:  # caches, allocator, threads
        fn()
        calls += 1
    return first


@pytest.mark.parametrize("op,kind,B,shape,dt,impl", CASES, ids=[_case_id(c) for c in CASES])
def test_op(benchmark, op, kind, B, shape, dt, impl):
    fn, case = _fn(op, kind, B, shape, dt, impl)
    first_call_s = _warm(fn)
    C, H, W = shape
    benchmark.group = f"{op} {kind}: {bench.KIND_TITLES[kind]}, B={B}, {C}x{H}x{W} {dt}"
    benchmark.extra_info.update({
        "op": op, "kind": kind, "impl": _impl_label(impl, op), "B": B, "shape": [B, C, H, W],
        "dtype": dt, "preset": PRESET, "torch_num_threads": torch.get_num_threads(),
        "first_call_s": first_call_s, "note": impls._note(op, kind, impl),
        "bytes": bench.TRAFFIC_TENSORS[op] * B * C * H * W * (torch.finfo(bench.DTYPES[dt]).bits // 8),
    })
    out = benchmark(fn)
    first = out[0] if isinstance(out, tuple) else out
    assert first.shape == case.x0.shape  # a smoke check on the result, not on the time


# ---------------------------------------------------------------------------------------------
# the train-step suite's variants (anisodiff bench --suite train)
# ---------------------------------------------------------------------------------------------
TRAIN = _settings(("train",))["train"] if HAVE_DIFFUSERS else None


@functools.lru_cache(maxsize=1)
def _train_steps() -> dict:
    from anisodiff.bench import train_suite as bt

    return bt.make_train_steps(TRAIN, BACKENDS)[0]


def _train_variants() -> list[str]:
    if not HAVE_DIFFUSERS:
        return []
    from anisodiff.bench import train_suite as bt

    return list(bt.TRAIN_VARIANTS) + [f"anisodiff_sdm_{b}" for b in BACKENDS[1:]]


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="the train-step suite needs diffusers")
@pytest.mark.parametrize("variant", _train_variants())
def test_train_step(benchmark, variant):
    step = _train_steps()[variant]
    first_call_s = _warm(step)
    benchmark.group = (f"train step: {TRAIN['unet']} UNet, B={TRAIN['batch']}, amp {TRAIN['amp']} "
                       f"({PRESET} preset)")
    benchmark.extra_info.update({"variant": variant, "preset": PRESET, "settings": dict(TRAIN),
                                 "first_call_s": first_call_s})
    loss = benchmark(step)
    assert torch.isfinite(loss)
