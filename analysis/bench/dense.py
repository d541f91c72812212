"""Dense (segmentation) cases at sizes no CPU step here reaches: every method's memory at
4096x4096 / 8192x8192 (simulated), lrcnn's plans across budgets (Pareto front, predicted), and
the time target (at half the plain step's memory, the fastest exact plan's step time against
plain's, with what its time is spent on).

How each number is made (the ``peak_how`` / ``time_how`` columns say it per row):

* plain, ``checkpoint-blocks``, ``checkpoint-sqrt``: peak of one whole training step simulated
  under ``FakeTensorMode`` (:func:`lrcnn.analysis.bench.studies.simulated_peak`, the wrappers of
  :mod:`~lrcnn.analysis.bench.methods`);
* ``compile`` (activation-memory budgets): extrapolated from the measured small step: its bytes
  above the fixed state (parameters, optimizer state) scaled by the pixels, plus the input and
  mask at the size (Dynamo cannot trace fake parameters, so no simulation);
* ``lrcnn``: the planner's plans at a sweep of budgets, peak and time predicted by the cost model
  (which matches the simulated executor step to three digits on U-Net: README); the smallest
  plan's step is also simulated (``--sim-sizes`` up to 4096 by default: larger take minutes);
* times: plain's step time is the cost model's prediction for the profile; a baseline's is
  plain's times its time ratio measured on the real small step (paired with plain steps); an
  lrcnn plan's is the cost model's prediction.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Dict, List, Optional, Sequence

import torch

from lrcnn.analysis.bench.cases import OPTIMIZER
from lrcnn.analysis.bench.methods import CheckpointBlocks, CheckpointSqrt, sweep
from lrcnn.analysis.bench.studies import simulated_peak
from lrcnn.analysis.bench.tables import machine_line, pareto
from lrcnn.planner.files import atomic_write, write_csv_atomic, write_text_atomic
from lrcnn.planner.units import fmt_bytes

SIM_SIZES = (2048, 4096, 8192)  # the first is where the time target is judged
SIMULATE_PLANS_UP_TO = 4096  # the smallest plan's step simulated at sizes up to this (larger: minutes)
TIME_TARGET = 1.5  # the issue's: at half plain's memory, within 1.5x plain's step time

_BASELINES = (("plain", None), ("checkpoint-blocks", CheckpointBlocks), ("checkpoint-sqrt", CheckpointSqrt))


def _solver(model_name: str, size: int, profile: str, bn: str = "train", policy: str = "auto"):
    from lrcnn.models.capture import build_and_capture
    from lrcnn.planner.solve import Solver

    _, g = build_and_capture(model_name, 1, (size, size), "float32", bn)
    return Solver(g, model_name, policy=policy, bn=bn, optimizer=OPTIMIZER, device_profile=profile)


def _kinds(plan) -> str:
    kinds = []
    for s in plan.segments:
        k = s.mode if s.mode != "rows" else f"rows-{s.policy}x{s.strips}"
        if s.mode == "rows" and (s.options or {}).get("bn"):
            k += f"({s.options['bn']} BN)"
        kinds.append(k)
    return "+".join(dict.fromkeys(kinds)) or "plain"


def _simulated_plan_peak(solver, plan, shape) -> float:
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory
    from lrcnn.models import get_model

    model = get_model(solver.name, device="meta")
    g = solver.graph
    return float(train_step_memory(apply_plan(model, plan, g), shape, OPTIMIZER).absolute_peak)


def simulated_rows(case: str, model_name: str, sizes: Sequence[int], profile: str, measured: List[Dict],
                   points: int = 8, progress: bool = True,
                   simulate_plans_up_to: int = SIMULATE_PLANS_UP_TO) -> List[Dict]:
    """Rows (one per method and setting, per size) of the case's model at batch 1 and each of
    ``sizes`` (square), train-mode BN; ``measured``: the case's rows from the real small step
    (:func:`lrcnn.analysis.bench.compare.run_case`), whose time ratios and compiled steps' bytes are
    carried to the sizes (see the module's docstring for how each number is made)."""
    from tqdm import tqdm

    plain_m = next((r for r in measured if r["method"] == "plain"), None)
    rows: List[Dict] = []
    bar = tqdm(desc=f"{case} simulated", total=len(sizes) * (len(_BASELINES) + points), unit="row",
               disable=not progress, file=sys.stderr)
    for size in sizes:
        shape = (1, 3, size, size)
        px = size * size
        solver = _solver(model_name, size, profile)
        base = solver.baseline()
        plain_s = float(base["time_s"])
        common = dict(case=case, model=model_name, batch=1, resolution=size, bn="train", profile=profile)

        def add(method, setting, peak, peak_how, time_s, time_how, note="", **kw):
            rows.append(dict(common, method=method, setting=setting, peak_bytes=float(peak), peak_how=peak_how,
                             time_s=float(time_s), time_ratio=float(time_s) / plain_s, time_how=time_how,
                             note=note, **kw))
        alt_peaks = []
        for name, wrapper in _BASELINES:
            bar.set_postfix_str(f"{size} {name}")
            peak = simulated_peak(model_name, wrapper, shape)
            m = next((r for r in measured if r["method"] == name), None)
            if name == "plain":
                t, how = plain_s, "predicted (cost model)"
            elif m is not None and not math.isnan(m.get("time_ratio", math.nan)):
                t = plain_s * m["time_ratio"]
                how = (f"plain's x {m['time_ratio']:.2f}, the ratio measured at {m['resolution']}x{m['resolution']}")
            else:
                t, how = math.nan, "not measured"
            add(name, "-", peak, "simulated (FakeTensorMode step)", t, how)
            if name != "plain":
                alt_peaks.append(peak)
            bar.update(1)
        for m in measured:  # torch.compile: the measured small step carried to the size
            if m["method"] != "compile" or plain_m is None or math.isnan(m.get("step_bytes", math.nan)):
                continue
            small_px = m["resolution"] ** 2
            io = (m["batch"] * small_px) * (3 * 4 + 8)  # float32 input and int64 mask at the small size
            peak = m["baseline_bytes"] - io + px * (3 * 4 + 8) + m["step_bytes"] * px / small_px
            add("compile", m["setting"], peak, f"extrapolated: step bytes measured at {m['resolution']}x"
                f"{m['resolution']} x pixels", plain_s * m["time_ratio"],
                f"plain's x {m['time_ratio']:.2f}, the ratio to compiled plain measured at {m['resolution']}x"
                f"{m['resolution']}")
        # lrcnn: a budget sweep from the smallest plan to plain's peak, and at each alternative's peak
        lo = solver.smallest_budget()
        budgets = sorted(set(int(b) for b in sweep(lo, max(lo, solver.budget_for(base["peak"])), points)
                             + [b for b in alt_peaks if b >= lo]))
        bar.total += len(budgets) - points
        for i, b in enumerate(budgets):
            bar.set_postfix_str(f"{size} lrcnn {fmt_bytes(b)}")
            plan = solver.solve(b)
            pred = plan.predicted
            extra = {}
            if i == 0 and size <= simulate_plans_up_to:
                extra["simulated_peak_bytes"] = _simulated_plan_peak(solver, plan, shape)
            add("lrcnn", f"budget={fmt_bytes(b)}", pred["peak_bytes"], "predicted (cost model)", pred["time_s"],
                "predicted (cost model)", _kinds(plan), budget_bytes=float(b), **extra)
            bar.update(1)
    bar.close()
    return rows


def time_target(model_name: str, size: int, profile: str, plain_peak: Optional[float] = None) -> Dict:
    """At half the plain step's peak (``plain_peak``: simulated; default the cost model's), the
    fastest plan's predicted step time against plain's, and where its time goes: per row segment
    the BN gradient sweeps (one recompute and backward of the segment's strips per BN level: the
    rows of a level's input gradient need the whole map's gradient statistics of the levels above),
    the BN statistics pass, and the rest (strips, halos, recompute, the other segments).  Then the
    same budget with frozen BN (eval mode) and with checkpoint / store segments alone: what would
    change it."""
    from lrcnn.planner.ilp import InfeasibleError

    s = _solver(model_name, size, profile)
    base = s.baseline()
    plain_peak = float(plain_peak or base["peak"])
    budget = int(plain_peak / 2)
    out = dict(model=model_name, resolution=size, profile=profile, plain_peak_bytes=plain_peak,
               budget_bytes=budget, plain_s=float(base["time_s"]))
    try:
        plan = s.solve(budget)
    except InfeasibleError as e:
        out.update(plan="infeasible", note=str(e))
        return out
    bn_grad = bn_stat = 0.0
    levels = 0
    for seg in plan.segments:
        if seg.mode != "rows":
            continue
        c = s.cm.segment(seg)
        sweeps = s.cm.segment(dataclasses.replace(seg, options={})).detail  # (detail of the sweeps strategy)
        bn_grad += sweeps["bn_extra_s"] - sweeps["bn_stat_s"]
        bn_stat += c.detail["bn_stat_s"]
        levels += int(c.detail["bn_levels"])
    t = float(plan.predicted["time_s"])
    out.update(plan=_kinds(plan), peak_bytes=float(plan.predicted["peak_bytes"]), time_s=t,
               ratio=t / out["plain_s"], bn_levels=levels, bn_grad_s=bn_grad, bn_stat_s=bn_stat,
               rest_s=t - bn_grad - bn_stat, ratio_without_bn=(t - bn_grad - bn_stat) / out["plain_s"])
    for key, kw in (("frozen_bn", dict(bn="eval")), ("checkpoint_only", dict(policy="checkpoint"))):
        alt = _solver(model_name, size, profile, **kw)
        try:
            p = alt.solve(budget)
            out[f"{key}_ratio"] = float(p.predicted["time_s"]) / float(alt.baseline()["time_s"])
            out[f"{key}_plan"] = _kinds(p)
        except InfeasibleError:
            out[f"{key}_ratio"] = math.nan
            out[f"{key}_plan"] = f"infeasible: its smallest plan needs {fmt_bytes(alt.smallest_budget())}"
    return out


def sim_markdown(rows: List[Dict], targets: Sequence[Dict], device: torch.device) -> str:
    """The simulated table per case and size, and the time target per case."""
    lines = [f"Computed on {machine_line(device)} (no step at these sizes runs here: every number is simulated, "
             f"predicted or extrapolated, as the columns say). Batch 1, float32, train-mode BN, SGD momentum; "
             f"peak = absolute bytes of one training step; time ratio against plain's predicted step "
             f"(cost model, `{rows[0]['profile'] if rows else 'cpu'}` profile).", ""]
    import pandas as pd

    df = pd.DataFrame(rows)
    for (case, size), d in df.groupby(["case", "resolution"], sort=False):
        plain = d[d.method == "plain"].iloc[0]
        lines += [f"**{case}** at {size}x{size} ({d.iloc[0]['model']})", "",
                  "| method | setting | peak | x plain | how (peak) | step s | x plain | how (time) | plan |",
                  "|---|---|---:|---:|---|---:|---:|---|---|"]
        for _, r in d.iterrows():
            sim = r.get("simulated_peak_bytes", math.nan)
            how = r.peak_how + (f"; simulated {fmt_bytes(sim)}" if isinstance(sim, float) and not math.isnan(sim)
                                else "")
            note = r.note if isinstance(r.note, str) else ""
            t = "-" if math.isnan(r.time_s) else f"{r.time_s:.4g}"
            tr = "-" if math.isnan(r.time_ratio) else f"{r.time_ratio:.2f}"
            lines.append(f"| {r.method} | {r.setting} | {fmt_bytes(r.peak_bytes)} | "
                         f"{r.peak_bytes / plain.peak_bytes:.3f} | {how} | {t} | {tr} | {r.time_how} | {note} |")
        lines.append("")
    for t in targets:
        lines += target_markdown(t)
    return "\n".join(lines)


def target_markdown(t: Dict) -> List[str]:
    t = dict(t, resolution=int(t["resolution"]), bn_levels=int(t.get("bn_levels", 0) or 0))  # (CSV: floats)
    head = (f"**Time target**, {t['model']} at {t['resolution']}x{t['resolution']} (predicted, `{t['profile']}` "
            f"profile): budget = half the plain step's simulated peak ({fmt_bytes(t['plain_peak_bytes'])} / 2 = "
            f"{fmt_bytes(t['budget_bytes'])}); plain's step {t['plain_s']:.4g} s.")
    if t.get("plan") == "infeasible":
        return [head, "", f"No plan fits: {t['note']}", ""]
    ok = t["ratio"] <= TIME_TARGET
    out = [head, "",
           "| | value |", "|---|---:|",
           f"| fastest exact plan | {t['plan']}, peak {fmt_bytes(t['peak_bytes'])} |",
           f"| its step time | {t['time_s']:.4g} s = **{t['ratio']:.2f}x plain** (target <= {TIME_TARGET}: "
           f"{'met' if ok else 'not met'}) |",
           f"| of which BN gradient sweeps ({t['bn_levels']} BN levels in row segments, one strip recompute + "
           f"backward each) | {t['bn_grad_s']:.4g} s ({t['bn_grad_s'] / t['plain_s']:.2f}x plain) |",
           f"| of which the BN statistics pass | {t['bn_stat_s']:.4g} s ({t['bn_stat_s'] / t['plain_s']:.2f}x plain) |",
           f"| the rest (strips, halos, recompute, other segments) | {t['rest_s']:.4g} s "
           f"({t['ratio_without_bn']:.2f}x plain) |",
           f"| same budget, frozen BN (eval mode) | "
           + (f"{t['frozen_bn_ratio']:.2f}x plain ({t['frozen_bn_plan']})" if not math.isnan(t['frozen_bn_ratio'])
              else t['frozen_bn_plan']) + " |",
           f"| same budget, checkpoint / store segments only | "
           + (f"{t['checkpoint_only_ratio']:.2f}x plain ({t['checkpoint_only_plan']})"
              if not math.isnan(t['checkpoint_only_ratio']) else t['checkpoint_only_plan']) + " |", ""]
    return out


def write_sim(rows: List[Dict], device: torch.device, csv: str, png: str, md: str) -> str:
    """Write the simulated rows (each case's time target rides on its first plain row as
    ``target_*`` columns) as CSV, plot and markdown; returns the markdown."""
    import pandas as pd

    targets = [{k[len("target_"):]: v for k, v in r.items() if k.startswith("target_")}
               for r in rows if isinstance(r.get("target_model"), str)]
    text = sim_markdown(rows, targets, device)
    write_csv_atomic(pd.DataFrame(rows), csv)
    plot(rows, png)
    write_text_atomic(text, md, "markdown")
    return text


def plot(rows: List[Dict], path: str) -> None:
    """Peak against step time per case and size: lrcnn's Pareto front (predicted) and the
    baselines' points."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    cases, sizes = list(dict.fromkeys(df.case)), list(dict.fromkeys(df.resolution))
    fig, axes = plt.subplots(len(cases), len(sizes), figsize=(5.2 * len(sizes), 4.4 * len(cases)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for (case, size), d in df.groupby(["case", "resolution"], sort=False):  # a row per case, a column per size
        ax = axes[cases.index(case)][sizes.index(size)]
        ax.set_visible(True)
        d = d[d.time_s.notna()]
        for meth, dm in d.groupby("method", sort=False):
            pts = list(zip(dm.peak_bytes / 2**30, dm.time_s / 3600))
            sc = ax.scatter(*zip(*pts), label=meth, s=22, marker="o" if meth == "lrcnn" else "s")
            fr = pareto(pts)
            if len(fr) > 1:
                ax.step(*zip(*fr), where="post", alpha=0.6, color=sc.get_facecolor()[0])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # (minor labels overlap)
        ax.set_title(f"{case} at {int(size)}x{int(size)}")
        ax.set_xlabel("peak memory (GiB)")
        ax.set_ylabel("step time (h, predicted)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, "PNG", lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)
