"""``planner validate``: prove the planner on this device.

Solve plans across the budget range of one model and input (the plain step's budget, then
``points - 1`` budgets down to the smallest feasible plan), run each for real training steps on
the device (:func:`lrcnn.executor.run.run_plan`), and compare what was predicted with what was
measured: peak memory (CPU: storage accounting; CUDA: allocated bytes), the CUDA caching
allocator's reserved peak (CUDA: ``max_memory_reserved``; CPU: modeled on the step's allocations,
:mod:`lrcnn.models.allocator`) and step time.  One row per plan; the records of every run in one
file; a PNG of predicted vs measured over the budget range.  A plan measured above its budget is a
failure (exit 1): its allocated peak, and where the budget is in reserved bytes (a GPU profile) its
reserved peak.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from lrcnn.errors import UsageError
from lrcnn.executor.run import budget_failures, resolve_device, run_plan
from lrcnn.models.capture import build_and_capture, quiet_torch_logs
from lrcnn.planner.files import atomic_write
from lrcnn.planner.solve import Solver
from lrcnn.planner.units import format_table

VALIDATE_COLUMNS = ["point", "budget_bytes", "predicted_peak_bytes", "measured_peak_bytes", "peak_err",
                    "predicted_reserved_bytes", "reserved_bytes", "modeled_reserved_bytes", "reserved_method",
                    "within_budget", "predicted_s", "measured_s", "time_err", "segments", "run_id"]


@dataclass
class ValidateResult:
    table: Any                                   # pandas DataFrame, VALIDATE_COLUMNS
    records: Any                                 # every run's records (executor.run.COLUMNS)
    failures: List[str] = field(default_factory=list)
    header: str = ""


def budget_points(smallest: int, plain: int, points: int) -> List[int]:
    """``points`` budgets from the plain step's (first) down to the smallest feasible plan's,
    evenly spaced, distinct."""
    if points < 1:
        raise UsageError(f"--points {points}: give at least 1 plan to validate")
    hi = max(smallest, plain)
    if points == 1 or hi == smallest:
        return [hi]
    out: List[int] = []
    for k in range(points):
        b = int(round(hi - (hi - smallest) * k / (points - 1)))
        if b not in out:
            out.append(b)
    return out


def plan_text(plan) -> str:
    """A plan in a few words: its segments' modes, e.g. ``rows overlx8 store-r2 checkpoint``."""
    out = []
    for s in plan.segments:
        if s.mode == "rows":
            out.append(f"rows {s.policy}x{s.strips or len(s.bounds or []) - 1}")
        elif s.mode == "store" and s.recompute:
            out.append(f"store-r{len(s.recompute)}")
        else:
            out.append(s.mode)
    return " ".join(out)


def validate(model: str, batch: int, resolution: Optional[Tuple[int, int]] = None, *, bn: str = "train",
             dtype: str = "float32", amp: Optional[str] = None, amp_rows: bool = False,
             optimizer: str = "momentum", device: str = "auto", device_profile: Optional[str] = None,
             points: int = 4, steps: int = 3, warmup: int = 1, seed: int = 0, num_classes: Optional[int] = None,
             progress: bool = True) -> ValidateResult:
    """Solve ``points`` plans of the zoo ``model`` across its budget range and run each on
    ``device``; see the module docstring.  ``device_profile``: the cost model's device (default:
    ``cpu`` on the CPU, ``h100`` on CUDA).  Bad input raises a ValueError subclass (one line)."""
    import pandas as pd
    from tqdm import tqdm

    if steps < 1 or warmup < 0:
        raise UsageError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if points < 1:
        raise UsageError(f"--points {points}: give at least 1 plan to validate")
    dev = resolve_device(device)
    profile = device_profile or ("cpu" if dev.type == "cpu" else "h100")
    with quiet_torch_logs():
        _, graph = build_and_capture(model, batch, resolution, dtype, bn, None, num_classes, amp=amp)
    solver = Solver(graph, model, bn=bn, optimizer=optimizer, device_profile=profile, amp_rows=amp_rows)
    plain_budget = solver.budget_for(solver.baseline()["peak"])  # the budget the plain step needs
    budgets = budget_points(solver.smallest_budget(), plain_budget, points)
    rows: List[Dict[str, Any]] = []
    records = []
    failures: List[str] = []
    bar = tqdm(total=len(budgets), desc=f"validate {model}", unit="plan", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        for k, b in enumerate(budgets):
            plan = solver.solve(b)
            if num_classes is not None:
                plan.training.setdefault("num_classes", num_classes)
            res = run_plan(plan, steps=steps, warmup=warmup, device=device, seed=seed, progress=False)
            df = res.records
            df["validate_point"] = k
            records.append(df)
            step = df[df.scope == "step"]
            tracked = step[step.tracked]
            timed = step[~step.tracked]["actual_s"] if (~step.tracked).any() else step["actual_s"]
            measured = float(tracked["actual_peak_bytes"].max())
            predicted = float(plan.predicted.get("peak_bytes", math.nan))
            first = tracked.iloc[0] if len(tracked) else {}
            p_s = float(plan.predicted.get("time_s", math.nan))
            m_s = float(timed.median())
            rows.append({
                "point": k, "budget_bytes": b, "predicted_peak_bytes": predicted, "measured_peak_bytes": measured,
                "peak_err": (predicted - measured) / measured if measured else math.nan,
                "predicted_reserved_bytes": float(plan.predicted.get("reserved_bytes", math.nan)),
                "reserved_bytes": float(tracked["actual_reserved_bytes"].max()),
                "modeled_reserved_bytes": float(tracked["modeled_reserved_bytes"].max()),
                "reserved_method": str(first.get("reserved_method", "")),
                "within_budget": not budget_failures(df, plan, dev.type), "predicted_s": p_s, "measured_s": m_s,
                "time_err": (p_s - m_s) / m_s if m_s else math.nan, "segments": plan_text(plan),
                "run_id": str(df["run_id"].iloc[0]),
            })
            failures += [f"plan {k} (budget {b:,} bytes): {f}" for f in res.failures]
            bar.update(1)
    finally:
        bar.close()
    table = pd.DataFrame(rows, columns=VALIDATE_COLUMNS)
    first = records[0].iloc[0]
    n, c, h, w = graph.input_shape
    gpu = solver.cm.profile.kind == "cuda"
    resv = ("measured (max_memory_reserved)" if dev.type == "cuda" else
            "modeled (the CUDA caching allocator model on the CPU step's allocations)")
    conf = first.get("alloc_conf") or "default settings"
    header = (f"{model} {n}x{c}x{h}x{w} {dtype}{' + autocast ' + amp if amp else ''}, BatchNorm {bn}, "
              f"{optimizer}, on {first['device']} ({first['device_name']}, torch {first['torch_version']}), "
              f"cost model profile {profile}, {steps} step(s) per plan\n"
              f"budgets in {'reserved' if gpu else 'allocated'} bytes (the CUDA context is in none); "
              f"reserved peak {resv}, allocator {conf}")
    return ValidateResult(table, pd.concat(records, ignore_index=True), failures, header)


def format_validate(res: ValidateResult) -> str:
    """The validate table: one row per plan, MiB and ms, errors in percent."""

    def mib(v):
        return "-" if v is None or math.isnan(v) else f"{v / 2**20:.1f}"

    def pct(v):
        return "-" if v is None or math.isnan(v) else f"{v:+.1%}"

    def ms(v):
        return "-" if v is None or math.isnan(v) else f"{v * 1e3:.1f}"

    t = res.table
    cuda = bool(len(t)) and bool((t.reserved_method == "cuda").any())
    label = "resv_MiB" if cuda else "resv_MiB(model)"
    rows = [[r.point, mib(r.budget_bytes), mib(r.predicted_peak_bytes), mib(r.measured_peak_bytes), pct(r.peak_err),
             mib(r.reserved_bytes)] + ([mib(r.modeled_reserved_bytes)] if cuda else [])
            + ["yes" if r.within_budget else "NO", ms(r.predicted_s), ms(r.measured_s), pct(r.time_err), r.segments]
            for r in t.itertuples()]
    head = (["#", "budget_MiB", "pred_MiB", "meas_MiB", "peak_err", label] + (["model_MiB"] if cuda else [])
            + ["within", "pred_ms", "meas_ms", "time_err", "plan"])
    lines = [res.header, "", format_table(head, rows, "rrrrrr" + "r" * cuda + "lrrrl"), ""]
    if len(t):
        over = t.reserved_bytes / t.measured_peak_bytes - 1
        lines.append(f"peak error: median {t.peak_err.abs().median():.2%}, worst {t.peak_err.abs().max():.2%}; "
                     f"{int(t.within_budget.sum())}/{len(t)} plans within budget; step time error: median "
                     f"{t.time_err.abs().median():.1%}")
        lines.append(f"reserved above allocated ({'measured' if cuda else 'modeled'}): median {over.median():+.1%}, "
                     f"worst {over.max():+.1%}"
                     + (f"; the model's reserved vs measured: median "
                        f"{(t.modeled_reserved_bytes / t.reserved_bytes - 1).median():+.1%}" if cuda else ""))
    return "\n".join(lines)


def draw_validate(res: ValidateResult, path: str) -> None:
    """PNG (atomically written): predicted and measured peak against the budget line, and
    predicted and measured step time, over the budgets validated."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    t = res.table.sort_values("budget_bytes")
    x = t.budget_bytes / 2**20
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax1.plot(x, x, "k--", lw=1, label="budget")
    ax1.plot(x, t.predicted_peak_bytes / 2**20, "o-", label="predicted peak")
    ax1.plot(x, t.measured_peak_bytes / 2**20, "s-", label="measured peak")
    cuda = (t.reserved_method == "cuda").any()
    ax1.plot(x, t.reserved_bytes / 2**20, "^:", label="reserved peak" + ("" if cuda else " (modeled)"))
    ax1.set_xlabel("budget (MiB)")
    ax1.set_ylabel("peak (MiB)")
    ax1.set_title("memory")
    ax1.legend(loc="upper left")
    ax2.plot(x, t.predicted_s * 1e3, "o-", label="predicted")
    ax2.plot(x, t.measured_s * 1e3, "s-", label="measured (median)")
    ax2.set_xlabel("budget (MiB)")
    ax2.set_ylabel("step time (ms)")
    ax2.set_title("time")
    ax2.legend(loc="best")
    fig.suptitle(res.header, fontsize=9)
    fig.tight_layout()
    atomic_write(path, "plot", lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)
