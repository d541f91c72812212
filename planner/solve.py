"""``planner.solve``: capture a model, price candidate segments, solve the ILP, return a Plan.

::

    from lrcnn.planner import solve
    plan = solve("resnet50", (32, 3, 224, 224), "8GB")              # a zoo name
    plan = solve(my_module, (8, 3, 512, 512), 6 * 2**30, bn="eval", policy="2ps", time_limit=5)
    plan.save("plan.json"); plan.predicted["peak_bytes"], plan.solver["gap"]

The budget is device bytes (``"8GB"`` = 8e9, ``"8GiB"`` = 8 * 2^30): with a GPU profile the bytes the
CUDA caching allocator reserves (the plan's allocated peak plus the allocator's reserve,
:meth:`lrcnn.planner.cost.DeviceProfile.reserved_for`), with the ``cpu`` profile the allocated
bytes; the CUDA context is in neither.  A budget no plan meets raises
:class:`lrcnn.planner.ilp.InfeasibleError` (a ``ValueError``) whose message names the smallest peak any
plan reaches under the same cost model.
"""
from __future__ import annotations

import difflib
import inspect
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lrcnn.errors import UsageError, UsageTypeError
from lrcnn.models import capture, default_resolution
from lrcnn.models.capture import build_and_capture, quiet_torch_logs
from lrcnn.models.geometry import cumulative_strides
from lrcnn.planner.cost import CostModel, STATE_COPIES
from lrcnn.planner.ilp import InfeasibleError, Problem, Result
from lrcnn.planner.plan import BN_MODES, DTYPES, OPTIMIZERS, Plan, Segment
from lrcnn.planner.units import fmt_bytes, parse_bytes

POLICIES = ("auto", "2ps", "overl", "checkpoint")
SOLVERS = ("auto", "cbc", "highs")
#: Labels per boundary the exact DP may keep before it counts as a heuristic (then the ILP decides).
DP_LABELS = 4000
#: Budgets are device (GPU) bytes, so plans are priced for a GPU unless told otherwise.
DEFAULT_PROFILE = "h100"
DEFAULT_TIME_LIMIT = 30.0
DEFAULT_GAP = 0.005
# Share of the budget a plan keeps free: the cost model's worst under-prediction on row segments
# (bench.cost_grid, tests/test_solve.py) stays well inside it, so a plan keeps its promise.
HEADROOM = 0.025


def _check_options(policy, bn, strips, dtype, optimizer, solver) -> None:
    if policy not in POLICIES:
        raise UsageError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if bn not in BN_MODES:
        raise UsageError(f"BatchNorm mode {bn!r} is not one of {', '.join(BN_MODES)}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if solver not in SOLVERS:
        raise UsageError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if strips is not None and (isinstance(strips, bool) or not isinstance(strips, int) or strips < 1):
        raise UsageError(f"strips must be a positive integer, got {strips!r}")
    if strips is not None and policy == "checkpoint":
        raise UsageError("--strips applies to row segments; policy 'checkpoint' has none: drop --strips or "
                         "choose another --policy")


def _check_keywords(name: str, fn: Callable, problem_kw: Dict[str, Any]) -> None:
    """Refuse a keyword that neither ``fn`` nor :class:`~lrcnn.planner.ilp.Problem` takes, at once
    (a typo such as ``strip=64`` is not passed on to fail, or be ignored, later), listing the valid
    ones (:class:`~lrcnn.errors.UsageTypeError`: also the ``TypeError`` Python raises for one)."""
    extra = [k for k in inspect.signature(Problem.__init__).parameters
             if k not in ("self", "cm", "graph", "policy", "strips")]
    unknown = [k for k in problem_kw if k not in extra]
    if not unknown:
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name != "self"] + extra
    near = difflib.get_close_matches(unknown[0], valid, n=1)
    hint = f" (did you mean {near[0]}=?)" if near else ""
    plural = "s" * (len(unknown) > 1)
    raise UsageTypeError(f"{name}() got an unknown keyword argument{plural} {', '.join(map(repr, unknown))}{hint}; "
                         f"it takes {', '.join(valid)}")


def capture_model(model, input_shape: Optional[Sequence[int]], dtype: str = "float32",
                  bn: str = "train", num_classes: Optional[int] = None, batch: int = 32,
                  amp: Optional[str] = None):
    """``(name, graph)`` for a zoo name (built on the meta device) or an ``nn.Module``, captured
    under autocast with ``amp`` (``"bf16"``/``"fp16"``).

    A module's BatchNorm layers are put in ``bn`` mode for the capture and restored afterwards.
    """
    import torch.nn as nn

    if isinstance(model, str):
        if input_shape is None:
            r = default_resolution(model)
            input_shape = (batch, 3, r, r)
        n, c, h, w = _shape4(input_shape)
        if c != 3:
            raise UsageError(f"input shape {tuple(input_shape)}: zoo models take 3 channels; give (N, 3, H, W)")
        _, graph = build_and_capture(model, n, (h, w), dtype, bn, None, num_classes, amp=amp)
        return model, graph
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a zoo name or a torch.nn.Module, got {type(model).__name__}")
    if input_shape is None:
        raise UsageError("input_shape (N, C, H, W) is needed for a module: pass it (only zoo names have a default)")
    import torch

    shape = _shape4(input_shape)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.training for m in bns]
    try:
        for m in bns:
            m.train(bn == "train")
        with quiet_torch_logs():
            graph = capture(model, shape, getattr(torch, dtype), model_name=type(model).__name__, amp=amp)
    finally:
        for m, t in zip(bns, saved):
            m.train(t)
    return type(model).__name__, graph


def _shape4(s) -> Tuple[int, int, int, int]:
    try:
        t = tuple(int(v) for v in s)
    except (TypeError, ValueError):
        raise UsageError(f"input shape {s!r} must be four positive integers (N, C, H, W)") from None
    if len(t) != 4 or min(t) < 1:
        raise UsageError(f"input shape {s!r} must be four positive integers (N, C, H, W)")
    return t


class Solver:
    """One captured graph under one cost model: candidates built once, then solved per budget."""

    def __init__(self, graph, name: Optional[str] = None, policy: str = "auto", bn: str = "train",
                 strips: Optional[int] = None, optimizer: str = "momentum",
                 device_profile: Any = DEFAULT_PROFILE, solver: str = "auto", headroom: float = HEADROOM,
                 compiled: bool = False, amp_rows: bool = False, **problem_kw):

        _check_keywords("Solver", Solver.__init__, problem_kw)
        _check_options(policy, bn, strips, graph.dtype, optimizer, solver)
        # under autocast, row strips differ from plain autocast at half-precision rounding
        # (executor.rows.amp_refusal): planned only where the user accepts that (--amp-rows)
        self.amp_rows = bool(amp_rows)
        if graph.amp and not self.amp_rows:
            if policy in ("2ps", "overl"):
                raise UsageError(f"--policy {policy} plans row segments, whose gradients under --amp differ from "
                                 f"plain autocast at half-precision rounding: add --amp-rows to accept that, or "
                                 f"use --policy auto|checkpoint")
            policy = "checkpoint"  # (no row segments: checkpoint and store are bit-identical)

        self.graph, self.name = graph, name or graph.model_name
        self.policy, self.bn, self.optimizer, self.solver_name = policy, bn, optimizer, solver
        self.device_profile = device_profile
        self.headroom = float(headroom)  # share of the budget kept free (see HEADROOM)
        t0 = time.perf_counter()
        self.compiled = bool(compiled)  # priced for compile_plan (see CostModel)
        self.cm = CostModel(graph, optimizer=optimizer, profile=device_profile, compiled=compiled)
        self.strips, self._problem_kw = strips, dict(problem_kw)
        self._problem = None
        self._baseline: Optional[Dict[str, Any]] = None
        self.setup_s = time.perf_counter() - t0
        self._min_peak: Optional[int] = None
        self.last_path: List = []

    @property
    def hint(self) -> str:
        """What a budget no plan fits could still try, and the floor no plan goes under (the tail
        of :class:`lrcnn.planner.ilp.InfeasibleError`'s message)."""

        g, cm = self.graph, self.cm
        levers = []
        if self.strips is not None:  # a forced strip count leaves out every other row candidate
            levers.append(f"without --strips {self.strips} (the planner picks the strips per segment)")
        if g.amp and not self.amp_rows:
            levers.append("allow row segments with --amp-rows")
        if STATE_COPIES[self.optimizer]:
            levers.append("--optimizer sgd")
        if self.bn == "train" and any(n.batch_stats for n in g.nodes):
            levers.append("--bn eval")
        if not g.amp and g.dtype == "float32":
            levers.append("--amp bf16")
        fixed = cm.fixed_breakdown()
        if fixed["workspace"]:
            levers.append(f"a device profile with less workspace ({cm.profile.name} reserves {fmt_bytes(fixed['workspace'])})")
        floor = {"parameters": fixed["params"], "gradients": g.grad_bytes, "optimizer state": fixed["optimizer"],
                 "workspace": fixed["workspace"]}
        text = (", or try " + ", ".join(levers)) if levers else ""
        return text + "; every plan keeps " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in floor.items() if v)

    def training(self) -> Dict[str, Any]:
        """The plan's ``training`` block (``Plan.build`` adds ``amp`` from the graph)."""
        t: Dict[str, Any] = {"optimizer": self.optimizer, "bn": self.bn}
        if self.amp_rows:
            t["amp_rows"] = True
        return t

    @property
    def problem(self):
        """The priced candidates (built on first use: a budget the plain step fits needs none)."""
        if self._problem is None:

            t0 = time.perf_counter()
            self._problem = Problem(self.cm, self.graph, policy=self.policy, strips=self.strips,
                                    **self._problem_kw)
            self.setup_s += time.perf_counter() - t0
        return self._problem

    # ------------------------------------------------------------------------------------------
    def min_peak(self) -> int:
        if self._min_peak is None:
            self._min_peak = self.problem.min_peak()
        return self._min_peak

    def fits(self, budget) -> bool:
        return parse_bytes(budget) >= self.smallest_budget()

    def smallest_budget(self) -> int:
        """The smallest budget a plan fits: the smallest predicted peak plus the headroom (and
        on a GPU profile the caching allocator's reserve)."""
        return self.budget_for(self.min_peak())

    def peak_room(self, budget: int) -> int:
        """The largest predicted (allocated) peak a plan may have within ``budget``: the budget
        less the headroom kept free and, on a GPU profile, less the caching allocator's reserve
        (:meth:`lrcnn.planner.cost.DeviceProfile.allocatable`: a GPU budget is reserved bytes)."""
        return self.cm.profile.allocatable(budget - int(budget * self.headroom))

    def budget_for(self, peak: int) -> int:
        """The smallest budget a plan of predicted ``peak`` bytes fits (:meth:`peak_room`)."""
        need = self.cm.profile.reserved_for(peak)
        b = need if self.headroom <= 0 else int(need / (1 - self.headroom)) + 1
        while self.peak_room(b) < peak:  # (integer rounding: the smallest such budget)
            b += 1
        while b > 1 and self.peak_room(b - 1) >= peak:
            b -= 1
        return b

    def price(self, segments: Sequence[Segment]) -> Dict[str, Any]:
        """compose() of a plan of ``segments`` (store units cover the rest): its peak, phases and
        step time."""
        cm = self.cm
        return cm.compose([cm.segment(s) for s in cm.cover(list(segments))])

    def baseline(self) -> Dict[str, Any]:
        """compose() of the plan-less step (every unit stored, nothing recomputed)."""
        if self._baseline is None:
            costs = [self.cm.segment(Segment(a, b, "store")) for a, b in self.cm.units()]
            self._baseline = dict(self.cm.compose(costs))
        return dict(self._baseline)

    def solve(self, budget, time_limit: float = DEFAULT_TIME_LIMIT, gap: float = DEFAULT_GAP,
              warm: Optional[List] = None, merge_store: bool = True) -> Plan:
        """The fastest plan whose predicted peak fits ``budget`` (bytes or a size string; with a
        GPU profile reserved bytes: see :meth:`peak_room`)."""

        budget = parse_bytes(budget)
        user_budget = budget
        # the plan must fit with HEADROOM to spare (the cost model's error on row segments) and,
        # on a GPU, with the caching allocator's reserve: the peak the plan may reach
        budget = self.peak_room(budget)
        if self._problem is None and self.baseline()["peak"] <= budget:
            return self._plain_plan(user_budget)  # nothing to trade: no candidates to price
        p = self.problem
        smallest = self.smallest_budget()
        cap = p.cap(budget)
        if cap < 0 or not p._min_keep_feasible(cap):
            raise InfeasibleError(user_budget, smallest, self.hint)
        t0 = time.perf_counter()
        if p.path_fits(p.store_path(), cap):
            greedy = p.store_path()  # nothing to trade: the plain step fits and nothing is faster
            res = Result(greedy, "optimal", sum(c.time_s for c in greedy) + p.time_const, None, 0.0,
                         0.0, "none")
            res.bound = res.objective
        else:
            greedy = p.pareto_dp(cap, max_labels=DP_LABELS)
            exact = p.dp_exact and greedy is not None
            if warm and p.path_fits(warm, cap) and (greedy is None or
                                                    sum(c.time_s for c in warm) < sum(c.time_s for c in greedy)):
                greedy = list(warm)
            dp_obj = sum(c.time_s for c in greedy) + p.time_const if greedy else None
            if self.solver_name == "auto" and exact:
                # the label-setting DP solved this exact problem: nothing for the ILP to add
                res = Result(greedy, "optimal", dp_obj, dp_obj, 0.0, 0.0, "dp")
            else:
                ilp = "cbc" if self.solver_name == "auto" else self.solver_name
                res = p.solve_ilp(budget, time_limit=time_limit, gap=gap, warm=greedy, solver=ilp)
                if res.status == "infeasible":
                    raise InfeasibleError(user_budget, smallest, self.hint)
                if exact and res.status != "optimal" and res.objective <= dp_obj * (1 + 1e-12):
                    # the solver stopped early on the DP's plan, which the exact DP proves optimal
                    res.extra["ilp_gap"] = res.gap
                    res.status, res.gap, res.bound = "optimal", 0.0, dp_obj
                    res.solver += "+dp"
        res.solve_s = time.perf_counter() - t0
        self.last_path = list(res.path)
        return self._plan(res, user_budget, merge_store)

    def _plain_plan(self, budget: int) -> Plan:
        t0 = time.perf_counter()
        units = self.cm.units()
        plan = Plan.build(self.graph, [Segment(units[0][0], units[-1][1], "store")], model=self.name,
                          training=self.training(), budget_bytes=budget)
        plan.predicted = self.cm.predict(plan)
        base = self.baseline()
        self.last_path = []
        plan.solver = {
            "solver": "none", "status": "optimal", "objective_s": base["time_s"], "bound_s": base["time_s"],
            "gap": 0.0, "solve_s": round(time.perf_counter() - t0, 4), "setup_s": round(self.setup_s, 4),
            "candidates": 0, "units": len(units), "policy": self.policy,
            "device_profile": self._profile_name(), "compiled": self.compiled, "min_peak_bytes": None,
            "baseline_time_s": base["time_s"], "baseline_peak_bytes": base["peak"],
            "note": "the plain step fits the budget: nothing to search",
        }
        return plan

    def _profile_name(self) -> str:
        d = self.device_profile
        return d if isinstance(d, str) else getattr(d, "name", str(d))

    def _legal(self, seg: Segment) -> bool:
        return self.graph.segment_refusal(seg.first, seg.last) is None

    def plan_segments(self, segments: Sequence[Segment]) -> List[Segment]:
        """The segments a plan holds of a path's ``segments`` (a candidate path's ``c.seg``): a
        plain store unit that reads a tensor passing over the units before it is no legal segment
        (:meth:`~lrcnn.models.capture.LayerGraph.segment_refusal`): it is left out, and its nodes
        run as the model runs them (priced the same: a store unit is the plain step's)."""
        return [s for s in segments if s.mode != "store" or s.recompute or self._legal(s)]

    def smallest_segments(self) -> List[Segment]:
        """The plan segments of the smallest plan (the least predicted peak, whatever its time)."""
        return self.plan_segments([c.seg for c in self.problem.min_peak_path()])

    def _plan(self, res, budget: int, merge_store: bool) -> Plan:
        p, cm = self.problem, self.cm
        exact = p.evaluate(res.path)
        segs = [c.seg for c in res.path]
        if merge_store:
            merged = _merge_store(segs, self._legal)
            costs = [cm.segment(s) for s in merged]
            comp = cm.compose(costs)
            if comp["peak"] <= max(exact["peak"], budget) and abs(comp["time_s"] - exact["time_s"]) <= 1e-9 * max(1.0, exact["time_s"]):
                segs = merged
        segs = self.plan_segments(segs)
        plan = Plan.build(self.graph, segs, model=self.name, training=self.training(), budget_bytes=budget)
        plan.predicted = cm.predict(plan)
        base = self.baseline()
        plan.solver = {
            "solver": res.solver, "status": res.status, "objective_s": res.objective,
            "bound_s": res.bound, "gap": res.gap, "solve_s": round(res.solve_s, 4),
            "setup_s": round(self.setup_s, 4), "candidates": len(p.cands), "priced": p.priced,
            "units": p.U, "quantum_bytes": p.quantum, "policy": self.policy,
            "device_profile": self._profile_name(), "compiled": self.compiled,
            "min_peak_bytes": self.min_peak(), "baseline_time_s": base["time_s"],
            "baseline_peak_bytes": base["peak"], "ilp_peak_bytes": exact["peak"],
            "unit_path": [[c.i, c.j] for c in res.path],
            "dp_exact": bool(p.dp_exact),
        }
        plan.solver.update({k: v for k, v in res.extra.items() if k != "cap_quanta"})
        return plan


def _merge_store(segs: List[Segment], legal) -> List[Segment]:
    """Adjacent store segments merged into one where the merged one is a legal segment
    (``legal(segment)``: a tensor passing over one of them may make it read two)."""
    out: List[Segment] = []
    for s in segs:
        merged = None
        if out and s.mode == "store" and out[-1].mode == "store":
            prev = out[-1]
            merged = Segment(prev.first, s.last, "store", recompute=list(prev.recompute) + list(s.recompute))
        if merged is not None and legal(merged):
            out[-1] = merged
        else:
            out.append(Segment(s.first, s.last, s.mode, s.policy, s.strips, s.bounds, list(s.recompute), dict(s.options)))
    return out


def solve(model, input_shape: Optional[Sequence[int]] = None, budget=None, *,
          policy: str = "auto", bn: str = "train", strips: Optional[int] = None, dtype: str = "float32",
          optimizer: str = "momentum", device_profile: Any = DEFAULT_PROFILE,
          time_limit: float = DEFAULT_TIME_LIMIT, gap: float = DEFAULT_GAP, solver: str = "auto",
          num_classes: Optional[int] = None, compiled: bool = False, amp: Optional[str] = None,
          amp_rows: bool = False, **problem_kw) -> Plan:
    """Plan one training step of ``model`` at ``input_shape`` within ``budget`` device bytes.

    ``model``: a zoo name (``planner models``), a torchvision model or any ``nn.Module`` the capture
    supports.  ``input_shape``: (N, C, H, W); for a zoo name it defaults to batch 32 at the model's
    resolution.  Returns a validated :class:`Plan` with ``plan.predicted`` (the cost model's
    prediction) and ``plan.solver`` (status, gap, objective, solve time, candidate count).
    ``compiled``: the plan will run through :func:`lrcnn.executor.compiled.compile_plan` (recomputing a
    store segment's BN / ReLU / add is then free: see :class:`lrcnn.planner.cost.CostModel`).
    ``amp``: ``"bf16"`` or ``"fp16"`` plans mixed precision as ``torch.autocast`` runs it (float32
    ``dtype``: parameters, gradients and optimizer state in float32, activations as autocast makes
    them); the plan records it in ``training.amp`` and ``apply_plan`` captures the same way.
    Under ``amp`` row segments are planned only with ``amp_rows=True`` (their gradients differ
    from plain autocast at half-precision rounding; recorded as ``training.amp_rows``).
    """
    _check_keywords("solve", solve, problem_kw)
    if budget is None:
        raise UsageError("a budget is needed, e.g. budget='8GB'")
    budget = parse_bytes(budget)
    _check_options(policy, bn, strips, dtype, optimizer, solver)
    t0 = time.perf_counter()
    name, graph = capture_model(model, input_shape, dtype, bn, num_classes, amp=amp)
    s = Solver(graph, name, policy=policy, bn=bn, strips=strips, optimizer=optimizer,
               device_profile=device_profile, solver=solver, compiled=compiled, amp_rows=amp_rows, **problem_kw)
    plan = s.solve(budget, time_limit=time_limit, gap=gap)
    plan.solver["total_s"] = round(time.perf_counter() - t0, 4)
    return plan


def max_batch(fits_at: Callable[[int], Tuple[bool, int]], budget: int, limit: int = 1 << 16,
              start: Optional[int] = None) -> int:
    """Largest batch ``n`` with ``fits_at(n)[0]`` (``fits_at`` returns (fits, min peak bytes)).

    Interpolation search: the smallest plan's peak grows about linearly with the batch, so a secant
    guess brackets the answer in a few captures; bisection finishes it.  0 if batch 1 does not fit.
    ``start``: a size expected to fit (another method's answer); the search begins there and grows
    at most 2x per try, so a peak that grows faster than linearly (an image side: quadratic) never
    sends a guess far past the answer, where one capture and solve may take many minutes.
    """
    if start is not None and start > 2:
        ok, pk = fits_at(start)
        if not ok:
            return max_batch(fits_at, budget, min(limit, start - 1))
        if start >= limit:
            return limit
        lo, plo, hi, phi, slope, capped = start, pk, None, None, max(1.0, pk / start), True
    else:
        ok1, p1 = fits_at(1)
        if not ok1:
            return 0
        if limit <= 1:
            return 1
        ok2, p2 = fits_at(2)
        if not ok2:
            return 1
        if limit <= 2:  # (no guess left between the batches tried and the limit)
            return 2
        lo, plo, hi, phi = 2, p2, None, None
        slope, capped = max(1.0, float(p2 - p1)), False
    turn = 0
    while hi is None or hi - lo > 1:
        step = max(1, int((budget - plo) / slope))
        if hi is None:
            c = min(lo + step, limit, 2 * lo if capped else limit)
        else:  # secant and bisection alternate: fast on near-linear peaks, never slow
            c = lo + step if turn % 2 == 0 else (lo + hi) // 2
            c = min(max(c, lo + 1), hi - 1)
            turn += 1
        ok, pk = fits_at(c)
        if ok:
            slope = max(1.0, (pk - plo) / (c - lo))
            lo, plo = c, pk
            if c >= limit:
                return limit
        else:
            hi, phi = c, pk
            slope = max(1.0, (phi - plo) / (hi - lo))
    return lo


def pareto_frame(solver, points: int = 10, lo: Optional[int] = None, hi: Optional[int] = None,
                 time_limit: float = 30.0, gap: float = 0.005):
    """Budget vs predicted step time: ``points`` budgets from the smallest plan to the plain step.

    Budgets are solved in increasing order, each warm-started from the previous plan (which still
    fits), so the predicted time never rises as the budget grows.
    """
    import pandas as pd

    lo = lo if lo is not None else solver.smallest_budget()
    hi = hi if hi is not None else max(lo, solver.baseline()["peak"])
    budgets = sorted({int(lo + (hi - lo) * k / max(1, points - 1)) for k in range(points)})
    rows, warm = [], None
    base_t = solver.baseline()["time_s"]
    for b in budgets:
        plan = solver.solve(b, time_limit=time_limit, gap=gap, warm=warm)
        warm = list(solver.last_path)
        pred = plan.predicted
        modes = {}
        for s in plan.segments:
            modes[s.mode] = modes.get(s.mode, 0) + 1
        rows.append({
            "budget_bytes": b, "budget_GB": b / 1e9, "budget_GiB": b / 2**30,
            "time_s": pred["time_s"], "overhead": pred["time_s"] / base_t - 1 if base_t else 0.0,
            "peak_bytes": pred["peak_bytes"], "status": plan.solver["status"], "gap": plan.solver["gap"],
            "segments": " ".join(f"{k}:{v}" for k, v in sorted(modes.items())),
        })
    return pd.DataFrame(rows)


def _largest(test: Callable[[int], Tuple[bool, int]], lo: int, hi: int, target: float) -> int:
    """Largest ``n`` in ``[lo, hi)`` with ``test(n)[0]``, where ``lo`` passes (or is 0) and ``hi``
    fails (or bounds the search), ``test`` true up to the answer and false after it.  ``test(n)``
    returns (passes, peak bytes); secant guesses on the peak (about linear in the batch) alternate
    with bisection, as in :func:`max_batch`."""
    plo = phi = slope = None
    turn = 0
    while hi - lo > 1:
        turn += 1
        if turn % 2 == 0 and plo is not None and phi is not None and phi > plo:
            c = lo + int((target - plo) * (hi - lo) / (phi - plo))  # secant across the bracket
        elif turn % 2 == 1 and plo is not None and (slope or lo):
            c = lo + int((target - plo) / (slope or plo / lo))  # along the slope (else through 0)
        else:
            c = (lo + hi) // 2
        c = min(max(c, lo + 1), hi - 1)
        ok, pk = test(c)
        if ok:
            if plo is not None and pk > plo:
                slope = (pk - plo) / (c - lo)
            lo, plo = c, pk
        else:
            hi, phi = c, pk
    return lo


class BatchSearch:
    """One model's solvers at every batch size, and the searches over the batch that ``solve
    --batch max`` answers, capturing the model twice (:class:`lrcnn.models.capture.BatchGraphs`:
    every other batch's graph is derived, exactly).

    ``graphs(n)``: the graph at batch ``n``; ``make_solver(graph, **overrides)``: a
    :class:`Solver` for a graph (``overrides``: another ``policy``); ``budget``: device bytes;
    ``reserve(graph)``: bytes held back from the budget at that batch (DDP's gradient buckets).

    Pricing every candidate at a batch (:attr:`Solver.problem`) is the costly step, so the search
    prices few batches: a plan found at one batch says, cheaply, up to which batch that plan fits
    (its segments priced again at each size), and that is the next batch priced; the answer is
    the same as testing every batch (the smallest plan's peak grows with the batch: the search
    assumes so, as :func:`max_batch` does).  :attr:`priced` lists the batches priced."""

    def __init__(self, graphs: Callable[[int], Any], make_solver: Callable[..., "Solver"], budget: int,
                 reserve: Optional[Callable[[Any], int]] = None, limit: int = 1 << 16,
                 time_limit: float = DEFAULT_TIME_LIMIT, gap: float = DEFAULT_GAP):
        self.graphs, self.make_solver, self.budget, self.limit = graphs, make_solver, int(budget), int(limit)
        self.reserve = reserve or (lambda g: 0)
        self.time_limit, self.gap = time_limit, gap
        self._solvers: Dict[Tuple[int, str], Solver] = {}
        self._exact: Dict[Tuple[int, Optional[float]], Tuple[bool, Any]] = {}
        self.priced: List[int] = []

    # -- one batch ----------------------------------------------------------------------------
    def solver(self, n: int, policy: Optional[str] = None) -> "Solver":
        key = (int(n), policy or "")
        s = self._solvers.get(key)
        if s is None:
            s = self._solvers[key] = self.make_solver(self.graphs(int(n)), **({"policy": policy} if policy else {}))
        return s

    def budget_at(self, n: int) -> int:
        """The budget a plan at batch ``n`` has (the reserve held back)."""
        return self.budget - self.reserve(self.graphs(n))

    def plain_fits(self, n: int) -> bool:
        """The plain step (no plan) fits at batch ``n``: what :meth:`Solver.solve` tests first."""
        s, b = self.solver(n), self.budget_at(n)
        return s.baseline()["peak"] <= s.peak_room(b)

    def plan_at(self, n: int, segments: Sequence[Segment]) -> Dict[str, float]:
        """compose() of a plan's ``segments`` at batch ``n`` (peak, phases, step time)."""
        return self.solver(n).price(segments)

    def _plan_test(self, segments, slowdown: Optional[float] = None):
        """Cheap: at batch m, whether the plan of ``segments`` fits (and keeps the time per sample
        within ``slowdown``), with its peak."""
        def test(m: int) -> Tuple[bool, int]:
            c = self.plan_at(m, segments)
            ok = self.solver(m).budget_for(c["peak"]) <= self.budget_at(m)
            if ok and slowdown is not None:
                ok = c["time_s"] / m <= slowdown
            return ok, int(c["peak"])
        return test

    def _fits(self, n: int, slowdown: Optional[float] = None):
        """Exact at batch ``n`` (every candidate priced): (whether a plan fits, and within the
        time per sample ``slowdown`` when given; a cheap test from the plan found here)."""
        key = (int(n), slowdown)
        if key not in self._exact:
            s, b = self.solver(n), self.budget_at(n)
            plain = slowdown is not None and self.plain_fits(n)
            if not plain:
                self.priced.append(int(n))
            if plain:
                plan = s.solve(b)
                ok = plan.predicted["time_s"] / n <= slowdown
                guide = self._plan_test(plan.segments, slowdown=slowdown)
            elif not s.fits(b):
                ok, guide = False, self._plan_test(s.smallest_segments(), slowdown=slowdown)
            elif slowdown is None:
                ok, guide = True, self._plan_test(s.smallest_segments())
            else:
                plan = s.solve(b, time_limit=self.time_limit, gap=self.gap)
                ok = plan.predicted["time_s"] / n <= slowdown
                guide = self._rescaled_test(n, slowdown)
            self._exact[key] = (ok, guide)
        return self._exact[key]

    def _rescaled_test(self, n: int, slowdown: float):
        """Cheap, from the candidates priced at batch ``n``: at batch m, whether the fastest plan
        at ``n`` whose activations would fit batch m's budget (their bytes scaled by m / n; the
        exact DP over the priced candidates) fits at m and keeps the time per sample within
        ``slowdown``, with its peak.  The fastest plan at ``n`` itself fills the budget, so it
        fits few larger batches; this one leaves room for them."""
        s = self.solver(n)
        p = s.problem

        def test(m: int) -> Tuple[bool, int]:
            sm, bm = self.solver(m), self.budget_at(m)
            room = (sm.peak_room(bm) - sm.cm.fixed_bytes()) * n / m
            path = p.pareto_dp(int(room) // p.quantum, max_labels=DP_LABELS) if room > 0 else None
            if not path:
                return False, 1 << 62
            return self._plan_test([c.seg for c in path], slowdown=slowdown)(m)
        return test

    # -- searches -----------------------------------------------------------------------------
    def target(self) -> float:
        """The peak a budget allows, for the secant guesses (the tests decide)."""
        s = next(iter(self._solvers.values()), None)
        return float(s.peak_room(self.budget)) if s is not None else self.budget * (1 - HEADROOM)

    def largest_plain(self) -> int:
        """The largest batch the plain step fits (0: not even one sample)."""
        # (from batch 3: batch 1 is a capture of its own, needed only when batch 3 does not fit)
        return max_batch(lambda n: (self.plain_fits(n), self.solver(n).baseline()["peak"]), self.target(),
                         self.limit, start=min(3, self.limit))

    def estimate(self, n: int, policy: str = "overl") -> Tuple[int, float]:
        """A batch a plan surely fits, found cheaply (a lower bound on :meth:`largest`; 0 if
        none), and that plan's step time there: the smallest plan of a quicker search at batch
        ``n`` (row segments of one ``policy``), grown to the largest batch it fits."""
        segs = self.smallest_segments(n, policy)
        test = self._plan_test(segs)
        ok, _ = test(n)
        m = _largest(test, n if ok else 0, (self.limit + 1) if ok else n, self.target())
        return m, (self.plan_at(m, segs)["time_s"] if m else math.nan)

    def smallest_segments(self, n: int, policy: str = "overl") -> List[Segment]:
        """A plan with the smallest peak at batch ``n`` among row segments of one ``policy`` (the
        quicker search :meth:`estimate` starts from)."""
        return self.solver(n, policy).smallest_segments()

    def passes(self, n: int, slowdown: Optional[float] = None) -> bool:
        """Exact at batch ``n``: a plan fits (and, with ``slowdown``, the fastest one that fits takes
        at most ``slowdown`` seconds per sample)."""
        return self._fits(n, slowdown)[0]

    def largest(self, start: Optional[int] = None, slowdown: Optional[float] = None) -> int:
        """The largest batch a plan fits (0: none), or with ``slowdown`` (seconds per sample)
        the largest whose fastest plan within the budget takes at most that per sample (above
        ``start``, which then passes: the plain step's largest batch).  ``start``: the first
        batch priced (a good guess: :meth:`estimate`)."""
        lo, hi = 0, self.limit + 1
        guide = None
        n = max(1, min(int(start or 1), self.limit))
        checked = False  # the last batch priced was the one after a guide's answer
        crawl = 0  # passes in a row that moved the answer by a batch or two
        while hi - lo > 1:
            n = min(max(n, lo + 1), hi - 1)
            ok, g = self._fits(n, slowdown)
            crawl = crawl + 1 if ok and n - lo <= 2 else 0
            if ok:
                lo = n
            else:
                hi = n
            guide = g or guide
            if hi - lo <= 1:
                break
            m = _largest(guide, lo, hi, self.target()) if guide is not None else lo
            if m > lo and crawl < 3:
                n, checked = m, False  # as far as the plan found fits
            elif ok and not checked and crawl < 3:
                n, checked = lo + 1, True  # the guide's answer passed: is it the last?
            else:  # the guides no longer lead: bisect, or double
                n, checked = ((lo + hi) // 2 if hi <= self.limit else 2 * lo), False
        return lo


def largest_inputs(solver: Solver, graph_at: Callable[[Tuple[int, int]], Any], make_solver: Callable[[Any], Solver],
                   budget: int, segments: Optional[Sequence[Segment]] = None, tries: int = 3) -> Dict[str, Any]:
    """At the solver's batch: the largest input (the captured one scaled, aspect kept, in steps of
    the network's total stride) the plain step fits in ``budget``, against one the plan of
    ``segments`` (a small-peak plan, e.g. :meth:`BatchSearch.smallest_segments`) surely fits.

    Guessed cheaply, then confirmed: activation bytes grow with the pixel count (exactly so for the
    plain step at multiples of the total stride, and for a plan that keeps its strip counts), the
    parameters, gradients, optimizer state and workspace not at all, so the captured size's peak
    scales to a first guess; a capture at the guess (``graph_at((h, w))``, priced by
    ``make_solver(graph)``) confirms it or, from the peak found there, gives a smaller guess (at
    most ``tries`` captures each).  The plan keeps its strip counts, so its answer is a lower bound: with
    more strips a plan fits larger inputs still.  Returns ``{"plain": (h, w, step seconds) or None,
    "lrcnn": ...}`` (None: nothing larger than the captured input fits, or it was not found)."""
    g, cm = solver.graph, solver.cm
    _, _, h0, w0 = g.input_shape
    stride = max(1, max(cumulative_strides(g.row_graph()).values(), default=1))
    fixed = cm.fixed_breakdown()
    floor = fixed["params"] + fixed["buffers"] + fixed["optimizer"] + fixed["workspace"] + g.grad_bytes
    target = solver.peak_room(budget)

    def size(f: float) -> Tuple[int, int]:
        return max(stride, int(h0 * f) // stride * stride), max(stride, int(w0 * f) // stride * stride)

    def search(peak0: float, step: Callable[[Solver], Dict[str, float]]):
        if target <= floor or peak0 <= floor:
            return None
        f = math.sqrt((target - floor) / (peak0 - floor))
        for _ in range(tries):
            hw = size(f)
            if hw[0] <= h0 and hw[1] <= w0:  # no larger than the captured input
                return None
            s = make_solver(graph_at(hw))
            c = step(s)
            if s.budget_for(c["peak"]) <= budget:
                return hw[0], hw[1], float(c["time_s"])
            # guess again from the peak just found (activations a little above quadratic: padding,
            # per-strip halos), at least a stride smaller
            grown = (c["peak"] - floor) / (hw[0] * hw[1] / (h0 * w0))
            f = min(math.sqrt(max(target - floor, 0) / grown), (hw[0] - stride) / h0)
        return None

    out = {"plain": search(solver.baseline()["peak"], lambda s: s.baseline()), "lrcnn": None}
    if segments:
        out["lrcnn"] = search(solver.price(segments)["peak"], lambda s: s.price(segments))
    return out
