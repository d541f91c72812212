"""Exactness sweep over timm CNNs: capture, solve at two budgets, train one step plain vs planned.

    python -m lrcnn.analysis.bench.timm_sweep                                   # the default list (37 models)
    python -m lrcnn.analysis.bench.timm_sweep --models resnet18,mobilenetv2_050 --out /tmp/s.csv --md /tmp/s.md

For every model (``timm.create_model(name, pretrained=False, num_classes=10)``, random weights,
float64, train mode: BatchNorm normalises with batch statistics and updates its running ones) at a
small input (default batch 2, 3x64x64):

1. **plan**: capture the model (:func:`lrcnn.planner.solve.capture_model`), build one
   :class:`lrcnn.planner.solve.Solver` (SGD momentum, train BN, device profile ``cpu``) and solve a
   plan at two budgets: the smallest feasible one (``Solver.smallest_budget()``) and the one halfway
   between it and the plain step's budget (its predicted peak ``Solver.baseline()['peak']`` plus the
   solver's headroom, as ``smallest_budget`` adds it to the smallest peak); where the smallest
   budget is not below the plain one, only the plain plan is solved.  Each plan is also
   applied (:func:`lrcnn.executor.apply_plan`) to the user's model, not trained;
2. **model untouched**: the user's ``state_dict()`` (every parameter and buffer, bit for bit, BN
   ``num_batches_tracked`` included) and its modules' train/eval flags must be the same before and
   after capture, solve and apply;
3. **exactness**: from identical weights (deep copies of the model as created), one training step
   (``--steps``) plain and one through the plan (input requiring grad, cross-entropy on random
   labels, backward, SGD momentum 0.9, lr 0.1, the same RNG seed before the steps) and the norm-
   wise relative difference of the output, the loss, the input gradient, every parameter gradient,
   every parameter after the step and every buffer after it (floating or integer).  A quantity
   that is zero by the maths is rounding noise in both runs (the gradient of a bias whose shift a
   following train-mode BN removes; after a second step that bias itself, and the running mean of
   a BN fed such zero-mean maps): a parameter gradient's difference is measured against
   ``max(|ref|, floor * |G|)`` with ``G`` the whole reference gradient vector (all parameters, that
   step), a parameter's against ``floor * |P|`` (all parameters) and a floating buffer's against
   ``floor * |B|`` (all floating buffers) likewise; ``floor`` = ``--floor`` (default 1e-4, stricter than the tests' float64 GRAD_FLOOR of 1e-2: every
   model swept passes it).
   Nothing is skipped.  A gradient present in one run and absent (``None``) in the other counts as
   an infinite error.  A plan is ``exact`` when every error is <= ``--tol`` (1e-10).

Every exception is caught per model and per plan; a record says which stage raised it.  Status:
``exact``; ``inexact`` (``worst`` names the quantity with the largest error); ``refused`` (the
project's own refusal: CaptureError, PlanError, RowSegmentError, CostError, InfeasibleError, ...;
``detail`` is its first line); ``error`` (any other exception: type and first line).  The model-
state check is its own column (``state``: ``kept`` or ``changed: <keys>``).

Output: a CSV (``--out``) with one row per model and plan (or one per model where it failed before
a plan), and a markdown table (``--md``, default: the CSV's name with ``.md``) with a summary.
Columns: ``model``; ``params_M`` (the model's parameters, millions) and ``graph_params_M`` (those
the capture attributes to graph nodes, which the cost model prices); ``nodes``; ``plan``
(``smallest`` / ``middle`` / ``plain``); ``budget_bytes``, ``predicted_peak_bytes``,
``plain_peak_bytes`` (the plain step's predicted peak); ``segments`` (segment modes and counts,
e.g. ``checkpoint:2 rows/overl:1 store:2``); ``status``; ``stage`` (where an exception came from:
create, capture, solve, apply, plain, step, compare); ``worst`` and ``max_err``; ``detail`` (the
quantities over the bar, or the exception); ``err_out``, ``err_loss``, ``err_xgrad``, ``err_grad``,
``err_param``, ``err_buffer`` (the largest error of each kind); ``state``; ``capture_s``,
``solve_s`` (this budget's solve; candidate pricing is paid by the first), ``step_s`` (apply and
the planned step) and ``seconds`` (the whole model).
Runtime (2-core CPU shared with other jobs, load ~7): 170 s for the default 37 models at the
defaults, 206 s with ``--steps 2``; one torch thread (``--threads``, default 1): the same sweep on
torch's default 2 threads took 22 minutes there (tiny float64 steps, OpenMP threads fighting the
other jobs).  Batch 2 at 64x64 is small enough for that and still gives every traceable model
plans with checkpoint segments, and six (resnet18/50/26d, skresnet18, dla34, hrnet_w18_small) plans
with row segments; the smallest plan's predicted peak is 0.46-1.0x the plain step's (median 0.96:
parameters, their gradients and momentum dominate at this size).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple
from lrcnn.executor import apply_plan
from lrcnn.executor.exactness import compare, train_step
from lrcnn.executor.strips import RowSegmentError
from lrcnn.models.capture import CaptureError
from lrcnn.models.zoo import ModelError
from lrcnn.planner.cost import CostError
from lrcnn.planner.files import write_csv_atomic
from lrcnn.planner.ilp import InfeasibleError
from lrcnn.planner.plan import PlanError
from lrcnn.planner.solve import Solver, capture_model

#: Default sweep: a spread of timm CNN families (plain / bottleneck / grouped / SE / depthwise /
#: dense / cross-stage / dual-path / multi-branch / weight-standardised / NAS), plus LayerNorm ones
#: (ConvNeXt) to see refusals.
DEFAULT_MODELS = [
    "resnet18", "resnet50", "resnet26d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t",
    "skresnet18", "resnest14d", "res2net50_14w_8s", "regnetx_002", "regnety_002", "efficientnet_b0",
    "tf_efficientnet_lite0", "mixnet_s", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv3_large_100", "mnasnet_small", "spnasnet_100", "fbnetc_100", "lcnet_050",
    "ghostnet_100", "rexnet_100", "densenet121", "cspdarknet53", "cspresnet50", "cs3darknet_focus_s",
    "darknet17", "dla34", "dpn48b", "hrnet_w18_small", "vgg11_bn", "repvgg_a0", "nf_regnet_b0",
    "nf_resnet26", "convnext_atto", "convnext_femto",
]
TOL = 1e-10
FLOOR = 1e-4  # stricter than executor.exactness.GRAD_FLOOR[float64] (1e-2), as the published sweep was run
FIELDS = ["model", "params_M", "graph_params_M", "nodes", "plan", "budget_bytes", "predicted_peak_bytes", "plain_peak_bytes",
          "segments", "status", "stage", "worst", "detail", "over_kinds", "max_err", "err_out", "err_loss", "err_xgrad",
          "err_grad", "err_param", "err_buffer", "state", "state_kinds", "capture_s", "solve_s", "step_s", "seconds"]


# ------------------------------------------------------------------------------------------------
# helpers

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _refusal_types() -> Tuple[type, ...]:
    return (CaptureError, PlanError, RowSegmentError, CostError, InfeasibleError, ModelError)


def classify(e: BaseException) -> Tuple[str, str]:
    """``(status, detail)`` of an exception: the project's own refusals are ``refused`` (detail:
    the message's first line), anything else ``error`` (detail: ``Type: first line``)."""
    if isinstance(e, _refusal_types()):
        return "refused", _first_line(e)
    return "error", f"{type(e).__name__}: {_first_line(e)}"


def _bits(t) -> Any:
    import torch

    t = t.detach().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.numel() else t


def snapshot(model) -> Dict[str, Any]:
    """The model's state (every state_dict tensor, cloned) and its modules' train flags."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "training": {k: m.training for k, m in model.named_modules()}}


def state_diff(before: Dict[str, Any], model) -> List[str]:
    """Names of what differs (bit for bit) between a snapshot and the model now."""
    import torch

    now = model.state_dict(keep_vars=True)
    diff = sorted(set(before["state"]) ^ set(now))
    for k, v in before["state"].items():
        if k not in now:
            continue
        w = now[k].detach()
        if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(_bits(v), _bits(w)):
            diff.append(k)
    diff += [f"{k or '<root>'}.training" for k, m in model.named_modules()
             if before["training"].get(k, m.training) != m.training]
    return diff


def _state_text(diff: Optional[List[str]]) -> str:
    if diff is None:
        return ""
    if not diff:
        return "kept"
    return f"changed: {', '.join(diff[:3])}" + (f" (+{len(diff) - 3})" if len(diff) > 3 else "")


def _group_max(errs: Dict[str, float], prefix: str) -> float:
    vals = [v for k, v in errs.items() if k.split("@")[0] == prefix or k.startswith(prefix + ":")]
    return max(vals) if vals else float("nan")


def _kinds(keys: Sequence[str]) -> str:
    """Kinds of the compared quantities ``keys``: their group and last name component
    (``buffer:blocks.0.bn1.running_mean`` -> ``buffer:running_mean``), sorted, space separated."""
    out = set()
    for k in keys:
        group, _, name = k.split("@")[0].partition(":")
        out.add(f"{group}:{name.rsplit('.', 1)[-1]}" if name else group)
    return " ".join(sorted(out))


def _segments_text(plan) -> str:
    modes: Dict[str, int] = {}
    for s in plan.segments:
        key = s.mode
        if s.mode == "rows":
            key += f"/{s.policy}"
        elif s.mode == "store" and s.recompute:
            key += "+recompute"
        modes[key] = modes.get(key, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(modes.items()))


# ------------------------------------------------------------------------------------------------
# one model

def make_model(name: str, seed: int = 0, num_classes: int = 10):
    import timm
    import torch

    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return m.to(torch.float64).train()


def sweep_model(name: str, batch: int = 2, resolution: int = 64, tol: float = TOL,
                floor: float = FLOOR, time_limit: float = 10.0, lr: float = 0.1,
                seed: int = 0, profile: str = "cpu", steps: int = 1) -> List[Dict[str, Any]]:
    """The records of one model: one per plan solved, or one saying where it failed."""
    import torch

    t_model = time.perf_counter()
    base: Dict[str, Any] = {"model": name}
    records: List[Dict[str, Any]] = []
    stage = "create"

    def fail(e: BaseException, **extra) -> Dict[str, Any]:
        status, detail = classify(e)
        return {**base, **extra, "status": status, "stage": stage, "detail": detail}

    try:
        model = make_model(name, seed)
    except Exception as e:  # noqa: BLE001 - every failure is a record
        return [fail(e, seconds=round(time.perf_counter() - t_model, 2))]
    base["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    pristine = copy.deepcopy(model)  # the weights every step starts from
    before = snapshot(model)
    shape = (batch, 3, resolution, resolution)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)

    # -- capture and solve (on the user's model) ---------------------------------------------
    plans: List[Tuple[str, Any, float]] = []  # (budget kind, plan, solve seconds)
    diff: Optional[List[str]] = None
    try:
        stage = "capture"
        t0 = time.perf_counter()
        _, graph = capture_model(model, shape, "float64", bn="train")
        base["capture_s"] = round(time.perf_counter() - t0, 2)
        base["nodes"] = len(graph.nodes)
        # parameters the capture attributes to nodes (what the cost model prices); less than
        # params_M where parameters are read through get_attr rather than by a module call
        base["graph_params_M"] = round(graph.param_bytes / 8 / 1e6, 3)  # float64
        stage = "solve"
        t0 = time.perf_counter()
        solver = Solver(graph, name, bn="train", optimizer="momentum",
                        device_profile=profile)
        peak = int(solver.baseline()["peak"])
        base["plain_peak_bytes"] = peak
        # budgets keep solver.headroom free: the plain step's own budget is its peak plus that
        hi = solver.budget_for(peak)
        lo = solver.smallest_budget()
        budgets = [("smallest", lo), ("middle", (lo + hi) // 2)] if lo < hi else [("plain", hi)]
        for kind, b in budgets:
            t1 = time.perf_counter()
            try:
                plan = solver.solve(b, time_limit=time_limit)
            except Exception as e:  # noqa: BLE001
                records.append(fail(e, plan=kind, budget_bytes=b, solve_s=round(time.perf_counter() - t1, 2)))
                continue
            plans.append((kind, plan, round(time.perf_counter() - t1, 2)))
        stage = "apply"
        kept = []
        for kind, plan, solve_s in plans:
            try:
                apply_plan(model, plan, graph)  # applied to the user's model, not run
            except Exception as e:  # noqa: BLE001
                records.append(fail(e, plan=kind, budget_bytes=plan.budget_bytes,
                                    predicted_peak_bytes=plan.predicted.get("peak_bytes"),
                                    segments=_segments_text(plan), solve_s=solve_s))
                continue
            kept.append((kind, plan, solve_s))
        plans = kept
    except Exception as e:  # noqa: BLE001
        records.append(fail(e, seconds=round(time.perf_counter() - t_model, 2)))
        plans = []
    finally:
        try:
            diff = state_diff(before, model)
        except Exception as e:  # noqa: BLE001
            diff = [f"<check failed: {type(e).__name__}: {_first_line(e)}>"]
    base["state"] = _state_text(diff)
    base["state_kinds"] = _kinds([f"state:{k}" for k in diff]) if diff else ""
    for r in records:
        r["state"], r["state_kinds"] = base["state"], base["state_kinds"]

    # -- plain reference step, once --------------------------------------------------------------
    ref = None
    if plans:
        stage = "plain"
        try:
            ref_model = copy.deepcopy(pristine)
            ref = train_step(ref_model, ref_model, x, y, lr=lr, steps=steps)
            del ref_model
        except Exception as e:  # noqa: BLE001
            records.append(fail(e, seconds=round(time.perf_counter() - t_model, 2)))
            plans = []

    # -- one planned step per plan --------------------------------------------------------------
    for kind, plan, solve_s in plans:
        t0 = time.perf_counter()
        rec = {**base, "plan": kind, "budget_bytes": plan.budget_bytes,
               "predicted_peak_bytes": plan.predicted.get("peak_bytes"), "segments": _segments_text(plan),
               "solve_s": solve_s}
        stage = "apply"
        try:
            m = copy.deepcopy(pristine)
            pm = apply_plan(m, plan, graph)
            stage = "step"
            got = train_step(pm, m, x, y, lr=lr, steps=steps)
            stage = "compare"
            errs = compare(got, ref, floor)
            worst = max(errs, key=lambda k: errs[k])
            rec.update({
                "status": "exact" if errs[worst] <= tol else "inexact", "stage": "",
                "worst": worst, "max_err": errs[worst],
                **{f"err_{p}": _group_max(errs, p) for p in ("out", "loss", "xgrad", "grad", "param", "buffer")},
            })
            if errs[worst] > tol:
                bad = sorted((k for k in errs if errs[k] > tol), key=lambda k: -errs[k])
                rec["detail"] = f"{len(bad)} over tol: " + ", ".join(f"{k}={errs[k]:.1e}" for k in bad[:4])
                rec["over_kinds"] = _kinds(bad)
            del pm, m, got
        except Exception as e:  # noqa: BLE001
            rec.update(fail(e, **{k: v for k, v in rec.items() if k not in base}))
        rec["step_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
    order = {"smallest": 0, "middle": 1, "plain": 2}
    records.sort(key=lambda r: order.get(r.get("plan", ""), -1))
    total = round(time.perf_counter() - t_model, 2)
    for r in records:
        r.setdefault("seconds", total)
        r["seconds"] = total
    return records


def sweep(models: Sequence[str], progress: bool = True, **kw) -> List[Dict[str, Any]]:
    """Records of every model (see :func:`sweep_model`); one failing model never stops the sweep."""
    from tqdm import tqdm

    out: List[Dict[str, Any]] = []
    bar = tqdm(list(models), desc="timm sweep", unit="model", disable=not progress, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            recs = sweep_model(name, **kw)
        except Exception as e:  # noqa: BLE001 - a bug of the sweep itself: still a record
            _, detail = classify(e)
            recs = [{"model": name, "status": "error", "stage": "sweep",
                     "detail": f"{detail} [{traceback.extract_tb(e.__traceback__)[-1].name}]"}]
        out.extend({f: r.get(f, "") for f in FIELDS} for r in recs)
    return out


# ------------------------------------------------------------------------------------------------
# output

def _fmt(v, kind: str = "") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    if kind == "err":
        return f"{v:.1e}" if v != 0 else "0"
    if kind == "bytes":
        return f"{v / 2**20:.2f}"
    return str(v).replace("|", "\\|")


def markdown(rows: List[Dict[str, Any]], settings: str, runtime_s: float) -> str:
    from collections import Counter

    models = list(dict.fromkeys(r["model"] for r in rows))
    per_model = {}
    for m in models:
        st = [r["status"] for r in rows if r["model"] == m]
        per_model[m] = ("exact" if all(s == "exact" for s in st) else
                        next(s for s in ("error", "refused", "inexact") if s in st))
    plans = Counter(r["status"] for r in rows)
    kept = sum(1 for m in models if next(r["state"] for r in rows if r["model"] == m) == "kept")
    lines = [
        "# timm CNN exactness sweep", "",
        f"{settings}. Runtime {runtime_s / 60:.1f} min.", "",
        f"Models: {len(models)}; all plans exact: {sum(v == 'exact' for v in per_model.values())}; "
        f"worst status per model: " + ", ".join(f"{k} {v}" for k, v in Counter(per_model.values()).most_common())
        + ". Plan records: " + ", ".join(f"{k} {v}" for k, v in plans.most_common())
        + f". Model state kept by capture/solve/apply: {kept} of {len(models)}.", "",
        "Budget: the plan's budget; peak: its predicted peak; plain: the plain step's predicted peak "
        "(a budget keeps the solver's 2.5% headroom free, so a budget may exceed the plain peak).", "",
        "| model | plan | budget MiB | peak MiB | plain MiB | segments | status | stage | worst | max err | detail "
        "| state | s |",
        "|---|---|---:|---:|---:|---|---|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([
            _fmt(r["model"]), _fmt(r["plan"]), _fmt(r["budget_bytes"], "bytes"),
            _fmt(r["predicted_peak_bytes"], "bytes"), _fmt(r["plain_peak_bytes"], "bytes"),
            _fmt(r["segments"]), _fmt(r["status"]), _fmt(r["stage"]), _fmt(r["worst"]), _fmt(r["max_err"], "err"),
            _fmt(r["detail"])[:160], _fmt(r["state"]), _fmt(r["seconds"])]) + " |")
    classes = failure_classes(rows)
    if classes:
        lines += ["", "## Failure classes (grouped automatically)", "",
                  "| class | models (plans) | example |", "|---|---|---|"]
        for key, (members, example) in classes.items():
            lines.append(f"| {_fmt(key)} | {_fmt(', '.join(members))} | {_fmt(example)[:200]} |")
    return "\n".join(lines) + "\n"


def _generic(detail: str) -> str:
    """An exception's first line with the names of one model's nodes left out, for grouping."""
    import re

    d = re.sub(r"\bsegment \S+?\.\.\S+?: ", "", str(detail))
    d = re.sub(r"'[^']*'", "'...'", d)
    d = re.sub(r"\bcannot trace \w+", "cannot trace ...", d)
    d = re.sub(r"\b(at node|node) [\w.]+", r"\1 ...", d)
    return d[:110]


def failure_classes(rows: List[Dict[str, Any]]) -> Dict[str, Tuple[List[str], str]]:
    """``{class: (members, example)}``: inexact plans by the kinds of quantity over the bar,
    refusals and errors by stage and message, models whose state planning changed, and models
    whose capture attributes fewer parameters to nodes than the model holds."""
    groups: Dict[str, Dict[str, List[str]]] = {}
    examples: Dict[str, str] = {}

    def add(key: str, model: str, plan, example: str) -> None:
        groups.setdefault(key, {}).setdefault(model, [])
        if plan:
            groups[key][model].append(str(plan))
        examples.setdefault(key, example)

    for r in rows:
        if r["status"] == "inexact":
            add(f"inexact: {r['over_kinds']}", r["model"], r["plan"], f"{r['model']}: {r['detail']}")
        elif r["status"] in ("refused", "error"):
            add(f"{r['status']} at {r['stage']}: {_generic(r['detail'])}", r["model"], r["plan"],
                f"{r['model']}: {r['detail']}")
    seen = set()
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        if r["state"] not in ("", "kept"):
            add(f"model state changed by capture/solve/apply: {r['state_kinds']}", r["model"], None,
                f"{r['model']}: {r['state']}")
        pm, gm = r["params_M"], r["graph_params_M"]
        if isinstance(pm, (int, float)) and isinstance(gm, (int, float)) and gm < pm * (1 - 1e-3):
            add("capture prices fewer parameters than the model has (params read outside a module call)",
                r["model"], None, f"{r['model']}: {gm} of {pm} M")
    out = {}
    for key, members in groups.items():
        out[key] = ([f"{m} ({', '.join(p)})" if p else m for m, p in members.items()], examples[key])
    return out


def write_outputs(rows: List[Dict[str, Any]], csv_path: str, md_path: Optional[str], settings: str,
                  runtime_s: float) -> None:
    import pandas as pd

    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    write_csv_atomic(pd.DataFrame(rows, columns=FIELDS), csv_path)
    if md_path:
        tmp = md_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(markdown(rows, settings, runtime_s))
        os.replace(tmp, md_path)


def _models_arg(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give a comma list of timm model names")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrcnn.analysis.bench.timm_sweep", description=__doc__.split("\n")[0],
                                 epilog="Needs timm. Details: the module docstring (pydoc bench.timm_sweep).")
    ap.add_argument("--models", type=_models_arg, default=DEFAULT_MODELS, metavar="A,B,...",
                    help=f"comma list of timm model names (default: {len(DEFAULT_MODELS)} CNNs)")
    ap.add_argument("--out", default="bench/results/timm-sweep.csv", help="CSV file (default: %(default)s)")
    ap.add_argument("--md", default=None, help="markdown file (default: --out with .md)")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default: %(default)s)")
    ap.add_argument("--resolution", type=int, default=64, help="square input side (default: %(default)s)")
    ap.add_argument("--tol", type=float, default=TOL, help="exactness bar (default: %(default)g)")
    ap.add_argument("--floor", type=float, default=FLOOR,
                    help="a parameter gradient's (parameter's, floating buffer's) difference is relative to "
                         "max(|its reference|, this x the norm of all gradients (parameters, floating buffers)) "
                         "(default: %(default)g)")
    ap.add_argument("--steps", type=int, default=1,
                    help="training steps compared per plan, on the same batch (default: %(default)s; 2 also "
                         "sees state a second step reads: momentum, running statistics, num_batches_tracked)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="ILP time limit per solve, s (default: %(default)s)")
    ap.add_argument("--profile", default="cpu", help="device profile for the planner: the steps run on the CPU, "
                                                     "so no CUDA workspace is reserved (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 0: torch's default. One thread by default: these steps are tiny, "
                         "and on a shared 2-core machine two OpenMP threads ran them 5-100x slower "
                         "(default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.batch < 2:
        ap.error("--batch must be >= 2 (train-mode BatchNorm needs more than one value per channel)")
    try:
        import timm  # noqa: F401
    except ImportError:
        print("error: timm is not installed (pip install timm)", file=sys.stderr)
        return 2
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    md = args.md or os.path.splitext(args.out)[0] + ".md"
    t0 = time.perf_counter()
    rows = sweep(args.models, progress=not args.no_progress, batch=args.batch, resolution=args.resolution,
                 tol=args.tol, floor=args.floor, time_limit=args.time_limit, profile=args.profile,
                 steps=args.steps)
    runtime = time.perf_counter() - t0
    settings = (f"timm {timm.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
                f"float64, train mode, batch {args.batch}, 3x{args.resolution}x{args.resolution}, 10 classes, "
                f"SGD momentum 0.9 lr 0.1, {args.steps} step(s); budgets: smallest feasible and halfway to the plain step's; "
                f"tol {args.tol:g}, floor {args.floor:g} x the norm of all gradients / parameters / floating buffers")
    write_outputs(rows, args.out, md, settings, runtime)
    from collections import Counter

    print(f"{len(args.models)} models, {len(rows)} records in {runtime:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in Counter(r['status'] for r in rows).most_common())
          + f"; wrote {args.out} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
