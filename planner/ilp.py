"""The plan search: candidate segments over the model's units and an ILP (PuLP) that picks them.

Units are the cost model's runs of nodes between consecutive cut points (a residual block or a
single layer), ``cm.units()``, where a run holding most of the step's saved bytes is split at its
bypass boundaries (tensors made before it pass over the pieces: ``CostModel._split``).  Boundary
``b`` (0..U) lies before unit ``b``.  A *candidate* is a unit range ``i..j`` with one
configuration; every candidate but a plain store unit is a legal segment (``Problem._legal``: one
tensor enters, one leaves), a plain store unit that is not runs node by node:

* ``store``      one unit, without recompute or (when the unit has any) dropping its cheap
                 pointwise / BN / add outputs (``Segment.recompute``); adjacent store units are
                 merged in the final plan;
* ``checkpoint`` any range of at most ``max_ckpt_units`` units;
* ``rows``       a range of only row-wise nodes with at most ``max_row_units`` units that contain a
                 spatial op, per policy (2PS / OverL) and strip count (powers of two up to what the
                 geometry allows, or the forced ``strips``).

Each candidate is priced once by ``cm.segment``; unsupported ones (``SegmentCost.supported`` False,
e.g. train-mode BN in rows) are dropped, and so are candidates another configuration of the same
range beats on every number (keep, peaks, gradients, time).

The ILP is exactly :meth:`lrcnn.planner.cost.CostModel.compose`, linearised.  Binary ``x_c`` per
candidate; one path of candidates from boundary 0 to boundary U (flow constraints); ``M_b`` = keep
of the chosen segments that end at or before ``b``; ``G_b`` = gradient bytes of the chosen
segments that start after ``b``.  For every boundary ``b`` (``cap`` = budget - fixed bytes)::

    M_b + sum_{c starts at b} fwd_peak_c x_c        <= cap      (forward phase)
    M_b + G_b + sum_{c starts at b} bwd_peak_c x_c  <= cap      (backward phase)
    M_U + loss backward                             <= cap      (compose()'s loss term)
    sum_c grad_c x_c + optimizer_peak               <= cap      (optimizer step)

When the path passes ``b`` exactly one term of each sum is on and the rows are compose()'s
``fixed + sum_{j<k} keep_j + fwd_peak_k`` and ``fixed + sum_{j<k} keep_j + sum_{j>k} grad_j +
bwd_peak_k``; when a chosen segment spans ``b`` the row is implied by that segment's own row
(peaks are non-negative).  Objective: sum of ``fwd_s + bwd_s`` (plus the constant optimizer time).

Bytes are quantised to ``quantum`` (rounded up, the budget down), so every plan the ILP accepts
fits the budget exactly under compose().  Two dynamic programmes over the boundaries complement the
ILP: :meth:`Problem.min_cap` (smallest feasible budget: min-keep DP + bisection, exact when each
range's gradient bytes do not depend on its mode) and :meth:`Problem.pareto_dp` (label-setting on
(keep, time), exact without a label cap; with one, the ILP's warm start).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from lrcnn.errors import LrcnnError, UsageError
from lrcnn.models.geometry import max_strips
from lrcnn.models.ops import recomputable
from lrcnn.planner.plan import Segment
from lrcnn.planner.units import fmt_both

MODES_BY_POLICY = {
    "auto": ("store", "checkpoint", "rows"),
    "2ps": ("store", "checkpoint", "rows"),
    "overl": ("store", "checkpoint", "rows"),
    "checkpoint": ("store", "checkpoint"),
}
ROW_POLICIES = {"auto": ("2ps", "overl"), "2ps": ("2ps",), "overl": ("overl",), "checkpoint": ()}
MAX_AUTO_STRIPS = 64
LIGHT_KINDS = ("pointwise", "norm", "join")  # ReLU, BN, add: units of only these are not "major"


class InfeasibleError(LrcnnError, ValueError):
    """No plan fits the budget; ``min_peak`` is the smallest predicted peak any plan reaches."""

    def __init__(self, budget: int, min_peak: int, hint: str = ""):
        self.budget, self.min_peak = budget, min_peak
        super().__init__(f"infeasible: the smallest plan needs {fmt_both(min_peak)}; "
                         f"the budget is {fmt_both(budget)}: raise --budget or lower --batch/--resolution{hint}")


@dataclass
class Candidate:
    i: int                   # first unit
    j: int                   # last unit (inclusive): the segment ends at boundary j + 1
    seg: Segment
    cost: object             # SegmentCost
    q: Tuple[int, int, int, int] = (0, 0, 0, 0)  # quantised keep, fwd_peak, bwd_peak, grad

    @property
    def time_s(self) -> float:
        return self.cost.fwd_s + self.cost.bwd_s


@dataclass
class Result:
    path: List[Candidate]
    status: str               # optimal | feasible (time limit / gap) | infeasible
    objective: float          # predicted step time of the path (compose's time_s)
    bound: Optional[float] = None
    gap: float = 0.0
    solve_s: float = 0.0
    solver: str = "cbc"
    extra: Dict[str, object] = field(default_factory=dict)


def _ceil_div(a: int, q: int) -> int:
    return -((-int(a)) // q)


class Problem:
    """Candidates of one captured graph under one cost model (built once, solved per budget)."""

    def __init__(self, cm, graph, policy: str = "auto", strips: Optional[int] = None,
                 max_row_units: int = 6, max_ckpt_units: int = 8, recompute: bool = True,
                 quantum: Optional[int] = None, min_row_height: int = 16,
                 max_strips: int = MAX_AUTO_STRIPS, strip_gain: float = 0.03):
        if policy not in MODES_BY_POLICY:
            raise UsageError(f"policy {policy!r} is not one of {', '.join(MODES_BY_POLICY)}")
        if strips is not None and (not isinstance(strips, int) or strips < 1):
            raise UsageError(f"strips must be a positive integer, got {strips!r}")
        self.cm, self.graph, self.policy, self.strips = cm, graph, policy, strips
        t0 = time.perf_counter()
        self.units: List[Tuple[str, str]] = list(cm.units())
        self.U = len(self.units)
        self.fixed = int(cm.fixed_bytes())
        self.opt_peak = int(cm.optimizer_peak())
        # compose()'s terms that belong to no segment: with no segments it is just them (the loss's
        # forward and its own backward on top of everything kept, the optimizer step's time)
        empty = cm.compose([])
        self.tail = max(0, int(max(empty["forward"], empty["backward"])) - self.fixed)
        self.max_row_units, self.max_ckpt_units, self.recompute = max_row_units, max_ckpt_units, recompute
        self.min_row_height, self.max_strips, self.strip_gain = min_row_height, max_strips, strip_gain
        self.unit_nodes = [graph.span(a, b) for a, b in self.units]
        self._cuts = set(graph.cut_points())
        self.cands: List[Candidate] = []
        self.priced = 0
        self.refused: Dict[str, int] = {}
        self.strips_top = 0  # the most strips any row segment considered allows (its rows)
        self._build()
        if strips is not None and strips > self.strips_top:
            self._refuse_strips(strips)
        # quantum: ~1/2^22 of the largest activation-like quantity, at least one byte
        if quantum is None:
            top = max([self.fixed] + [c.cost.bwd_peak + c.cost.keep for c in self.cands] + [1])
            quantum = max(1, 2 ** max(0, int(math.log2(max(top, 1))) - 22))
        self.quantum = int(quantum)
        self._quantise()
        self.tail_q = _ceil_div(self.tail, self.quantum)
        base = self.store_path()
        costs = [c.cost for c in base]
        comp = cm.compose(costs)
        self.time_const = float(comp["time_s"]) - sum(c.time_s for c in base)
        self.baseline = comp
        self.build_s = time.perf_counter() - t0
        # plan-independent gradient suffix (exact when a range's gradients do not depend on its mode)
        ug = [0] * self.U
        for c in self.cands:
            if c.seg.mode == "store" and c.i == c.j:
                ug[c.i] = c.q[3]
        self.grad_suffix = [0] * (self.U + 1)
        for b in range(self.U - 1, -1, -1):
            self.grad_suffix[b] = self.grad_suffix[b + 1] + ug[b]
        self.grads_additive = all(c.q[3] == sum(ug[c.i:c.j + 1]) for c in self.cands)
        self.dp_exact = False
        self.by_start: List[List[Candidate]] = [[] for _ in range(self.U)]
        for c in self.cands:
            self.by_start[c.i].append(c)

    def _refuse_strips(self, strips: int) -> None:
        """A forced strip count no row segment has rows for: say so, and the largest that works,
        instead of an infeasible budget (every row candidate was left out)."""
        size = "x".join(str(v) for v in self.graph.input_shape[2:])
        if not self.strips_top:
            raise UsageError(f"--strips {strips}: no segment of this model can run in row strips at input size {size} "
                             f"(policy {self.policy!r}; a row segment needs a map of at least {self.min_row_height} "
                             f"rows); drop --strips, or use a larger --resolution")
        raise UsageError(f"--strips {strips}: no row segment of this model has {strips} rows at input size {size}; "
                         f"the largest usable count is {self.strips_top}: give --strips {self.strips_top} or less, "
                         f"or leave --strips out (the planner picks per segment)")

    # ------------------------------------------------------------------------------------------
    def _price(self, i: int, j: int, seg: Segment) -> Optional[Candidate]:
        self.priced += 1
        cost = self.cm.segment(seg)
        if not cost.supported:
            key = f"{seg.mode}: {cost.why}"
            self.refused[key] = self.refused.get(key, 0) + 1
            return None
        return Candidate(i, j, seg, cost)

    def _build(self) -> None:
        g, U = self.graph, self.U
        modes = MODES_BY_POLICY[self.policy]
        rg = g.row_graph() if "rows" in modes else None
        rowwise_unit = [all(n.rowwise and n.is_map for n in nodes) for nodes in self.unit_nodes]
        # major boundaries: before a unit that does real work (not only ReLU / BN / add); checkpoint
        # and row segments start and end on them (a lone ReLU gains nothing from either mode)
        major = [any(n.kind not in LIGHT_KINDS for n in nodes) for nodes in self.unit_nodes] + [True]
        major[0] = True
        runs = self.cm.unit_runs()  # the run between cut points each unit lies in
        run_first = [i == 0 or runs[i - 1] != runs[i] for i in range(U)]
        run_last = [i == U - 1 or runs[i + 1] != runs[i] for i in range(U)]
        run_major: Dict[int, bool] = {}
        for i in range(U):
            run_major[runs[i]] = run_major.get(runs[i], False) or major[i]
        run_major_at = [run_major[runs[i]] for i in range(U)] + [True]
        run_major_at[0] = True
        for i in range(U):
            first, last = self.units[i]
            group: List[Candidate] = []
            c = self._price(i, i, Segment(first, last, "store"))
            if c is None:
                raise ValueError(f"the cost model refuses a plain store segment {first}..{last}: "
                                 f"{self.cm.segment(Segment(first, last, 'store')).why}")
            group.append(c)
            if self.recompute and self._legal(i, i):
                cheap = [n.name for n in self.unit_nodes[i][:-1] if recomputable(n)]
                if cheap:
                    c = self._price(i, i, Segment(first, last, "store", recompute=cheap))
                    if c is not None:
                        group.append(c)
            # the plain store stays even where the recompute beats it (compiled pricing: the
            # recompute is free): it is the no-plan path (store_path) and the baseline
            self.cands.extend([group[0]] + [c for c in _pareto(group) if c is not group[0]])
            # ranges counted in units (pieces), and ranges of whole runs counted in runs: a run
            # split at bypass boundaries still forms every range it formed whole (a row segment
            # over a whole U-Net), besides the ranges of its pieces
            by_piece, by_run = major[i], run_first[i] and run_major_at[i]
            if not by_piece and not by_run:
                continue
            source = g.source_of(first)
            rows_ok = "rows" in modes and source.is_map and source.height >= self.min_row_height
            span = rspan = 0
            chain_p, chain_r = rows_ok and by_piece, rows_ok and by_run
            for j in range(i, U):
                span += major[j]
                rspan += run_first[j] and run_major[runs[j]]
                ckpt_p = by_piece and span <= self.max_ckpt_units
                ckpt_r = by_run and rspan <= self.max_ckpt_units
                chain_p = chain_p and rowwise_unit[j] and span <= self.max_row_units
                chain_r = chain_r and rowwise_unit[j] and rspan <= self.max_row_units
                if "checkpoint" not in modes:
                    ckpt_p = ckpt_r = False
                if not (ckpt_p or ckpt_r or chain_p or chain_r):
                    break
                end_p = major[j + 1]
                end_r = run_last[j] and run_major_at[j + 1]
                ckpt = (ckpt_p and end_p) or (ckpt_r and end_r)
                chain = (chain_p and end_p) or (chain_r and end_r)
                if not (ckpt or chain) or not self._legal(i, j):
                    continue
                last = self.units[j][1]
                group = []
                if ckpt:
                    c = self._price(i, j, Segment(first, last, "checkpoint"))
                    if c is not None:
                        group.append(c)
                if chain:
                    for pol in ROW_POLICIES[self.policy]:
                        group.extend(self._row_candidates(i, j, first, last, source.name, pol, rg))
                self.cands.extend(_pareto(group))

    def _legal(self, i: int, j: int) -> bool:
        """Whether units ``i..j`` may form a segment other than plain store
        (:meth:`~lrcnn.models.capture.LayerGraph.segment_refusal`: one tensor enters, one leaves;
        others may pass over).  A range between two cut points always may; a plain store unit
        that may not (it reads a tensor passing over the units before it) runs node by node."""
        first, last = self.units[i][0], self.units[j][1]
        cuts = self._cuts
        if last in cuts and self.graph.source_of(first).name in cuts:
            return True
        return self.graph.segment_refusal(first, last) is None

    def _row_candidates(self, i, j, first, last, source, pol, rg) -> List[Candidate]:
        """Row candidates of one range and policy: the forced strip count, or 2, 4, 8, ... while
        doubling the strips still lowers the segment's peak by ``strip_gain`` (and rows allow)."""

        top = max_strips(rg, source, last, pol)
        self.strips_top = max(self.strips_top, top)
        if self.strips is not None:
            if self.strips > top:
                return []
            c = self._price(i, j, Segment(first, last, "rows", policy=pol, strips=self.strips))
            return [c] if c is not None else []
        out: List[Candidate] = []
        prev = None
        k = 2
        batch_bn = any(n.batch_stats for n in self.cm.graph.span(first, last))
        while k <= min(top, self.max_strips):
            c = self._price(i, j, Segment(first, last, "rows", policy=pol, strips=k))
            if c is None:
                break
            out.append(c)
            if batch_bn:  # training-mode BN: statistics by strip sweeps (default) or one full pass
                lw = self._price(i, j, Segment(first, last, "rows", policy=pol, strips=k, options={"bn": "layerwise"}))
                if lw is not None:
                    out.append(lw)
            pk = max(c.cost.fwd_peak, c.cost.bwd_peak)
            if prev is not None and pk > (1 - self.strip_gain) * prev:
                break
            prev = pk
            k *= 2
        return out

    def _quantise(self) -> None:
        q = self.quantum
        for c in self.cands:
            k = c.cost
            vals = (k.keep, k.fwd_peak, k.bwd_peak, k.grad_bytes)
            if min(vals) < 0:
                raise ValueError(f"cost model gave a negative byte count for {c.seg.first}..{c.seg.last} ({c.seg.mode}): {vals}")
            c.q = tuple(_ceil_div(v, q) for v in vals)

    # ------------------------------------------------------------------------------------------
    def cap(self, budget: int) -> int:
        """Quantised bytes available to activations and gradients under ``budget``."""
        return (int(budget) - self.fixed) // self.quantum

    def store_path(self) -> List[Candidate]:
        """No plan: every unit stored, nothing recomputed."""
        out = []
        for i in range(self.U):
            out.append(next(c for c in self.cands if c.i == i and c.j == i and c.seg.mode == "store"
                            and not c.seg.recompute))
        return out

    def evaluate(self, path: Sequence[Candidate]) -> dict:
        """compose() of a path: the exact predicted phases, peak and time."""
        return self.cm.compose([c.cost for c in path])

    def path_fits(self, path: Sequence[Candidate], cap: int) -> bool:
        """The ILP's constraints (quantised) for one path."""
        if cap < 0:
            return False
        M = 0
        grads = [c.q[3] for c in path]
        after = sum(grads)
        for c in path:
            after -= c.q[3]
            if M + c.q[1] > cap or M + after + c.q[2] > cap:
                return False
            M += c.q[0]
        return M + self.tail_q <= cap and sum(grads) + _ceil_div(self.opt_peak, self.quantum) <= cap

    # -- dynamic programmes ----------------------------------------------------------------------
    def _min_keep_feasible(self, cap: int) -> bool:
        return self._min_keep(cap)[0]

    def _min_keep(self, cap: int) -> Tuple[bool, List[Optional[Candidate]]]:
        """Whether a plan fits ``cap`` (the min-keep DP), and per boundary the last candidate of
        the path that reaches it keeping the least."""
        INF = float("inf")
        best = [INF] * (self.U + 1)
        best[0] = 0
        last: List[Optional[Candidate]] = [None] * (self.U + 1)
        for b in range(self.U):
            M = best[b]
            if M == INF:
                continue
            for c in self.by_start[b]:
                e = c.j + 1
                if M + c.q[1] <= cap and M + self.grad_suffix[e] + c.q[2] <= cap and M + c.q[0] < best[e]:
                    best[e] = M + c.q[0]
                    last[e] = c
        ok = best[self.U] + self.tail_q <= cap and self.grad_suffix[0] + _ceil_div(self.opt_peak, self.quantum) <= cap
        return ok, last

    def min_peak_path(self) -> List[Candidate]:
        """A plan with the smallest peak (:meth:`min_peak`): the min-keep DP's path at that cap."""
        ok, last = self._min_keep(self.min_cap())
        path: List[Candidate] = []
        b = self.U
        while b > 0 and last[b] is not None:
            path.append(last[b])
            b = last[b].i
        if not ok or b != 0:
            raise ValueError("no plan is feasible at the smallest cap")
        return path[::-1]

    def min_cap(self) -> int:
        """Smallest quantised cap that admits a plan (bisection on the min-keep DP)."""
        lo, hi = 0, 1
        while not self._min_keep_feasible(hi):
            lo, hi = hi, hi * 2
            if hi > 2 ** 62:
                raise ValueError("no plan is feasible at any budget under this cost model")
        while lo < hi:
            mid = (lo + hi) // 2
            if self._min_keep_feasible(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def min_peak(self) -> int:
        """Smallest predicted peak (bytes) of any plan, by the same (quantised) model."""
        return self.fixed + self.min_cap() * self.quantum

    def pareto_dp(self, cap: int, max_labels: Optional[int] = 12) -> Optional[List[Candidate]]:
        """Fastest path under ``cap`` by label setting on (keep so far, time).

        Every constraint ahead of a boundary depends on the path behind it only through the keep
        so far, so Pareto labels (keep, time) per boundary make this exact when each range's
        gradient bytes do not depend on its mode (``grads_additive``) and no frontier was cut to
        ``max_labels``; ``self.dp_exact`` says whether both held.  Otherwise it is a heuristic.
        """
        self.dp_exact = False
        truncated = False
        if self.grad_suffix[0] + _ceil_div(self.opt_peak, self.quantum) > cap:
            return None
        labels: List[List[tuple]] = [[] for _ in range(self.U + 1)]
        labels[0] = [(0, 0.0, None)]
        for b in range(self.U):
            front = _frontier(labels[b], None)
            if max_labels is not None and len(front) > max_labels:
                front, truncated = _frontier(front, max_labels), True
            labels[b] = front
            for lab in front:
                M, t, _ = lab
                for c in self.by_start[b]:
                    e = c.j + 1
                    if M + c.q[1] <= cap and M + self.grad_suffix[e] + c.q[2] <= cap:
                        labels[e].append((M + c.q[0], t + c.time_s, (lab, c)))
        end = [l for l in labels[self.U] if l[0] + self.tail_q <= cap]
        if not end:
            return None
        best = min(end, key=lambda l: (l[1], l[0]))
        path = []
        node = best
        while node[2] is not None:
            prev, c = node[2]
            path.append(c)
            node = prev
        path.reverse()
        if not self.path_fits(path, cap):
            return None
        self.dp_exact = self.grads_additive and not truncated
        return path

    # -- the ILP ---------------------------------------------------------------------------------
    def solve_ilp(self, budget: int, time_limit: float = 30.0, gap: float = 0.005,
                  warm: Optional[Sequence[Candidate]] = None, solver: str = "cbc",
                  threads: int = 1, msg: bool = False) -> Result:
        import pulp

        t0 = time.perf_counter()
        cap = self.cap(budget)
        U = self.U
        prob = pulp.LpProblem("lrcnn_plan", pulp.LpMinimize)
        with warnings.catch_warnings():  # PuLP 3.x deprecates LpVariable(...) for prob.add_variable
            warnings.simplefilter("ignore", DeprecationWarning)
            x = [pulp.LpVariable(f"x{k}", cat="Binary") for k in range(len(self.cands))]
            M = [pulp.LpVariable(f"M{b}", lowBound=0) for b in range(U + 1)]
            G = [pulp.LpVariable(f"G{b}", lowBound=0) for b in range(U + 1)]
        starts: List[List[int]] = [[] for _ in range(U + 1)]
        ends: List[List[int]] = [[] for _ in range(U + 1)]
        for k, c in enumerate(self.cands):
            starts[c.i].append(k)
            ends[c.j + 1].append(k)
        A = pulp.LpAffineExpression
        C = pulp.LpConstraint
        EQ, LE = pulp.LpConstraintEQ, pulp.LpConstraintLE
        cands = self.cands
        # in microseconds: candidate times differ by microseconds on small models, under CBC's
        # absolute tolerances when written in seconds (it then stops at a slower path, "optimal")
        prob += A([(x[k], c.time_s * 1e6) for k, c in enumerate(cands)]), "time"
        prob += C(A([(x[k], 1) for k in starts[0]]), EQ, "start", 1)
        prob += C(A([(x[k], 1) for k in ends[U]]), EQ, "end", 1)
        for b in range(1, U):
            prob += C(A([(x[k], 1) for k in ends[b]] + [(x[k], -1) for k in starts[b]]), EQ, f"flow{b}", 0)
        prob += C(A([(M[0], 1)]), EQ, "M0", 0)
        for b in range(1, U + 1):  # M_b = M_{b-1} + keep of the segments ending at b
            prob += C(A([(M[b], 1), (M[b - 1], -1)] + [(x[k], -cands[k].q[0]) for k in ends[b]]), EQ, f"keep{b}", 0)
        prob += C(A([(G[U], 1)]), EQ, "GU", 0)
        for b in range(U - 1, -1, -1):  # G_b = G_{b+1} + gradients of the segments starting at b+1
            prob += C(A([(G[b], 1), (G[b + 1], -1)] + [(x[k], -cands[k].q[3]) for k in starts[b + 1]]), EQ, f"grad{b}", 0)
        for b in range(U):
            prob += C(A([(M[b], 1)] + [(x[k], cands[k].q[1]) for k in starts[b]]), LE, f"fwd{b}", cap)
            prob += C(A([(M[b], 1), (G[b], 1)] + [(x[k], cands[k].q[2]) for k in starts[b]]), LE, f"bwd{b}", cap)
        prob += C(A([(M[U], 1)]), LE, "loss_backward", cap - self.tail_q)
        prob += C(A([(x[k], c.q[3]) for k, c in enumerate(cands)]), LE, "optimizer",
                  cap - _ceil_div(self.opt_peak, self.quantum))
        if warm:
            on = {id(c) for c in warm}
            for k, c in enumerate(self.cands):
                x[k].setInitialValue(1 if id(c) in on else 0)
        logdir = tempfile.mkdtemp(prefix="lrcnn-ilp-")
        log = os.path.join(logdir, "cbc.log")
        try:
            if solver == "cbc":
                warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
                s = pulp.PULP_CBC_CMD(msg=msg, timeLimit=max(1, time_limit), gapRel=gap, threads=threads,
                                      warmStart=bool(warm), logPath=log)
            elif solver == "highs":
                if not pulp.HiGHS().available():
                    raise UsageError("solver 'highs' is not available (pip install highspy); use --solver cbc")
                try:
                    s = pulp.HiGHS(msg=msg, timeLimit=max(1, time_limit), gapRel=gap, warmStart=bool(warm),
                                   threads=threads)
                except TypeError:  # a PuLP whose HiGHS interface takes no warm start / threads
                    s = pulp.HiGHS(msg=msg, timeLimit=max(1, time_limit), gapRel=gap)
            else:
                raise UsageError(f"solver {solver!r} is not one of cbc, highs")
            prob.solve(s)
            text = open(log).read() if os.path.exists(log) else ""
        finally:
            for f in os.listdir(logdir):
                os.unlink(os.path.join(logdir, f))
            os.rmdir(logdir)
        solve_s = time.perf_counter() - t0
        status = pulp.LpStatus.get(prob.status, str(prob.status))
        path = [self.cands[k] for k in range(len(x)) if (x[k].value() or 0) > 0.5]
        path.sort(key=lambda c: c.i)
        ok = _is_path(path, U) and self.path_fits(path, cap)
        if not ok:
            if warm and _is_path(list(warm), U) and self.path_fits(list(warm), cap):
                path, ok = list(warm), True  # the solver kept no better incumbent
            elif prob.status == pulp.LpStatusInfeasible or not path:
                return Result([], "infeasible", float("nan"), solve_s=solve_s, solver=solver)
            else:
                raise RuntimeError(f"solver returned an inconsistent solution (status {status})")
        obj = sum(c.time_s for c in path) + self.time_const
        bound = None
        if solver == "cbc":
            absgap = _cbc_gap(text)
            bound = None if absgap is None else obj - self.time_const - absgap
        else:
            try:
                bound = float(s.solverModel.getInfo().mip_dual_bound)
            except Exception:
                bound = None
        opt_flag = prob.sol_status == pulp.LpSolutionOptimal if hasattr(prob, "sol_status") else status == "Optimal"
        if bound is not None and math.isfinite(bound):
            lb = bound + self.time_const
            g = max(0.0, (obj - lb) / obj) if obj > 0 else 0.0
        else:
            lb, g = (obj if opt_flag else None), (0.0 if opt_flag else float("nan"))
        stopped = "time limit" in text.lower() or "stopped on time" in text.lower()
        st = "optimal" if (opt_flag and not stopped and g <= gap + 1e-12) else "feasible"
        if st == "optimal" and g > 1e-6:
            st = "optimal (within gap)"
        return Result(path, st, obj, lb, g, solve_s, solver,
                      {"cap_quanta": cap, "stopped_on_time": stopped})


# ------------------------------------------------------------------------------------------------

def _pareto(group: List[Candidate]) -> List[Candidate]:
    """Drop candidates of one range that another beats (or equals) on every number."""
    def key(c):
        k = c.cost
        return (k.keep, k.fwd_peak, k.bwd_peak, k.grad_bytes, c.time_s)

    out: List[Candidate] = []
    for c in sorted(group, key=lambda c: (c.time_s, key(c))):
        kc = key(c)
        if any(all(a <= b for a, b in zip(key(d), kc)) for d in out):
            continue
        out.append(c)
    return out


def _frontier(labels: List[tuple], cap: Optional[int]) -> List[tuple]:
    """Pareto frontier of (keep, time) labels (keep ascending, time strictly descending)."""
    labels = sorted(labels, key=lambda l: (l[0], l[1]))
    front = []
    best_t = float("inf")
    for lab in labels:
        if lab[1] < best_t - 1e-15:
            front.append(lab)
            best_t = lab[1]
    if cap is not None and len(front) > cap:
        step = (len(front) - 1) / (cap - 1)
        front = [front[round(k * step)] for k in range(cap)]
    return front


def _is_path(path: Sequence[Candidate], U: int) -> bool:
    b = 0
    for c in path:
        if c.i != b:
            return False
        b = c.j + 1
    return b == U


def _cbc_gap(text: str) -> Optional[float]:
    """CBC's final absolute gap (objective - lower bound) from its log; None if it does not say.

    Both numbers come from the log (printed to ~8 digits), so an optimal run gives exactly 0.
    """
    obj = re.findall(r"Objective value:\s*([-+0-9.eE]+)", text)
    if not obj:
        return None
    m = re.findall(r"Lower bound:\s*([-+0-9.eE]+)", text)
    if m:
        return max(0.0, float(obj[-1]) - float(m[-1]))
    # CBC runs sub-searches ("Reduced search") that print their own gap lines: only a gap line
    # between the last two "Search completed" messages belongs to the main search
    parts = text.split("Cbc0001I")
    main = parts[-2] if len(parts) >= 2 else text
    m = re.findall(r"Exiting as integer gap of\s*([-+0-9.eE]+)", main)
    if m:
        return float(m[-1])
    if "Optimal solution found" in text:
        return 0.0
    return None


def enumerate_paths(problem: Problem):
    """Every plan (path of candidates): for exhaustive checks on small graphs."""
    def rec(b, acc):
        if b == problem.U:
            yield list(acc)
            return
        for c in problem.by_start[b]:
            acc.append(c)
            yield from rec(c.j + 1, acc)
            acc.pop()
    yield from rec(0, [])
