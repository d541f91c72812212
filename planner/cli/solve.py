"""``planner solve``: the fastest plan that fits a budget."""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import Optional

from lrcnn.errors import UsageError
from lrcnn.models.capture import BatchGraphs, build_and_capture
from lrcnn.models.zoo import BN_MODES, DTYPES
from lrcnn.planner.cli.args import (add_amp_arg, DEFAULT_BATCH, EXIT_OK, positive_int, positive_int_value,
                                    positive_number, resolution_arg, shape_text)
from lrcnn.planner.cost import (ALLOCATOR_RESERVE, ALLOCATOR_RESERVE_BYTES, check_profile, CUDA_CONTEXT_BYTES,
                                load_profile)
from lrcnn.planner.files import check_output_path, write_csv_atomic
from lrcnn.planner.ilp import InfeasibleError
from lrcnn.planner.plan import OPTIMIZERS, precision
from lrcnn.planner.solve import (BatchSearch, DEFAULT_GAP, DEFAULT_PROFILE, DEFAULT_TIME_LIMIT, largest_inputs,
                                 pareto_frame, POLICIES, Solver, SOLVERS)
from lrcnn.planner.units import fmt_both, fmt_bytes, format_table, parse_bytes

BUDGET_HELP = (f"memory budget: 8GB (10^9), 7.5GiB (2^30), 512MiB, or bytes.  With a GPU profile it covers the bytes "
               f"the CUDA caching allocator reserves for the training step (torch.cuda.max_memory_reserved: the "
               f"allocated bytes plus the allocator's reserve, {ALLOCATOR_RESERVE:.0%} + "
               f"{ALLOCATOR_RESERVE_BYTES // 2**20} MiB, kept free inside the budget); the CUDA context is not in "
               f"it: leave about {CUDA_CONTEXT_BYTES / 2**30:g} GiB of the device free for it (the summary says what "
               f"the budget leaves).  With the cpu profile it covers the bytes the step allocates"
               ).replace("%", "%%")  # (argparse formats help with %)


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
    p.add_argument("--budget", required=True, type=budget_arg, metavar="SIZE", help=BUDGET_HELP)
    p.add_argument("--batch", type=batch_arg, default=None, metavar="N|max",
                   help=f"batch size, or 'max': the largest batch a plan fits, with its samples/s against the "
                        f"plain step's at the plain step's own largest batch (default {DEFAULT_BATCH})")
    p.add_argument("--max-slowdown", type=positive_number("a factor such as 2"), default=None, metavar="X",
                   help="with --batch max (implied): the largest batch whose time per sample is at most X times "
                        "the plain step's at the largest batch the plain step fits")
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
                   help="classes the model predicts, per image or per pixel (default: 1000 for torchvision "
                        "classifiers, 21 for its segmentation models, 2 for unet, 10 (dense: 3) for tiny_*)")
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


def _capture_at(args):
    def capture_at(n: int):
        return build_and_capture(args.model, n, args.resolution, args.dtype, args.bn, None, args.num_classes,
                                 amp=args.amp)[1]
    return capture_at


def _make_solver(args):
    def make(graph, policy=None) -> Solver:
        return Solver(graph, args.model, policy=policy or args.policy, bn=args.bn, strips=args.strips,
                      optimizer=args.optimizer, device_profile=args.device_profile, solver=args.solver,
                      compiled=getattr(args, "compiled", False), amp_rows=getattr(args, "amp_rows", False))
    return make


def solver_for(args, batch: int) -> Solver:
    return _make_solver(args)(_capture_at(args)(batch))


def _cheap_policy(args) -> str:
    """The policy of the quick search behind a first guess of the largest batch: row segments of
    one policy (OverL: half the pricing of both), or none where the plan may have none."""
    if args.amp and not getattr(args, "amp_rows", False):
        return "checkpoint"
    return "overl" if args.policy == "auto" else args.policy


def _search(args, graphs, budget: int, world) -> BatchSearch:
    # per process: DDP's gradient buckets, one copy of the parameter bytes
    reserve = (lambda g: g.param_bytes) if (world or 1) > 1 else None
    return BatchSearch(graphs, _make_solver(args), budget, reserve, time_limit=args.time_limit, gap=args.gap)


def _per_sample(time_s: float, n: int, ref: float = 0.0) -> str:
    """'158 samples/s (6.31 ms a sample)', with ``ref`` (seconds a sample) ', 15.8x the plain
    step's time per sample' inside the brackets."""
    t = time_s / n
    rate = f"{1 / t:,.0f}" if t > 0 else "inf"
    vs = f", {t / ref:.3g}x the plain step's" if ref else ""
    return f"{rate} samples/s ({_sig3(t * 1e3)} ms a sample{vs})"


def _up_to(n: int, search: BatchSearch) -> str:
    return f"{n} or more" if n >= search.limit else str(n)


def _warn(text: str) -> None:
    print(f"planner: warning: {text}", file=sys.stderr)


def _batch_search(args, graphs, budget: int, world, slowdown):
    """``--batch max`` (with ``slowdown``: ``--max-slowdown``) over the graphs ``graphs(n)``:
    (the search, the batch found, the plain step's largest batch and its step time)."""
    search = _search(args, graphs, budget, world)
    plain_n = search.largest_plain()
    plain_t = search.solver(plain_n).baseline()["time_s"] if plain_n else None
    if slowdown is None:
        guess = search.estimate(max(plain_n, 1), _cheap_policy(args))[0]
        return search, search.largest(start=max(guess, 1)), plain_n, plain_t
    if not plain_n:
        raise UsageError(f"--max-slowdown compares with the plain step's time per sample at its largest batch, but "
                         f"the plain step fits no batch in {fmt_both(budget)}: drop --max-slowdown (--batch max "
                         f"finds the largest batch a plan fits)")
    limit_s = slowdown * plain_t / plain_n
    if not search.passes(plain_n, limit_s):
        raise UsageError(f"--max-slowdown {slowdown:g}: the plain step at its largest batch {plain_n} takes 1x "
                         f"its own time per sample; give 1 or more")
    return search, search.largest(start=plain_n, slowdown=limit_s), plain_n, plain_t


def command(args) -> int:
    """``planner solve``: solve, print the summary, write the plan (and the Pareto CSV)."""
    t0 = time.perf_counter()
    check_output_path(args.output, "plan")
    check_output_path(args.pareto, "Pareto CSV", (".csv",))
    if args.strips is not None and args.policy == "checkpoint":
        raise UsageError("--strips applies to row segments; --policy checkpoint has none")
    check_profile(args.device_profile)
    profile = load_profile(args.device_profile)
    budget = args.budget
    batch = args.batch
    slowdown = getattr(args, "max_slowdown", None)
    if slowdown is not None:
        if batch not in (None, "max"):
            raise UsageError(f"--max-slowdown searches the batch: drop --batch {batch} (or give --batch max)")
        batch = "max"
    if batch is None:
        batch = DEFAULT_BATCH
    world = getattr(args, "world_size", None)
    if world is not None and batch != "max":
        if batch % world:
            raise UsageError(f"--batch {batch} does not split evenly over --world-size {world}; "
                             f"give a multiple of {world}")
        batch //= world
    mem = profile.device_memory
    if mem is not None and budget > mem:
        _warn(f"the budget {fmt_both(budget)} is more than the {profile.name} profile's device memory "
              f"{fmt_both(mem)}: no plan that uses it can run there")
    elif profile.usable_memory is not None and budget > profile.usable_memory:
        _warn(f"the budget {fmt_both(budget)} leaves {fmt_both(mem - budget)} of the {profile.name}'s "
              f"{fmt_both(mem)} for the CUDA context, which takes about 0.5-1 GiB: budget at most "
              f"{fmt_both(profile.usable_memory)} there")

    def reserve(s) -> int:  # per process: DDP's gradient buckets, one copy of the parameter bytes
        return s.graph.param_bytes if (world or 1) > 1 else 0

    notes = []
    if batch == "max":
        graphs = BatchGraphs(_capture_at(args), base=2)
        search, batch, plain_n, plain_t = _batch_search(args, graphs, budget, world, slowdown)
        same = not batch or graphs.check(batch)  # (one more capture)
        how = (f"{graphs.captures} captures (the graph at every other batch derived from them), "
               f"{len(search.priced)} batches priced")
        if not same:
            # (never seen: tests compare derived graphs with captures) again, capturing every batch
            captured = functools.lru_cache(maxsize=None)(_capture_at(args))
            search, batch, plain_n, plain_t = _batch_search(args, captured, budget, world, slowdown)
            how = (f"{captured.cache_info().currsize} captures (a derived graph differed from its capture), "
                   f"{len(search.priced)} batches priced")
        if batch == 0:
            s1 = search.solver(1)
            raise InfeasibleError(budget, s1.smallest_budget() + reserve(s1), s1.hint)
        solver = search.solver(batch)
        who = "per-process " if world else ""
    else:
        solver = solver_for(args, batch)
    held = reserve(solver)
    if held and budget - held < solver.smallest_budget():
        raise InfeasibleError(budget, solver.smallest_budget() + held, solver.hint)
    plan = solver.solve(budget - held, time_limit=args.time_limit, gap=args.gap)
    if args.batch == "max" or slowdown is not None:
        what = (f"largest {who}batch within {slowdown:g}x the plain step's time per sample" if slowdown is not None
                else f"largest {who}batch that fits")
        ref = plain_t / plain_n if plain_n else 0.0
        line = f"{what}: {batch} at {_per_sample(plan.predicted['time_s'], batch, ref)}"
        line += (f"; the plain step fits up to batch {_up_to(plain_n, search)} at {_per_sample(plain_t, plain_n)}"
                 if plain_n else "; the plain step fits no batch")
        notes += [line, f"search: {how}, {time.perf_counter() - t0:.1f} s"]
    if world is not None:
        plan.budget_bytes = budget
        plan.training["world_size"] = world
        plan.solver["ddp_bucket_bytes"] = held
        notes.append(f"world size {world}: batch {batch} per process, global batch {batch * world}; budget per "
                     f"process, DDP gradient buckets {fmt_bytes(held)} reserved from it")
    if plan.solver.get("solver") == "none" and args.batch != "max" and slowdown is None:
        # the plain step fits: nothing to search, so say what the budget buys
        notes.append(_what_it_buys(args, solver, budget, world))
    plan.solver["total_s"] = round(time.perf_counter() - t0, 4)
    peak = plan.predicted.get("reserved_bytes", plan.predicted.get("peak_bytes", 0))
    if mem is not None and peak > mem:
        _warn(f"the plan's predicted peak {fmt_both(peak)}{' (reserved)' if profile.kind == 'cuda' else ''} is more "
              f"than the {profile.name} profile's device memory {fmt_both(mem)}: it cannot run there")
    frame = None
    if args.pareto:
        frame = pareto_frame(solver, args.pareto_points, time_limit=args.time_limit, gap=args.gap)
    print(format_solve_summary(plan, solver, "\n".join(notes)))
    if args.output:
        plan.save(args.output)
        print(f"\nwrote {args.output}")
    if frame is not None:
        write_csv_atomic(frame, args.pareto)
        print(f"wrote {args.pareto} ({len(frame)} budgets, {fmt_both(frame['budget_bytes'].min())} .. "
              f"{fmt_both(frame['budget_bytes'].max())})")
    return EXIT_OK


def _what_it_buys(args, solver: Solver, budget: int, world) -> str:
    """One line: the largest batch the plain step fits in the budget against a batch lrcnn
    surely fits (a quick search: --batch max finds the largest), each with its time per sample."""
    graphs = BatchGraphs(_capture_at(args), base=solver.graph.input_shape[0])
    graphs.add(solver.graph)
    search = _search(args, graphs, budget, world)
    plain_n = search.largest_plain()
    policy = _cheap_policy(args)
    n, t = search.estimate(max(plain_n, 1), policy)
    who = " per process" if world else ""
    line = f"what {fmt_both(budget)} buys{who}: the plain step up to batch {_up_to(plain_n, search)}"
    ref = 0.0
    if plain_n:
        plain_t = search.solver(plain_n).baseline()["time_s"]
        ref = plain_t / plain_n
        line += f" at {_per_sample(plain_t, plain_n)}"
    if n > plain_n:
        line += f"; lrcnn at least batch {n} at {_per_sample(t, n, ref)}; --batch max finds lrcnn's largest"
    elif plain_n >= search.limit:
        line += " (the largest batch searched)"
    else:
        line += "; lrcnn finds no larger batch quickly (--batch max searches them all)"
    return line + "\n" + _inputs_it_buys(args, solver, budget, search.smallest_segments(max(plain_n, 1), policy))


def _inputs_it_buys(args, solver: Solver, budget: int, segments) -> str:
    """One line: at the plan's batch, the largest input the plain step fits against one a small-peak
    plan surely fits (:func:`lrcnn.planner.solve.largest_inputs`), each with its step time."""
    n = solver.graph.input_shape[0]
    found = largest_inputs(solver, lambda hw: build_and_capture(args.model, n, hw, args.dtype, args.bn, None,
                                                                args.num_classes, amp=args.amp)[1],
                           _make_solver(args), budget, segments)
    plain, ours = found["plain"], found["lrcnn"]
    h0, w0 = solver.graph.input_shape[2:]

    def per_pixel(hw_t) -> float:
        return hw_t[2] / (hw_t[0] * hw_t[1])

    line = f"at batch {n}: the plain step up to input " + (
        f"{plain[0]}x{plain[1]} ({_step_time(plain[2])} a step)" if plain else f"{h0}x{w0} (no larger one)")
    if ours and (not plain or ours[0] * ours[1] > plain[0] * plain[1]):
        ref = per_pixel(plain) if plain else solver.baseline()["time_s"] / (h0 * w0)
        line += (f"; lrcnn at least {ours[0]}x{ours[1]} ({_step_time(ours[2])} a step with its smallest plan, "
                 f"{per_pixel(ours) / ref:.3g}x the plain step's time per pixel)")
    else:
        line += "; lrcnn finds no larger input quickly"
    return line


def _step_time(seconds: float) -> str:
    return f"{_sig3(seconds)} s" if seconds >= 1 else f"{_sig3(seconds * 1e3)} ms"


def _sig3(v: float) -> str:
    """Three significant digits, trailing zeros kept, no bare trailing point ('326', '6.30')."""
    return ("%#.3g" % v).rstrip(".")


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
    lines.append(budget_text(budget, cm.profile, solver.peak_room(budget)))
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
    if cm.profile.kind == "cuda":
        resv = pred.get("reserved_bytes") or cm.profile.reserved_for(peak)
        lines.append(f"predicted peak   {fmt_both(resv)} reserved of {fmt_both(budget)} ({100 * resv / budget:.1f}% of "
                     f"the budget): {fmt_both(peak)} allocated plus the caching allocator's reserve")
    else:
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
    lines.append(f"predicted step   {t * 1e3:.2f} ms, {over} vs no plan ({base_t * 1e3:.2f} ms, peak {fmt_both(base_p)})"
                 + (f"; {cm.profile.name} datasheet estimates, never calibrated on a GPU" if cm.profile.datasheet else ""))
    mp = info.get("min_peak_bytes")
    reserve = " and the allocator's reserve" if cm.profile.kind == "cuda" else ""
    lines.append(f"smallest plan    needs --budget {fmt_both(solver.budget_for(mp))} (its peak {fmt_both(mp)} "
                 f"plus the {solver.headroom:.1%} kept free{reserve})" if mp is not None
                 else "smallest plan    not searched: the plain step fits the budget")
    gap = info.get("gap")
    gap_s = "n/a" if gap is None or gap != gap else f"{100 * gap:.2f}%"
    lines.append(f"solver           {info.get('solver')}: {info.get('status')}, gap {gap_s}, solve {info.get('solve_s', 0):.2f} s, "
                 f"total {info.get('total_s', 0):.2f} s, {info.get('candidates')} candidates over {info.get('units')} units")
    return "\n".join(lines)


def budget_text(budget: int, profile, room: Optional[int] = None) -> str:
    """The summary's budget line: what a budget covers (GPU profile: reserved bytes, the allocated
    peak at most ``room``) and, on a GPU profile, what it leaves of the device for the CUDA
    context."""
    mem, usable = profile.device_memory, profile.usable_memory
    if profile.kind != "cuda":
        text = f"budget {fmt_both(budget)} of allocated bytes (the training step's)"
        return text if mem is None else text + f"; the {profile.name} profile's memory: {fmt_both(mem)}"
    room = profile.allocatable(budget) if room is None else room
    text = (f"budget {fmt_both(budget)} of reserved bytes (the CUDA caching allocator's, for the training step: its "
            f"allocated peak at most {fmt_both(max(room, 0))}, the allocator's reserve kept free beside it)")
    if mem is None:
        return text + "; the CUDA context (about 0.5-1 GiB) is not in it"
    left = mem - budget
    return text + (f"; of the {profile.name}'s {fmt_both(mem)} it leaves {fmt_both(max(left, 0))} for the CUDA context "
                   f"(about 0.5-1 GiB): budget at most {fmt_both(usable)} there")
