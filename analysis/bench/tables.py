"""What a benchmark run writes: the Pareto front, the targets, the markdown tables, the plot, and
the rows of earlier runs kept in the CSV."""
from __future__ import annotations

import datetime
import math
import platform
from typing import Dict, List, Sequence, Tuple

import torch


from lrcnn.analysis.bench.cases import BenchError, EXACT_RTOL, NOISE_FACTOR
from lrcnn.planner.files import atomic_write, read_table, write_csv_atomic, write_text_atomic
from lrcnn.planner.units import fmt_bytes


def pareto(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (memory, time) points no other point beats in both."""
    front, best = [], math.inf
    for mem, t in sorted(points):
        if t < best:
            front.append((mem, t))
            best = t
    return front


def targets(df) -> List[Dict]:
    """Per case: lrcnn's minimum peak against the best alternative's, on both measures (absolute
    and the step's own bytes: what the step adds above parameters, optimizer state and batch,
    the measure the original LR-CNN numbers use), and the Pareto check: an alternative is beaten
    when an exact lrcnn plan has no more absolute peak and no more time relative to plain (for
    torch.compile: relative to compiled plain, as its time is compared); ``pareto_ties`` counts the
    others an exact lrcnn plan with no more peak matches within noise (its median ratio is above
    the alternative's, the lowest of its paired ratios is not)."""
    out = []
    ok = df[df.peak_bytes.notna()]
    for case, d in ok.groupby("case", sort=False):
        mine = d.method.str.startswith("lrcnn")
        lr = d[mine & d.exact]
        alts = d[~mine]
        if lr.empty or alts.empty:
            continue
        best_alt = alts.loc[alts.peak_bytes.idxmin()]
        step = {}
        if "step_bytes" in d and d.step_bytes.notna().all():
            best_step = alts.loc[alts.step_bytes.idxmin()]
            step = dict(lrcnn_min_step_bytes=lr.step_bytes.min(), best_alt_step=f"{best_step.method} {best_step.setting}",
                        best_alt_min_step_bytes=best_step.step_bytes,
                        step_min_ratio=lr.step_bytes.min() / best_step.step_bytes)
        dominated, total, ties = 0, 0, 0
        for _, a in alts.iterrows():
            if a.method == "plain":
                continue
            total += 1
            # time as the ratio to each method's own plain (compile: compiled plain), as the issue asks
            fits = lr[lr.peak_bytes <= a.peak_bytes]
            if (fits.time_ratio <= a.time_ratio).any():
                dominated += 1
            elif "pair_min" in fits and (fits.pair_min <= a.time_ratio).any():
                ties += 1  # not beaten, but within the range of an lrcnn row's paired ratios
        out.append(dict(case=case, lrcnn_min_bytes=lr.peak_bytes.min(), best_alt=f"{best_alt.method} {best_alt.setting}",
                        best_alt_min_bytes=best_alt.peak_bytes,
                        min_ratio=lr.peak_bytes.min() / best_alt.peak_bytes,
                        pareto=f"{dominated}/{total}", pareto_ties=ties, **step))
    return out


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        import os
        what = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return (f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}")


def markdown(df, tg: List[Dict], device: torch.device) -> str:
    lines = [f"Measured on {machine_line(device)}. Peak = absolute bytes of one training step "
             f"(SGD momentum, train-mode BN unless the case says frozen BN: eval mode, affine parameters "
             f"frozen); step peak = what the step adds above parameters, optimizer "
             f"state and batch (activations, gradients, transients: the original LR-CNN's measure); "
             f"time = median step; ratios against plain PyTorch "
             f"(compile, lrcnn-compile: against compiled plain; time of a method with a `paired_ratio` in "
             f"the CSV: the median ratio of its steps to a plain step (compiled methods: a compiled plain "
             f"step) timed right before each, in brackets the range of those ratios). "
             f"exact = gradients, loss and BN running statistics "
             f"within {EXACT_RTOL['float32']:g} (float32; float64: {EXACT_RTOL['float64']:g}) norm-wise "
             f"relative of plain PyTorch, or, in float32, per tensor within {NOISE_FACTOR}x plain PyTorch's own "
             f"spread (the same step with oneDNN/cuDNN off; shown as `<= spread`); float64 runs check the "
             f"maths to 1e-10.", ""]
    for case, d in df.groupby("case", sort=False):
        r0 = d.iloc[0]
        spread = f"; float32 spread of plain PyTorch {r0['noise_floor']:.1e}" if r0['dtype'] == "float32" else ""
        bn = ", frozen BN" if r0.get("bn") == "frozen" else ""  # (rows of older runs have no bn: train)
        where = r0.get("device")
        where = f"; measured on {where}" if isinstance(where, str) and where != machine_line(device) else ""
        lines += [f"**{case}** ({r0['model']}, batch {r0['batch']}, {r0['resolution']}x{r0['resolution']}, "
                  f"{r0['dtype']}{bn}{spread}{where})", "",
                  "| method | setting | peak | x plain | step peak | step s | x plain | exact (max rel err) | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for _, r in d.iterrows():
            note = r.note if isinstance(r.note, str) else ""  # empty notes read back from CSV as NaN
            if math.isnan(r.peak_bytes):
                lines.append(f"| {r.method} | {r.setting} | - | - | - | - | - | - | {note} |")
                continue
            sp = fmt_bytes(r.step_bytes) if "step_bytes" in r and not math.isnan(r.step_bytes) else "-"
            lines.append(f"| {r.method} | {r.setting} | {fmt_bytes(r.peak_bytes)} | {r.mem_ratio:.2f} | {sp} | "
                         f"{r.step_s:.3f} | {_time_cell(r)} | {_exact_cell(r)} | "
                         f"{note} |")
        lines.append("")
    if tg:
        lines += ["| case | measure | lrcnn min (exact plans) | best alternative (its min) | ratio (target <= 0.5) | "
                  "alternatives beaten on both axes (+ matched within the pair range) |", "|---|---|---:|---|---:|---:|"]
        for t in tg:
            ties = t.get("pareto_ties", 0)
            pareto = t["pareto"] + (f" (+{ties})" if ties else "")
            lines.append(f"| {t['case']} | absolute peak | {fmt_bytes(t['lrcnn_min_bytes'])} | {t['best_alt']} "
                         f"({fmt_bytes(t['best_alt_min_bytes'])}) | {t['min_ratio']:.2f} | {pareto} |")
            if "step_min_ratio" in t:
                lines.append(f"| {t['case']} | step peak | {fmt_bytes(t['lrcnn_min_step_bytes'])} | "
                             f"{t['best_alt_step']} ({fmt_bytes(t['best_alt_min_step_bytes'])}) | "
                             f"{t['step_min_ratio']:.2f} | |")
        lines.append("")
    return "\n".join(lines)


def _time_cell(r) -> str:
    """The time ratio; for paired methods with the range of their pairs (``1.21 [1.10-1.35]``)."""
    lo, hi = r.get("pair_min", math.nan), r.get("pair_max", math.nan)  # NaN: unpaired, or an older CSV
    if hi > lo:  # (False when either is NaN)
        return f"{r.time_ratio:.2f} [{lo:.2f}-{hi:.2f}]"
    return f"{r.time_ratio:.2f}"


def _exact_cell(r) -> str:
    if r.exact and r.max_rel_err > EXACT_RTOL.get(r["dtype"], 0.0):  # (r.dtype: the Series's own dtype)
        return f"yes ({r.max_rel_err:.1e} <= spread)"
    return f"{'yes' if r.exact else 'no'} ({r.max_rel_err:.1e})"


def plot(df, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df.peak_bytes.notna()]
    cases = list(dict.fromkeys(ok.case))
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(5.5 * max(1, len(cases)), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        d = ok[ok.case == case]
        for meth, dm in d.groupby("method", sort=False):
            pts = list(zip(dm.peak_bytes / 2**30, dm.step_s))
            sc = ax.scatter(*zip(*pts), label=meth, s=22)
            fr = pareto(pts)
            if len(fr) > 1:  # the method's Pareto front, in its colour
                ax.step(*zip(*fr), where="post", alpha=0.6, color=sc.get_facecolor()[0])
        ax.set_title(case)
        ax.set_xlabel("peak memory (GiB)")
        ax.set_ylabel("step time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, "PNG", lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)


def study_markdown(rows: List[Dict], budget: int, device: torch.device, model_name: str = "resnet50") -> str:
    here = machine_line(device)
    runs = {r["study"]: (r["device"] if isinstance(r.get("device"), str) else here) for r in rows}
    where = here if set(runs.values()) <= {here} else "; ".join(f"{k}: {v}" for k, v in runs.items())
    lines = [f"{model_name}, train-mode BN, SGD momentum, budget {fmt_bytes(budget)}; every number simulated "
             f"(FakeTensorMode, no memory used) on {where}.", "",
             "| study | fixed | method | largest | peak at it | x best alternative | pixels x checkpoint-blocks | how |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        pk = "-" if math.isnan(r["peak_bytes"]) else fmt_bytes(r["peak_bytes"])
        size = str(r["largest"]) if r["study"] == "max batch" else f"{r['largest']}x{r['largest']}"
        px = r.get("x_pixels_checkpoint_blocks", math.nan)  # (resolution rows; older CSVs have none)
        px = "-" if not isinstance(px, float) or math.isnan(px) else f"{px:.2f}"
        lines.append(f"| {r['study']} | {r['fixed']} | {r['method']} | {size} | {pk} | "
                     f"{r['x_best_alternative']:.2f} | {px} | {r['how']} |")
    return "\n".join(lines) + "\n"


def earlier_rows(csv: str, running: Sequence[str], key: str = "case",
                 required: Sequence[str] = ("case", "method", "setting", "peak_bytes", "step_s", "max_rel_err",
                                            "exact", "device"),
                 what: str = "compare CSV") -> List[Dict]:
    """Rows of an existing ``compare-<device>.csv`` (or ``study-<device>.csv``) whose ``key``
    (case, or study) is not in ``running`` (each keeps its own ``device`` line: machine, torch
    version and date), so a table can be built one case (study) per run.  A file that is not
    such a CSV is an error naming ``--fresh``."""
    import os

    if not os.path.exists(csv):
        return []
    df = read_table(csv, list(required), what, "pass --fresh to start it anew or choose another --out-dir",
                    BenchError)
    df = df[~df[key].isin(list(running))]
    return df.to_dict("records")


def write_compare(rows: List[Dict], dev: torch.device, csv: str, png: str, md: str) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    here = machine_line(dev)
    df["device"] = df["device"].fillna(here) if "device" in df else here  # kept rows: their own run's line
    text = markdown(df, targets(df), dev)
    write_csv_atomic(df, csv)
    plot(df, png)
    write_text_atomic(text, md, "markdown")
    return text
