"""Matplotlib (Agg) figure of a report: memory timeline and per-segment peaks with errors."""
from __future__ import annotations


import numpy as np

from lrcnn.analysis.compare import segment_table, timeline
from lrcnn.planner.files import atomic_write

MiB = 2 ** 20


def draw_report(df, path: str) -> None:
    """Write a PNG: (top) the memory timeline of each run's tracked step, actual peak and live
    bytes per mark against the predicted peaks where the cost model gives them, and the budget;
    (bottom) per segment and direction, predicted vs actual peak with the relative error.
    Written atomically (tmp + os.replace)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    segs = segment_table(df)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9))
    for run_id in dict.fromkeys(df["run_id"]):
        t = timeline(df, run_id)
        if t.empty:
            continue
        tag = f"{t['model'].iloc[0]} {str(run_id)[:6]}"
        x = np.arange(len(t))
        ax1.step(x, t["actual_peak_bytes"] / MiB, where="pre", label=f"{tag} actual peak")
        ax1.plot(x, t["actual_live_bytes"] / MiB, lw=0.8, alpha=0.6, label=f"{tag} live at mark")
        pred = t["predicted_peak_bytes"]
        if pred.notna().any():
            ax1.plot(x, pred / MiB, "o", ms=5, label=f"{tag} predicted peak")
        budget = t["budget_bytes"].iloc[0] if "budget_bytes" in t else np.nan
        if budget is not None and np.isfinite(float(budget)):
            ax1.axhline(float(budget) / MiB, color="red", ls="--", lw=1, label=f"{tag} budget")
        if len(t) <= 60:
            ax1.set_xticks(x)
            ax1.set_xticklabels([str(s)[:28] for s in t["name"]], rotation=75, fontsize=6)
    ax1.set_ylabel("MiB")
    ax1.set_title("memory timeline of the measured step (peak since previous mark)")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no timeline in the records", ha="center", transform=ax1.transAxes)

    if len(segs):
        labels = [f"{str(r.run_id)[:6]} s{int(r.segment)} {r.phase[:3]}" for r in segs.itertuples()]
        x = np.arange(len(segs))
        w = 0.4
        actual = segs["actual_peak_bytes"].to_numpy(dtype=float) / MiB
        pred = segs["predicted_peak_bytes"].to_numpy(dtype=float) / MiB
        ax2.bar(x - w / 2, np.nan_to_num(actual), w, label="actual peak")
        if np.isfinite(pred).any():
            ax2.bar(x + w / 2, np.nan_to_num(pred), w, label="predicted peak")
        for xi, a, rel in zip(x, actual, segs["peak_rel_err"]):
            if np.isfinite(rel):
                ax2.annotate(f"{rel:+.0%}", (xi, a), ha="center", va="bottom", fontsize=7)
        if not np.isfinite(pred).any():
            ax2.text(0.01, 0.95, "no predictions in the plan (cost model not available)",
                     transform=ax2.transAxes, va="top", fontsize=8)
        ax2.set_xticks(x)
        ax2.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no segments in the plan", ha="center", transform=ax2.transAxes)
    ax2.set_ylabel("MiB")
    ax2.set_title("per-segment peak: predicted vs actual (relative error above the bars)")
    fig.tight_layout()

    try:
        atomic_write(path, "PNG", lambda tmp: fig.savefig(tmp, dpi=100, format="png"), ".png")
    finally:
        plt.close(fig)
