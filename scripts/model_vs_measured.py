#!/usr/bin/env python3
"""Measured against PREDICTED: every CUDA add_noise case of `anisodiff bench` JSONs beside the static
performance model's prediction for the same case (benchmarks/results/model-sm90.json, from
scripts/cuda_perf_model.py), and the ratio measured / predicted. A ratio outside [1/1.5, 1.5] is
flagged: docs/cuda.md asks for a reason next to each such case when the results are committed.

    python scripts/model_vs_measured.py MODEL_JSON BENCH_JSON [BENCH_JSON ...] [--json OUT]

The benchmark's % of copy bandwidth is per eager call (the op's median call time against a large
copy's bandwidth, both measured in the same run), so it is compared with the model's
``predicted_pct_copy_call``; the model's GPU-time share is printed beside it. The benchmark's kinds
map onto the model's: ``sdm`` (SDM squeeze-only) is ``squeeze``, ``sdm_powerlaw`` (SDM + power law)
``squeeze+spectral`` (the model's spectrum exponent differs; the kernel and its cost do not). Plain
json, no anisodiff import (gpu_check.sh runs it whatever state the package is in)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KIND_MAP = {"sdm": "squeeze", "sdm_powerlaw": "squeeze+spectral"}
FLAG_RATIO = 1.5


def model_index(model: dict) -> dict:
    return {(c["kind"], c["B"], c["C"], c["H"], c["W"], c["dtype"]): c for c in model.get("cases", [])}


def compare(model: dict, benches: list[dict]) -> list[dict]:
    """One row per CUDA add_noise case of the benchmarks whose kind the model has."""
    idx = model_index(model)
    rows = []
    for bench in benches:
        device = ((bench.get("machine") or {}).get("gpu") or {}).get("name") or bench.get("device")
        for case in bench.get("cases", []):
            kind = KIND_MAP.get(case.get("kind"))
            cuda = (case.get("backends") or {}).get("cuda")
            if case.get("op") != "add_noise" or kind is None or not cuda:
                continue
            key = (kind, case["B"], case["C"], case["H"], case["W"], case["dtype"])
            row = {"kind": kind, "bench_kind": case["kind"], "B": case["B"], "C": case["C"], "H": case["H"],
                   "W": case["W"], "dtype": case["dtype"], "device": device,
                   "measured_ms": cuda.get("median_ms"), "measured_pct_copy": cuda.get("pct_copy_bw")}
            m = idx.get(key)
            if m is None or "cuda" not in m or m["cuda"].get("predicted_pct_copy_call") is None:
                row["note"] = "no model case (the model's grid: B 16-1024 x 3x32x32 4x64x64 16x64x64 4x128x128)"
            else:
                pc, pg = m["cuda"]["predicted_pct_copy_call"], m["cuda"].get("predicted_pct_copy_gpu")
                row.update(predicted_pct_copy_call=pc, predicted_pct_copy_gpu=pg,
                           predicted_call_us=m["cuda"].get("predicted_call_us"),
                           kernels=[L.get("kernel") for L in m["cuda"].get("launches", [])])
                if row["measured_pct_copy"] is not None and pc:
                    r = row["measured_pct_copy"] / pc
                    row["ratio"] = r
                    row["differs"] = not (1 / FLAG_RATIO <= r <= FLAG_RATIO)
            rows.append(row)
    return rows


def format_rows(rows: list[dict], model: dict) -> str:
    src = model.get("source", {})
    head = (f"measured (anisodiff bench, per eager call) against PREDICTED (model of commit "
            f"{src.get('commit', '?')}; % of copy bandwidth)")
    if not rows:
        return head + "\n  no CUDA add_noise measurements to compare (no benchmark JSON, or no cuda backend timed)\n"
    lines = [head, f"  {'kind':17s} {'B':>5s} {'shape':>10s} {'dtype':5s} {'measured':>9s} {'PRED call':>9s} "
                   f"{'PRED GPU':>9s} {'ratio':>6s}"]
    for r in rows:
        shape = f"{r['C']}x{r['H']}x{r['W']}"
        meas = f"{r['measured_pct_copy']:.1f}%" if r.get("measured_pct_copy") is not None else "-"
        if "note" in r:
            lines.append(f"  {r['kind']:17s} {r['B']:>5d} {shape:>10s} {r['dtype']:5s} {meas:>9s}  {r['note']}")
            continue
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        flag = "  DIFFERS by more than 1.5x: say why" if r.get("differs") else ""
        pg = r.get("predicted_pct_copy_gpu")
        pg = f"{pg:.1f}%" if pg is not None else "-"
        lines.append(f"  {r['kind']:17s} {r['B']:>5d} {shape:>10s} {r['dtype']:5s} {meas:>9s} "
                     f"{r['predicted_pct_copy_call']:>8.1f}% {pg:>9s} {ratio:>6s}{flag}")
    n = sum(1 for r in rows if r.get("differs"))
    lines.append(f"  {n} of {sum(1 for r in rows if 'ratio' in r)} compared cases differ by more than {FLAG_RATIO:g}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("bench", type=Path, nargs="*")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    model = json.loads(a.model.read_text())
    benches, unread = [], []
    for p in a.bench:  # one unreadable file (a killed run's) loses its own cases only
        try:
            benches.append(json.loads(p.read_text()))
        except (OSError, ValueError) as exc:
            if p.exists():
                unread.append(f"{p}: {exc}")
    rows = compare(model, benches)
    sys.stdout.write(format_rows(rows, model))
    for u in unread:
        sys.stdout.write(f"  not read: {u}\n")
    if a.json:
        a.json.write_text(json.dumps({"model_source": model.get("source"), "flag_ratio": FLAG_RATIO,
                                      "benchmarks": [str(p) for p in a.bench if p.exists()], "rows": rows},
                                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
