"""``anisodiff bench``: the fused ops against the code users write today, side by side.

    anisodiff bench [--device cpu|cuda] [--quick | --smoke] [--suite ops|train|sampling|all ...]
                    [--json OUT.json] [--plot OUT.png]

Suites: ``ops`` (default; this module) times the fused ops against the baselines; ``train`` (one
optimizer step of the SDM paper's UNet with each noise implementation) and ``sampling`` (50 DDPM
steps with each sampler) live in :mod:`anisodiff.bench_train` and need diffusers.

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

The timing logic is here (library code) so the installed console script can run it;
``benchmarks/run_cpu.py`` is a thin wrapper with the source tree's default output paths.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import pathlib
import platform
import shlex
import socket
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

from . import __version__
from . import bench_baselines as bl
from ._argtypes import int_in, nonneg_float
from ._ext import available_backends, build_info
from .ops import add_noise, shaped_noise
from .sampling import AnisotropicNoise
from .spec import NoiseSpec

__all__ = [
    "BenchError", "add_arguments", "resolve_settings", "run", "execute", "format_table",
    "plot_report", "machine_info", "copy_bandwidth", "make_case", "case_matrix", "case_impls",
    "make_callable", "compiled_fns", "fused_backends", "op_backends", "interleave", "Timer",
    "backend_goals", "KINDS", "OPS", "STEP_T", "STEP_PREV", "STEP_BACKENDS", "DTYPES", "SUITES", "PRESETS", "CUDA_PRESETS",
]

FORMAT = "anisodiff-bench"
# 2: several fused backends per case (rows with "fused": true, "backend", "primary"; per-case
# "backends" and "backend_ratios"), "suites", "backend_goals", the "train_step" and "sampling"
# sections. Every key of version 1 is still there with its meaning (the primary backend's numbers).
FORMAT_VERSION = 2
SUITES = ("ops", "train", "sampling")

OPS = ("add_noise", "shaped_noise", "ddpm_step")
# bytes moved by the op at least, in tensors of the noise's shape: add_noise reads x0 and writes x_t
# and the target; shaped_noise writes the noise; ddpm_step reads x_t and the model output and writes
# x_prev and x0_hat
TRAFFIC_TENSORS = {"add_noise": 3, "shaped_noise": 1, "ddpm_step": 4}
# ddpm_step: one ancestral step (mode="official") at this fixed timestep, to STEP_PREV, with a random
# model output and x_t = sqrt(abar) x0 + sqrt(1 - abar) e (bench_baselines.step_inputs)
STEP_T, STEP_PREV = 500, 499
# the fused backends that have the DDPM-step op (AnisotropicNoise.ddpm_step(backend=...));
# "reference" is anisodiff's vectorised float64 step (the tests stand it in for a second backend)
STEP_BACKENDS = ("cpu", "cuda", "triton", "reference")
# ops with torch.compile baselines (compiled per op: add_noise's keys are the impl names,
# the others' "<op>:<impl>")
COMPILED_OPS = ("add_noise", "ddpm_step")

KINDS = ("iso", "sdm", "hdm", "powerlaw", "band", "sdm_powerlaw")
KIND_TITLES = {
    "iso": "isotropic (white)",
    "sdm": "SDM squeeze s=-0.4",
    "hdm": "HDM (Heisenberg) s=-0.4",
    "powerlaw": "power law alpha=-0.04",
    "band": "band [0, 0.25] cycles/px",
    "sdm_powerlaw": "SDM s=-0.4 + power law alpha=-0.04",
}
SPECTRAL_KINDS = ("powerlaw", "band", "sdm_powerlaw")
SQUEEZE_ONLY_KINDS = ("sdm", "hdm")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

FLOOR = "isotropic_floor"
WHITE = "anisodiff_white"
COMPILED = ("compiled_eager", "compiled_eager_fallback_random", "compiled_eager_max_autotune")
CPU_COMPILED = COMPILED[:2]  # max-autotune is the GPU goal's baseline; on a CPU it only adds minutes
# every implementation's column in the table and slot in the plot, in this order (after the fused op)
BASELINE_ORDER = ("eager_vectorised", "eager_rfft", *COMPILED, "official_sdm", "sagd_appendix")
IMPL_ORDER = ("fused", "fused_alt", *BASELINE_ORDER, FLOOR, WHITE)

IMPLS = {
    "fused": "anisodiff.add_noise / shaped_noise / AnisotropicNoise.ddpm_step (mode='official') on "
             "each fused backend of the device that has the op (the JSON names them "
             "anisodiff_<backend>; the first one is the primary), canonical Philox stream, seed "
             "drawn from torch's generator",
    "eager_vectorised": "randn_like + fft2/ifft2 (calibrated w) + einsum S(t) (+ mix for add_noise; "
                        "+ x0_hat, clip in S^-1 coordinates and the DDPM update for ddpm_step)",
    "eager_rfft": "eager_vectorised with rfft2/irfft2 instead of fft2/ifft2 (spectral kinds)",
    "compiled_eager": "torch.compile(eager_vectorised), default inductor options (add_noise, "
                      "ddpm_step)",
    "compiled_eager_fallback_random": "torch.compile(eager_vectorised), inductor "
                                      "fallback_random=True (aten randn) (add_noise, ddpm_step)",
    "compiled_eager_max_autotune": "torch.compile(eager_vectorised, mode='max-autotune') (the "
                                   "baseline of issue 3's GPU goal; full CUDA runs only: its "
                                   "autotuning takes minutes)",
    "official_sdm": "official SDM code: per-sample .item() loop building S, bmm, diffusers add_noise "
                    "(add_noise, squeeze-only kinds); ddpm_step: the official sampler step "
                    "(the loop, linalg.inv, 4 bmm around diffusers DDPMScheduler.step; needs "
                    "diffusers)",
    "sagd_appendix": "SAGD App. E: randn, fftn/ifftn, per-plane std normalisation, diffusers "
                     "add_noise (add_noise, spectral kinds; only the spatial half of sdm_powerlaw)",
    FLOOR: "no anisotropy: torch.randn_like + diffusers add_noise (add_noise), torch.randn "
           "(shaped_noise), diffusers-style DDPMScheduler.step with torch.randn_like (ddpm_step)",
    WHITE: "anisodiff with NoiseSpec(): the fused op's own white-noise floor",
}

# The foundation goal: fused add_noise >= 2x faster than eager_vectorised at B=64, 3x32x32 fp32.
HEADLINE = {"op": "add_noise", "B": 64, "shape": (3, 32, 32), "dtype": "fp32",
            "kinds": ("sdm", "sdm_powerlaw"), "baseline": "eager_vectorised", "target": 2.0}

# issue 4: the Triton backend within 1.3x of the CUDA backend's time, and faster than torch.compile
# of the eager code, per case.
TRITON_VS_CUDA_TARGET = 1.3

# Presets. "full" is the matrix of the benchmark issue; "quick" the headline size for every kind,
# op and dtype; "smoke" a tiny case of each for the test suite (it checks the plumbing, not speed).
# On --device cuda, CUDA_PRESETS replace them: the full matrix of issue 7 item 2 and a quick run
# sized for a target of about two minutes on an H100.
PRESETS = {
    "full": {"batch": [1, 16, 128, 512], "shapes": [(3, 32, 32), (3, 64, 64), (4, 64, 64)],
             "dtypes": ["fp32", "bf16"], "repeats": 15, "min_repeats": 3, "block_ms": 5.0,
             "warmup": 0.01, "group_s": 0.25, "max_group_s": 3.0, "max_rounds_factor": 2,
             "compile": True, "copy_mib": 256, "copy_repeats": 7},
    "quick": {"batch": [64], "shapes": [(3, 32, 32)], "dtypes": ["fp32", "bf16"], "repeats": 11,
              "min_repeats": 5, "block_ms": 5.0, "warmup": 0.02, "group_s": 0.4,
              "max_group_s": 2.0, "max_rounds_factor": 3, "compile": False, "copy_mib": 128,
              "copy_repeats": 7},
    "smoke": {"batch": [2], "shapes": [(3, 16, 16)], "dtypes": ["fp32", "bf16"], "repeats": 3,
              "min_repeats": 3, "block_ms": 0.5, "warmup": 0.0, "group_s": 0.01,
              "max_group_s": 0.3, "max_rounds_factor": 2, "compile": False, "copy_mib": 16,
              "copy_repeats": 3},
}
GPU_SHAPES = [(3, 32, 32), (3, 64, 64), (4, 64, 64), (4, 128, 128), (3, 256, 256)]
CUDA_PRESETS = {
    # 3 ops x 6 kinds x 4 B x 5 shapes x 2 dtypes = 720 cases; torch.compile (default options only:
    # fallback_random is a CPU matter) at fp32 and the first shape
    "full": {"batch": [1, 16, 128, 512], "shapes": GPU_SHAPES, "dtypes": ["fp32", "bf16"],
             "repeats": 11, "min_repeats": 3, "block_ms": 2.0, "warmup": 0.005, "group_s": 0.1,
             "max_group_s": 1.0, "max_rounds_factor": 2, "compile": True,
             "compile_impls": ["compiled_eager", "compiled_eager_max_autotune"], "copy_mib": 1024,
             "copy_repeats": 7},
    # 3 ops x 6 kinds x B 128 x {3x32x32, 4x64x64, 3x256x256} x 2 dtypes = 108 cases, torch.compile
    # once per kind (B = 128, fp32, 3x32x32)
    "quick": {"batch": [128], "shapes": [(3, 32, 32), (4, 64, 64), (3, 256, 256)],
              "dtypes": ["fp32", "bf16"], "repeats": 9, "min_repeats": 3, "block_ms": 2.0,
              "warmup": 0.005, "group_s": 0.1, "max_group_s": 0.6, "max_rounds_factor": 2,
              "compile": True, "compile_impls": ["compiled_eager"], "copy_mib": 1024,
              "copy_repeats": 7},
    "smoke": {**PRESETS["smoke"], "copy_mib": 64},
}
# the CPU-load filter: rounds during which other processes used more CPUs than this are dropped
# (a GPU run is launch-bound at worst, and GPU hosts run their own daemons: a looser default)
DEFAULT_MAX_OTHER_LOAD = {"cpu": 0.2, "cuda": 4.0}


class BenchError(Exception):
    """The benchmark cannot run as asked (no CUDA device, ops not built, a bad option)."""


# ---------------------------------------------------------------------------------------------
# machine info and load
# ---------------------------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, int | None]:
    model, cores = "unknown", set()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", None
    phys = core = None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and model == "unknown":
            model = val
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
        elif not key and core is not None:
            cores.add((phys, core))
            phys = core = None
    if core is not None:
        cores.add((phys, core))
    return model, (len(cores) or None)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, machine busy CPU-s from /proc/stat, this process's CPU-s)."""
    try:
        vals = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]
    return time.perf_counter(), (sum(vals) - idle) / _CLK_TCK, time.process_time()


def other_load(before, after) -> float | None:
    """CPUs used by OTHER processes between two :func:`_cpu_snapshot` s (0.1-CPU resolution for
    ~100 ms windows: /proc/stat counts in 1/CLK_TCK s)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def busy_cpus(window_s: float = 1.0) -> float | None:
    """CPUs kept busy by OTHER work during ``window_s`` seconds of this process sleeping
    (from /proc/stat; 0 = idle machine, 2.0 = two cores fully taken)."""
    def snap():
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = snap()
        time.sleep(window_s)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    total, idle = t1 - t0, i1 - i0
    if total <= 0:
        return None
    return round((total - idle) / total * (os.cpu_count() or 1), 2)


def wait_for_idle(max_wait_s: float, threshold: float = 0.2) -> float | None:
    """Poll :func:`busy_cpus` until it drops below ``threshold`` or ``max_wait_s`` passes."""
    t0 = time.perf_counter()
    busy = busy_cpus()
    while busy is not None and busy >= threshold and time.perf_counter() - t0 < max_wait_s:
        busy = busy_cpus()
    return busy


def machine_info(device: str = "cpu") -> dict:
    """CPU model and cores, torch and its threads, anisodiff's build, the GPU on ``cuda``."""
    model, physical = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "hostname": socket.gethostname() or "local",
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "cpus_usable": affinity,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "anisodiff_version": __version__,
        "anisodiff_build_info": build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: v for k, v in os.environ.items()
                if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "LD_PRELOAD",
                         "ANISODIFF_CPU_CAPABILITY", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                         "CUDA_LAUNCH_BLOCKING", "PYTORCH_CUDA_ALLOC_CONF")
                or k.startswith("MALLOC_") or k.startswith("GOMP_") or k.startswith("KMP_")},
        "loadavg": _loadavg(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count,
                       "cuda_runtime": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(),
                       "device_count": torch.cuda.device_count(),
                       "device_index": torch.cuda.current_device()}
    try:
        import importlib.metadata as _md

        info["triton_version"] = _md.version("triton")
    except Exception:  # noqa: BLE001 - not installed
        info["triton_version"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return info


# ---------------------------------------------------------------------------------------------
# clocks: wall time on the CPU, CUDA events on a GPU
# ---------------------------------------------------------------------------------------------
class WallClock:
    """Per-block wall time with ``time.perf_counter`` (CPU ops return when they are done)."""

    name = "time.perf_counter"

    def time_block(self, fn, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0


class CudaEventClock:
    """Per-block GPU time between two CUDA events recorded around ``n`` launches on the current
    stream (the device is synchronised before the block, the end event waited for after it)."""

    name = "torch.cuda.Event(enable_timing=True)"

    def time_block(self, fn, n: int) -> float:
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _clock(device: str):
    return CudaEventClock() if device == "cuda" else WallClock()


# ---------------------------------------------------------------------------------------------
# copy bandwidth
# ---------------------------------------------------------------------------------------------
def copy_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 7, clock=None) -> dict:
    """The machine's copy bandwidth: ``dst.copy_(src)`` of a ``mib`` MiB float32 buffer (larger than
    the caches), timed ``repeats`` times after two warm-up copies; every copy moves 2 x the buffer
    (read src, write dst). Returns the median and every sample in GB/s (1e9 bytes / s)."""
    clock = clock or _clock(device)
    nbytes = int(mib) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    for _ in range(2):
        dst.copy_(src)
    before = _cpu_snapshot()
    samples = [2 * nbytes / clock.time_block(lambda: dst.copy_(src), 1) / 1e9 for _ in range(repeats)]
    load = other_load(before, _cpu_snapshot())
    del src, dst
    return {"GBps": statistics.median(samples), "samples_GBps": samples, "buffer_bytes": nbytes,
            "bytes_per_copy": 2 * nbytes, "repeats": repeats, "threads": torch.get_num_threads(),
            "other_load": load,
            "method": f"torch.Tensor.copy_ of {mib} MiB float32 on {device}, 2 x buffer bytes per "
                      f"copy, median of {repeats}"}


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def make_case(kind: str, B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float32,
              device: str = "cpu", step: bool = False) -> bl.Case:
    """The inputs of one case (:func:`anisodiff.bench_baselines.make_case`, seed 0) for ``kind``
    in :data:`KINDS`: ``iso`` is the sdm case without its squeeze (``NoiseSpec()``), ``powerlaw``
    the sdm_powerlaw case without its squeeze. ``step``: also the DDPM step's inputs at
    :data:`STEP_T` (``case.model_output``, ``case.sample``; :func:`~anisodiff.bench_baselines.step_inputs`)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    base = {"iso": "sdm", "powerlaw": "sdm_powerlaw"}.get(kind, kind)
    case = bl.make_case(base, B, C, H, W, seed=0, dtype=dtype)
    if kind == "iso":
        case = replace(case, axes=None, strength=0.0, spec=NoiseSpec())
    elif kind == "powerlaw":
        case = replace(case, axes=None, strength=0.0, spec=NoiseSpec(spectral=case.spec.spectral))
    case = replace(case, kind=kind, title=KIND_TITLES[kind])
    if device != "cpu":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        case = replace(case, x0=move(case.x0), timesteps=move(case.timesteps),
                       alphas_cumprod=move(case.alphas_cumprod), betas=move(case.betas),
                       axes=move(case.axes), weights=move(case.weights))
    if step:
        case.model_output, case.sample = bl.step_inputs(case.x0, case.alphas_cumprod.cpu(), STEP_T)
    return case


def impls_for(op: str, kind: str, compiled: tuple = (), extra_backends: tuple = ()) -> list[str]:
    """The implementations timed for one case: ``"fused"`` (the primary fused backend) first, then
    ``"fused:<backend>"`` for every other fused backend, then the baselines."""
    out = ["fused", *(f"fused:{b}" for b in extra_backends)]
    if not (op == "shaped_noise" and kind == "iso"):  # there it is torch.randn, the floor itself
        out.append("eager_vectorised")
    if kind in SPECTRAL_KINDS:
        out.append("eager_rfft")
    if op == "add_noise":
        out += list(compiled)
        if kind in SQUEEZE_ONLY_KINDS:
            out.append("official_sdm")
        if kind in SPECTRAL_KINDS:
            out.append("sagd_appendix")
    if op == "ddpm_step":
        out += list(compiled)
        if kind in SQUEEZE_ONLY_KINDS and _have_diffusers():  # the sampler step calls diffusers
            out.append("official_sdm")
    out.append(FLOOR)
    if kind != "iso":  # for iso the fused op IS its white floor
        out.append(WHITE)
    return out


def _have_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def same_operator(impl: str, kind: str) -> bool:
    """Whether ``impl`` computes the same noise operator as the fused op for ``kind`` (the
    candidates for "the fastest baseline"): not the white floors (except for ``iso``), not
    sagd_appendix on sdm_powerlaw (only the spatial half there)."""
    if is_fused(impl) or impl == WHITE:
        return False
    if impl == FLOOR:
        return kind == "iso"
    if impl == "sagd_appendix":
        return kind != "sdm_powerlaw"
    return True


def is_fused(impl: str) -> bool:
    """``impl`` is a fused backend (``"fused"``, ``"fused:<backend>"``)."""
    return impl == "fused" or impl.startswith("fused:")


def _note(op: str, kind: str, impl: str) -> str:
    if impl == "sagd_appendix" and kind == "sdm_powerlaw":
        return "spatial part only (no published code does both): a lower bound"
    if impl == "sagd_appendix":
        return "per-plane std normalisation (SAGD appendix), fused uses calibrated weights"
    return ""


def make_callable(op: str, impl: str, case: bl.Case, dtype: torch.dtype, device: str, backend: str,
                  compiled: dict, noise=None, upcast: bool = False):
    """A zero-argument callable timing ``impl`` (a name of :func:`impls_for`) on ``case``; the
    fused op runs on ``backend`` (``"fused:<b>"`` on ``b``). ``upcast``: run the baseline in float32
    and cast its outputs to ``dtype`` (for dtypes torch's ops lack, e.g. bfloat16 FFTs on the CPU)."""
    x0, t, spec, sched = case.x0, case.timesteps, case.spec, case.schedule
    nkw = {} if noise is None else {"noise": noise}
    if impl.startswith("fused:"):
        impl, backend = "fused", impl.split(":", 1)[1]
    if op == "add_noise":
        if impl == "fused":
            return lambda: add_noise(x0, t, spec, sched, backend=backend, **nkw)
        if impl == WHITE:
            white = NoiseSpec()
            return lambda: add_noise(x0, t, white, sched, backend=backend, **nkw)
        kw = {**case.baseline_kwargs(), **nkw}
        if impl == "eager_rfft":
            fn, kw = bl.eager_vectorised, {**kw, "rfft": True}
        elif impl in compiled:
            fn = compiled[impl]
        else:
            fn = bl.BASELINES[impl]
        args = case.baseline_args(impl)
        if not upcast:
            return lambda: fn(*args, **kw)
        rest = args[1:]
        kw32 = {**kw, "noise": kw["noise"].float()} if "noise" in kw else kw

        def run_upcast():
            x_t, n = fn(x0.float(), *rest, **kw32)
            return x_t.to(dtype), n.to(dtype)
        return run_upcast
    if op == "ddpm_step":
        return _step_callable(impl, case, dtype, backend, compiled, upcast)
    # shaped_noise
    shape = tuple(x0.shape)
    if impl == "fused":
        return lambda: shaped_noise(shape, spec, timesteps=t, schedule=sched, dtype=dtype,
                                    device=device, backend=backend)
    if impl == WHITE:
        white = NoiseSpec()
        return lambda: shaped_noise(shape, white, dtype=dtype, device=device, backend=backend)
    if impl == FLOOR:
        if upcast:
            return lambda: torch.randn(shape, device=device).to(dtype)
        return lambda: torch.randn(shape, dtype=dtype, device=device)
    rfft = impl == "eager_rfft"
    a = (shape, t, case.betas, case.axes, case.strength, case.weights)
    kw = {"variant": case.variant, "device": device, "rfft": rfft}
    if upcast:
        return lambda: bl.eager_shaped_noise(*a, **kw, dtype=torch.float32).to(dtype)
    return lambda: bl.eager_shaped_noise(*a, **kw, dtype=dtype)


def _step_callable(impl: str, case: bl.Case, dtype: torch.dtype, backend: str, compiled: dict,
                   upcast: bool):
    """:func:`make_callable` for ``ddpm_step``: one step ``STEP_T -> STEP_PREV`` of
    ``case.sample`` with ``case.model_output`` (:func:`make_case` with ``step=True``)."""
    mo, x = case.model_output, case.sample
    if mo is None or x is None:
        raise ValueError("ddpm_step: the case has no step inputs (make_case(..., step=True))")
    if impl in ("fused", WHITE):
        noise = AnisotropicNoise(case.spec if impl == "fused" else NoiseSpec(), case.schedule)
        return lambda: noise.ddpm_step(mo, STEP_T, x, prev_timestep=STEP_PREV, mode="official",
                                       backend=backend)
    if impl == "official_sdm":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=case.schedule.num_train_timesteps,
                              beta_schedule="linear")
        t = torch.tensor(STEP_T)  # as the sampler loop passes it: a 0-d element of sched.timesteps

        def fn(m, xt):
            return bl.official_sdm_ddpm_step(sched, m, t, xt, case.axes, case.strength,
                                             variant=case.variant)
    else:
        kw = {"variant": case.variant, "prev_timestep": STEP_PREV}
        if impl == "eager_rfft":
            base, kw = bl.eager_ddpm_step, {**kw, "rfft": True}
        elif impl in compiled:
            base = compiled[impl]
        else:
            base = bl.STEP_BASELINES[impl]
        rest = (case.alphas_cumprod, case.betas, case.axes, case.strength, case.weights)

        def fn(m, xt):
            return base(m, STEP_T, xt, *rest, **kw)
    if not upcast:
        return lambda: fn(mo, x)

    def run_upcast():  # the casts are part of the timed call, as for add_noise
        x_prev, x0_hat = fn(mo.float(), x.float())
        return x_prev.to(dtype), x0_hat.to(dtype)
    return run_upcast


def _first_call(fn, clock) -> float:
    return clock.time_block(fn, 1)


class Timer:
    """One implementation's callable after its first call (torch.compile compiles there; MKL
    builds its FFT descriptors), warmed up (at least one more call and ``warmup_s``) and calibrated
    so a block of ``inner`` calls lasts about ``block_s``. With ``inner`` given, the block size is
    fixed and there is no warm-up here (the caller has warmed the callable up)."""

    def __init__(self, name: str, fn, clock, warmup_s: float, block_s: float, first_s: float,
                 inner: int | None = None):
        self.name, self.fn, self.clock = name, fn, clock
        self.first_s = first_s
        if inner is not None:
            self.per_call, self.inner = first_s, int(inner)
        else:
            calls, spent = 0, 0.0
            t0 = time.perf_counter()
            while calls < 1 or time.perf_counter() - t0 < warmup_s:
                spent += clock.time_block(fn, 1)
                calls += 1
            self.per_call = spent / calls
            self.inner = max(1, min(10_000, round(block_s / max(self.per_call, 1e-7))))
        self.samples: list[float] = []
        self.faults: list[float] = []  # minor page faults per call, per block

    def block(self) -> None:
        gc.disable()
        try:
            f0 = _minor_faults()
            dt = self.clock.time_block(self.fn, self.inner)
            f1 = _minor_faults()
        finally:
            gc.enable()
        self.samples.append(dt / self.inner)
        self.faults.append((f1 - f0) / self.inner)


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def interleave(timers: list, planned: int, *, max_rounds: int, max_s: float,
               max_other_load: float) -> dict:
    """Timing rounds: one ``block()`` of every timer in turn, the order rotated every round, until
    ``planned`` rounds were clean (other processes used at most ``max_other_load`` CPUs during the
    round), ``max_rounds`` rounds ran, or (after ``planned`` rounds) ``max_s`` seconds passed.
    Returns the rounds to keep (the clean ones; all of them, flagged unreliable, when fewer than
    half the planned rounds were clean) and the load statistics."""
    loads, clean, r = [], 0, 0
    t0 = time.perf_counter()
    while (clean < planned and r < max_rounds
           and (r < planned or time.perf_counter() - t0 < max_s)):
        k = r % len(timers)
        before = _cpu_snapshot()
        for tm in timers[k:] + timers[:k]:  # rotate the order every round
            tm.block()
        load = other_load(before, _cpu_snapshot())
        loads.append(load)
        clean += load is None or load <= max_other_load
        r += 1
    keep = [i for i, ld in enumerate(loads) if ld is None or ld <= max_other_load]
    reliable = len(keep) >= max(min(3, planned), planned // 2)
    if not reliable:
        keep = list(range(len(loads)))
    known = [x for x in loads if x is not None]
    return {"keep": keep, "rounds": len(loads), "planned_rounds": planned, "clean_rounds": clean,
            "reliable": reliable, "other_load_median": statistics.median(known) if known else None}


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int, int]:
    """argparse type: ``CxHxW`` (e.g. 3x32x32)."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or not all(1 <= d <= 4096 for d in dims) or dims[0] > 64:
        raise argparse.ArgumentTypeError(f"expected CxHxW (C <= 64, H, W <= 4096), got {text!r}")
    return dims


_POSITIVE_INT = int_in(1)


def add_arguments(p: argparse.ArgumentParser, *, json_help: str, plot_help: str) -> None:
    """The options of ``anisodiff bench`` (and ``benchmarks/run_cpu.py``). Matrix options left at
    None take the preset's value (:func:`resolve_settings`)."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default: %(default)s); cuda needs a CUDA device and a fused "
                        "CUDA backend, timed with CUDA events")
    p.add_argument("--suite", nargs="+", choices=SUITES + ("all",), default=None,
                   help="what to time (default: ops): ops = the fused ops against the baselines; "
                        "train = one optimizer step of the SDM paper's UNet with each noise "
                        "implementation; sampling = 50 DDPM steps with each sampler (train and "
                        "sampling need diffusers); all = the three, into one JSON")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="ops: B=64 at 3x32x32 for every kind, op and dtype, no torch.compile, "
                           "well under a minute on 2 cores (cuda: B=128 at 3x32x32, 4x64x64, "
                           "3x256x256 with torch.compile, about two minutes on an H100); train / "
                           "sampling: fewer rounds (cpu: the tiny UNet, small batches)")
    mode.add_argument("--smoke", action="store_true",
                      help="a tiny case of everything in a few seconds: checks that everything "
                           "runs (the test suite); its times mean little")
    p.add_argument("--json", type=pathlib.Path, default=None, metavar="OUT.json", help=json_help)
    p.add_argument("--plot", type=pathlib.Path, default=None, metavar="OUT.png", help=plot_help)
    p.add_argument("--no-plot", action="store_true", help="write no picture")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None,
                   help="ops (default: all: add_noise shaped_noise ddpm_step)")
    p.add_argument("--kinds", nargs="+", choices=KINDS + ("sdm+powerlaw",), default=None,
                   help="spec kinds (default: all)")
    p.add_argument("--batch", type=_POSITIVE_INT, nargs="+", default=None, metavar="B",
                   help="batch sizes (full: 1 16 128 512; quick: 64, cuda 128)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="CxHxW",
                   help="per-sample shapes (full: 3x32x32 3x64x64 4x64x64, cuda also 4x128x128 "
                        "3x256x256; quick: 3x32x32, cuda 3x32x32 4x64x64 3x256x256)")
    p.add_argument("--size", type=_POSITIVE_INT, default=None, metavar="N",
                   help="shorthand for --shapes 3xNxN")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                   help="dtypes of x0 and the noise (default: fp32 bf16)")
    p.add_argument("--threads", type=_POSITIVE_INT, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=_POSITIVE_INT, default=None,
                   help="timing rounds per case at most (full 15, quick 11)")
    p.add_argument("--min-repeats", type=_POSITIVE_INT, default=None,
                   help="timing rounds per case at least, however slow the case (full 3, quick 5)")
    p.add_argument("--block-ms", type=nonneg_float, default=None,
                   help="target duration of one timing block in ms (full and quick 5)")
    p.add_argument("--warmup", type=nonneg_float, default=None, metavar="SECONDS",
                   help="warm-up per implementation after its first call, at least one more call "
                        "(full 0.01, quick 0.02)")
    p.add_argument("--group-s", type=nonneg_float, default=None, metavar="SECONDS",
                   help="time for the rounds of one case: fewer rounds (down to --min-repeats) for "
                        "slow cases (full 0.25, quick 0.4)")
    p.add_argument("--max-group-s", type=nonneg_float, default=None, metavar="SECONDS",
                   help="stop collecting replacement rounds for one case after this long (full 3, "
                        "quick 2)")
    p.add_argument("--max-rounds-factor", type=_POSITIVE_INT, default=None,
                   help="run at most this many x the planned rounds to collect clean ones "
                        "(full 2, quick 3)")
    p.add_argument("--max-other-load", type=nonneg_float, default=None, metavar="CPUS",
                   help="drop rounds during which other processes used more than this many CPUs "
                        "(default: 0.2 on cpu, 4 on cuda)")
    p.add_argument("--wait-idle", type=nonneg_float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for other load to drop below 0.2 CPUs")
    p.add_argument("--given-noise", action="store_true",
                   help="add_noise only: pass the same pre-drawn white noise to every "
                        "implementation (noise=eps), timing the shaping + mix without the RNG")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="skip the torch.compile baselines (full run: add_noise and ddpm_step, "
                        "fp32, first shape)")
    p.add_argument("--copy-mib", type=_POSITIVE_INT, default=None, metavar="MIB",
                   help="buffer size of the copy-bandwidth measurement (full 256, quick 128)")
    p.add_argument("--details", action="store_true",
                   help="also print every implementation's row (median, IQR, GB/s, faults)")
    from . import bench_train  # its options (the module imports diffusers only when it runs)

    bench_train.add_arguments(p)


def _suites(args) -> list[str]:
    chosen = getattr(args, "suite", None) or ["ops"]
    return list(SUITES) if "all" in chosen else [x for x in SUITES if x in chosen]


def resolve_settings(args) -> dict:
    """The settings of a run: the preset (full, quick or smoke; :data:`CUDA_PRESETS` on cuda)
    overridden by the options. The train / sampling suites' settings are under ``"train"`` and
    ``"sampling"`` (:func:`anisodiff.bench_train.resolve_settings`)."""
    mode = "smoke" if getattr(args, "smoke", False) else "quick" if args.quick else "full"
    s = {"compile_impls": list(CPU_COMPILED),
         **(CUDA_PRESETS if args.device == "cuda" else PRESETS)[mode]}
    s["mode"] = mode
    for key in ("batch", "dtypes", "repeats", "min_repeats", "block_ms", "warmup", "group_s",
                "max_group_s", "max_rounds_factor", "copy_mib"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.shapes is not None and args.size is not None:
        raise BenchError("--shapes and --size: give one of them")
    if args.shapes is not None:
        s["shapes"] = [tuple(x) for x in args.shapes]
    elif args.size is not None:
        s["shapes"] = [(3, args.size, args.size)]
    if args.compile is not None:
        s["compile"] = args.compile
    s["kinds"] = [("sdm_powerlaw" if k == "sdm+powerlaw" else k) for k in (args.kinds or KINDS)]
    s["kinds"] = list(dict.fromkeys(s["kinds"]))
    s["ops"] = list(dict.fromkeys(args.ops or (("add_noise",) if args.given_noise else OPS)))
    if args.given_noise and set(s["ops"]) - {"add_noise"}:
        raise BenchError("--given-noise applies to add_noise only (shaped_noise and ddpm_step draw "
                         "the noise)")
    s["min_repeats"] = min(s["min_repeats"], s["repeats"])
    for key in ("device", "given_noise", "wait_idle"):
        s[key] = getattr(args, key)
    s["max_other_load"] = (args.max_other_load if args.max_other_load is not None
                           else DEFAULT_MAX_OTHER_LOAD[args.device])
    s["threads"] = args.threads
    s["suites"] = _suites(args)
    if "train" in s["suites"] or "sampling" in s["suites"]:
        from . import bench_train

        s.update(bench_train.resolve_settings(args, mode, s["suites"]))
    return s


def fused_backends(device: str) -> tuple[list[str], dict]:
    """The fused backends the benchmark times on ``device``: ``available_backends(device)`` minus
    ``"reference"``, fastest first (the first is the primary), and ``{backend: why}`` for those
    skipped (Triton under ``TRITON_INTERPRET=1`` on the CPU: an interpreter, not a kernel).
    Raises :class:`BenchError` when nothing is left to time."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device cuda: no CUDA device (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'})")
    avail = available_backends(device)
    skipped = {}
    if device == "cpu" and "triton" in avail:
        skipped["triton"] = ("Triton on the CPU runs under TRITON_INTERPRET=1 (the interpreter, "
                             "for tests): not a kernel worth timing; skipped")
    fused = [b for b in avail if b != "reference" and b not in skipped]
    if not fused:
        if device == "cuda":
            raise BenchError("--device cuda: this anisodiff build has no fused CUDA backend "
                             f"(available: {', '.join(avail)}); nothing to time")
        raise BenchError("anisodiff's compiled CPU ops are not built: nothing to benchmark "
                         f"({build_info().get('error')})")
    return fused, skipped


def op_backends(op: str, backends) -> tuple[list[str], dict]:
    """The fused backends of ``backends`` (:func:`fused_backends`) that time ``op``, in order, and
    ``{backend: why}`` for those without the op: ``ddpm_step`` runs on :data:`STEP_BACKENDS`
    (interpreted Triton on the CPU is already left out by :func:`fused_backends`)."""
    if op != "ddpm_step":
        return list(backends), {}
    step = STEP_BACKENDS
    keep = [b for b in backends if b in step]
    why = {b: f"{b} has no ddpm_step op (AnisotropicNoise.ddpm_step runs on "
              f"{', '.join(x for x in step if x != 'reference')}): ddpm_step not timed there"
           for b in backends if b not in step}
    return keep, why


def _fused_backend(device: str) -> str:
    """The primary fused backend of ``device`` (see :func:`fused_backends`)."""
    return fused_backends(device)[0][0]


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
_COMPILE_OPTIONS = {"compiled_eager": {},
                    "compiled_eager_fallback_random": {"options": {"fallback_random": True}},
                    "compiled_eager_max_autotune": {"mode": "max-autotune"}}


def compiled_key(op: str, name: str) -> str:
    """The key of ``op``'s torch.compile baseline ``name`` in :func:`compiled_fns`' dict:
    ``name`` for add_noise (as before ddpm_step had one), ``"<op>:<name>"`` otherwise."""
    return name if op == "add_noise" else f"{op}:{name}"


def compiled_fns(s: dict) -> tuple[dict, dict]:
    """``({key: compiled fn}, {key: "ok" or why not})`` for every op of the run with torch.compile
    baselines (:data:`COMPILED_OPS`) and every name of ``s["compile_impls"]``; keys from
    :func:`compiled_key`. Empty when ``s["compile"]`` is off."""
    compiled, notes = {}, {}
    if not s["compile"]:
        return compiled, notes
    warnings.filterwarnings("ignore",
                            message=".*Torchinductor does not support code generation for complex.*")
    for op in (o for o in COMPILED_OPS if o in s.get("ops", OPS)):
        for name in s.get("compile_impls", COMPILED):
            key = compiled_key(op, name)
            fn, why = bl.make_compiled_eager(device=s["device"], op=op, **_COMPILE_OPTIONS[name])
            notes[key] = why
            if fn is not None:
                compiled[key] = fn
    return compiled, notes


def _progress(msg: str, stream) -> None:
    if stream is not None:
        print(msg, file=stream, flush=True)


def case_matrix(s: dict) -> list[tuple]:
    """The cases of a run with settings ``s``, in the order they run: ``(op, kind, B, (C, H, W),
    dtype name)``. ``anisodiff bench`` and the pytest-benchmark suite (benchmarks/) share it."""
    return [(op, kind, B, tuple(shape), dt) for op in s["ops"] for shape in s["shapes"]
            for dt in s["dtypes"] for kind in s["kinds"] for B in s["batch"]]


def case_impls(op: str, kind: str, shape, dtype_name: str, s: dict, compiled: dict,
               backends) -> tuple[list[str], dict]:
    """The implementations of one case (:func:`impls_for`; the fused ones on
    :func:`op_backends` of ``backends``) and the compiled callables it uses, ``{impl name: fn}``:
    torch.compile baselines only for add_noise and ddpm_step at fp32 and the run's first shape
    (``compiled``: :func:`compiled_fns`' dict)."""
    use = {}
    if op in COMPILED_OPS and dtype_name == "fp32" and tuple(shape) == tuple(s["shapes"][0]):
        use = {name: compiled[compiled_key(op, name)] for name in s.get("compile_impls", COMPILED)
               if compiled_key(op, name) in compiled}
    return impls_for(op, kind, tuple(use), tuple(op_backends(op, backends)[0][1:])), use


def _time_case(op, kind, B, shape, dtype_name, s, backends, compiled, clock) -> list[dict]:
    """Every implementation of one case (every fused backend of ``backends``, the first the
    primary, then the baselines), interleaved; one row each."""
    device, dtype = s["device"], DTYPES[dtype_name]
    C, H, W = shape
    primary = op_backends(op, backends)[0][0]
    case = make_case(kind, B, C, H, W, dtype, device, step=op == "ddpm_step")
    names, use_compiled = case_impls(op, kind, shape, dtype_name, s, compiled, backends)
    noise = None
    if s["given_noise"] and op == "add_noise":
        noise = torch.randn(case.x0.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    timers, notes = [], {}
    for name in names:
        upcast = False
        fn = make_callable(op, name, case, dtype, device, primary, use_compiled, noise, upcast)
        try:
            first = _first_call(fn, clock)
        except RuntimeError as exc:  # e.g. "Unsupported dtype BFloat16" from torch.fft on the CPU
            if is_fused(name) or name == WHITE or dtype == torch.float32:
                raise
            upcast = True
            fn = make_callable(op, name, case, dtype, device, primary, use_compiled, noise, upcast)
            first = _first_call(fn, clock)
            notes[name] = (f"{dtype_name}: computed in float32 and cast, as torch raises "
                           f"{str(exc).splitlines()[0][:60]!r} in {dtype_name}")
        timers.append(Timer(name, fn, clock, s["warmup"], s["block_ms"] / 1e3, first))
    round_cost = sum(tm.per_call * tm.inner for tm in timers)
    planned = max(s["min_repeats"], min(s["repeats"], int(s["group_s"] / max(round_cost, 1e-9))))
    group = interleave(timers, planned, max_rounds=s["max_rounds_factor"] * planned,
                       max_s=s["max_group_s"], max_other_load=s["max_other_load"])
    keep = group.pop("keep")
    nbytes = TRAFFIC_TENSORS[op] * B * C * H * W * (torch.finfo(dtype).bits // 8)
    stats = {tm.name: _quantiles([tm.samples[i] for i in keep]) for tm in timers}
    fused_med, floor_med = stats["fused"][1], stats[FLOOR][1]
    rows = []
    for tm in timers:
        q1, q2, q3 = stats[tm.name]
        gbps = nbytes / q2 / 1e9
        backend = (primary if tm.name == "fused" else tm.name.split(":", 1)[1]) \
            if is_fused(tm.name) else None
        rows.append({
            "op": op, "kind": kind, "title": KIND_TITLES[kind], "B": B, "C": C, "H": H, "W": W,
            "dtype": dtype_name,
            "impl": f"anisodiff_{backend}" if backend else tm.name, "fused": backend is not None,
            "backend": backend, "primary": tm.name == "fused",
            "median_ms": q2 * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": min(tm.samples[i] for i in keep) * 1e3,
            "bytes": nbytes, "gbps": gbps, "pct_copy_bw": None,  # filled in by run()
            "repeats": len(keep), "calls_per_block": tm.inner,
            "speedup_vs_fused": q2 / fused_med,
            "overhead_vs_floor_ms": (q2 - floor_med) * 1e3, "ratio_vs_floor": q2 / floor_med,
            "first_call_s": tm.first_s,
            "compile_s": tm.first_s if tm.name in COMPILED else None,
            "minor_faults_per_call": statistics.median([tm.faults[i] for i in keep]),
            "note": "; ".join(x for x in (_note(op, kind, tm.name), notes.get(tm.name, "")) if x),
            **group,
        })
    return rows


def _vs_baselines(fused: dict, base: list[dict], floor: dict) -> dict:
    """One fused row against the case's baselines: speed-up over each, over the fastest computing
    the same noise, and the cost relative to the isotropic floor."""
    same = [r for r in base if same_operator(r["impl"], r["kind"])]
    best = min(same, key=lambda r: r["median_ms"]) if same else None
    return {
        "speedups": {r["impl"]: r["median_ms"] / fused["median_ms"] for r in base},
        "fastest_baseline": best["impl"] if best else None,
        "speedup_vs_fastest": best["median_ms"] / fused["median_ms"] if best else None,
        "floor_ms": floor["median_ms"],
        "overhead_vs_floor_ms": fused["median_ms"] - floor["median_ms"],
        "ratio_vs_floor": fused["median_ms"] / floor["median_ms"],
    }


def _case_summary(rows: list[dict]) -> dict:
    """One case: the primary fused backend's numbers and its speed-up over each baseline (the
    version-1 keys), every fused backend's under ``backends`` and the time ratio of each other
    backend to the primary under ``backend_ratios`` (``"triton/cuda"``: > 1 means Triton slower)."""
    fused_rows = [r for r in rows if r["fused"]]
    fused = next(r for r in fused_rows if r["primary"])
    floor = next(r for r in rows if r["impl"] == FLOOR)
    base = [r for r in rows if not r["fused"]]
    per_backend = {}
    for r in fused_rows:
        per_backend[r["backend"]] = {
            **{k: r[k] for k in ("impl", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbps",
                                 "pct_copy_bw")},
            **_vs_baselines(r, base, floor)}
    return {
        **{k: fused[k] for k in ("op", "kind", "title", "B", "C", "H", "W", "dtype", "bytes",
                                 "median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbps", "pct_copy_bw",
                                 "repeats", "rounds", "planned_rounds", "clean_rounds", "reliable",
                                 "other_load_median")},
        "fused_impl": fused["impl"],
        **_vs_baselines(fused, base, floor),
        "backends": per_backend,
        "backend_ratios": {f"{r['backend']}/{fused['backend']}": r["median_ms"] / fused["median_ms"]
                           for r in fused_rows if not r["primary"]},
    }


# Issue 3's goals for the CUDA add_noise (fractions of the measured copy bandwidth, speed-ups).
CUDA_GOALS = {"squeeze_pct_copy": 85.0, "squeeze_min_tensor_bytes": 32 * 2**20,
              "spectral_pct_copy": 60.0, "spectral_planes": (32, 64),
              "vs_official_sdm": 50.0, "official_case": {"B": 128, "shape": (3, 32, 32)},
              "vs_eager": 4.0, "vs_compile": 2.0}


def cuda_goals(cases: list[dict]) -> list[dict]:
    """Issue 3's goals per add_noise case where the CUDA backend ran: % of copy bandwidth for
    squeeze-only fp32 (>= 32 MB per tensor) and spectral (32x32, 64x64) cases, and the speed-ups
    over the official SDM loop (B=128, 3x32x32), eager PyTorch and torch.compile of it."""
    g, out = CUDA_GOALS, []
    for c in cases:
        cu = c.get("backends", {}).get("cuda")
        if cu is None or c["op"] != "add_noise":
            continue
        key = {k: c[k] for k in ("op", "kind", "B", "C", "H", "W", "dtype")}

        def add(goal, value, target):
            out.append({"goal": goal, "issue": 3, **key, "value": value, "target": target,
                        "met": value >= target, "reliable": c["reliable"]})
        per_tensor = c["bytes"] / TRAFFIC_TENSORS["add_noise"]
        if c["kind"] in SQUEEZE_ONLY_KINDS and c["dtype"] == "fp32" and per_tensor >= g["squeeze_min_tensor_bytes"]:
            add("cuda_squeeze_pct_copy", cu["pct_copy_bw"], g["squeeze_pct_copy"])
        if c["kind"] in SPECTRAL_KINDS and c["H"] == c["W"] and c["H"] in g["spectral_planes"]:
            add("cuda_spectral_pct_copy", cu["pct_copy_bw"], g["spectral_pct_copy"])
        sp = cu["speedups"]
        oc = g["official_case"]
        if "official_sdm" in sp and c["B"] == oc["B"] and (c["C"], c["H"], c["W"]) == oc["shape"]:
            add("cuda_vs_official_sdm", sp["official_sdm"], g["vs_official_sdm"])
        if "eager_vectorised" in sp:
            add("cuda_vs_eager", sp["eager_vectorised"], g["vs_eager"])
        # issue 3 names torch.compile(mode="max-autotune"); quick runs only have the default mode
        for name in ("compiled_eager_max_autotune", "compiled_eager"):
            if name in sp:
                add("cuda_vs_compile", sp[name], g["vs_compile"])
                out[-1]["baseline"] = name
                break
    return out


def backend_goals(cases: list[dict]) -> list[dict]:
    """Issue 4's goals per case where the Triton and the CUDA backend both ran: Triton's time
    within :data:`TRITON_VS_CUDA_TARGET` x CUDA's, and Triton faster than torch.compile of the
    eager code (where that baseline ran in the case); then issue 3's (:func:`cuda_goals`)."""
    out = cuda_goals(cases)
    for c in cases:
        b = c.get("backends", {})
        if "triton" not in b or "cuda" not in b:
            continue
        key = {k: c[k] for k in ("op", "kind", "B", "C", "H", "W", "dtype")}
        ratio = b["triton"]["median_ms"] / b["cuda"]["median_ms"]
        out.append({"goal": "triton_within_cuda", "issue": 4, **key, "value": ratio,
                    "target": TRITON_VS_CUDA_TARGET, "met": ratio <= TRITON_VS_CUDA_TARGET,
                    "reliable": c["reliable"]})
        x = b["triton"]["speedups"].get("compiled_eager")
        if x is not None:
            out.append({"goal": "triton_beats_compile", "issue": 4, **key, "value": x,
                        "target": 1.0, "met": x > 1.0, "reliable": c["reliable"]})
    return out


def _base_report(s: dict, argv, device: str) -> dict:
    """The keys every report has, whatever suites ran."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "command": " ".join(shlex.quote(a) for a in argv),
        "argv": argv,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "suites": list(s.get("suites", ["ops"])),
        "machine": machine_info(device),
    }


def run(s: dict, *, progress=None, argv: list[str] | None = None) -> dict:
    """Run the op benchmark with settings ``s`` (:func:`resolve_settings`); returns the report.
    ``progress``: a stream for one line per case (None: silent)."""
    device = s["device"]
    backends, skipped = fused_backends(device)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    clock = _clock(device)
    compiled, compile_notes = compiled_fns(s)
    busy_before = wait_for_idle(s["wait_idle"]) if s["wait_idle"] > 0 else busy_cpus(0.5)
    load_before = _loadavg()
    t_start = time.perf_counter()
    copy_before = copy_bandwidth(device, s["copy_mib"], s["copy_repeats"], clock)
    op_skipped = {op: why for op in s["ops"] for why in [op_backends(op, backends)[1]] if why}
    no_backend = [op for op in s["ops"] if not op_backends(op, backends)[0]]
    matrix = [c for c in case_matrix(s) if c[0] not in no_backend]
    results = []
    for i, (op, kind, B, shape, dt) in enumerate(matrix):
        t0 = time.perf_counter()
        rows = _time_case(op, kind, B, shape, dt, s, backends, compiled, clock)
        results += rows
        fused_txt = ", ".join(f"{r['impl']} {r['median_ms']:.3f} ms" for r in rows if r["fused"])
        _progress(f"[{i + 1}/{len(matrix)}] {op} {kind} B={B} {'x'.join(map(str, shape))} {dt}: "
                  f"{fused_txt} ({time.perf_counter() - t0:.1f} s)", progress)
    copy_after = copy_bandwidth(device, s["copy_mib"], s["copy_repeats"], clock)
    elapsed = time.perf_counter() - t_start
    samples = copy_before["samples_GBps"] + copy_after["samples_GBps"]
    copy = {**copy_before, "GBps": statistics.median(samples), "samples_GBps": samples,
            "GBps_before": copy_before["GBps"], "GBps_after": copy_after["GBps"],
            "other_load": [copy_before["other_load"], copy_after["other_load"]],
            "repeats": len(samples),
            "method": copy_before["method"].replace(f"median of {s['copy_repeats']}",
                                                    f"median of {len(samples)} (half before the "
                                                    "cases, half after)")}
    for r in results:
        r["pct_copy_bw"] = 100.0 * r["gbps"] / copy["GBps"]
    cases = []
    for key in dict.fromkeys((r["op"], r["kind"], r["B"], r["C"], r["H"], r["W"], r["dtype"])
                             for r in results):
        cases.append(_case_summary([r for r in results if (r["op"], r["kind"], r["B"], r["C"],
                                                           r["H"], r["W"], r["dtype"]) == key]))
    goal = []
    hl = HEADLINE
    for kind in (() if s["given_noise"] else hl["kinds"]):  # the goal includes drawing the noise
        c = next((c for c in cases if c["op"] == hl["op"] and c["kind"] == kind and c["B"] == hl["B"]
                  and (c["C"], c["H"], c["W"]) == hl["shape"] and c["dtype"] == hl["dtype"]), None)
        if c is not None and hl["baseline"] in c["speedups"]:
            x = c["speedups"][hl["baseline"]]
            goal.append({"kind": kind, "B": hl["B"], "baseline": hl["baseline"], "speedup": x,
                         "target": hl["target"], "met": x >= hl["target"], "reliable": c["reliable"]})
    settings = {k: v for k, v in s.items() if k not in ("train", "sampling")}
    settings["shapes"] = ["x".join(map(str, sh)) for sh in s["shapes"]]
    settings.update({"threads": torch.get_num_threads(), "compile_notes": compile_notes,
                     "clock": clock.name, "fused_backend": backends[0], "fused_backends": backends,
                     "skipped_backends": skipped, "op_skipped_backends": op_skipped,
                     "ops_not_timed": {op: "no fused backend of the device has the op"
                                       for op in no_backend},
                     "ddpm_step": {"timestep": STEP_T, "prev_timestep": STEP_PREV,
                                   "mode": "official", "model_output": "torch.randn, seeded",
                                   "sample": "sqrt(abar_t) x0 + sqrt(1 - abar_t) e, e white, seeded"}
                     if "ddpm_step" in s["ops"] else None})
    implementations = {k: v for k, v in IMPLS.items() if k != "fused"}
    implementations.update({f"anisodiff_{b}": IMPLS["fused"] + ("" if i else " (primary)")
                            for i, b in enumerate(backends)})
    return {
        **_base_report(s, argv, device),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "busy_cpus_before": busy_before,
        "busy_cpus_after": busy_cpus(0.5),
        "settings": settings,
        "traffic": {op: f"{n} x B*C*H*W*itemsize bytes" for op, n in TRAFFIC_TENSORS.items()},
        "copy_bandwidth": copy,
        "implementations": implementations,
        "elapsed_s": elapsed,
        "results": results,
        "cases": cases,
        "goal": goal,
        "backend_goals": backend_goals(cases),
    }


# ---------------------------------------------------------------------------------------------
# report: table
# ---------------------------------------------------------------------------------------------
_COLUMNS = (("eager_vectorised", "eager"), ("eager_rfft", "rfft"), ("compiled_eager", "compile"),
            ("compiled_eager_fallback_random", "comp-fbr"), ("compiled_eager_max_autotune", "comp-mat"),
            ("official_sdm", "sdm-code"),
            ("sagd_appendix", "sagd"))


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(report: dict, details: bool = False) -> str:
    """One line per case: the fused op's median [IQR], GB/s, % of the copy bandwidth, its speed-up
    over each baseline (baseline median / fused median) and its cost relative to the floor."""
    m, st, cp = report["machine"], report["settings"], report["copy_bandwidth"]
    cols = [(k, h) for k, h in _COLUMNS if any(k in c["speedups"] for c in report["cases"])]
    ratio_cols = list(dict.fromkeys(k for c in report["cases"] for k in c.get("backend_ratios", {})))
    primary = st.get("fused_backend", "")
    lines = [
        f"anisodiff {m['anisodiff_version']} bench on {report['device']} ({st['mode']} run) | "
        f"{m['cpu_model']} ({m['logical_cpus']} logical CPUs) | torch {m['torch_version']}, "
        f"{st['threads']} threads | kernel ISA {m['anisodiff_build_info'].get('cpu_capability')}"
        + (f" | GPU {m['gpu']['name']}" if "gpu" in m else ""),
        f"copy bandwidth {cp['GBps']:.2f} GB/s (before {cp['GBps_before']:.2f}, after "
        f"{cp['GBps_after']:.2f}; {cp['method']})",
        f"median [IQR] per call over up to {st['repeats']} interleaved rounds of ~{st['block_ms']:g} "
        f"ms blocks (rounds where other processes used > {st['max_other_load']} CPUs dropped); "
        "GB/s over the traffic floor (add_noise 3 tensors, shaped_noise 1, ddpm_step 4); speed-up = "
        "baseline / fused (> 1: fused faster); best = the fastest baseline computing the same noise; "
        "floor = fused / isotropic floor (randn + mix; ddpm_step: the plain DDPM step)"
        + (f"; ddpm_step: t = {st['ddpm_step']['timestep']} -> {st['ddpm_step']['prev_timestep']}, "
           "mode='official', random model output" if st.get("ddpm_step") else "")
        + ("; WHITE NOISE GIVEN (noise=eps): RNG excluded" if st["given_noise"] else ""),
        f"other load: busy CPUs before {report['busy_cpus_before']}, after "
        f"{report['busy_cpus_after']}; loadavg before {report['loadavg_before']}, after "
        f"{report['loadavg_after']}",
        f"fused backends: {', '.join(st.get('fused_backends', [primary]))} (the columns are "
        f"{primary}'s"
        + (f"; {', '.join(ratio_cols)} = time ratio, > 1: slower than {primary}" if ratio_cols else "")
        + ")" + "".join(f"; {b} skipped: {why}" for b, why in st.get("skipped_backends", {}).items())
        + "".join(f"; {op}: {b} skipped: {why}" for op, d in st.get("op_skipped_backends", {}).items()
                  for b, why in d.items())
        + "".join(f"; {op} not timed: {why}" for op, why in st.get("ops_not_timed", {}).items()),
        "",
    ]
    head = (f"{'op':<13}{'kind':<13}{'B':>4}  {'shape':<10}{'dtype':<6}{'fused ms':>10}{'[IQR]':>9}"
            f"{'GB/s':>8}{'%copy':>7} |" + "".join(f"{h:>9}" for _, h in cols)
            + f"{'best':>8} | {'vs floor':>16}" + "".join(f"{h:>13}" for h in ratio_cols))
    lines += [head, "-" * len(head)]
    for c in report["cases"]:
        shape = f"{c['C']}x{c['H']}x{c['W']}"
        flag = "" if c["reliable"] else "  UNRELIABLE (busy machine)"
        lines.append(
            f"{c['op']:<13}{c['kind']:<13}{c['B']:>4}  {shape:<10}{c['dtype']:<6}"
            f"{c['median_ms']:>10.3f}{c['iqr_ms']:>9.3f}{c['gbps']:>8.2f}{c['pct_copy_bw']:>6.0f}% |"
            + "".join(f"{_ratio(c['speedups'].get(k)):>9}" for k, _ in cols)
            + f"{_ratio(c['speedup_vs_fastest']):>8} | {c['overhead_vs_floor_ms']:>+8.3f} ms "
            f"{c['ratio_vs_floor']:>4.2f}x"
            + "".join(f"{_ratio(c.get('backend_ratios', {}).get(k)):>13}" for k in ratio_cols)
            + flag)
    notes = {}
    for r in report["results"]:
        for note in filter(None, r["note"].split("; ")):
            notes.setdefault(note, {})[r["impl"]] = None
    if notes:
        lines += ["", "notes:"] + [f"  {', '.join(impls)}: {note}" for note, impls in notes.items()]
    if details:
        lines += ["", _details(report)]
    if report["goal"]:
        lines.append("")
        for g in report["goal"]:
            verdict = goal_verdict(g["met"], g["reliable"])
            lines.append(f"foundation goal (fused add_noise >= {g['target']:g}x faster than "
                         f"{g['baseline']}, B={g['B']}, 3x32x32 fp32, {g['kind']}): measured "
                         f"{g['speedup']:.2f}x -> {verdict}")
    lines += _backend_goal_lines(report.get("backend_goals", []))
    if any(not c["reliable"] for c in report["cases"]):
        lines.append(f"WARNING: other processes kept the CPUs busy during some cases (more than "
                     f"{st['max_other_load']} CPUs in most rounds): times are inflated and ratios "
                     "unreliable there. Re-run on an idle machine (--wait-idle, --threads 1).")
    return "\n".join(lines)


def goal_verdict(met: bool, reliable: bool) -> str:
    """"MET" / "NOT MET", flagged when the machine was busy during the measurement."""
    return ("MET" if met else "NOT MET") + ("" if reliable else " (UNRELIABLE: the machine was busy)")


def _backend_goal_lines(goals: list[dict]) -> list[str]:
    """Issue 3's and 4's verdicts, one line per goal: met in how many cases, the worst case."""
    lines = []
    g3 = CUDA_GOALS
    for name, what, worst, unit, issue in (
            ("cuda_squeeze_pct_copy", f"CUDA squeeze-only fp32 >= {g3['squeeze_pct_copy']:g}% of copy "
             "bandwidth at >= 32 MB per tensor", min, "% copy", 3),
            ("cuda_spectral_pct_copy", f"CUDA spectral 32x32/64x64 >= {g3['spectral_pct_copy']:g}% of "
             "copy bandwidth", min, "% copy", 3),
            ("cuda_vs_official_sdm", f"CUDA >= {g3['vs_official_sdm']:g}x the official SDM loop", min,
             "x speed-up", 3),
            ("cuda_vs_eager", f"CUDA >= {g3['vs_eager']:g}x eager PyTorch", min, "x speed-up", 3),
            ("cuda_vs_compile", f"CUDA >= {g3['vs_compile']:g}x torch.compile(eager)", min, "x speed-up", 3),
            ("triton_within_cuda", f"Triton time <= {TRITON_VS_CUDA_TARGET:g} x CUDA time", max, "x CUDA", 4),
            ("triton_beats_compile", "Triton faster than torch.compile(eager)", min, "x speed-up", 4)):
        gs = [g for g in goals if g["goal"] == name]
        if not gs:
            continue
        w = worst(gs, key=lambda g: g["value"])
        met = sum(g["met"] for g in gs)
        unrel = sum(not g["reliable"] for g in gs)
        lines.append(f"issue {issue} goal ({what}): met in {met} of {len(gs)} cases -> "
                     f"{'MET' if met == len(gs) else 'NOT MET'}; worst {w['value']:.2f} {unit} at "
                     f"{w['op']} {w['kind']} B={w['B']} {w['C']}x{w['H']}x{w['W']} {w['dtype']}"
                     + (f" ({unrel} cases UNRELIABLE)" if unrel else ""))
    return ([""] + lines) if lines else []


def _details(report: dict) -> str:
    lines = []
    head = (f"{'implementation':<32}{'median ms':>11}{'IQR ms':>9}{'GB/s':>8}{'%copy':>7}"
            f"{'speed-up':>10}{'vs floor':>17}{'faults/call':>13}")
    for c in report["cases"]:
        key = (c["op"], c["kind"], c["B"], c["C"], c["H"], c["W"], c["dtype"])
        rows = [r for r in report["results"]
                if (r["op"], r["kind"], r["B"], r["C"], r["H"], r["W"], r["dtype"]) == key]
        state = (f"{c['repeats']} clean of {c['rounds']} rounds" if c["reliable"] else
                 f"UNRELIABLE: {c['clean_rounds']} of {c['rounds']} rounds undisturbed, all kept")
        lines += ["", f"== {c['op']} {c['title']}  B={c['B']} {c['C']}x{c['H']}x{c['W']} "
                      f"{c['dtype']}  [{state}]", head]
        for r in rows:
            extra = f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] else ""
            lines.append(f"{r['impl']:<32}{r['median_ms']:>11.3f}{r['iqr_ms']:>9.3f}"
                         f"{r['gbps']:>8.2f}{r['pct_copy_bw']:>6.0f}%{r['speedup_vs_fused']:>9.2f}x"
                         f"{r['overhead_vs_floor_ms']:>+9.3f} ms {r['ratio_vs_floor']:>4.2f}x"
                         f"{r['minor_faults_per_call']:>13.0f}{extra}")
    return "\n".join(lines).lstrip("\n")


# ---------------------------------------------------------------------------------------------
# report: picture
# ---------------------------------------------------------------------------------------------
_COLORS = {
    "fused": "#d62728", "fused_alt": "#e377c2", "eager_vectorised": "#1f77b4", "eager_rfft": "#6baed6",
    "compiled_eager": "#9467bd", "compiled_eager_fallback_random": "#c5b0d5",
    "compiled_eager_max_autotune": "#54278f",
    "official_sdm": "#ff7f0e", "sagd_appendix": "#2ca02c", FLOOR: "#7f7f7f", WHITE: "#c7c7c7",
}


def plot_report(report: dict, path) -> pathlib.Path:
    """Grouped bars of the median time per call (log scale) of every implementation for each
    (spec kind, B), one panel per (op, shape, dtype); the fused op in red with a black edge, above
    each group its speed-up over the fastest baseline computing the same noise. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    path = pathlib.Path(path)
    results = report["results"]
    ops = list(dict.fromkeys(r["op"] for r in results))
    rows_keys = list(dict.fromkeys((r["C"], r["H"], r["W"], r["dtype"]) for r in results))
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    batches = sorted({r["B"] for r in results})
    present = [i for i in IMPL_ORDER if any(_slot(r) == i for r in results)]
    ncols, nrows = len(ops), len(rows_keys)
    n_groups = len(kinds) * len(batches)
    key = lambda r: (r["op"], r["kind"], r["B"], r["C"], r["H"], r["W"], r["dtype"])  # noqa: E731
    sizes = {}
    for r in results:
        sizes[key(r)] = sizes.get(key(r), 0) + 1
    # bars per group, per column (op): the columns get widths in proportion
    col_bars = [max(n for k, n in sizes.items() if k[0] == op) for op in ops]
    # layout in inches: header (title, legend), panels of ax_h with gap between rows
    panel_ws = [max(6.5, 0.085 * n_groups * nb + 1.2) for nb in col_bars]
    head, foot, ax_h, gap, left, right, wgap = 1.25, 0.55, 2.6, 0.95, 0.75, 0.25, 0.75
    fig_w = left + right + sum(panel_ws) + wgap * (ncols - 1)
    fig_h = head + foot + ax_h * nrows + gap * (nrows - 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(fig_w, fig_h), squeeze=False,
                             gridspec_kw={"width_ratios": panel_ws})
    fig.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, bottom=foot / fig_h,
                        top=1 - head / fig_h, hspace=gap / ax_h,
                        wspace=wgap / (sum(panel_ws) / ncols))
    cases = {(c["op"], c["kind"], c["B"], c["C"], c["H"], c["W"], c["dtype"]): c
             for c in report["cases"]}
    for ci, op in enumerate(ops):
        width = 0.84 / col_bars[ci]
        for ri, (C, H, W, dt) in enumerate(rows_keys):
            ax = axes[ri][ci]
            sel = [r for r in results if r["op"] == op and (r["C"], r["H"], r["W"], r["dtype"])
                   == (C, H, W, dt)]
            ax.set_title(f"{op}   [B, {C}, {H}, {W}]   {dt}", fontsize=10, loc="left")
            if not sel:
                ax.set_axis_off()
                continue
            ymin = min(r["median_ms"] for r in sel)
            ymax = max(r["q3_ms"] for r in sel)
            xt, xl = [], []
            g = 0
            for kind in kinds:
                g0 = g
                for B in batches:
                    grp = sorted((r for r in sel if r["kind"] == kind and r["B"] == B),
                                 key=lambda r: IMPL_ORDER.index(_slot(r)))
                    if grp:
                        x0 = g - width * (len(grp) - 1) / 2
                        for j, r in enumerate(grp):
                            slot = _slot(r)
                            fused = slot in ("fused", "fused_alt")
                            lo, hi = r["median_ms"] - r["q1_ms"], r["q3_ms"] - r["median_ms"]
                            ax.bar(x0 + j * width, r["median_ms"], width * 0.92,
                                   color=_COLORS[slot], edgecolor="black" if fused else "none",
                                   linewidth=1.0 if fused else 0, zorder=3 if fused else 2,
                                   yerr=[[max(lo, 0)], [max(hi, 0)]], error_kw={
                                       "elinewidth": 0.6, "capsize": 0, "ecolor": "#333333"})
                        c = cases.get((op, kind, B, C, H, W, dt))
                        if c and c["speedup_vs_fastest"] is not None:
                            top = max(r["q3_ms"] for r in grp)
                            x = c["speedup_vs_fastest"]
                            ax.annotate(f"{x:.1f}x", (g, top), xytext=(0, 2),
                                        textcoords="offset points", ha="center", va="bottom",
                                        fontsize=7 if n_groups <= 12 else 6, fontweight="bold",
                                        color="#1a7f37" if x >= 1 else "#b42318")
                    xt.append(g)
                    xl.append(f"B={B}" if len(batches) > 1 else "")
                    g += 1
                trans = blended_transform_factory(ax.transData, ax.transAxes)
                ax.text((g0 + g - 1) / 2, -0.13 if len(batches) > 1 else -0.05,
                        kind.replace("_", "+"), transform=trans, ha="center", va="top",
                        fontsize=8, fontweight="bold")
                if g < n_groups:
                    ax.axvline(g - 0.5, color="#bbbbbb", linewidth=0.6, zorder=1)
            ax.set_yscale("log")
            ax.set_ylim(ymin / 2.0, ymax * 3.5)
            ax.set_xlim(-0.6, n_groups - 0.4)
            ax.set_xticks(xt)
            ax.set_xticklabels(xl, fontsize=7)
            ax.tick_params(axis="x", length=0)
            ax.set_ylabel("median ms / call", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", which="major", color="#e5e5e5", linewidth=0.6, zorder=0)
    m, st, cp = report["machine"], report["settings"], report["copy_bandwidth"]
    fused_name = next(r["impl"] for r in results if _slot(r) == "fused")
    alt_names = ", ".join(dict.fromkeys(r["impl"] for r in results if _slot(r) == "fused_alt"))
    labels = {"fused": f"{fused_name} (fused)", "fused_alt": f"{alt_names} (fused)",
              FLOOR: "isotropic floor (torch.randn [+ mix | plain DDPM step])",
              WHITE: "anisodiff white (NoiseSpec())"}
    handles = [Patch(facecolor=_COLORS[i], edgecolor="black" if i in ("fused", "fused_alt") else "none",
                     label=labels.get(i, i)) for i in present]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0 - 0.5 / fig_h))
    gpu = f", GPU {m['gpu']['name']}" if "gpu" in m else ""
    fig.suptitle(
        f"anisodiff {m['anisodiff_version']} bench ({st['mode']}, {report['device']}{gpu}): "
        f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch_version']}, "
        f"{st['threads']} threads, kernel ISA {m['anisodiff_build_info'].get('cpu_capability')}, "
        f"copy {cp['GBps']:.1f} GB/s, {report['timestamp'][:10]}\n"
        "median time per call (log scale; whiskers: IQR); label over each group: speed-up of the "
        "fused op over the fastest baseline computing the same noise",
        fontsize=10, y=1.0 - 0.08 / fig_h, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slot(row: dict) -> str:
    if not row["fused"]:
        return row["impl"]
    return "fused" if row.get("primary", True) else "fused_alt"  # version-1 rows: one fused


# ---------------------------------------------------------------------------------------------
# driver shared by `anisodiff bench` and benchmarks/run_cpu.py
# ---------------------------------------------------------------------------------------------
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
    backends, _ = fused_backends(s["device"])  # fail fast: no CUDA device, no compiled ops
    models = [x for x in suites if x != "ops"]
    if models:
        from . import bench_train

        bench_train.require_diffusers()
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
        report = {**_base_report(s, argv, s["device"]), "settings": settings,
                  "loadavg_before": _loadavg(), "busy_cpus_before": busy_before,
                  "copy_bandwidth": None, "elapsed_s": 0.0, "results": [], "cases": [], "goal": [],
                  "backend_goals": []}
    if "train" in suites:
        report["train_step"] = bench_train.run_train(s["train"], backends=backends, progress=progress)
        print(("\n" if "ops" in suites else "") + bench_train.format_train(report["train_step"]), file=out)
    if "sampling" in suites:
        report["sampling"] = bench_train.run_sampling(s["sampling"], backends=backends,
                                                      progress=progress)
        print("\n" + bench_train.format_sampling(report["sampling"]), file=out)
    report["total_elapsed_s"] = time.perf_counter() - t0
    if "ops" not in suites:
        report.update(loadavg_after=_loadavg(), busy_cpus_after=busy_cpus(0.5))
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
            print(f"picture: {bench_train.plot_models(report, models_plot_path(plot_path, suites))}",
                  file=out)
    return report
