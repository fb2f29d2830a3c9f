"""``--suite ops``: every case of the matrix (op x spec kind x B x shape x dtype), every fused
backend of the device and every baseline, interleaved in one process (:func:`run`). Per case and
implementation: median and IQR per call, GB/s over the op's traffic floor and its share of the
copy bandwidth measured in the same run, the speed-ups over every baseline and the cost over the
isotropic floor."""
from __future__ import annotations

import statistics
import time

import torch

from . import cases
from .cases import DTYPES, KIND_TITLES, STEP_PREV, STEP_T, TRAFFIC_TENSORS, case_matrix, make_case, op_backends
from .goals import backend_goals, headline_goals, trainer_goals
from .impls import (COMPILED, FLOOR, IMPLS, WHITE, _note, case_impls, compiled_fns, is_fused,
                    make_callable, same_operator)
from .machine import busy_cpus, loadavg, wait_for_idle
from .report import base_report
from .timing import Timer, copy_bandwidth, first_call, interleave, make_clock, progress_line, quantiles

__all__ = ["run"]


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
            first = first_call(fn, clock)
        except RuntimeError as exc:  # e.g. "Unsupported dtype BFloat16" from torch.fft on the CPU
            if is_fused(name) or name == WHITE or dtype == torch.float32:
                raise
            upcast = True
            fn = make_callable(op, name, case, dtype, device, primary, use_compiled, noise, upcast)
            first = first_call(fn, clock)
            notes[name] = (f"{dtype_name}: computed in float32 and cast, as torch raises "
                           f"{str(exc).splitlines()[0][:60]!r} in {dtype_name}")
        timers.append(Timer(name, fn, clock, s["warmup"], s["block_ms"] / 1e3, first))
    round_cost = sum(tm.per_call * tm.inner for tm in timers)
    planned = max(s["min_repeats"], min(s["repeats"], int(s["group_s"] / max(round_cost, 1e-9))))
    group = interleave(timers, planned, max_rounds=s["max_rounds_factor"] * planned,
                       max_s=s["max_group_s"], max_other_load=s["max_other_load"])
    keep = group.pop("keep")
    nbytes = TRAFFIC_TENSORS[op] * B * C * H * W * (torch.finfo(dtype).bits // 8)
    stats = {tm.name: quantiles([tm.samples[i] for i in keep]) for tm in timers}
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


def run(s: dict, *, progress=None, argv: list[str] | None = None) -> dict:
    """Run the op benchmark with settings ``s`` (:func:`resolve_settings`); returns the report.
    ``progress``: a stream for one line per case (None: silent)."""
    device = s["device"]
    backends, skipped = cases.fused_backends(device)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    clock = make_clock(device)
    compiled, compile_notes = compiled_fns(s)
    busy_before = wait_for_idle(s["wait_idle"]) if s["wait_idle"] > 0 else busy_cpus(0.5)
    load_before = loadavg()
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
        progress_line(f"[{i + 1}/{len(matrix)}] {op} {kind} B={B} {'x'.join(map(str, shape))} {dt}: "
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
    summaries = []
    for key in dict.fromkeys((r["op"], r["kind"], r["B"], r["C"], r["H"], r["W"], r["dtype"])
                             for r in results):
        summaries.append(_case_summary([r for r in results if (r["op"], r["kind"], r["B"], r["C"],
                                                           r["H"], r["W"], r["dtype"]) == key]))
    settings = {k: v for k, v in s.items() if k not in ("train", "sampling")}
    settings["shapes"] = ["x".join(map(str, sh)) for sh in s["shapes"]]
    settings.update({"threads": torch.get_num_threads(), "compile_notes": compile_notes,
                     "clock": clock.name, "fused_backend": backends[0], "fused_backends": backends,
                     "skipped_backends": skipped, "op_skipped_backends": op_skipped,
                     "ops_not_timed": {op: "no fused backend of the device has the op"
                                       for op in no_backend},
                     "kinds_pending": {k: why for k in s["kinds"] if k in cases.TRAINER_KINDS
                                       for why in [cases.trainer_kind_pending(k)] if why},
                     "ddpm_step": {"timestep": STEP_T, "prev_timestep": STEP_PREV,
                                   "mode": "official", "model_output": "torch.randn, seeded",
                                   "sample": "sqrt(abar_t) x0 + sqrt(1 - abar_t) e, e white, seeded"}
                     if "ddpm_step" in s["ops"] else None})
    implementations = {k: v for k, v in IMPLS.items() if k != "fused"}
    implementations.update({f"anisodiff_{b}": IMPLS["fused"] + ("" if i else " (primary)")
                            for i, b in enumerate(backends)})
    return {
        **base_report(s, argv, device),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "busy_cpus_before": busy_before,
        "busy_cpus_after": busy_cpus(0.5),
        "settings": settings,
        "traffic": {op: f"{n} x B*C*H*W*itemsize bytes" for op, n in TRAFFIC_TENSORS.items()},
        "copy_bandwidth": copy,
        "implementations": implementations,
        "elapsed_s": elapsed,
        "results": results,
        "cases": summaries,
        "goal": headline_goals(summaries, s["given_noise"]),
        "backend_goals": backend_goals(summaries),
        "trainer_goals": trainer_goals(summaries),
    }
