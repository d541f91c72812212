"""Evaluate one graph node on a band of rows, exactly as the full-map op would compute those rows.

Row bands carry their position: a :class:`Band` is a tensor holding rows ``[start, start+h)`` of a
node's full map.  Windowed ops read the input rows that :func:`lrcnn.models.geometry.input_rows` names,
pad with the op's own pad value only at the true top/bottom of the map, and run with zero H-padding
(W is untouched, so W padding, ceil_mode and count_include_pad along W keep PyTorch's semantics).
Transposed convolutions run on their input band with zero H-padding and are cropped to the rows
the band completes (rows no input row feeds: the bias); pixel shuffle likewise.  Interpolations
take each output row's input rows and weights from the geometry (:func:`lrcnn.models.geometry.
resize_taps`, PyTorch's own index arithmetic for the band's dtype and device) and leave W to
PyTorch's interpolation with the rows kept as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lrcnn.errors import LrcnnError
from lrcnn.models import memory, ops as _ops
from lrcnn.models.geometry import ResizeGeom, RowGeom, input_rows, resize_taps
from lrcnn.models.ops import call, out_of_place_call, out_of_place_module, pair


class RowSegmentError(LrcnnError, ValueError):
    """A row segment contains something that cannot run exactly in row strips."""


# what to do when a node cannot run in row strips (planner solve, given the model as it is, never
# puts such a node in a row segment)
ROWS_FIX = ("end the row segment before it or plan that part as checkpoint/store (re-run planner solve on the "
            "model as it is now: it never puts such a node in rows), or remove the feature")


def check_module(node: str, module: nn.Module, segment: str) -> None:
    """RowSegmentError if ``module`` (node ``node`` of row segment ``segment``) has acquired
    something row strips cannot run since it was planned (:func:`lrcnn.models.ops.module_refusal`)."""
    why = _ops.module_refusal(module)
    if why:
        raise RowSegmentError(f"row segment {segment}: node {node!r} ({module.__class__.__name__}): {why}; {ROWS_FIX}")


@dataclass
class Band:
    start: int          # first full-map row held
    t: torch.Tensor     # N, C, rows, W

    @property
    def stop(self) -> int:
        return self.start + self.t.shape[2]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        if hi <= lo:  # no rows (an output row made only of padding reads none)
            return self.t[:, :, :0]
        if lo < self.start or hi > self.stop:
            raise RuntimeError(f"internal: rows [{lo},{hi}) not in band [{self.start},{self.stop})")
        return self.t[:, :, lo - self.start: hi - self.start]


def _index(values: List[int], like: torch.Tensor) -> torch.Tensor:
    """An int64 index tensor of ``values`` on ``like``'s device, fake where ``like`` is (a simulated
    step: index_select takes no real tensor beside a fake one)."""
    return memory.constant_like(torch.tensor(values, dtype=torch.long, device=like.device), like)


def _pad_rows(x: torch.Tensor, top: int, bottom: int, value: float) -> torch.Tensor:
    if top == 0 and bottom == 0:
        return x
    return F.pad(x, (0, 0, top, bottom), value=value)


def _avgpool_row_scale(m: nn.AvgPool2d, lo: int, hi: int, in_h: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-output-row factor turning a strip average (divisor k_h) into PyTorch's full-map average."""
    k, s, p = pair(m.kernel_size)[0], pair(m.stride or m.kernel_size)[0], pair(m.padding)[0]
    factors = []
    for r in range(lo, hi):
        h0 = r * s - p
        h1 = min(h0 + k, in_h + p)
        cnt = h1 - h0 if m.count_include_pad else min(h1, in_h) - max(h0, 0)
        factors.append(k / cnt)
    if all(f == 1.0 for f in factors):
        return None
    return memory.constant_like(torch.tensor(factors, dtype=like.dtype, device=like.device), like).view(1, 1, -1, 1)


class StripOp:
    """How one node computes a band of its output rows from bands of its inputs."""

    def __init__(self, fxnode: fx.Node, info: _ops.OpInfo, module: Optional[nn.Module], in_heights: List[int],
                 out_width: Optional[int] = None):
        self.node = fxnode
        self.name = fxnode.name
        self.info = info
        self.module = module
        self.in_heights = in_heights
        self.inputs = [a.name for a in fxnode.all_input_nodes]
        self.geom: RowGeom = info.geom
        # a fused norm + activation layer: the modules applied after the normalisation
        tail = _ops.norm_act_tail(module) if module is not None else None
        self.tail = [out_of_place_module(t) for t in tail or ()]
        # the op along W (output widths; an interpolation's W arguments)
        self.wgeom: Optional[RowGeom] = None
        if info.kind == _ops.SPATIAL:
            if module is not None:
                self.wgeom = _ops.window_geom(module, 1)
            else:
                self.wgeom = _ops.function_geom(fxnode.target, fxnode.args, fxnode.kwargs, axis=1)
            if isinstance(self.wgeom, ResizeGeom) and self.wgeom.dynamic:  # (a size read at run time)
                self.wgeom = ResizeGeom(self.wgeom.mode, self.wgeom.align_corners, size=out_width, dynamic=True)
        self.factor = None  # pixel (un)shuffle
        if info.op in ("pixel_shuffle", "pixel_unshuffle"):
            self.factor = self.geom.stride
        self.fn = self._build()

    # A callable (inputs: list[Band], lo, hi) -> tensor of rows [lo, hi)
    def _build(self) -> Callable:
        m, info = self.module, self.info
        if info.kind == _ops.SPATIAL:
            if isinstance(self.geom, ResizeGeom):
                return self._resize
            if isinstance(m, nn.ConvTranspose2d):
                return self._transpose
            if info.op == "pixel_shuffle":
                return self._shuffle
            return self._spatial
        if info.kind == _ops.NORM:
            return self._norm
        if self.node.op == "call_module":
            if isinstance(m, nn.Identity):
                return lambda bands, lo, hi: bands[0].rows(lo, hi)
            mod = out_of_place_module(m)
            return lambda bands, lo, hi: mod(bands[0].rows(lo, hi))
        # call_function / call_method: pointwise or join; substitute row slices for node arguments
        op = self.node.op
        target, kwargs = out_of_place_call(self.node.target, dict(self.node.kwargs))
        index = {name: i for i, name in enumerate(self.inputs)}

        def run(bands, lo, hi):
            sub = lambda a: bands[index[a.name]].rows(lo, hi)  # noqa: E731
            return call(op, target, fx.node.map_arg(self.node.args, sub), fx.node.map_arg(kwargs, sub))

        return run

    def _spatial(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        m, g = self.module, self.geom
        ir = input_rows(g, lo, hi, self.in_heights[0])
        x = _pad_rows(bands[0].rows(ir.lo, ir.hi), ir.pad_top, ir.pad_bottom, g.pad_value)
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, m.weight, m.bias, pair(m.stride), (0, pair(m.padding)[1]),
                            pair(m.dilation), m.groups)
        if isinstance(m, nn.MaxPool2d):
            return F.max_pool2d(x, pair(m.kernel_size), pair(m.stride or m.kernel_size),
                                (0, pair(m.padding)[1]), pair(m.dilation), ceil_mode=m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            y = F.avg_pool2d(x, pair(m.kernel_size), pair(m.stride or m.kernel_size),
                             (0, pair(m.padding)[1]), ceil_mode=m.ceil_mode,
                             count_include_pad=m.count_include_pad)
            scale = _avgpool_row_scale(m, lo, hi, self.in_heights[0], y)
            return y if scale is None else y * scale
        if self.info.op == "pixel_unshuffle":  # (kernel r, stride r: the band's rows, no padding)
            return F.pixel_unshuffle(x, self.factor)
        raise RowSegmentError(f"node {self.name}: spatial op {self.info.op} has no strip implementation")

    def _transpose(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a transposed convolution: the convolution of the input rows that feed
        them (no H padding), cropped to them; rows none of those feeds get the bias alone."""
        m, g = self.module, self.geom
        ir = input_rows(g, lo, hi, self.in_heights[0])
        x = bands[0].rows(ir.lo, ir.hi)
        n = hi - lo
        if ir.hi > ir.lo:
            y = F.conv_transpose2d(x, m.weight, None, pair(m.stride), (0, pair(m.padding)[1]),
                                   (0, pair(m.output_padding)[1]), m.groups, pair(m.dilation))
            a = lo - g.first_row(ir.lo)  # (row 0 of y is full-map row first_row(ir.lo))
            s0 = min(max(a, 0), y.shape[2])
            s1 = min(max(a + n, s0), y.shape[2])
            y = y[:, :, s0:s1]
            top = min(max(-a, 0), n)
            if y.shape[2] < n:
                y = F.pad(y, (0, 0, top, n - top - y.shape[2]))
        else:
            y = x.new_zeros((x.shape[0], m.out_channels, n, self.wgeom.out_size(x.shape[3])))
        return y if m.bias is None else y + m.bias.view(1, -1, 1, 1)

    def _shuffle(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a pixel shuffle: the shuffle of the input rows holding them, cropped."""
        r = self.factor
        ir = input_rows(self.geom, lo, hi, self.in_heights[0])
        y = F.pixel_shuffle(bands[0].rows(ir.lo, ir.hi), r)
        a = lo - ir.lo * r
        return y[:, :, a: a + hi - lo]

    def _resize(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of an interpolation: each output row from its input rows and weights
        (:func:`resize_taps` with the arithmetic of the kernel PyTorch runs on this dtype and
        device; the half types in float32, as PyTorch accumulates them), then PyTorch's own
        interpolation along W with the rows kept as they are (its copy path)."""
        g, in_h = self.geom, self.in_heights[0]
        out_h = g.out_size(in_h)
        ir = input_rows(g, lo, hi, in_h)
        x = bands[0].rows(ir.lo, ir.hi)
        half = x.dtype in (torch.float16, torch.bfloat16)
        variant = "f32" if x.dtype != torch.float64 else ("cuda64" if x.is_cuda else "cpu64")
        taps = [resize_taps(g, o, in_h, out_h, variant) for o in range(lo, hi)]
        i0 = _index([t[0] - ir.lo for t in taps], x)
        y = x.index_select(2, i0)
        if g.mode == "bilinear":
            i1 = _index([t[1] - ir.lo for t in taps], x)
            work = torch.float32 if half else x.dtype
            l1 = memory.constant_like(torch.tensor([t[2] for t in taps], dtype=work, device=x.device), x)
            l1 = l1.view(1, 1, -1, 1)
            y = y.to(work) * (1 - l1) + x.index_select(2, i1).to(work) * l1
        w = self.wgeom
        if w.scale is not None:
            y = F.interpolate(y, scale_factor=(1.0, w.scale), mode=g.mode,
                              align_corners=g.align_corners if g.mode == "bilinear" else None)
        else:
            y = F.interpolate(y, size=(hi - lo, w.out_size(x.shape[3])), mode=g.mode,
                              align_corners=g.align_corners if g.mode == "bilinear" else None)
        return y.to(x.dtype)

    def _norm(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        m = self.module  # eval mode with running statistics (training-mode BN: executor.rows._BNStrip)
        return self.finish(F.batch_norm(bands[0].rows(lo, hi), m.running_mean, m.running_var, m.weight, m.bias,
                                         False, 0.0, m.eps))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """A norm node's normalised rows through its fused tail (activation), if it has one."""
        for t in self.tail:
            y = t(y)
        return y

    def __call__(self, bands: List[Band], lo: int, hi: int) -> torch.Tensor:
        return self.fn(bands, lo, hi)

    def empty(self, bands: List[Band]) -> torch.Tensor:
        """This node's output with no rows: (N, C, 0, W) as its full map has, nothing computed.

        A strip may compute no row of a node and still run a consumer of it: an output row whose
        window reads only border padding (e.g. a dilated conv on a 1-row map) needs no input row,
        but the padded input it is computed from has the input's channels and width.  Windowed
        ops get their output width from their W geometry; the others are evaluated on zero rows
        (a normalisation keeps its input's shape)."""
        x = bands[0].t
        if self.info.kind == _ops.SPATIAL:
            c = x.shape[1]
            if isinstance(self.module, (nn.Conv2d, nn.ConvTranspose2d)):
                c = self.module.out_channels
            elif self.info.op == "pixel_shuffle":
                c = c // self.factor ** 2
            elif self.info.op == "pixel_unshuffle":
                c = c * self.factor ** 2
            return x.new_empty((x.shape[0], c, 0, self.wgeom.out_size(x.shape[3])))
        if self.info.kind == _ops.NORM:
            return x[:, :, :0]
        return self.fn(bands, 0, 0)


def build_strip_op(fxnode: fx.Node, graph_node, module: Optional[nn.Module], in_heights: List[int]) -> StripOp:
    """StripOp for a captured node, or RowSegmentError naming the node and op if it cannot run in rows."""
    if not graph_node.rowwise:
        raise RowSegmentError(f"node {graph_node.name!r} (op {graph_node.op}, {graph_node.target}) cannot run "
                              f"in a row segment: {graph_node.reason or 'not row-local'}; {ROWS_FIX}")
    if fxnode.op == "call_module":
        info = _ops.classify_module(module)
    else:
        info = _ops.classify_function(fxnode.target, fxnode.args, fxnode.kwargs)
    info = _ops.OpInfo(info.op, info.kind, graph_node.geom or info.geom, True)
    return StripOp(fxnode, info, module, in_heights, graph_node.shape[3] if graph_node.is_map else None)
