"""Row segments: run a contiguous region of the graph in horizontal strips, exactly.

Forward runs strip by strip without autograd and keeps only the segment output (plus, for 2PS, the
boundary rows each strip received from the one above).  Backward recomputes one strip at a time
with autograd and back-propagates the matching rows of the output gradient.

* OverL: each strip computes every row it needs (its halo included) from the stored segment input;
  strips are independent, and since the per-strip losses add up to the full loss, gradients are
  exact with no de-duplication.
* 2PS: strips run top to bottom and every row of every node is computed once: a strip receives
  the rows its halo shares with the strip above (carried rows) instead of recomputing them.  In
  backward (bottom to top) the gradient that lands on carried rows is handed to the strip above,
  which adds it to the rows it computed (the "gradient carry").

Training-mode BatchNorm (batch statistics over N, H, W of the whole map) stays exact: the statistics
are found before the strips run (strip sweeps, one per BN level, or one layer-wise pass:
``options.bn``), and backward first runs one gradient sweep per BN level to find the two global
per-channel sums BN's input gradient needs (see :class:`_BNStrip`; the cost model prices the sweeps:
:meth:`planner.cost.CostModel.bn_cost`).

The segment is a ``torch.autograd.Function`` taking the segment input and the segment's parameters,
so one ``loss.backward()`` drives everything, parameter gradients arrive through ordinary autograd
(once per parameter: DDP-safe), and the user's optimizer keeps working.

A per-position loss inside the segment (:class:`RowLoss`; ``apply_plan(model, plan, loss=...)``):
the last segment of a dense model may evaluate the loss itself.  Each strip evaluates it on the
output rows it finishes against the matching target rows and keeps only the sum; the segment
returns the mean over every position (the strips' sums over the count: the mean reduction, exact
to rounding).  In backward each strip's autograd root is its loss sum, seeded with the scalar
gradient over the count, where a plain segment back-propagates the output gradient's rows (the
BN gradient sweeps alike).  The full-resolution output (logits), its gradient and the loss's
log-softmax map never exist: a strip's rows of them are its own transients.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from lrcnn.executor.state import amp_replay, amp_state, no_cast_cache, StateSlots
from lrcnn.executor.strips import Band, build_strip_op, check_module, RowSegmentError, StripOp
from lrcnn.models import memory
from lrcnn.models.geometry import (bn_cover, bn_levels, default_bounds, full_map_schedule, max_strips,
                                   propagate_heights, RowGraph, segment_ancestors, strip_schedule, StripSchedule)
from lrcnn.models.loss import LossError, target_shape
from lrcnn.planner.plan import BN_STRATEGIES


class RowLoss:
    """A per-position loss a row segment evaluates on its output rows, for one step.

    ``fn(logits_rows, target_rows)`` returns the loss of every position (reduction none: shape
    ``target_rows.shape``), e.g. :func:`lrcnn.models.loss.pixel_cross_entropy`; ``target``: one
    class index (or value) per output position, ``(N, H, W)`` for ``(N, C, H, W)`` output.  The
    segment's value is ``sum over strips of fn(rows).sum() / target.numel()``: the mean reduction
    of ``fn`` over the whole map, exact to rounding."""

    __slots__ = ("fn", "target", "count")

    def __init__(self, fn, target: torch.Tensor):
        self.fn, self.target = fn, target
        self.count = max(1, target.numel())

    def check(self, rows: torch.Tensor, height: int, seg_name: str) -> None:
        """Refuse (LossError) a target that does not give one value per position of the segment's
        output (``rows``: a band of it, ``height`` its rows), or an output that is not dense."""
        if rows.dim() != 4:
            raise LossError(f"row segment {seg_name}: its output has {rows.dim()} dimensions; a loss inside row "
                            f"strips needs dense (N, C, H, W) logits")
        want = target_shape((rows.shape[0], rows.shape[1], height) + tuple(rows.shape[3:]))
        if tuple(self.target.shape) != want:
            raise LossError(f"the target has shape {tuple(self.target.shape)}, the logits of row segment {seg_name} "
                            f"({rows.shape[0]}, {rows.shape[1]}, {height}, {rows.shape[3]}) need one value per "
                            f"position, shape {want}")

    def sum(self, rows: torch.Tensor, a: int, b: int, seg_name: str) -> torch.Tensor:
        """The loss summed over output rows ``a..b`` (``rows``: those rows of the logits)."""
        t = self.target[:, a:b]
        part = self.fn(rows, t)
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != tuple(t.shape):
            got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise LossError(f"row segment {seg_name}: the loss returned {got} for target rows of shape "
                            f"{tuple(t.shape)}; a loss inside row strips returns the loss of every position "
                            f"(reduction='none'), e.g. lrcnn.models.loss.pixel_cross_entropy")
        return part.sum()


class RowSegment:
    """Executable row segment (one per plan segment with mode 'rows')."""

    def __init__(self, root: nn.Module, graph, fxnodes: Dict[str, fx.Node], seg):
        names = [n.name for n in graph.span(seg.first, seg.last)]
        self.name = f"{seg.first}..{seg.last}"
        self.source = graph.source_of(seg.first).name
        self.nodes = names
        self.out = names[-1]
        self.policy = seg.policy
        self.strips = seg.strips
        self.bounds = list(seg.bounds) if seg.bounds else None
        # trained under autocast only where the plan accepts its rounding (training.amp_rows)
        self.allow_amp = False
        self.plan_height = graph[self.source].height
        members = set(names) | {self.source}
        for n in names:
            for u in graph[n].inputs:
                if u not in members:
                    raise RowSegmentError(f"row segment {self.name}: node {n!r} reads {u!r} from outside the segment")
        self.rowgraph = RowGraph([self.source] + names,
                                 {n: graph[n].inputs for n in names},
                                 {n: graph[n].geom for n in names if graph[n].geom is not None},
                                 {})
        # for a backward with create_graph=True: the segment's nodes run plainly (whole maps)
        self._root = weakref.ref(root)
        self._fxnodes = [fxnodes[n] for n in names]
        self.ops: Dict[str, StripOp] = {}
        for n in names:
            fxn = fxnodes[n]
            mod = root.get_submodule(fxn.target) if fxn.op == "call_module" else None
            heights = [graph[u].height for u in graph[n].inputs]
            self.ops[n] = build_strip_op(fxn, graph[n], mod, heights)
        # parameters/buffers looked up at call time, so functional_call and fake-tensor
        # simulation see their substituted tensors (and the recompute sees the forward's)
        self.state = StateSlots(op.module for op in self.ops.values())
        # last consumer (index in self.nodes) of each node inside the segment
        self.last_use: Dict[str, int] = {}
        for i, n in enumerate(names):
            for u in self.ops[n].inputs:
                self.last_use[u] = i
        self._sched: Dict[tuple, Tuple[StripSchedule, Dict[str, int]]] = {}  # by input height, cover
        self.rows_computed: Dict[str, int] = {}  # rows computed per node by the last forward sweep
        # ancestors / descendants of every node inside the segment (the source excluded)
        self._anc = segment_ancestors(names, {n: self.ops[n].inputs for n in names})
        self._desc: Dict[str, set] = {n: {m for m in names if n in self._anc[m]} for n in names}
        self.bn_strategy = (seg.options or {}).get("bn", "sweeps")
        if self.bn_strategy not in BN_STRATEGIES:
            raise RowSegmentError(f"row segment {self.name}: options.bn {self.bn_strategy!r} is not one of "
                                  f"{', '.join(BN_STRATEGIES)}")
        # what the last step's training-mode BN handling did (planner.cost.CostModel.bn_cost predicts it)
        self.bn_sweeps: Dict[str, int] = {"forward": 0, "backward": 0}
        self.bn_rows: Dict[str, Dict[str, int]] = {"forward": {}, "backward": {}}

    # ------------------------------------------------------------------------------------------
    @property
    def params(self) -> List[torch.Tensor]:
        return self.state.current_params()

    def batch_bns(self) -> List[str]:
        """BatchNorm nodes that normalise with batch statistics now (training mode, or no running
        statistics to use), in topological order."""
        out = []
        for n, op in self.ops.items():
            m = op.module
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
                out.append(n)
        return out

    def bn_levels(self, bns: List[str]) -> Tuple[List[List[str]], List[List[str]]]:
        """Forward and backward levels of the segment's training-mode BNs
        (:func:`lrcnn.models.geometry.bn_levels`)."""
        return bn_levels(bns, self._anc)

    def _cover(self, bns: List[str]) -> List[str]:
        """Nodes every row of which must be computed: training-mode BNs and their ancestors."""
        return bn_cover(self.nodes, bns, self._anc)

    def schedule(self, in_h: int) -> StripSchedule:
        """Strip schedule for a segment input of ``in_h`` rows (cached per height).

        The plan's explicit bounds apply at the plan's height; at another height the strip count
        is kept (capped at the rows available).
        """
        return self._schedule(in_h, False)

    def _schedule(self, in_h: int, one_strip: bool) -> StripSchedule:
        cover = self._cover(self.batch_bns())
        key = (in_h, one_strip, tuple(cover))
        hit = self._sched.get(key)
        if hit is None:
            if in_h != self.plan_height:
                dyn = [n for n, op in self.ops.items() if getattr(op.geom, "dynamic", False)]
                if dyn:
                    raise RowSegmentError(
                        f"row segment {self.name}: node {dyn[0]!r} resizes to a size read from a tensor at run time, "
                        f"planned at input height {self.plan_height}: its rows at height {in_h} are not known from "
                        f"the plan; run at height {self.plan_height}, or re-plan at this size")
            heights = propagate_heights(self.rowgraph, {self.source: in_h})
            self.rowgraph.height = heights
            if one_strip:
                sched = full_map_schedule(self.rowgraph, self.source, self.nodes, cover)
            else:
                if self.bounds and in_h == self.plan_height:
                    bounds = self.bounds
                else:
                    count = self.strips or len(self.bounds) - 1
                    count = min(count, max_strips(self.rowgraph, self.source, self.out, self.policy))
                    bounds = default_bounds(self.rowgraph, self.source, self.out, self.policy, count)
                sched = strip_schedule(self.rowgraph, self.source, self.nodes, bounds, self.policy, cover)
            for n in cover:
                gap = sched.uncovered(n, heights[n])
                if gap is not None:
                    raise RowSegmentError(
                        f"row segment {self.name}: rows {gap[0]}..{gap[1]} of node {n!r} are computed by no "
                        f"strip, but training-mode BatchNorm needs every row of its input and upstream; "
                        f"cover this part with a checkpoint/store segment")
            sched.own = {n: sched.owned(n) for n in self.nodes}
            hit = (sched, heights)
            self._sched[key] = hit
        sched, heights = hit
        for op in self.ops.values():
            op.in_heights = [heights[u] for u in op.inputs]
        return sched

    # ------------------------------------------------------------------------------------------
    def _run_strip(self, sched: StripSchedule, i: int, x_band: Band,
                   carried: Optional[Dict[str, torch.Tensor]],
                   forward: bool, on_new=None, count: Optional[Dict[str, int]] = None,
                   bn: Optional[Dict[str, "_BNStat"]] = None, active: Optional[set] = None,
                   on_stats=None, bn_io: Optional[dict] = None,
                   bn_hold: Optional[set] = None) -> Tuple[Dict[str, Band], Dict[str, torch.Tensor]]:
        """Compute strip ``i``.  Returns the bands still held and the carries for strip i+1.

        ``carried``: rows each node receives from earlier strips (2PS).  ``forward``: the no-grad
        sweep (extract the carries for the next strip).  Bands are dropped after their last use
        (in backward, autograd keeps what it needs).  ``on_new(node, tensor, start)`` sees each
        node's newly computed rows; ``count`` adds up the rows computed per node.

        Training-mode BN (``bn``: node -> statistics): a BN whose statistics are known is applied
        with them (:class:`_BNStrip`; ``bn_io[node] = (input rows, output rows, token)`` for the
        nodes in ``bn_hold``, ``(None, None, token)`` for the others); for one whose
        statistics are not known yet, ``on_stats(node, rows)`` sees the input rows this strip owns
        and, if the statistics are still unknown, the node and everything below it is skipped.
        ``active``: evaluate only these nodes.
        """
        strip = sched.rows[i]
        nxt = sched.rows[i + 1] if i + 1 < sched.strips else None
        bands: Dict[str, Band] = {self.source: x_band}
        carry_out: Dict[str, torch.Tensor] = {}
        for k, n in enumerate(self.nodes):
            r = strip[n]
            op = self.ops[n]
            st = bn.get(n) if bn else None
            run = (active is None or n in active) and all(u in bands for u in op.inputs)
            if run and st is not None and st.mean is None:
                o0, o1 = sched.own[n][i]
                if on_stats is not None and o1 > o0:
                    on_stats(n, bands[op.inputs[0]].rows(o0, o1))
                run = st.mean is not None
            if run:
                if r.hi > r.start:
                    if st is not None:
                        xr = bands[op.inputs[0]].rows(r.start, r.hi)
                        m = op.module
                        new, tok = _BNStrip.apply(xr, m.weight, m.bias, st, sched.own[n][i][0] - r.start)
                        if bn_io is not None:  # (the normalised rows: the BN's own output)
                            bn_io[n] = (xr, new, tok) if bn_hold and n in bn_hold else (None, None, tok)
                        new = op.finish(new)
                        del xr, tok
                    else:
                        new = op([bands[u] for u in op.inputs], r.start, r.hi)
                    if count is not None:
                        count[n] = count.get(n, 0) + (r.hi - r.start)
                else:  # no rows here, but consumers may still read its (empty) band
                    new = op.empty([bands[u] for u in op.inputs])
                if on_new is not None and r.hi > r.start:
                    on_new(n, new, r.start)
                c0, c1 = r.carried
                if carried is not None and c1 > c0:
                    band = Band(c0, torch.cat([carried[n], new], dim=2) if r.hi > r.start else carried[n])
                else:
                    band = Band(r.start, new)
                bands[n] = band
                if forward and sched.policy == "2ps" and nxt is not None:
                    n0, n1 = nxt[n].carried
                    if n1 > n0:
                        carry_out[n] = band.rows(n0, n1).clone()
            for u in op.inputs:
                if self.last_use.get(u) == k and u != self.source:
                    bands.pop(u, None)
        return bands, carry_out

    # -- training-mode BatchNorm: statistics -----------------------------------------------------
    def _statistics(self, x: torch.Tensor, sched: StripSchedule, bns: List[str]) -> Dict[str, "_BNStat"]:
        """Batch mean / variance of every training-mode BN's input over (N, H, W) of the whole map.

        ``sweeps``: one no-grad strip pass per forward level (the BNs of a level need the
        statistics of the BNs upstream of them), through the ancestors of that level's BNs only;
        each strip adds the rows it owns (Chan's parallel combination of per-strip mean / M2).
        ``layerwise`` (and any one-strip segment): one no-grad pass over the whole map, all levels
        at once (the full maps of the pass are transient memory).
        """
        bn = {n: _BNStat() for n in bns}
        fwd_levels, _ = self.bn_levels(bns)
        one = self.bn_strategy == "layerwise" or sched.strips == 1
        passes = [(self._schedule(x.shape[2], True) if one and sched.strips > 1 else sched, bns)] if one \
            else [(sched, lv) for lv in fwd_levels]
        rows = self.bn_rows["forward"] = {}
        for sc, targets in passes:
            inline = sc.strips == 1
            acc: Dict[str, tuple] = {}

            def on_stats(n, xr, acc=acc, inline=inline):
                acc[n] = _chan(acc.get(n), xr)
                if inline:
                    bn[n].finish(acc[n], self.ops[n].module.eps)

            active = set(targets)
            for t in targets:
                active |= self._anc[t]
            carried = {} if sc.policy == "2ps" else None
            for i in range(sc.strips):
                lo, hi = sc.rows[i][self.source].lo, sc.rows[i][self.source].hi
                _, carry_out = self._run_strip(sc, i, Band(lo, x[:, :, lo:hi]), carried, forward=True,
                                               count=rows, bn=bn, active=active, on_stats=on_stats)
                carried = carry_out if sc.policy == "2ps" else None
            for t in targets:
                if bn[t].mean is None:
                    if t not in acc:
                        raise RuntimeError(f"internal: no rows of {t!r} seen by the statistics sweep")
                    bn[t].finish(acc[t], self.ops[t].module.eps)
        self.bn_sweeps["forward"] = len(passes)
        return bn

    def _update_running(self, bn: Dict[str, "_BNStat"]) -> None:
        """Running statistics, once per step (:func:`update_running_stats`)."""
        for n, st in bn.items():
            update_running_stats(self.ops[n].module, st.mean, st.var, st.count)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, loss: Optional[RowLoss] = None
                ) -> Tuple[torch.Tensor, list, Optional[Dict[str, "_BNStat"]]]:
        """No-grad strip-wise forward.  Returns the output map, the per-strip carried rows and the
        training-mode BN statistics (None without such BNs); updates BN running statistics.
        ``loss``: the mean loss over every output position instead of the output map (each strip
        evaluates it on the rows it finishes; the map is never assembled)."""
        sched = self.schedule(x.shape[2])
        bns = self.batch_bns()
        bn = None
        self.bn_sweeps = {"forward": 0, "backward": 0}
        self.bn_rows = {"forward": {}, "backward": {}}
        if bns:
            bn = self._statistics(x, sched, bns)
            self._update_running(bn)
        self.rows_computed = {}
        out: Optional[torch.Tensor] = None
        carries = Carries(sched)
        carried = {} if sched.policy == "2ps" else None
        total: Optional[torch.Tensor] = None
        for i in range(sched.strips):
            lo, hi = sched.rows[i][self.source].lo, sched.rows[i][self.source].hi
            carries.keep(i, carried)
            bands, carry_out = self._run_strip(sched, i, Band(lo, x[:, :, lo:hi]), carried, forward=True,
                                               count=self.rows_computed, bn=bn)
            y = bands[self.out]
            a, b = sched.out[i]
            if b > a and loss is not None:
                if total is None:
                    loss.check(y.t, sched.out[-1][1], self.name)
                part = loss.sum(y.rows(a, b), a, b, self.name)
                total = part if total is None else total + part
            elif b > a:  # 2PS: early strips may not reach the output yet
                if out is None:
                    shp = list(y.t.shape)
                    shp[2] = sched.out[-1][1]
                    out = y.t.new_empty(shp)
                out[:, :, a:b] = y.rows(a, b)
            del bands, y
            carried = carry_out if sched.policy == "2ps" else None
        memory.mark(f"rows {self.name} forward")
        if loss is not None:
            out = total / loss.count
        return out, carries, bn

    def backward(self, x: torch.Tensor, gy: torch.Tensor, carries: "Carries", need_gx: bool,
                 params: List[torch.Tensor], bn: Optional[Dict[str, "_BNStat"]] = None,
                 loss: Optional[RowLoss] = None):
        """Strip-wise recompute + backward, last strip first. Returns (grad_x, grads of params).
        ``loss``: the forward's :class:`RowLoss` (``gy`` is then the scalar gradient of the mean
        loss; each strip's root is its loss sum, seeded with ``gy / count``).

        With training-mode BNs, first one gradient sweep per backward level finds the global
        constants mean(dy), mean(dy * xhat) of that level's BNs (those of the BNs downstream are
        known by then), then the real sweep runs with all of them known.
        """
        sched = self.schedule(x.shape[2])
        if bn:
            _, levels = self.bn_levels(list(bn))
            rows = self.bn_rows["backward"] = {}
            for targets in levels:
                known = {b for b, st in bn.items() if st.c1 is not None}
                carry_nodes = {n for n in self.nodes if all(b in known for b in self._desc[n] if b in bn)}
                sums = self._sweep(x, gy, carries, sched, False, [], bn, targets, carry_nodes, rows, loss)[2]
                for t in targets:  # no gradient reached the BN's output at all: dy = 0
                    zero = torch.zeros_like(bn[t].mean)
                    s1, s2 = sums.get(t, (zero, zero))
                    bn[t].c1, bn[t].c2 = s1 / bn[t].count, s2 / bn[t].count
            self.bn_sweeps["backward"] = len(levels)
        gx, gparams, _ = self._sweep(x, gy, carries, sched, need_gx, params, bn, [], set(self.nodes), None, loss)
        return gx, gparams

    def _sweep(self, x, gy, carries, sched: StripSchedule, need_gx: bool, params: List[torch.Tensor],
               bn, targets: List[str], carry_nodes: set, count, loss: Optional[RowLoss] = None):
        """One bottom-up recompute + backward sweep.  Returns (grad_x, param grads, per target BN
        the sums over all rows of dy and dy * xhat at its output).  The seed of each strip: the
        rows of ``gy`` it finishes, or with ``loss`` its loss sum and ``gy / count``."""
        seed = gy / loss.count if loss is not None else None
        gx = torch.zeros_like(x) if need_gx else None
        gparams: List[Optional[torch.Tensor]] = [None] * len(params)
        owned = [False] * len(params)
        sums: Dict[str, list] = {}
        pending: Dict[str, Tuple[int, torch.Tensor]] = {}  # node -> (first row, grad of carried rows)
        for i in reversed(range(sched.strips)):
            srow = sched.rows[i][self.source]
            roots: List[torch.Tensor] = []
            grads: List[torch.Tensor] = []

            def on_new(n, new, start, roots=roots, grads=grads):
                p = pending.get(n)
                if p is None:
                    return
                p0, pg = p
                lo = max(p0, start)
                hi = min(p0 + pg.shape[2], start + new.shape[2])
                if hi > lo:
                    roots.append(new[:, :, lo - start: hi - start])
                    grads.append(pg[:, :, lo - p0: hi - p0])

            bn_io: Dict[str, tuple] = {}
            with torch.enable_grad():
                # (a constants sweep tracks the input too, so every BN output it needs requires grad)
                xs = x[:, :, srow.lo:srow.hi].detach().requires_grad_(need_gx or bool(targets))
                leaves: Dict[str, torch.Tensor] = {}
                carried = None
                if carries[i] is not None:
                    carried = {n: c.detach().requires_grad_(n in carry_nodes) for n, c in carries[i].items()}
                    leaves = {n: c for n, c in carried.items() if n in carry_nodes}
                bands, _ = self._run_strip(sched, i, Band(srow.lo, xs), carried, forward=False, on_new=on_new,
                                           count=count, bn=bn, bn_io=bn_io, bn_hold=set(targets))
                a, b = sched.out[i]
                if b > a and loss is not None:
                    roots.append(loss.sum(bands[self.out].rows(a, b), a, b, self.name))
                    grads.append(seed)
                elif b > a:
                    roots.append(bands[self.out].rows(a, b))
                    grads.append(gy[:, :, a:b])
                # every BN with known constants is a root through its token (a scalar output of
                # _BNStrip, zero gradient): its input gradient has a term on every row it owns
                # even where the segment output never reads it.  Only the target BNs' input and
                # output rows are held (their dy sums need them); the others' are freed as soon as
                # the recompute and the backward no longer need them (generator expressions: no
                # loop variable keeps a band, and with it this strip's graph, alive into the next
                # strip)
                roots.extend(io[2] for n, io in bn_io.items() if bn[n].c1 is not None)
                grads.extend(torch.zeros_like(io[2]) for n, io in bn_io.items() if bn[n].c1 is not None)
                tg = [n for n in targets if n in bn_io and bn_io[n][1].requires_grad]
                inputs = ([xs] if need_gx else []) + list(leaves.values()) + params + [bn_io[n][1] for n in tg]
                keep = [k for k, r in enumerate(roots) if r.requires_grad]
                roots = [roots[k] for k in keep]
                grads = [grads[k] for k in keep]
                if roots and inputs:
                    got = torch.autograd.grad(roots, inputs, grads, allow_unused=True)
                else:
                    got = (None,) * len(inputs)
            # drop the strip's graph now: on_new's default arguments hold the first root/grad
            # lists, which would keep this strip's activations alive through the next strip
            del bands, roots, grads, inputs, on_new, xs, carried
            k = 0
            if need_gx:
                if got[0] is not None:
                    gx[:, :, srow.lo:srow.hi] += got[0]
                k = 1
            new_pending: Dict[str, Tuple[int, torch.Tensor]] = {}
            for n in leaves:
                g = got[k]
                k += 1
                c0, c1 = sched.rows[i][n].carried
                if g is None:
                    g = torch.zeros_like(leaves[n])
                p = pending.get(n)
                if p is not None:  # pending rows above this strip's computed rows go further up
                    p0, pg = p
                    lo, hi = max(p0, c0), min(p0 + pg.shape[2], c1)
                    if hi > lo:
                        g = g.clone()
                        g[:, :, lo - c0: hi - c0] += pg[:, :, lo - p0: hi - p0]
                new_pending[n] = (c0, g)
            pending = new_pending
            for j in range(len(params)):
                g = got[k + j]
                if g is None:
                    continue
                if gparams[j] is None:
                    gparams[j] = g
                elif owned[j]:
                    gparams[j].add_(g)
                else:
                    gparams[j] = gparams[j] + g
                    owned[j] = True
            k += len(params)
            _add_dy_sums(sums, tg, got[k:], bn_io, bn)
            del got, bn_io
            g = p = pg = None  # (loop variables: no gradient outlives its strip)
            memory.mark(f"rows {self.name} backward strip {i}")
        return gx, gparams, sums

    def plain_backward(self, x: torch.Tensor, gy: torch.Tensor, need_gx: bool, params: List[torch.Tensor],
                       loss: Optional[RowLoss] = None):
        """Backward with ``create_graph=True`` (a gradient penalty, double backward): the segment's
        nodes run once more as plain whole-map autograd (the forward's parameters and state; BN
        running statistics are not touched again) and are differentiated with a graph, so the
        gradients are exact and differentiable again.  Whole maps: this backward does not keep
        the plan's memory bound.  Call it with the forward's parameters and copies of its buffers
        bound.  Returns (grad_x, grads of ``params``).  ``loss``: ``gy`` is the mean loss's
        gradient; the loss runs on the whole output map here."""
        y = self._root()._run_nodes(self._fxnodes, x, self.source, "pure")
        if loss is not None:
            y = loss.sum(y, 0, y.shape[2], self.name) / loss.count
        ins = ([x] if need_gx else []) + list(params)
        got = torch.autograd.grad(y, ins, gy, create_graph=True, allow_unused=True)
        return (got[0] if need_gx else None), list(got[1 if need_gx else 0:])


class Carries:
    """The rows a 2PS forward carried into each strip, kept for the backward, each row once.

    A node's carried rows overlap from strip to strip when its consumers lag behind it by more
    than a strip (an encoder map a skip joins only after the decoder has come back up: its lag
    is about half the receptive field): each strip keeps only the rows no earlier strip kept,
    and ``carries[i]`` gives strip ``i``'s carried rows again (one kept chunk: a view of it; more:
    the chunks concatenated, a transient of that strip's backward).  OverL strips carry nothing
    (``carries[i]`` is None)."""

    def __init__(self, sched: StripSchedule):
        self.sched = sched
        self.chunks: Dict[str, List[Tuple[int, torch.Tensor]]] = {}  # node -> (first row, rows), in order
        self.none = sched.policy != "2ps"

    def keep(self, i: int, carried: Optional[Dict[str, torch.Tensor]]) -> None:
        """Keep the rows carried into strip ``i`` that no earlier strip kept."""
        for n, t in (carried or {}).items():
            c0, c1 = self.sched.rows[i][n].carried
            got = self.chunks.setdefault(n, [])
            done = got[-1][0] + got[-1][1].shape[2] if got else c0
            new0 = max(c0, done)
            if new0 < c1:
                got.append((new0, t if new0 == c0 else t[:, :, new0 - c0:].clone()))

    def __getitem__(self, i: int) -> Optional[Dict[str, torch.Tensor]]:
        if self.none:
            return None
        out: Dict[str, torch.Tensor] = {}
        for n, r in self.sched.rows[i].items():
            c0, c1 = r.carried
            if c1 <= c0 or n not in self.chunks:
                continue
            parts = [t[:, :, max(c0 - a, 0): max(min(c1 - a, t.shape[2]), 0)]
                     for a, t in self.chunks[n] if a < c1 and a + t.shape[2] > c0]
            out[n] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out

    def stored_rows(self) -> Dict[str, int]:
        """Rows kept per node (what the cost model prices as the segment's carries)."""
        return {n: sum(t.shape[2] for _, t in c) for n, c in self.chunks.items()}


def update_running_stats(m: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Update BatchNorm ``m``'s running statistics with a batch's ``mean`` and biased ``var`` over
    ``count`` values per channel, exactly as ``nn.BatchNorm2d.forward`` does (nothing when ``m`` is
    not training or keeps no running statistics).  ``momentum=None``'s cumulative average is a
    tensor expression (no ``.item()``: no host sync, no graph break under ``torch.compile``)."""
    if not (m.training and m.track_running_stats):
        return
    with torch.no_grad():
        eaf = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:
                eaf = 1.0 / m.num_batches_tracked.to(mean.dtype)
        if m.running_mean is not None:
            m.running_mean.copy_(eaf * mean + (1 - eaf) * m.running_mean)
        if m.running_var is not None:
            unbiased = var * (count / max(count - 1, 1))
            m.running_var.copy_(eaf * unbiased + (1 - eaf) * m.running_var)


def bn_normalise(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    """A BatchNorm's normalisation with known per-channel ``mean`` and ``invstd`` (channel dimension
    1): ``(x - mean) * invstd * weight + bias``, in ``x``'s dtype as BatchNorm returns it (a half
    precision map under autocast is normalised in its statistics' float32 and rounded once).  With
    autograd off, in place on the one new tensor (no temporaries); with it on, out of place
    (differentiable in every argument)."""
    shp = [1, -1] + [1] * (x.dim() - 2)
    if not torch.is_grad_enabled():
        y = x - mean.view(shp)
        y.mul_(invstd.view(shp))
        if weight is not None:
            y.mul_(weight.view(shp))
        if bias is not None:
            y.add_(bias.view(shp))
        return y.to(x.dtype)
    y = (x - mean.view(shp)) * invstd.view(shp)
    if weight is not None:
        y = y * weight.view(shp)
    if bias is not None:
        y = y + bias.view(shp)
    return y.to(x.dtype)


def _add_dy_sums(sums: Dict[str, list], targets: List[str], grads, bn_io: dict, bn: Dict[str, "_BNStat"]) -> None:
    """Add one strip's sums of dy and dy * xhat (per channel) at each target BN's output to
    ``sums`` (a function, so none of the strip's bands outlives the call)."""
    for n, g in zip(targets, grads):
        if g is None:
            continue
        xr = bn_io[n][0].detach()
        # one temporary band (in place: the same operations as (xr - mean) * invstd * g)
        xhat = xr - bn[n].mean.view(1, -1, 1, 1)
        xhat.mul_(bn[n].invstd.view(1, -1, 1, 1))
        s1, s2 = g.sum((0, 2, 3)), xhat.mul_(g).sum((0, 2, 3))
        if n in sums:
            sums[n][0] = sums[n][0] + s1
            sums[n][1] = sums[n][1] + s2
        else:
            sums[n] = [s1, s2]


class _BNStat:
    """Batch statistics of one training-mode BN for one step, and its two backward constants."""

    __slots__ = ("mean", "var", "invstd", "count", "c1", "c2")

    def __init__(self):
        self.mean = self.var = self.invstd = self.c1 = self.c2 = None
        self.count = 0

    def finish(self, acc: tuple, eps: float) -> None:
        cnt, mean, m2 = acc
        self.count, self.mean, self.var = cnt, mean, m2 / cnt
        self.invstd = 1.0 / torch.sqrt(self.var + eps)


def _chan(prev: Optional[tuple], xr: torch.Tensor) -> tuple:
    """(count, mean, M2) per channel of ``prev`` combined with the rows ``xr`` (Chan et al.)."""
    xr = xr.detach()
    if xr.dtype in (torch.float16, torch.bfloat16):  # (as BatchNorm: statistics in float32)
        xr = xr.float()
    cnt = xr.shape[0] * xr.shape[2] * xr.shape[3]
    var, mean = torch.var_mean(xr, dim=(0, 2, 3), unbiased=False)
    m2 = var * cnt
    if prev is None:
        return cnt, mean, m2
    n_a, mean_a, m2_a = prev
    n = n_a + cnt
    delta = mean - mean_a
    return n, mean_a + delta * (cnt / n), m2_a + m2 + delta * delta * (n_a * cnt / n)


class _BNStrip(torch.autograd.Function):
    """Training-mode BN on a band of rows, with the step's recorded batch statistics.

    Forward: ``(x - mean) * invstd * w + b``.  Backward: the full-map input gradient
    ``w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` split into a part linear in this
    strip's ``dy`` (every row) and the constant part ``-w * invstd * (c1 + xhat * c2)``, added only
    on the rows this strip owns (rows from ``own0`` on), so each row gets it once over all strips;
    ``c1, c2`` (global means over N, H, W) are found by the gradient sweeps before they are used.
    Weight and bias gradients are this strip's sums (autograd adds the strips up).

    Returns ``(y, token)``: the token is a scalar the backward sweep makes an autograd root (zero
    gradient), so the BN's backward runs for the constant part even where nothing downstream reads
    ``y``, without holding ``y`` (or a zero gradient the size of ``y``) through the strip's whole
    backward.  Without a gradient at ``y``, ``dy`` is zero (not materialised).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, st: _BNStat, own0: int):
        y = bn_normalise(x, st.mean, st.invstd, weight, bias)  # no grad mode here: in place
        ctx.save_for_backward(x, weight)
        ctx.st, ctx.own0 = st, own0
        ctx.set_materialize_grads(False)
        return y, x.new_zeros(())

    @staticmethod
    def backward(ctx, dy, _dtoken):
        x, weight = ctx.saved_tensors
        st, o = ctx.st, ctx.own0
        shp = (1, -1, 1, 1)
        xhat = x - st.mean.view(shp)
        xhat.mul_(st.invstd.view(shp))
        if dy is None:  # only the token was reached: dy = 0
            zero = x.new_zeros(x.shape[1])
            gw = zero if ctx.needs_input_grad[1] else None
            gb = zero.clone() if ctx.needs_input_grad[2] else None
        else:
            gw = (dy * xhat).sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
            gb = dy.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            if st.c1 is None:
                raise RuntimeError("internal: BN input gradient needed before its constants are known")
            k = st.invstd.view(shp) if weight is None else st.invstd.view(shp) * weight.view(shp)
            gx = dy * k if dy is not None else torch.zeros_like(x)
            if o < x.shape[2]:
                # k * (c1 + xhat * c2), in place on xhat's owned rows (xhat is not read again):
                # the same operations as out of place, without two temporaries of those rows
                xo = xhat[:, :, o:]
                xo.mul_(st.c2.view(shp)).add_(st.c1.view(shp)).mul_(k)
                gx[:, :, o:] -= xo
        return gx, gw, gb, None, None


def amp_refusal(seg_name: str) -> str:
    """Why a row segment is not trained under autocast unless the plan allows it, and the fix."""
    return (f"row segment {seg_name} runs under torch.autocast: its forward is bit-identical to plain "
            f"autocast, but a gradient summed over strips (weight gradients, halo rows) adds per-strip "
            f"half-precision partials and differs from plain autocast at half-precision rounding; plan this "
            f"part as checkpoint/store (`planner solve --amp bf16|fp16` does: both are bit-identical), or "
            f"accept the difference with `planner solve --amp-rows` (plan training.amp_rows = true)")


class _RowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seg: RowSegment, loss: Optional[RowLoss], x: torch.Tensor, *params):
        with no_cast_cache():  # (the strips keep no autocast weight copies for later)
            y, carries, bn = seg.forward(x, loss)
        ctx.loss = loss
        ctx.amp = amp_state()  # the backward's strip recompute runs each op in the forward's dtype
        ctx.seg = seg
        ctx.carries = carries
        ctx.bn = bn
        ctx.params = params
        ctx.buffers = seg.state.current_buffers()
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        seg: RowSegment = ctx.seg
        if ctx.params is None:
            raise RowSegmentError(f"row segment {seg.name}: a second backward through the same forward "
                                  f"(retain_graph=True) is not supported in row strips; run the forward again, "
                                  f"or plan this part as checkpoint/store")
        # frozen parameters (requires_grad False) are neither differentiated nor given a gradient
        want = [k for k in range(len(ctx.params)) if ctx.needs_input_grad[3 + k]]
        if torch.is_grad_enabled():  # backward(create_graph=True)
            with seg.state.bound(ctx.params, [b.clone() for b in ctx.buffers]), amp_replay(ctx.amp):
                gx, got = seg.plain_backward(x, gy, ctx.needs_input_grad[2], [ctx.params[k] for k in want],
                                             ctx.loss)
        else:
            with seg.state.bound(ctx.params, ctx.buffers), amp_replay(ctx.amp):
                gx, got = seg.backward(x, gy.contiguous(), ctx.carries, ctx.needs_input_grad[2],
                                       [ctx.params[k] for k in want], ctx.bn, ctx.loss)
        # a parameter of a node no strip computes a row of (every output row reads only border
        # padding of it) gets no gradient from the strips; plain PyTorch gives it zeros, and
        # None would make an optimizer skip it (no weight decay, no momentum step)
        gparams: List[Optional[torch.Tensor]] = [None] * len(ctx.params)
        for k, g in zip(want, got):
            gparams[k] = torch.zeros_like(ctx.params[k]) if g is None else g
        if not torch.is_grad_enabled():
            # the strips' state is not needed again (a create_graph backward leaves it: the
            # first-order backward that usually follows runs the strips)
            ctx.carries = ctx.params = ctx.buffers = ctx.bn = ctx.loss = None
        return (None, None, gx, *gparams)


def run_rows(seg: RowSegment, x: torch.Tensor, loss: Optional[RowLoss] = None) -> torch.Tensor:
    """Apply a row segment to its input map (differentiable).  Refuses (RowSegmentError) a module
    that got a hook, a parametrization or the like after the plan was applied, and a forward that
    will be differentiated under autocast unless the plan allows it (:func:`amp_refusal`).
    ``loss``: return the mean of this per-position loss over the segment's output instead of the
    output (:class:`RowLoss`)."""
    for n, op in seg.ops.items():
        if op.module is not None:
            check_module(n, op.module, seg.name)
    params = seg.params
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        with torch.no_grad():
            return seg.forward(x, loss)[0]
    if not seg.allow_amp and any(enabled for _, enabled, _ in amp_state()):
        raise RowSegmentError(amp_refusal(seg.name))
    return _RowFunction.apply(seg, loss, x, *params)
