"""The machine a benchmark runs on: CPU model and cores, torch, the build, the GPU, and how busy the
other processes keep the CPUs (/proc/stat and the load average), recorded in every report."""
from __future__ import annotations

import os
import pathlib
import platform
import socket
import time

import torch

from .._ext import build_info
from .._version import __version__

__all__ = ["machine_info", "loadavg", "cpu_snapshot", "other_load", "busy_cpus", "wait_for_idle"]


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


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, machine busy CPU-s from /proc/stat, this process's CPU-s)."""
    try:
        vals = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]
    return time.perf_counter(), (sum(vals) - idle) / _CLK_TCK, time.process_time()


def other_load(before, after) -> float | None:
    """CPUs used by OTHER processes between two :func:`cpu_snapshot` s (0.1-CPU resolution for
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
        "loadavg": loadavg(),
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
