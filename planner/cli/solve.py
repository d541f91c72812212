"""``planner solve``: the fastest plan that fits a budget."""
from __future__ import annotations

import argparse
import math

from lrcnn.errors import UsageError
from lrcnn.models.capture import build_and_capture
from lrcnn.models.zoo import BN_MODES, DTYPES
from lrcnn.planner.cli.args import (add_amp_arg, DEFAULT_BATCH, EXIT_OK, positive_int, positive_int_value,
                                    positive_number, resolution_arg, shape_text)
from lrcnn.planner.cost import check_profile
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.ilp import InfeasibleError
from lrcnn.planner.plan import OPTIMIZERS, precision
from lrcnn.planner.solve import (DEFAULT_GAP, DEFAULT_PROFILE, DEFAULT_TIME_LIMIT, max_batch, pareto_frame, POLICIES,
                                 Solver, SOLVERS)
from lrcnn.planner.units import fmt_both, fmt_bytes, format_table, parse_bytes


def batch_arg(text: str):
    if str(text).strip().lower() == "max":
        return "max"
    try:
        return positive_int_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch {text!r} must be a positive integer or 'max'") from None


def gap_arg(text: str) -> float:
    try:
        g = float(text)
    except ValueError:
        g = math.nan
    if not 0 <= g < 1:
        raise argparse.ArgumentTypeError(f"--gap {text!r}: give a relative gap from 0 (prove optimal) to below 1, "
                                         f"e.g. 0.005")
    return g


def budget_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"budget: {e}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "solve", help="find the fastest plan that fits a memory budget (ILP)",
        description="Capture the model, price every candidate segment (store / checkpoint / rows, "
                    "per policy and strip count) with the cost model and pick, by an ILP, the plan "
                    "with the smallest predicted step time whose predicted peak of every phase "
                    "(forward, each backward step, optimizer step) fits the budget.  Budgets are "
                    "device bytes: 8GB = 8*10^9, 8GiB = 8*2^30.")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'planner models')")
    p.add_argument("--budget", required=True, type=budget_arg, metavar="SIZE",
                   help="memory budget: 8GB (10^9), 7.5GiB (2^30), 512MiB, or bytes")
    p.add_argument("--batch", type=batch_arg, default=DEFAULT_BATCH, metavar="N|max",
                   help=f"batch size, or 'max': the largest batch a plan fits (default {DEFAULT_BATCH})")
    p.add_argument("--world-size", type=positive_int, default=None, metavar="W",
                   help="plan for W DistributedDataParallel processes: --batch is the global batch, split "
                        "evenly (the plan's batch is each process's; 'max': the largest per-process batch) "
                        "and the budget is per process, DDP's gradient buckets (one copy of the "
                        "parameters' bytes) reserved from it when W > 1; recorded as training.world_size")
    p.add_argument("--resolution", type=resolution_arg, default=None, metavar="H[xW]",
                   help="input size: 224 or HxW (default: the model's own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="data type (default float32)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                   help="optimizer whose state is budgeted (default momentum)")
    p.add_argument("--bn", choices=BN_MODES, default="train", help="BatchNorm mode (default train)")
    add_amp_arg(p)
    p.add_argument("--amp-rows", action="store_true",
                   help="with --amp: also plan row segments, whose gradients differ from plain autocast at "
                        "half-precision rounding (forward bit-identical); recorded as training.amp_rows")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classifier outputs (default: 1000 for torchvision models, 10 for tiny_*)")
    p.add_argument("--device-profile", default=DEFAULT_PROFILE, metavar="NAME|FILE",
                   help=f"device the times are predicted for: a profile name or JSON file (default {DEFAULT_PROFILE})")
    p.add_argument("--policy", choices=POLICIES, default="auto",
                   help="restrict the search: auto (all), 2ps or overl (only that row policy), "
                        "checkpoint (no row segments) (default auto)")
    p.add_argument("--strips", type=positive_int, default=None, metavar="N",
                   help="force this strip count for row segments")
    p.add_argument("--compiled", action="store_true",
                   help="plan for lrcnn.compile_plan (torch.compile): recomputing a store segment's "
                        "BN/ReLU/add is fused into the backward kernels and priced free (memory is "
                        "predicted for eager execution; measure the compiled step)")
    p.add_argument("--time-limit", type=positive_number("a number of seconds"), default=DEFAULT_TIME_LIMIT, metavar="S",
                   help=f"solver time limit in seconds; the best plan found so far is returned with its gap (default {DEFAULT_TIME_LIMIT:g})")
    p.add_argument("--gap", type=gap_arg, default=DEFAULT_GAP, metavar="G",
                   help=f"relative optimality gap at which the solver stops (default {DEFAULT_GAP:g})")
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="auto: the exact label-setting DP where it applies (mode-independent gradient "
                        "bytes, bounded labels), else the ILP with CBC; cbc / highs (needs highspy): "
                        "always the ILP (warm-started from the DP) (default auto)")
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the plan here")
    p.add_argument("--pareto", default=None, metavar="FILE.csv",
                   help="also write budget vs predicted step time over a sweep of budgets (CSV)")
    p.add_argument("--pareto-points", type=positive_int, default=10, metavar="N",
                   help="budgets in the --pareto sweep (default 10)")
    p.set_defaults(func=command)


def solver_for(args, batch: int):
    _, graph = build_and_capture(args.model, batch, args.resolution, args.dtype, args.bn, None, args.num_classes,
                                 amp=args.amp)
    return Solver(graph, args.model, policy=args.policy, bn=args.bn, strips=args.strips,
                  optimizer=args.optimizer, device_profile=args.device_profile, solver=args.solver,
                  compiled=getattr(args, "compiled", False), amp_rows=getattr(args, "amp_rows", False))


def command(args) -> int:
    """``planner solve``: solve, print the summary, write the plan (and the Pareto CSV)."""
    import time

    t0 = time.perf_counter()
    check_output_path(args.output, "plan")
    check_output_path(args.pareto, "Pareto CSV", (".csv",))
    if args.strips is not None and args.policy == "checkpoint":
        raise UsageError("--strips applies to row segments; --policy checkpoint has none")
    check_profile(args.device_profile)
    budget = args.budget
    batch = args.batch
    world = getattr(args, "world_size", None)
    if world is not None and batch != "max":
        if batch % world:
            raise UsageError(f"--batch {batch} does not split evenly over --world-size {world}; "
                             f"give a multiple of {world}")
        batch //= world

    def reserve(s) -> int:  # per process: DDP's gradient buckets, one copy of the parameter bytes
        return s.graph.param_bytes if (world or 1) > 1 else 0

    note = ""
    if batch == "max":
        cache = {}

        def fits_at(n):
            s = solver_for(args, n)
            cache[n] = s
            return s.fits(budget - reserve(s)), s.min_peak()

        batch = max_batch(fits_at, budget)
        if batch == 0:
            raise InfeasibleError(budget, cache[1].smallest_budget() + reserve(cache[1]), cache[1].hint)
        solver = cache[batch]
        note = f"largest {'per-process ' if world else ''}batch that fits: {batch} ({len(cache)} captures)"
    else:
        solver = solver_for(args, batch)
    held = reserve(solver)
    if held and budget - held < solver.smallest_budget():
        raise InfeasibleError(budget, solver.smallest_budget() + held, solver.hint)
    plan = solver.solve(budget - held, time_limit=args.time_limit, gap=args.gap)
    if world is not None:
        plan.budget_bytes = budget
        plan.training["world_size"] = world
        plan.solver["ddp_bucket_bytes"] = held
        note = "\n".join(filter(None, [note, f"world size {world}: batch {batch} per process, global batch "
                                              f"{batch * world}; budget per process, DDP gradient buckets "
                                              f"{fmt_bytes(held)} reserved from it"]))
    plan.solver["total_s"] = round(time.perf_counter() - t0, 4)
    frame = None
    if args.pareto:
        frame = pareto_frame(solver, args.pareto_points, time_limit=args.time_limit, gap=args.gap)
    print(format_solve_summary(plan, solver, note))
    if args.output:
        plan.save(args.output)
        print(f"\nwrote {args.output}")
    if frame is not None:
        write_csv_atomic(frame, args.pareto)
        print(f"wrote {args.pareto} ({len(frame)} budgets, {fmt_both(frame['budget_bytes'].min())} .. "
              f"{fmt_both(frame['budget_bytes'].max())})")
    return EXIT_OK


def format_solve_summary(plan, solver, note: str = "") -> str:
    """The readable summary of a solved plan: segments, predicted peak vs budget, time, solver."""

    cm = solver.cm
    units = cm.units()  # (not solver.problem: pricing candidates is not needed to print)
    unit_first = {a: i for i, (a, _) in enumerate(units)}
    unit_last = {b: i for i, (_, b) in enumerate(units)}
    pred, info = plan.predicted, plan.solver
    budget = plan.budget_bytes
    lines = [f"{plan.model}: input {shape_text(plan.input_shape)} {precision(plan.dtype, plan.training.get('amp'))}, optimizer {plan.training.get('optimizer')}, "
             f"BatchNorm {plan.training.get('bn')}, device profile {info.get('device_profile')}, policy {info.get('policy')}"
             + (", priced for torch.compile (compile_plan)" if info.get("compiled") else "")]
    if note:
        lines.append(note)
    if plan.training.get("amp") and not plan.training.get("amp_rows"):
        lines.append("no row segments under --amp (their gradients would differ from plain autocast at "
                     "half-precision rounding): --amp-rows allows them")
    lines.append(f"budget {fmt_both(budget)}")
    lines.append("")
    rows = []
    for k, s in enumerate(plan.segments):
        c = cm.segment(s)
        i, j = unit_first.get(s.first, "?"), unit_last.get(s.last, "?")
        rows.append([k, f"{s.first}..{s.last}", f"{i}-{j}" if i != j else f"{i}", s.mode, s.policy or "",
                     s.strips or "", len(s.recompute) or "", f"{c.keep / 2**20:.1f}",
                     f"{max(c.fwd_peak, c.bwd_peak) / 2**20:.1f}", f"{(c.fwd_s + c.bwd_s) * 1e3:.3f}"])
    lines.append(format_table(["#", "segment", "units", "mode", "policy", "strips", "recompute",
                               "keep_MiB", "peak_MiB", "time_ms"], rows, "rllllrrrrr"))
    lines.append("")
    peak = pred.get("peak_bytes", 0)
    lines.append(f"predicted peak   {fmt_both(peak)} of {fmt_both(budget)} ({100 * peak / budget:.1f}% of the budget)")
    phases = pred.get("phases") or {}
    for name, v in phases.items():
        if isinstance(v, (int, float)):
            lines.append(f"  {name:<15}{fmt_both(v)}")
    breakdown = pred.get("breakdown") or {}
    if isinstance(breakdown, dict) and breakdown:
        parts = [f"{k} {fmt_bytes(v)}" for k, v in breakdown.items() if isinstance(v, (int, float))]
        if parts:
            lines.append("  breakdown      " + ", ".join(parts))
    base_t, base_p = info.get("baseline_time_s"), info.get("baseline_peak_bytes")
    t = pred.get("time_s", 0.0)
    over = f"{100 * (t / base_t - 1) + 0.0:+.1f}%".replace("-0.0%", "+0.0%") if base_t else "n/a"
    lines.append(f"predicted step   {t * 1e3:.2f} ms, {over} vs no plan ({base_t * 1e3:.2f} ms, peak {fmt_both(base_p)})")
    mp = info.get("min_peak_bytes")
    lines.append(f"smallest plan    needs --budget {fmt_both(solver.budget_for(mp))} (its peak {fmt_both(mp)} "
                 f"plus the {solver.headroom:.1%} kept free)" if mp is not None
                 else "smallest plan    not searched: the plain step fits the budget")
    gap = info.get("gap")
    gap_s = "n/a" if gap is None or gap != gap else f"{100 * gap:.2f}%"
    lines.append(f"solver           {info.get('solver')}: {info.get('status')}, gap {gap_s}, solve {info.get('solve_s', 0):.2f} s, "
                 f"total {info.get('total_s', 0):.2f} s, {info.get('candidates')} candidates over {info.get('units')} units")
    return "\n".join(lines)
