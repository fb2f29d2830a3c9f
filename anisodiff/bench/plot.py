"""The benchmark's pictures (need matplotlib): the op suite's grouped bars (:func:`plot_report`) and
the train-step / sampling panels (:func:`plot_models`)."""
from __future__ import annotations

import pathlib

from .goals import TRAIN_GOAL_PCT
from .cases import TRAINER_BASELINE
from .impls import FLOOR, IMPL_ORDER, WHITE
from .models import ISO

__all__ = ["plot_report", "plot_models"]


_COLORS = {
    "fused": "#d62728", "fused_alt": "#e377c2", "eager_vectorised": "#1f77b4", "eager_rfft": "#6baed6",
    "compiled_eager": "#9467bd", "compiled_eager_fallback_random": "#c5b0d5",
    "compiled_eager_max_autotune": "#54278f",
    "official_sdm": "#ff7f0e", "sagd_appendix": "#2ca02c", FLOOR: "#7f7f7f", WHITE: "#c7c7c7",
    # the trainers' eager code (one per trainer kind, so one colour for all)
    **{name: "#8c564b" for name in TRAINER_BASELINE.values()},
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


def plot_models(report: dict, path):
    """One panel per suite present: the train step's median time per variant (whiskers IQR,
    labels: % over the isotropic step, the dashed line at +2 %), and each sampler's time alone and
    with the UNet (log scale). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    secs = [k for k in ("train_step", "sampling") if k in report]
    fig, axes = plt.subplots(1, len(secs), figsize=(7.5 * len(secs), 5.2), squeeze=False)
    for ax, key in zip(axes[0], secs):
        sec = report[key]
        vs = sec["variants"]
        if key == "train_step":
            names = [v["name"] for v in vs]
            med = [v["median_ms"] for v in vs]
            err = [[v["median_ms"] - v["q1_ms"] for v in vs], [v["q3_ms"] - v["median_ms"] for v in vs]]
            colors = ["#7f7f7f" if n == ISO else "#d62728" if v["anisodiff"] else "#1f77b4"
                      for n, v in zip(names, vs)]
            ax.barh(range(len(vs)), med, xerr=err, color=colors, error_kw={"elinewidth": 0.8})
            ref = next(v["median_ms"] for v in vs if v["name"] == ISO)
            ax.axvline(ref * (1 + TRAIN_GOAL_PCT / 100), color="black", linestyle="--", linewidth=0.8,
                       label=f"isotropic + {TRAIN_GOAL_PCT:g} %")
            for i, v in enumerate(vs):
                ax.text(v["q3_ms"], i, f"  {v['paired_overhead_pct']:+.1f} %", va="center", fontsize=8)
            ax.set_yticks(range(len(vs)))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, max(v["q3_ms"] for v in vs) * 1.25)
            ax.set_xlabel("median ms per training step (whiskers: IQR)", fontsize=8)
            mo, st = sec["model"], sec["settings"]
            B, C, H, W = sec["input"]["shape"]
            ax.set_title(f"train step: {mo['name']} UNet ({mo['parameters'] / 1e6:.1f} M), B={B}, "
                         f"{C}x{H}x{W}, amp {st['amp']}\nlabel: paired overhead vs isotropic",
                         fontsize=9, loc="left")
            ax.legend(fontsize=8, loc="lower right")
        else:
            names = [v["name"] for v in vs]
            x = range(len(vs))
            alone = [v["sampler_only"]["median_ms"] for v in vs]
            tot = [v["with_unet"]["median_ms"] for v in vs]
            ax.bar([i - 0.2 for i in x], alone, 0.4, color="#ff7f0e", label="sampler alone (stand-in model)")
            ax.bar([i + 0.2 for i in x], tot, 0.4, color="#1f77b4", label="with the UNet")
            for i, v in enumerate(vs):
                ax.text(i - 0.2, alone[i], f"{alone[i]:.0f}", ha="center", va="bottom", fontsize=7)
                ax.text(i + 0.2, tot[i], f"{v['with_unet']['overhead_pct']:+.1f}%", ha="center",
                        va="bottom", fontsize=7)
            ax.set_yscale("log")
            ax.set_ylim(min(alone + tot) / 2, max(alone + tot) * 8)
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, fontsize=8, rotation=12)
            ax.set_ylabel("median ms per sampling run", fontsize=8)
            B, C, H, W = sec["shape"]
            ax.set_title(f"sampling: {sec['settings']['steps']} DDPM steps, B={B}, {C}x{H}x{W}, SDM "
                         f"s={sec['spec']['strength']}\nlabels: ms alone; % over the isotropic run "
                         "with the UNet", fontsize=9, loc="left")
            ax.legend(fontsize=8, loc="upper left")
    m = report["machine"]
    gpu = f", GPU {m['gpu']['name']}" if "gpu" in m else ""
    fig.suptitle(f"anisodiff {m['anisodiff_version']} bench ({report['device']}{gpu}): {m['cpu_model']}, "
                 f"torch {m['torch_version']}, {report['timestamp'][:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
