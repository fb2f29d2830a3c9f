"""The benchmark's record and its text: the JSON keys every report has (:func:`base_report`), the op
suite's table (:func:`format_table`, ``--details``) and the train-step and sampling tables
(:func:`format_train`, :func:`format_sampling`)."""
from __future__ import annotations

import datetime as _dt
import shlex
import sys

from .cases import TRAINER_BASELINE
from .goals import backend_goal_lines, goal_verdict, trainer_goal_lines
from .machine import machine_info

__all__ = ["FORMAT", "FORMAT_VERSION", "base_report", "format_table", "format_train",
           "format_sampling"]


FORMAT = "anisodiff-bench"

# 2: several fused backends per case (rows with "fused": true, "backend", "primary"; per-case
# "backends" and "backend_ratios"), "suites", "backend_goals", the "train_step" and "sampling"
# sections. Every key of version 1 is still there with its meaning (the primary backend's numbers).
FORMAT_VERSION = 2


def base_report(s: dict, argv, device: str) -> dict:
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


_COLUMNS = (("eager_vectorised", "eager"), ("eager_rfft", "rfft"), ("compiled_eager", "compile"),
            ("compiled_eager_fallback_random", "comp-fbr"), ("compiled_eager_max_autotune", "comp-mat"),
            ("official_sdm", "sdm-code"),
            ("sagd_appendix", "sagd"))


_TRAINER = "trainer"


def _speedup(case: dict, column: str):
    """The case's speed-up over the column's baseline; the trainer column: over the case's
    training-script baseline (trainer kinds)."""
    if column == _TRAINER:
        return case["speedups"].get(TRAINER_BASELINE.get(case["kind"], ""))
    return case["speedups"].get(column)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(report: dict, details: bool = False) -> str:
    """One line per case: the fused op's median [IQR], GB/s, % of the copy bandwidth, its speed-up
    over each baseline (baseline median / fused median) and its cost relative to the floor."""
    m, st, cp = report["machine"], report["settings"], report["copy_bandwidth"]
    cols = [(k, h) for k, h in _COLUMNS if any(k in c["speedups"] for c in report["cases"])]
    if any(c["kind"] in TRAINER_BASELINE for c in report["cases"]):
        cols.append((_TRAINER, "trainer"))  # the case's training-script baseline
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
            + "".join(f"{_ratio(_speedup(c, k)):>9}" for k, _ in cols)
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
    lines += backend_goal_lines(report.get("backend_goals", []))
    lines += trainer_goal_lines(report.get("trainer_goals", []))
    pending = report["settings"].get("kinds_pending", {})
    if pending:
        lines += [""] + [f"trainer kind {k} not timed: {why}" for k, why in pending.items()]
    if any(not c["reliable"] for c in report["cases"]):
        lines.append(f"WARNING: other processes kept the CPUs busy during some cases (more than "
                     f"{st['max_other_load']} CPUs in most rounds): times are inflated and ratios "
                     "unreliable there. Re-run on an idle machine (--wait-idle, --threads 1).")
    return "\n".join(lines)


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


def _head(sec: dict) -> str:
    m, st = sec["machine"], sec["settings"]
    gpu = f" | GPU {m['gpu']['name']}" if "gpu" in m else ""
    return (f"{m['cpu_model']} ({m['logical_cpus']} logical CPUs){gpu} | torch {m['torch_version']}, "
            f"{m['torch_num_threads']} threads | fused backends {', '.join(st['fused_backends'])}")


def format_train(sec: dict) -> str:
    st, mo = sec["settings"], sec["model"]
    B, C, H, W = sec["input"]["shape"]
    lines = [
        f"train step ({st['mode']} run, {sec['settings']['device']}): {mo['name']} UNet2DModel "
        f"({mo['parameters'] / 1e6:.1f} M parameters), B={B}, {C}x{H}x{W}, autocast {st['amp']}, "
        f"AdamW | {_head(sec)}",
        f"median [IQR] per step over {len(sec['variants'][0]['samples_ms'])} kept of "
        f"{sec['rounds']} interleaved rounds of {st['steps_per_block']} step(s); vs isotropic: "
        "ratio of medians and median of the per-round paired ratios [IQR]; noise ms: the "
        "variant's noise alone",
        "",
    ]
    head = (f"{'variant':<26}{'step ms':>10}{'[IQR]':>9}{'vs iso':>9}{'paired':>9}"
            f"{'[IQR]':>17}{'noise ms':>10}  backend")
    lines += [head, "-" * len(head)]
    for v in sec["variants"]:
        lines.append(
            f"{v['name']:<26}{v['median_ms']:>10.2f}{v['iqr_ms']:>9.2f}{v['overhead_pct']:>+8.1f}%"
            f"{v['paired_overhead_pct']:>+8.1f}%  [{v['paired_overhead_q1_pct']:+6.1f}, "
            f"{v['paired_overhead_q3_pct']:+6.1f}]{v['noise_ms']:>10.3f}  {v['backend'] or '-'}"
            + ("" if v["loss_finite"] else "  NON-FINITE LOSS"))
    lines.append("")
    for g in sec["goal"]:
        verdict = goal_verdict(g["met"], g["reliable"])
        lines.append(f"issue 7 goal (anisodiff train step within {g['target_pct']:g} % of the "
                     f"isotropic step): {g['variant']} {g['overhead_pct']:+.2f} % -> {verdict}")
    if not sec["reliable"]:
        lines.append("WARNING: other processes kept the CPUs busy in most rounds: all rounds kept, "
                     "the overheads are unreliable")
    return "\n".join(lines)


def format_sampling(sec: dict) -> str:
    st, mo = sec["settings"], sec["model"]
    B, C, H, W = sec["shape"]
    lines = [
        f"sampling ({st['mode']} run, {st['device']}): {st['steps']} DDPM steps, B={B}, {C}x{H}x{W}, "
        f"SDM s={sec['spec']['strength']}; with the {mo['name']} UNet2DModel "
        f"({mo['parameters'] / 1e6:.1f} M parameters, autocast {st['amp']}; its forward "
        f"{sec['unet_forward_ms']:.2f} ms per step) | {_head(sec)}",
        f"median [IQR] per sampling run: sampler alone over {sec['sampler_rounds']} rounds (stand-in "
        f"model: a fixed tensor), with the UNet over {sec['unet_rounds']} rounds; overheads vs "
        f"{sec['reference']}",
        "",
    ]
    head = (f"{'sampler':<22}{'alone ms':>11}{'[IQR]':>9}{'ms/step':>9}{'overhead':>11}"
            f" |{'+UNet ms':>11}{'[IQR]':>9}{'overhead':>10}{'% of total':>11}  path")
    lines += [head, "-" * len(head)]
    for v in sec["variants"]:
        a, u = v["sampler_only"], v["with_unet"]
        lines.append(
            f"{v['name']:<22}{a['median_ms']:>11.2f}{a['iqr_ms']:>9.2f}{a['per_step_ms']:>9.3f}"
            f"{a['overhead_ms']:>+9.1f}ms |{u['median_ms']:>11.1f}{u['iqr_ms']:>9.1f}"
            f"{u['overhead_pct']:>+9.1f}%{v['sampler_overhead_pct_of_total']:>+10.1f}%  "
            f"{v['path'] or '-'}" + ("" if v["output_finite"] else "  NON-FINITE OUTPUT"))
    lines += ["", "% of total: the sampler-only overhead over the isotropic sampler as a share of the "
              "isotropic run with the UNet"]
    if not sec["reliable"]:
        lines.append("WARNING: other processes kept the CPUs busy in most rounds: all rounds kept, "
                     "the overheads are unreliable")
    return "\n".join(lines)
