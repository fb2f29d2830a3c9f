#!/usr/bin/env python
"""Side-by-side CPU timing of the fused ``anisodiff.add_noise`` against the baselines.

    python benchmarks/run_cpu.py [--quick] [--json PATH] [--threads N] [--batch 16 64 128]
                                 [--kinds sdm hdm ...] [--no-compile] [--given-noise]
                                 [--wait-idle SECONDS] [--max-other-load CPUS]

Everything is timed in ONE process on the same machine, interleaved: every repeat runs one timing
block of each implementation in turn (rotating the order), so slow drift or a neighbour's load hits
all implementations alike; rounds during which OTHER processes used more than ``--max-other-load``
CPUs (from /proc/stat minus this process's CPU time) are dropped for every implementation, and
replaced by extra rounds. Per implementation: warm-up (at least ``--warmup`` seconds and 3 calls;
torch.compile's first call, the compilation, is timed separately), then ``--repeats`` blocks of
``n`` back-to-back calls with ``n`` chosen so one block lasts about ``--block-ms``; the per-call time
of a block is its wall time / n (``time.perf_counter``, Python GC off inside a block). Reported: the
median and the inter-quartile range over blocks, the speed-up ``baseline median / fused median`` and
the overhead over the isotropic floor (``torch.randn_like`` + diffusers ``add_noise``).

Writes JSON (machine info, command line, timestamp, every measurement) to
``benchmarks/results/cpu-<hostname>.json`` unless ``--json`` says otherwise. Numbers are whatever
this run measured: nothing is extrapolated or hard-coded. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import pathlib
import platform
import shlex
import socket
import statistics
import sys
import time
import warnings

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import anisodiff as ad  # noqa: E402
import baselines as bl  # noqa: E402

FUSED = "anisodiff_cpu"
FLOOR = "isotropic_floor"
HEADLINE = {"B": 64, "kinds": ("sdm", "sdm_powerlaw"), "baseline": "eager_vectorised", "target": 2.0}

# name -> (description, spec kinds it can express)
IMPLS = {
    FUSED: "anisodiff.add_noise(backend='cpu'), fused kernel, canonical Philox stream",
    "eager_vectorised": "randn_like + fft2/ifft2 (calibrated w) + einsum S(t) + mix (THE baseline)",
    "eager_rfft": "eager_vectorised with rfft2/irfft2 instead of fft2/ifft2",
    "compiled_eager": "torch.compile(eager_vectorised), default inductor options",
    "compiled_eager_fallback_random": "torch.compile(eager_vectorised), inductor fallback_random=True (aten randn)",
    "official_sdm": "official SDM code: per-sample .item() loop building S, bmm, diffusers add_noise",
    "sagd_appendix": "SAGD App. E: randn, fftn/ifftn, per-plane std normalisation, add_noise",
    FLOOR: "torch.randn_like + diffusers add_noise (no anisotropy)",
    "anisodiff_white": "anisodiff.add_noise with NoiseSpec() (the fused kernel's own white floor)",
}


# ---------------------------------------------------------------------------------------------
# machine info
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


def machine_info() -> dict:
    model, physical = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "hostname": socket.gethostname() or "local",
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "cpus_usable": affinity,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "anisodiff_version": ad.__version__,
        "anisodiff_build_info": ad.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: v for k, v in os.environ.items()
                if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "LD_PRELOAD")
                or k.startswith("MALLOC_") or k.startswith("GOMP_") or k.startswith("KMP_")},
        "loadavg": _loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
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


class Timer:
    """One implementation's callable, warmed up and calibrated."""

    def __init__(self, name: str, fn, warmup_s: float, block_s: float):
        self.name, self.fn = name, fn
        self.compile_s = None
        if name.startswith("compiled"):
            t0 = time.perf_counter()
            fn()
            self.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - t0 < warmup_s:
            fn()
            calls += 1
        per_call = (time.perf_counter() - t0) / calls
        self.inner = max(1, min(10_000, round(block_s / max(per_call, 1e-7))))
        self.samples: list[float] = []
        self.faults: list[float] = []  # minor page faults per call, per block

    def block(self) -> None:
        fn, n = self.fn, self.inner
        gc.disable()
        try:
            f0 = _minor_faults()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            f1 = _minor_faults()
        finally:
            gc.enable()
        self.samples.append(dt / n)
        self.faults.append((f1 - f0) / n)


def _callables(case, names: list[str], compiled: dict, given_noise: bool = False) -> dict:
    """Zero-argument callables. ``given_noise``: every implementation gets the same pre-drawn white
    noise (``noise=eps``), so the random number generation is excluded from all timings."""
    args, kw = case.baseline_args(), case.baseline_kwargs()
    nkw = {}
    if given_noise:
        nkw = {"noise": torch.randn(case.x0.shape, generator=torch.Generator().manual_seed(0))}
        kw = {**kw, **nkw}
    fns = {}
    for name in names:
        if name == FUSED:
            fns[name] = lambda: ad.add_noise(case.x0, case.timesteps, case.spec, case.schedule,
                                             backend="cpu", **nkw)
        elif name == "anisodiff_white":
            white = ad.NoiseSpec()
            fns[name] = lambda: ad.add_noise(case.x0, case.timesteps, white, case.schedule,
                                             backend="cpu", **nkw)
        elif name == "eager_rfft":
            fns[name] = lambda: bl.eager_vectorised(*args, **kw, rfft=True)
        elif name in compiled:
            cfn = compiled[name]
            fns[name] = lambda cfn=cfn: cfn(*args, **kw)
        else:
            fn, a = bl.BASELINES[name], case.baseline_args(name)
            fns[name] = lambda fn=fn, a=a: fn(*a, **kw)
    return fns


def _impls_for(kind: str, with_compile: bool, compiled: dict) -> list[str]:
    out = [FUSED, "eager_vectorised", "eager_rfft"]
    if with_compile:
        out += [n for n in ("compiled_eager", "compiled_eager_fallback_random") if n in compiled]
    out += [n for n in ("official_sdm", "sagd_appendix") if bl.supports(n, kind)]
    out += [FLOOR, "anisodiff_white"]
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ad.build_info().get("cpu"):
        raise SystemExit("anisodiff's compiled CPU ops are not built: nothing to benchmark "
                         f"({ad.build_info().get('error')})")
    warnings.filterwarnings("ignore", message=".*Torchinductor does not support code generation for complex.*")

    compiled, compile_notes = {}, {}
    if args.compile:
        for name, opts in (("compiled_eager", {}),
                           ("compiled_eager_fallback_random", {"options": {"fallback_random": True}})):
            fn, why = bl.make_compiled_eager(**opts)
            compile_notes[name] = why
            if fn is not None:
                compiled[name] = fn

    busy_before = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else busy_cpus()
    load_before = _loadavg()
    t_start = time.perf_counter()
    results = []
    for kind in args.kinds:
        for B in args.batch:
            case = bl.make_case(kind, B, 3, args.size, args.size, seed=0)
            names = _impls_for(kind, args.compile, compiled)
            fns = _callables(case, names, compiled, args.given_noise)
            timers = [Timer(n, fns[n], args.warmup, args.block_ms / 1e3) for n in names]
            loads, clean, r = [], 0, 0
            t_group = time.perf_counter()
            while (clean < args.repeats and r < args.max_rounds_factor * args.repeats
                   and (r < args.repeats or time.perf_counter() - t_group < args.max_group_s)):
                k = r % len(timers)
                before = _cpu_snapshot()
                for tm in timers[k:] + timers[:k]:  # rotate the order every repeat
                    tm.block()
                load = other_load(before, _cpu_snapshot())
                loads.append(load)
                clean += load is None or load <= args.max_other_load
                r += 1
            # keep only the rounds no other process disturbed (all implementations alike); if too
            # few were clean, keep everything and flag the group
            keep = [i for i, ld in enumerate(loads) if ld is None or ld <= args.max_other_load]
            reliable = len(keep) >= max(3, args.repeats // 2)
            if not reliable:
                keep = list(range(len(loads)))
            group_info = {"rounds": len(loads), "clean_rounds": clean, "reliable": reliable,
                          "other_load_median": statistics.median([x for x in loads if x is not None] or [0.0])}
            med = {tm.name: _quantiles([tm.samples[i] for i in keep])[1] for tm in timers}
            for tm in timers:
                q1, q2, q3 = _quantiles([tm.samples[i] for i in keep])
                results.append({
                    "kind": kind, "title": case.title, "B": B, "C": 3, "H": args.size, "W": args.size,
                    "dtype": "float32", "impl": tm.name,
                    "median_ms": q2 * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                    "iqr_ms": (q3 - q1) * 1e3, "min_ms": min(tm.samples[i] for i in keep) * 1e3,
                    "repeats": len(keep), "calls_per_block": tm.inner,
                    "speedup_vs_fused": q2 / med[FUSED],
                    "overhead_vs_floor_ms": (q2 - med[FLOOR]) * 1e3,
                    "ratio_vs_floor": q2 / med[FLOOR],
                    "compile_s": tm.compile_s,
                    "minor_faults_per_call": statistics.median([tm.faults[i] for i in keep]),
                    **group_info,
                })
    elapsed = time.perf_counter() - t_start

    goal = []
    for kind in (() if args.given_noise else HEADLINE["kinds"]):  # the goal includes drawing the noise
        rows = {r["impl"]: r for r in results if r["kind"] == kind and r["B"] == HEADLINE["B"]
                and r["H"] == 32}
        if FUSED in rows and HEADLINE["baseline"] in rows:
            s = rows[HEADLINE["baseline"]]["speedup_vs_fused"]
            goal.append({"kind": kind, "B": HEADLINE["B"], "baseline": HEADLINE["baseline"],
                         "speedup": s, "target": HEADLINE["target"], "met": s >= HEADLINE["target"],
                         "reliable": rows[FUSED]["reliable"]})
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "argv": sys.argv,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "busy_cpus_before": busy_before,
        "busy_cpus_after": busy_cpus(),
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup_s": args.warmup,
                     "block_ms": args.block_ms, "wait_idle_s": args.wait_idle,
                     "max_other_load": args.max_other_load, "max_rounds_factor": args.max_rounds_factor,
                     "max_group_s": args.max_group_s, "given_noise": args.given_noise,
                     "batch": args.batch, "kinds": args.kinds,
                     "size": args.size, "threads": torch.get_num_threads(), "compile": args.compile,
                     "compile_notes": compile_notes},
        "implementations": {k: v for k, v in IMPLS.items()},
        "elapsed_s": elapsed,
        "results": results,
        "goal": goal,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"anisodiff {m['anisodiff_version']} CPU add_noise, fp32 [B, 3, {report['settings']['size']}, "
        f"{report['settings']['size']}] | {m['cpu_model']} ({m['logical_cpus']} logical CPUs) | "
        f"torch {m['torch_version']}, {report['settings']['threads']} threads | "
        f"kernel ISA {m['anisodiff_build_info'].get('cpu_capability')}",
        f"median [IQR] per call over {report['settings']['repeats']} interleaved rounds of ~"
        f"{report['settings']['block_ms']:g} ms blocks (rounds where other processes used > "
        f"{report['settings']['max_other_load']} CPUs are dropped); speed-up = impl / fused "
        f"(>1: fused faster); floor = torch.randn_like + add_noise"
        + ("; WHITE NOISE GIVEN (noise=eps): RNG excluded everywhere" if report["settings"]["given_noise"] else ""),
        f"other load: busy CPUs before {report['busy_cpus_before']}, after "
        f"{report['busy_cpus_after']}; loadavg before {report['loadavg_before']}, after "
        f"{report['loadavg_after']}",
    ]
    header = (f"{'implementation':<32}{'median ms':>11}{'IQR ms':>9}{'speed-up':>10}{'vs floor':>17}"
              f"{'faults/call':>13}")
    seen = []
    for r in report["results"]:
        key = (r["kind"], r["B"])
        if key not in seen:
            seen.append(key)
    for kind, B in seen:
        rows = [r for r in report["results"] if r["kind"] == kind and r["B"] == B]
        r0 = rows[0]
        state = (f"{r0['repeats']} clean of {r0['rounds']} rounds" if r0["reliable"] else
                 f"UNRELIABLE: only {r0['clean_rounds']} of {r0['rounds']} rounds undisturbed, all kept")
        lines += ["", f"== {r0['title']}   B={B}   [{state}]", header]
        for r in rows:
            extra = f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] else ""
            if r["kind"] == "sdm_powerlaw" and r["impl"] == "sagd_appendix":
                extra += "  (spatial part only)"
            lines.append(f"{r['impl']:<32}{r['median_ms']:>11.3f}{r['iqr_ms']:>9.3f}"
                         f"{r['speedup_vs_fused']:>9.2f}x"
                         f"{r['overhead_vs_floor_ms']:>+9.3f} ms {r['ratio_vs_floor']:>4.2f}x"
                         f"{r['minor_faults_per_call']:>13.0f}{extra}")
    if report["goal"]:
        lines.append("")
        for g in report["goal"]:
            verdict = "MET" if g["met"] else "NOT MET"
            if not g["reliable"]:
                verdict += " (UNRELIABLE: the machine was busy, see the warning)"
            lines.append(f"foundation goal (fused >= {g['target']:g}x faster than {g['baseline']}, "
                         f"B={g['B']}, {g['kind']}): measured {g['speedup']:.2f}x -> {verdict}")
    if any(not r["reliable"] for r in report["results"]):
        lines.append(f"WARNING: other processes kept the CPUs busy during the run (more than "
                     f"{report['settings']['max_other_load']} CPUs in most rounds): with "
                     f"{report['settings']['threads']} torch threads on "
                     f"{report['machine']['logical_cpus']} CPUs a parallel region may wait for a "
                     "descheduled thread, so times are inflated and ratios unreliable. Re-run on an "
                     "idle machine (or with --wait-idle / --threads 1) for numbers to quote.")
    return "\n".join(lines)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="headline only (B=64, no torch.compile, fewer repeats): < 30 s")
    p.add_argument("--json", type=pathlib.Path, default=None,
                   help="where to write the JSON (default benchmarks/results/cpu-<hostname>.json)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 16 64 128)")
    p.add_argument("--kinds", nargs="+", default=list(bl.SPEC_KINDS), choices=bl.SPEC_KINDS)
    p.add_argument("--size", type=int, default=32, help="H = W (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timing blocks per implementation")
    p.add_argument("--block-ms", type=float, default=None, help="target duration of one block")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per implementation")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to SECONDS for other load to drop below 0.2 CPUs")
    p.add_argument("--max-other-load", type=float, default=0.2, metavar="CPUS",
                   help="discard timing rounds during which other processes used more than this "
                        "many CPUs (default 0.2)")
    p.add_argument("--max-rounds-factor", type=int, default=4,
                   help="run at most this many x --repeats rounds to collect clean ones")
    p.add_argument("--max-group-s", type=float, default=None,
                   help="stop collecting extra rounds for one (kind, B) after this many seconds")
    p.add_argument("--given-noise", action="store_true",
                   help="pass the same pre-drawn white noise to every implementation (noise=eps): "
                        "times the shaping + mix only, without random number generation")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baselines")
    a = p.parse_args(argv)
    if a.quick:
        a.batch = a.batch or [64]
        a.compile = False
        a.repeats = a.repeats or 15
        a.block_ms = a.block_ms or 10.0
        a.warmup = a.warmup if a.warmup is not None else 0.1
        a.max_group_s = a.max_group_s or 3.0
    else:
        a.batch = a.batch or [16, 64, 128]
        a.repeats = a.repeats or 30
        a.block_ms = a.block_ms or 20.0
        a.warmup = a.warmup if a.warmup is not None else 0.3
        a.max_group_s = a.max_group_s or 30.0
    return a


def main(argv=None) -> int:
    args = _parse(argv)
    report = run(args)
    print(format_table(report))
    path = args.json
    if path is None:
        host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in report["machine"]["hostname"])
        path = HERE / "results" / f"cpu-{host or 'local'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({report['elapsed_s']:.1f} s of timing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
