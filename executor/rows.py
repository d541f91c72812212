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

The segment is a ``torch.autograd.Function`` taking the segment input and the segment's parameters,
so one ``loss.backward()`` drives everything, parameter gradients arrive through ordinary autograd
(once per parameter: DDP-safe), and the user's optimizer keeps working.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from models.geometry import (RowGraph, StripSchedule, default_bounds, max_strips, propagate_heights,
                             strip_schedule)
from . import memory
from .state import StateSlots
from .strips import Band, RowSegmentError, StripOp, bn_refusal, build_strip_op


class RowSegment:
    """Executable row segment (one per plan segment with mode 'rows')."""

    def __init__(self, root: nn.Module, graph, fxnodes: Dict[str, fx.Node], seg):
        names = [n.name for n in graph.span(seg.first, seg.last)]
        self.name = f"{seg.first}..{seg.last}"
        self.source = graph.nodes[graph.index(seg.first) - 1].name
        self.nodes = names
        self.out = names[-1]
        self.policy = seg.policy
        self.strips = seg.strips
        self.bounds = list(seg.bounds) if seg.bounds else None
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
        self._sched: Dict[int, Tuple[StripSchedule, Dict[str, int]]] = {}  # by input height
        self.rows_computed: Dict[str, int] = {}  # rows computed per node by the last forward sweep

    # ------------------------------------------------------------------------------------------
    @property
    def params(self) -> List[torch.Tensor]:
        return self.state.current_params()

    def check_modes(self) -> None:
        """Refuse train-mode BatchNorm (exact strip-wise BN statistics are a separate feature)."""
        for n, op in self.ops.items():
            m = op.module
            if isinstance(m, nn.BatchNorm2d) and (m.training or not m.track_running_stats):
                raise RowSegmentError(bn_refusal(n, m))

    def schedule(self, in_h: int) -> StripSchedule:
        """Strip schedule for a segment input of ``in_h`` rows (cached per height).

        The plan's explicit bounds apply at the plan's height; at another height the strip count
        is kept (capped at the rows available).
        """
        hit = self._sched.get(in_h)
        if hit is None:
            heights = propagate_heights(self.rowgraph, {self.source: in_h})
            self.rowgraph.height = heights
            if self.bounds and in_h == self.plan_height:
                bounds = self.bounds
            else:
                count = self.strips or len(self.bounds) - 1
                count = min(count, max_strips(self.rowgraph, self.source, self.out, self.policy))
                bounds = default_bounds(self.rowgraph, self.source, self.out, self.policy, count)
            hit = (strip_schedule(self.rowgraph, self.source, self.nodes, bounds, self.policy), heights)
            self._sched[in_h] = hit
        sched, heights = hit
        for op in self.ops.values():
            op.in_heights = [heights[u] for u in op.inputs]
        return sched

    # ------------------------------------------------------------------------------------------
    def _run_strip(self, sched: StripSchedule, i: int, x_band: Band,
                   carried: Optional[Dict[str, torch.Tensor]],
                   forward: bool, on_new=None) -> Tuple[Dict[str, Band], Dict[str, torch.Tensor]]:
        """Compute strip ``i``.  Returns the bands still held and the carries for strip i+1.

        ``carried``: rows each node receives from earlier strips (2PS).  ``forward``: the no-grad
        sweep (extract the carries for the next strip).  Bands are dropped after their last use
        (in backward, autograd keeps what it needs).  ``on_new(node, tensor, start)`` sees each
        node's newly computed rows.
        """
        strip = sched.rows[i]
        nxt = sched.rows[i + 1] if i + 1 < sched.strips else None
        bands: Dict[str, Band] = {self.source: x_band}
        carry_out: Dict[str, torch.Tensor] = {}
        for k, n in enumerate(self.nodes):
            r = strip[n]
            op = self.ops[n]
            if r.hi > r.start:
                new = op([bands[u] for u in op.inputs], r.start, r.hi)
                if forward:
                    self.rows_computed[n] = self.rows_computed.get(n, 0) + (r.hi - r.start)
            else:
                ref = bands[op.inputs[0]].t
                new = ref.new_empty((ref.shape[0], 0, 0, 0))
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
                    del bands[u]
        return bands, carry_out

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
        """No-grad strip-wise forward. Returns the output map and the per-strip carried rows."""
        self.check_modes()
        sched = self.schedule(x.shape[2])
        self.rows_computed = {}
        out: Optional[torch.Tensor] = None
        carries: List[Optional[Dict[str, torch.Tensor]]] = []
        carried = {} if sched.policy == "2ps" else None
        for i in range(sched.strips):
            lo, hi = sched.rows[i][self.source].lo, sched.rows[i][self.source].hi
            carries.append(carried)
            bands, carry_out = self._run_strip(sched, i, Band(lo, x[:, :, lo:hi]), carried, forward=True)
            y = bands[self.out]
            a, b = sched.out[i]
            if b > a:  # 2PS: early strips may not reach the output yet
                if out is None:
                    shp = list(y.t.shape)
                    shp[2] = sched.out[-1][1]
                    out = y.t.new_empty(shp)
                out[:, :, a:b] = y.rows(a, b)
            del bands, y
            carried = carry_out if sched.policy == "2ps" else None
        memory.mark(f"rows {self.name} forward")
        return out, carries

    def backward(self, x: torch.Tensor, gy: torch.Tensor, carries: list, need_gx: bool,
                 params: List[torch.Tensor]):
        """Strip-wise recompute + backward, last strip first. Returns (grad_x, grads of params)."""
        sched = self.schedule(x.shape[2])
        gx = torch.zeros_like(x) if need_gx else None
        gparams: List[Optional[torch.Tensor]] = [None] * len(params)
        owned = [False] * len(params)
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

            with torch.enable_grad():
                xs = x[:, :, srow.lo:srow.hi].detach().requires_grad_(need_gx)
                leaves: Dict[str, torch.Tensor] = {}
                carried = None
                if carries[i] is not None:
                    carried = {n: c.detach().requires_grad_(True) for n, c in carries[i].items()}
                    leaves = carried
                bands, _ = self._run_strip(sched, i, Band(srow.lo, xs), carried, forward=False, on_new=on_new)
                a, b = sched.out[i]
                if b > a:
                    roots.append(bands[self.out].rows(a, b))
                    grads.append(gy[:, :, a:b])
                inputs = ([xs] if need_gx else []) + list(leaves.values()) + params
                if roots:
                    got = torch.autograd.grad(roots, inputs, grads, allow_unused=True)
                else:
                    got = (None,) * len(inputs)
            del bands, roots
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
            for j, g in enumerate(got[k:]):
                if g is None:
                    continue
                if gparams[j] is None:
                    gparams[j] = g
                elif owned[j]:
                    gparams[j].add_(g)
                else:
                    gparams[j] = gparams[j] + g
                    owned[j] = True
            del got
            memory.mark(f"rows {self.name} backward strip {i}")
        return gx, gparams


class _RowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seg: RowSegment, x: torch.Tensor, *params):
        y, carries = seg.forward(x)
        ctx.seg = seg
        ctx.carries = carries
        ctx.params = params
        ctx.buffers = seg.state.current_buffers()
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        seg: RowSegment = ctx.seg
        with seg.state.bound(ctx.params, ctx.buffers):
            gx, gparams = seg.backward(x, gy.contiguous(), ctx.carries, ctx.needs_input_grad[1], list(ctx.params))
        ctx.carries = ctx.params = ctx.buffers = None
        return (None, gx, *gparams)


def run_rows(seg: RowSegment, x: torch.Tensor) -> torch.Tensor:
    """Apply a row segment to its input map (differentiable)."""
    params = seg.params
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        with torch.no_grad():
            return seg.forward(x)[0]
    return _RowFunction.apply(seg, x, *params)
