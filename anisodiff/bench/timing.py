"""How the benchmark measures time: the clocks (wall time on the CPU, CUDA events on a GPU), the
copy bandwidth every GB/s is compared with, calibrated timing blocks (:class:`Timer`) and the
interleaved rounds with the load filter (:func:`interleave`)."""
from __future__ import annotations

import gc
import statistics
import time

import torch

from .machine import cpu_snapshot, other_load

__all__ = ["WallClock", "CudaEventClock", "make_clock", "copy_bandwidth", "first_call", "Timer",
           "quantiles", "interleave", "progress_line"]


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


def make_clock(device: str):
    return CudaEventClock() if device == "cuda" else WallClock()


def copy_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 7, clock=None) -> dict:
    """The machine's copy bandwidth: ``dst.copy_(src)`` of a ``mib`` MiB float32 buffer (larger than
    the caches), timed ``repeats`` times after two warm-up copies; every copy moves 2 x the buffer
    (read src, write dst). Returns the median and every sample in GB/s (1e9 bytes / s)."""
    clock = clock or make_clock(device)
    nbytes = int(mib) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    for _ in range(2):
        dst.copy_(src)
    before = cpu_snapshot()
    samples = [2 * nbytes / clock.time_block(lambda: dst.copy_(src), 1) / 1e9 for _ in range(repeats)]
    load = other_load(before, cpu_snapshot())
    del src, dst
    return {"GBps": statistics.median(samples), "samples_GBps": samples, "buffer_bytes": nbytes,
            "bytes_per_copy": 2 * nbytes, "repeats": repeats, "threads": torch.get_num_threads(),
            "other_load": load,
            "method": f"torch.Tensor.copy_ of {mib} MiB float32 on {device}, 2 x buffer bytes per "
                      f"copy, median of {repeats}"}


def first_call(fn, clock) -> float:
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


def quantiles(xs: list[float]) -> tuple[float, float, float]:
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
        before = cpu_snapshot()
        for tm in timers[k:] + timers[:k]:  # rotate the order every round
            tm.block()
        load = other_load(before, cpu_snapshot())
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


def progress_line(msg: str, stream) -> None:
    if stream is not None:
        print(msg, file=stream, flush=True)
