"""Row geometry: the one implementation of "which input rows does an output row band need".

Everything in lrcnn that reasons about rows (capture, cost model, planner, executor) goes through
this module, so the planner and the executor can never disagree about a halo.

Conventions
-----------
* Rows are half-open ranges ``[lo, hi)`` in *full-map* coordinates of the node they belong to.
* Every op is described along H by a *row geometry*, derived from the op's parameters (never by
  running it), that answers the same questions whatever the op: its output height for an input
  height (``out_size``), which input rows an output band needs (``needs``: real rows and border
  filler; ``window``: the unclipped interior rule), how many output rows from the top are
  computable from the first input rows (``computable``), and how many input rows one output row
  spans (``ratio``, a fraction: below 1 for up-sampling).  Three kinds exist:

  - :class:`HGeom`, windowed ops (conv, pooling, ``PixelUnshuffle``; kernel, stride, padding,
    dilation, ceil_mode, pad value): output rows ``[a, b)`` need input rows
    ``[a*s - p, (b-1)*s - p + d*(k-1) + 1)``; the part outside ``[0, H)`` is padding, which exists
    only at the true top and bottom of the map.  Pointwise ops and joins (add, concat) have the
    identity geometry.
  - :class:`TransposeGeom`, transposed convolution (``ConvTranspose2d``, ``PixelShuffle``): input
    row ``i`` feeds output rows ``i*s - p + j*d`` (``j < k``); an output band needs the input rows
    that feed it, and a band is computed from them and cropped to the rows they complete.
  - :class:`ResizeGeom`, interpolation (``F.interpolate`` / ``nn.Upsample``: nearest,
    nearest-exact, bilinear with either ``align_corners``; by scale factor or size, any ratio):
    output row ``o`` reads the input rows PyTorch's own index formula names (the float32 /
    float64 arithmetic of its kernels reproduced, :func:`resize_taps`).
* Strips are defined on the *output* rows of a segment and propagated backwards through the
  segment's DAG (union over consumers), so every row any strip computes is a row of the full map,
  on the full map's sampling grid: aligned with every layer's cumulative stride by construction.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lrcnn.errors import UsageError

Range = Tuple[int, int]


@dataclass(frozen=True)
class InputRows:
    """Rows of one input that an output row band needs."""

    lo: int  # first real input row (clipped to the map)
    hi: int  # one past the last real input row
    pad_top: int  # padding rows above lo (only at the true top of the map)
    pad_bottom: int  # padding rows below hi (only at the true bottom)

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @classmethod
    def clipped(cls, lo: int, hi: int, in_h: int) -> "InputRows":
        """The rows ``[lo, hi)`` inside a map of ``in_h`` rows, no filler: the needs of ops that
        read no padding (transposed convolutions, interpolations)."""
        lo, hi = min(max(lo, 0), in_h), min(max(hi, 0), in_h)
        return cls(lo, max(lo, hi), 0, 0)


@dataclass(frozen=True)
class HGeom:
    """Geometry of a windowed op along the H axis (along W, :func:`lrcnn.models.ops.window_geom`
    gives the same description, whose ``out_size`` is then the output width)."""

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    pad_value: float = 0.0  # value the op pads with: 0 (conv, avg-pool) or -inf (max-pool)

    @property
    def span(self) -> int:
        """Rows covered by one window: d*(k-1)+1."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def is_identity(self) -> bool:
        return self.kernel == 1 and self.stride == 1 and self.padding == 0

    def out_size(self, in_h: int) -> int:
        """Output rows for ``in_h`` input rows (PyTorch's conv/pool formula, ceil_mode included)."""
        eff = in_h + 2 * self.padding - self.span
        if self.ceil_mode:
            out = -(-eff // self.stride) + 1
            # PyTorch: the last window must start inside the input or the top padding.
            if out > 0 and (out - 1) * self.stride >= in_h + self.padding:
                out -= 1
        else:
            out = eff // self.stride + 1 if eff >= 0 else 0
        return max(out, 0)

    def window(self, a: int, b: int, in_h: Optional[int] = None) -> Range:
        """Unclipped input rows read by output rows [a, b) (may extend past the map: padding)."""
        return a * self.stride - self.padding, (b - 1) * self.stride - self.padding + self.span

    def ratio(self, in_h: int = 0, out_h: int = 0) -> Fraction:
        """Input rows per output row: the stride."""
        return Fraction(self.stride)

    def needs(self, a: int, b: int, in_h: int) -> InputRows:
        """Input rows (and border filler) output rows ``[a, b)`` need (:func:`input_rows`)."""
        if a >= b:
            return InputRows(0, 0, 0, 0)
        lo_u, hi_u = self.window(a, b)
        s, d = self.stride, self.dilation
        first, last = None, None
        for j in range(self.kernel):
            off = j * d - self.padding  # input row of tap j for output row r: r*s + off
            r0 = max(a, -(off // s))  # first output row whose tap j is at or below row 0
            if r0 < b and r0 * s + off < in_h:
                first = r0 * s + off if first is None else min(first, r0 * s + off)
            r1 = min(b - 1, (in_h - 1 - off) // s)  # last output row whose tap j is inside the map
            if r1 >= a and r1 * s + off >= 0:
                last = r1 * s + off if last is None else max(last, r1 * s + off)
        if first is None or last is None:  # only padding (and skipped rows) is read: all filler
            lo = hi = min(max(lo_u, 0), in_h)
            # (a window wholly above or below the map, e.g. padding > span, lies on one side of lo)
            top = min(max(lo - lo_u, 0), hi_u - lo_u)
            return InputRows(lo, hi, top, hi_u - lo_u - top)
        return InputRows(first, last + 1, first - lo_u, hi_u - last - 1)

    def computable(self, avail: int, in_h: int, out_h: int) -> int:
        """Output rows computable from the top when input rows ``[0, avail)`` exist."""
        if avail >= in_h:
            return out_h
        if avail <= 0:
            return 0
        # row r reads input rows up to r*s - p + span (exclusive)
        r = (avail + self.padding - self.span) // self.stride + 1
        return max(0, min(out_h, r))


IDENTITY = HGeom()


@dataclass(frozen=True)
class TransposeGeom:
    """Geometry of a transposed convolution along H (``ConvTranspose2d``; ``PixelShuffle(r)`` is
    kernel r, stride r): input row ``i`` feeds output rows ``i*s - p + j*d`` for taps ``j < k``;
    ``output_padding`` adds rows at the bottom (fed by the same rule, bias only beyond it).

    Output rows ``[a, b)`` need the input rows that can feed them,
    ``[ceil((a + p - d*(k-1)) / s), floor((b - 1 + p) / s) + 1)`` clipped to the map (with
    dilation some of those feed none of the band: reading them is harmless, a band is computed
    from its input rows and cropped to the output rows every feeding row of which it holds).
    There is no padding to add: rows beyond the map feed nothing."""

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    output_padding: int = 0

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, in_h: int) -> int:
        """PyTorch's output size: ``(in - 1)*s - 2p + d*(k-1) + output_padding + 1``."""
        if in_h <= 0:
            return 0
        return max(0, (in_h - 1) * self.stride - 2 * self.padding + self.span + self.output_padding)

    def window(self, a: int, b: int, in_h: Optional[int] = None) -> Range:
        """Unclipped input rows that can feed output rows [a, b)."""
        return -((self.span - 1 - a - self.padding) // self.stride), (b - 1 + self.padding) // self.stride + 1

    def ratio(self, in_h: int = 0, out_h: int = 0) -> Fraction:
        return Fraction(1, self.stride)

    def needs(self, a: int, b: int, in_h: int) -> InputRows:
        if a >= b:
            return InputRows(0, 0, 0, 0)
        return InputRows.clipped(*self.window(a, b), in_h)

    def computable(self, avail: int, in_h: int, out_h: int) -> int:
        if avail >= in_h:
            return out_h
        if avail <= 0:
            return 0
        # row o needs input rows up to floor((o + p) / s): all of them below avail
        return max(0, min(out_h, avail * self.stride - self.padding))

    def first_row(self, a: int) -> int:
        """Output row (full-map coordinates) of row 0 of the band computed from input rows from ``a``."""
        return a * self.stride - self.padding


RESIZE_MODES = ("nearest", "nearest-exact", "bilinear")


def _f32(v: float) -> float:
    """``v`` rounded to float32 (IEEE round to nearest), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


@dataclass(frozen=True)
class ResizeGeom:
    """Geometry of an interpolation along H (``F.interpolate``, ``nn.Upsample``), from its
    parameters: ``mode`` (nearest, nearest-exact, bilinear), ``align_corners`` (bilinear),
    ``size`` (the output rows, when given) or ``factor`` (the scale factor the output size follows:
    ``floor(in * factor)``), and ``scale``, the scale factor PyTorch's kernel receives (the factor;
    None when a size is given or ``recompute_scale_factor`` is set: the kernel then uses
    ``in / out``).  ``dynamic``: the size was read from another tensor at run time (the captured
    size holds at the captured height only).

    Output row ``o`` reads the input rows of PyTorch's index formula (:func:`resize_taps`); the
    rows an output band needs are the hull of its rows' taps over every variant of the kernels'
    arithmetic (float32 / float64, CPU / CUDA), so a band holds what any of them reads."""

    mode: str = "nearest"
    align_corners: bool = False
    size: Optional[int] = None
    factor: Optional[float] = None
    scale: Optional[float] = None
    dynamic: bool = False

    def out_size(self, in_h: int) -> int:
        if self.size is not None:
            return int(self.size)
        return max(0, int(in_h * self.factor))  # (PyTorch: the double product, truncated)

    def variants(self) -> Tuple[str, ...]:
        """The kernels' arithmetic variants whose taps may differ (:func:`resize_taps`)."""
        if self.mode != "bilinear":
            return ("any",)
        kinds = ("cpu64", "cuda64", "f32")
        return kinds if self.align_corners else kinds + tuple(k + "-nofma" for k in kinds)

    def ratio(self, in_h: int = 0, out_h: int = 0) -> Fraction:
        if self.factor is not None:
            return 1 / Fraction(self.factor).limit_denominator(1 << 20)
        out_h = out_h or self.out_size(in_h)
        return Fraction(in_h, out_h) if out_h else Fraction(1)

    def _span(self, o: int, in_h: int, out_h: int) -> Range:
        """Input rows (hull over the variants) output row ``o`` reads; outside the map, the
        interior rule continued (unclipped: receptive fields of interior rows)."""
        if 0 <= o < out_h:
            lo = hi = None
            for v in self.variants():
                i0, i1, _ = resize_taps(self, o, in_h, out_h, v)
                lo = i0 if lo is None else min(lo, i0)
                hi = i1 if hi is None else max(hi, i1)
            return lo, hi + 1
        scale = self._scale64(in_h, out_h)
        if self.mode == "bilinear":
            real = scale * o if self.align_corners else scale * (o + 0.5) - 0.5
            i0 = math.floor(real)
            return i0, i0 + 2
        i0 = math.floor(scale * (o + 0.5 if self.mode == "nearest-exact" else o))
        return i0, i0 + 1

    def _scale64(self, in_h: int, out_h: int) -> float:
        if self.mode == "bilinear" and self.align_corners:
            return (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
        return 1.0 / self.scale if self.scale else in_h / out_h

    def window(self, a: int, b: int, in_h: Optional[int] = None) -> Range:
        out_h = self.out_size(in_h)
        return self._span(a, in_h, out_h)[0], self._span(b - 1, in_h, out_h)[1]

    def needs(self, a: int, b: int, in_h: int) -> InputRows:
        if a >= b:
            return InputRows(0, 0, 0, 0)
        out_h = self.out_size(in_h)
        return InputRows.clipped(self._span(max(a, 0), in_h, out_h)[0], self._span(min(b, out_h) - 1, in_h, out_h)[1],
                                 in_h)

    def computable(self, avail: int, in_h: int, out_h: int) -> int:
        if avail >= in_h:
            return out_h
        if avail <= 0:
            return 0
        lo, hi = 0, out_h  # the first row reading row ``avail`` or below it (taps are monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._span(mid, in_h, out_h)[1] > avail:
                hi = mid
            else:
                lo = mid + 1
        return lo


@functools.lru_cache(maxsize=1 << 16)
def resize_taps(geom: ResizeGeom, o: int, in_h: int, out_h: int, variant: str) -> Tuple[int, int, float]:
    """``(i0, i1, lambda1)`` of output row ``o`` of an interpolation along one axis: it is
    ``(1 - lambda1) * x[i0] + lambda1 * x[i1]`` (nearest modes: ``i0 == i1``, ``lambda1 == 0``).

    PyTorch's index formulas (``aten/src/ATen/native/UpSample.h``), their arithmetic reproduced:
    nearest ``min(floor(f32(o) * s), in - 1)`` and nearest-exact ``min(floor((o + 0.5) * s), in - 1)``
    with ``s = f32(1 / scale)`` or ``f32(in) / f32(out)``, in float32 on every device and dtype;
    bilinear's source index ``s*o`` (align_corners) or ``max(s*(o + 0.5) - 0.5, 0)`` in the
    kernel's accumulation type, whose floor the CPU kernel takes in float32 (``floorf``) and the
    CUDA kernel does not.  ``variant``: ``cpu64`` (float64 on a CPU), ``cuda64`` (float64 on
    CUDA), ``f32`` (float32, and the half types, which accumulate in float32); each with the
    compilers' fused multiply-add for ``s*(o + 0.5) - 0.5`` (what PyTorch's builds compute), or
    without it with the suffix ``-nofma`` (the geometry reads the rows of both)."""
    if geom.mode != "bilinear":
        if out_h == in_h and geom.mode == "nearest":
            return o, o, 0.0
        s = _f32(1.0 / geom.scale) if geom.scale else _f32(_f32(float(in_h)) / _f32(float(out_h)))
        if geom.mode == "nearest":
            i = math.floor(_f32(float(o) * s))
        else:
            i = math.floor(_f32((o + 0.5) * s))
        i = min(i, in_h - 1)
        return i, i, 0.0
    if out_h == in_h:
        return o, o, 0.0
    kind, _, nofma = variant.partition("-")
    if kind == "f32":
        if geom.align_corners:
            s = _f32(_f32(float(in_h - 1)) / _f32(float(out_h - 1))) if out_h > 1 else 0.0
            real = _f32(s * o)
        else:
            s = _f32(1.0 / geom.scale) if geom.scale else _f32(_f32(float(in_h)) / _f32(float(out_h)))
            # (s * (o + 0.5) and its difference with 0.5 are exact in float64: one rounding is the fma)
            real = _f32(_f32(s * (o + 0.5)) - 0.5) if nofma else _f32(s * (o + 0.5) - 0.5)
            real = max(real, 0.0)
        i0 = min(math.floor(real), in_h - 1)
        lam = _f32(min(max(_f32(real - i0), 0.0), 1.0))
    else:
        s = geom._scale64(in_h, out_h)
        if geom.align_corners:
            real = s * o
        elif nofma:
            real = max(s * (o + 0.5) - 0.5, 0.0)
        else:
            real = max(float(Fraction(s) * Fraction(o + 0.5) - Fraction(1, 2)), 0.0)
        i0 = min(math.floor(_f32(real) if kind == "cpu64" else real), in_h - 1)
        lam = min(max(real - i0, 0.0), 1.0)
    return i0, i0 + (1 if i0 < in_h - 1 else 0), lam


RowGeom = Union[HGeom, TransposeGeom, ResizeGeom]


def input_rows(geom: RowGeom, a: int, b: int, in_h: int) -> InputRows:
    """Input rows (and border filler) that output rows ``[a, b)`` of a layer need.

    ``lo``/``hi`` is the smallest range of real input rows the windows read (with dilation a
    window skips rows, so a clipped window may start or end further in); ``pad_top`` and
    ``pad_bottom`` are the filler rows that complete the windows at the true borders: padding, and
    any skipped real rows between the padding and ``lo``/``hi``, which the kernel never reads:
    ``pad_top + rows + pad_bottom`` is the window's length, every term >= 0 (0 for transposed
    convolutions and interpolations, which read no padding).
    ``in_h`` is the height of the input map.  An empty band (``a >= b``) needs nothing.
    """
    return geom.needs(a, b, in_h)


def union(r1: Optional[Range], r2: Optional[Range]) -> Optional[Range]:
    """Hull of two row ranges (None or empty ranges are ignored)."""
    if r1 is None or r1[0] >= r1[1]:
        return r2 if (r2 is not None and r2[0] < r2[1]) else r1
    if r2 is None or r2[0] >= r2[1]:
        return r1
    return min(r1[0], r2[0]), max(r1[1], r2[1])


# ----------------------------------------------------------------------------------------------
# Subgraph composition
# ----------------------------------------------------------------------------------------------

class RowGraph:
    """The minimal view of a DAG that row geometry needs.

    ``order``: node names in topological order; ``inputs[n]``: the tensor inputs of n (node names);
    ``geom[n]``: the HGeom of n (the same for all its inputs); ``height[n]``: rows of n's output.
    :class:`lrcnn.models.capture.LayerGraph` provides these; tests build them by hand.
    """

    def __init__(self, order: Sequence[str], inputs: Mapping[str, Sequence[str]],
                 geom: Mapping[str, HGeom], height: Mapping[str, int]):
        self.order = list(order)
        self.inputs = {n: list(inputs.get(n, ())) for n in self.order}
        self.geom = dict(geom)
        self.height = dict(height)


def propagate_rows(g: RowGraph, nodes: Sequence[str], out_node: str, out_range: Range,
                   clip: bool = True) -> Dict[str, Range]:
    """Rows every node of a subgraph must produce so that ``out_node`` can produce ``out_range``.

    ``nodes`` is the subgraph in topological order (it may include its external input(s), which
    then receive the rows they must supply).  The rows a node must produce are the hull of what
    its consumers need.  With ``clip=False`` ranges are not clipped to the maps (receptive field
    of an interior band).
    """
    need: Dict[str, Optional[Range]] = {out_node: tuple(out_range)}
    members = set(nodes)
    for n in reversed(list(nodes)):
        r = need.get(n)
        if r is None or r[0] >= r[1]:
            continue
        geom = g.geom.get(n, IDENTITY)
        for u in g.inputs.get(n, ()):
            if u not in members:
                continue
            if clip:
                ir = input_rows(geom, r[0], r[1], g.height[u])
                rr = (ir.lo, ir.hi)
            else:
                rr = geom.window(r[0], r[1], g.height.get(u))
            need[u] = union(need.get(u), rr)
    return {n: r for n, r in need.items() if r is not None}


def cumulative_strides(g: RowGraph) -> Dict[str, Fraction]:
    """Input rows of the graph's first node per row of each node (max over paths): the product of
    the ratios (:meth:`HGeom.ratio`: strides, and below 1 for up-sampling) from the first node,
    a fraction (an ``int`` compares equal to it where it is whole)."""
    cs: Dict[str, Fraction] = {}
    for n in g.order:
        ins = [u for u in g.inputs.get(n, ()) if u in cs]
        base = max((cs[u] for u in ins), default=Fraction(1))
        h_in = g.height.get(ins[0], 0) if ins else 0
        cs[n] = base * g.geom.get(n, IDENTITY).ratio(h_in, g.height.get(n, 0))
    return cs


def receptive_fields(g: RowGraph, source: Optional[str] = None) -> Dict[str, int]:
    """Rows of ``source`` (default: the first node) that one interior output row of each node sees."""
    src = source or g.order[0]
    rf: Dict[str, int] = {}
    idx = {n: i for i, n in enumerate(g.order)}
    for n in g.order:
        if n == src:
            rf[n] = 1
            continue
        sub = g.order[idx[src]: idx[n] + 1]
        need = propagate_rows(g, sub, n, (0, 1), clip=False)
        r = need.get(src)
        rf[n] = (r[1] - r[0]) if r else 0
    return rf


def propagate_heights(g: RowGraph, input_heights: Mapping[str, int]) -> Dict[str, int]:
    """Heights of every node for given heights of the source node(s) (no tensors involved)."""
    h = dict(input_heights)
    for n in g.order:
        if n in h:
            continue
        ins = [u for u in g.inputs.get(n, ()) if u in h]
        if not ins:
            continue
        geom = g.geom.get(n, IDENTITY)
        h[n] = geom.out_size(h[ins[0]])
    return h


# ----------------------------------------------------------------------------------------------
# Strips
# ----------------------------------------------------------------------------------------------

def segment_ancestors(names: Sequence[str], inputs: Mapping[str, Sequence[str]]) -> Dict[str, set]:
    """Ancestors of every node of a segment within it (``names`` in topological order; inputs from
    outside the segment are ignored)."""
    anc: Dict[str, set] = {}
    for n in names:
        a: set = set()
        for u in inputs[n]:
            if u in anc:
                a |= anc[u] | {u}
        anc[n] = a
    return anc


def bn_levels(bns: Sequence[str], anc: Mapping[str, set]) -> Tuple[List[List[str]], List[List[str]]]:
    """Batch-statistics BNs of a row segment (topological order) grouped into forward levels (a
    BN's statistics need those of every BN upstream of it: level = 1 + deepest upstream BN) and
    backward levels (its gradient constants need those of every BN downstream).  One statistics
    sweep / one gradient sweep per level: the longest chain of BNs on a path through the segment."""
    fl: Dict[str, int] = {}
    for b in bns:
        fl[b] = 1 + max((fl[a] for a in bns if a in anc[b]), default=-1)
    bl: Dict[str, int] = {}
    for b in reversed(bns):
        bl[b] = 1 + max((bl[d] for d in bns if b in anc[d]), default=-1)
    fwd = [[b for b in bns if fl[b] == k] for k in range(1 + max(fl.values(), default=-1))]
    bwd = [[b for b in bns if bl[b] == k] for k in range(1 + max(bl.values(), default=-1))]
    return fwd, bwd


def bn_cover(names: Sequence[str], bns: Sequence[str], anc: Mapping[str, set]) -> List[str]:
    """Nodes every row of which must be computed (in ``names`` order): the BNs and their ancestors."""
    c = set(bns).union(*(anc[b] for b in bns))
    return [n for n in names if n in c]


def even_bounds(out_rows: int, strips: int) -> List[int]:
    """Split ``out_rows`` output rows into ``strips`` contiguous bands as evenly as possible."""
    if out_rows < 1:
        raise UsageError("a segment with no output rows cannot be split into strips; plan it as store or checkpoint")
    if not 1 <= strips <= out_rows:
        raise UsageError(f"strip count {strips} out of range: 1..{out_rows} for {out_rows} output rows; "
                         f"give a count in that range")
    return [(i * out_rows) // strips for i in range(strips)] + [out_rows]


def default_bounds(g: RowGraph, source: str, out: str, policy: str, strips: int) -> List[int]:
    """Even strip bounds for a segment: on the output rows (OverL) or the input rows (2PS).

    2PS bounds are placed on multiples of the segment's stride (:func:`segment_stride`) when the
    count allows it, so every strip finishes whole rows of its most down-sampled map.
    """
    if policy == "overl":
        return even_bounds(g.height[out], strips)
    h = g.height[source]
    stride = segment_stride(g, source, out)
    if 1 <= strips <= h // stride:
        units = h // stride
        b = [stride * ((k * units) // strips) for k in range(strips)] + [h]
        return b
    return even_bounds(h, strips)


def segment_stride(g: RowGraph, source: str, out: str) -> int:
    """Source rows per row of the segment's most down-sampled node (``source`` excluded, ``out``
    included, ``g.order`` between them), relative to the source, whole rows (at least 1): the
    grid 2PS strip bounds keep to (an encoder-decoder's bottleneck, not its output)."""
    cs = cumulative_strides(g)
    i, j = g.order.index(source), g.order.index(out)
    top = max((cs[n] / cs[source] for n in g.order[i + 1: j + 1]), default=Fraction(1))
    return max(1, math.floor(top))


def max_strips(g: RowGraph, source: str, out: str, policy: str) -> int:
    """Largest strip count of a segment: output rows (OverL) or input rows (2PS)."""
    return g.height[source] if policy == "2ps" else g.height[out]


def check_bounds(bounds: Sequence[int], out_rows: int) -> List[int]:
    b = [int(x) for x in bounds]
    if len(b) < 2 or b[0] != 0 or b[-1] != out_rows or any(x >= y for x, y in zip(b, b[1:])):
        raise UsageError(f"strip bounds {list(bounds)} must increase strictly from 0 to {out_rows}")
    return b


@dataclass
class StripRows:
    """What one strip does at one node (all ranges in the node's full-map rows)."""

    lo: int  # first row the strip needs at this node
    hi: int  # one past the last row needed
    start: int  # first row this strip computes (2PS: rows below `start` are carried in)

    @property
    def computed(self) -> int:
        return max(0, self.hi - self.start)

    @property
    def carried(self) -> Range:
        return (self.lo, max(self.lo, min(self.start, self.hi)))


def rows_computable(geom: RowGeom, avail: int, in_h: int, out_h: int) -> int:
    """Output rows of a layer computable (from the top) when input rows ``[0, avail)`` exist."""
    return geom.computable(avail, in_h, out_h)


@dataclass
class StripSchedule:
    """Per strip, per node: needed rows, computed rows and carried rows.

    ``source`` is the segment's input node (rows are read from the stored input, never carried);
    ``policy`` is ``"overl"`` (every strip computes all it needs, halo included, from the input)
    or ``"2ps"`` (each row of each node is computed exactly once; rows an earlier strip computed
    and a later one still needs are carried).  ``out[i]`` are the output rows strip i produces.
    """

    source: str
    nodes: List[str]  # the segment's nodes, topological order, source excluded
    bounds: List[int]
    policy: str
    rows: List[Dict[str, StripRows]]
    out: List[Range] = None

    @property
    def strips(self) -> int:
        return len(self.bounds) - 1

    def computed_rows(self, node: str) -> int:
        """Rows of ``node`` computed by one forward sweep over all strips."""
        return sum(s[node].computed for s in self.rows if node in s)

    def carry_rows(self, node: str) -> int:
        """Rows of ``node`` carried between strips over a sweep (2PS boundary state)."""
        return sum(s[node].carried[1] - s[node].carried[0] for s in self.rows if node in s)

    def owned(self, node: str) -> List[Range]:
        """Per strip, the rows of ``node`` it *owns*: the rows it computes that no earlier strip
        computed (OverL strips overlap in their halos; 2PS strips own what they compute).  Owned
        ranges are disjoint; they cover every row the sweep computes once."""
        out: List[Range] = []
        done = 0
        for s in self.rows:
            r = s.get(node)
            if r is None or r.hi <= r.start:
                out.append((done, done))
                continue
            lo = max(r.start, done)
            out.append((lo, max(lo, r.hi)))
            done = max(done, r.hi)
        return out

    def uncovered(self, node: str, height: int) -> Optional[Range]:
        """First run of rows of ``node`` (of ``height``) that no strip computes, or None."""
        covered = 0
        for lo, hi in self.owned(node):
            if hi > lo:
                if lo > covered:
                    return (covered, lo)
                covered = hi
        return (covered, height) if covered < height else None


def _cover(ranges: List[Optional[Range]], height: int) -> List[Optional[Range]]:
    """Widen per-strip row ranges (in strip order) so together they cover ``[0, height)``:
    a gap before a strip's range goes to that strip, the tail to the last strip with rows."""
    out = list(ranges)
    done, last = 0, None
    for i, r in enumerate(out):
        if r is None or r[0] >= r[1]:
            continue
        if r[0] > done:
            r = (done, r[1])
        out[i] = r
        done, last = max(done, r[1]), i
    if last is None:
        if height > 0:
            out[-1] = (0, height)
    elif done < height:
        out[last] = (out[last][0], height)
    return out


def full_map_schedule(g: RowGraph, source: str, nodes: Sequence[str], cover: Sequence[str] = ()) -> StripSchedule:
    """One OverL strip over every row of the segment (at ``g.height``): the schedule of a no-grad
    pass that needs whole maps (training-mode BN statistics found in one pass)."""
    return strip_schedule(g, source, nodes, [0, g.height[nodes[-1]]], "overl", cover)


def strip_schedule(g: RowGraph, source: str, nodes: Sequence[str], bounds: Sequence[int],
                   policy: str, cover: Sequence[str] = ()) -> StripSchedule:
    """Build the strip schedule of a row segment.

    ``nodes``: the segment's nodes in topological order (not including ``source``); the last one is
    the segment output.  ``bounds``: strip bounds on the output rows.

    OverL: ``bounds`` split the segment's *output* rows; strip i computes, at every node, exactly
    the rows that output rows ``[bounds[i], bounds[i+1])`` depend on.

    2PS: ``bounds`` split the segment's *input* rows; strip i reads input rows up to
    ``bounds[i+1]`` and every node then advances as far as its inputs allow (greedy, top to
    bottom), so a node carries into the next strip only the few rows its consumers' next windows
    still need (about kernel - stride rows per layer), whatever the depth of the segment.  Output
    rows come out with a lag of about half the receptive field; ``out[i]`` says which.

    ``cover``: nodes whose every row must be computed by some strip even if the segment output
    never reads it (inputs of training-mode BatchNorm, whose statistics and input gradient span
    the whole map, and everything upstream of them).  2PS computes every row anyway; OverL widens
    the strips at those nodes (gaps go to the strip below them, the tail to the last strip) and
    propagates the widened ranges upstream.
    """
    if policy not in ("overl", "2ps"):
        raise UsageError(f"unknown row policy {policy!r}: use '2ps' or 'overl'")
    nodes = list(nodes)
    out = nodes[-1]
    bounds = check_bounds(bounds, g.height[source] if policy == "2ps" else g.height[out])
    sub = [source] + nodes
    rows: List[Dict[str, StripRows]] = []
    outs: List[Range] = []
    if policy == "overl":
        if cover:
            needs = _overl_covered(g, sub, out, bounds, set(cover))
        else:
            needs = [propagate_rows(g, sub, out, (a, b)) for a, b in zip(bounds, bounds[1:])]
        for need, a, b in zip(needs, bounds, bounds[1:]):
            # a node may need no rows at all (an output row made only of padding)
            rows.append({n: StripRows(*need.get(n, (0, 0)), need.get(n, (0, 0))[0]) for n in sub})
            outs.append((a, b))
        return StripSchedule(source, nodes, bounds, policy, rows, outs)

    consumers: Dict[str, List[str]] = {n: [] for n in sub}
    for n in nodes:
        for u in g.inputs.get(n, ()):
            if u in consumers:
                consumers[u].append(n)
    done: Dict[str, int] = {n: 0 for n in sub}  # rows computed so far (source: rows read)
    for k in range(len(bounds) - 1):
        src_hi = bounds[k + 1]
        hi: Dict[str, int] = {source: max(src_hi, done[source])}
        for n in nodes:
            geom = g.geom.get(n, IDENTITY)
            hi[n] = max(done[n], min(rows_computable(geom, hi[u], g.height[u], g.height[n])
                                     for u in g.inputs[n]))
        lo: Dict[str, int] = {}
        for n in reversed(sub):
            start = done[n] if n != source else hi[n]
            first = start
            for c in consumers[n]:
                # rows c reads now or later: from where the window of its next row starts (not
                # the first row it reads: with dilation that is not monotone in the row)
                if done[c] < g.height[c]:
                    w0 = g.geom.get(c, IDENTITY).window(done[c], done[c] + 1, g.height[n])[0]
                    first = min(first, max(0, w0))
            lo[n] = first
        strip = {}
        for n in sub:
            start = done[n] if n != source else lo[n]
            strip[n] = StripRows(lo[n], hi[n], start)
        rows.append(strip)
        outs.append((done[out], hi[out]))
        done = hi
    if done[out] != g.height[out]:
        raise RuntimeError(f"internal: 2PS schedule ends at row {done[out]} of {g.height[out]}")
    return StripSchedule(source, nodes, bounds, policy, rows, outs)


def _overl_covered(g: RowGraph, sub: List[str], out: str, bounds: List[int], cover: set) -> List[Dict[str, Range]]:
    """OverL needs per strip (as ``propagate_rows``), widened so nodes in ``cover`` are computed whole."""
    k = len(bounds) - 1
    needs: List[Dict[str, Optional[Range]]] = [{out: (a, b)} for a, b in zip(bounds, bounds[1:])]
    members = set(sub)
    for n in reversed(sub):
        if n in cover:
            for i, r in enumerate(_cover([needs[i].get(n) for i in range(k)], g.height[n])):
                needs[i][n] = r
        geom = g.geom.get(n, IDENTITY)
        for i in range(k):
            r = needs[i].get(n)
            if r is None or r[0] >= r[1]:
                continue
            for u in g.inputs.get(n, ()):
                if u in members:
                    ir = input_rows(geom, r[0], r[1], g.height[u])
                    needs[i][u] = union(needs[i].get(u), (ir.lo, ir.hi))
    return [{n: r for n, r in need.items() if r is not None} for need in needs]
