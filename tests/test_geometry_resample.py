"""Row geometry of the ops of dense (encoder-decoder) networks against brute force (issue 27, 1):
interpolation (nearest, nearest-exact, bilinear with either align_corners, by scale factor or size,
non-integer ratios, up and down), transposed convolutions (any kernel, stride, padding,
output_padding, dilation, groups), PixelShuffle / PixelUnshuffle.

The geometry is derived from the ops' parameters; here it is checked on real float64 tensors:

* output heights equal torch's;
* soundness: input rows outside ``needs(a, b)`` replaced by huge random values leave output rows
  ``[a, b)`` bit-identical;
* minimality: the hull of the rows whose perturbation moves the band equals ``needs`` (nearest
  modes, transposed convolutions without dilation, pixel (un)shuffle); bilinear may read one more
  row at either end with weight 0 (PyTorch's kernels read it too), a dilated transposed
  convolution rows between its taps;
* interpolation taps: the weights ``1 - l`` of ``x[i0]`` and ``l`` of ``x[i1]`` from
  :func:`resize_taps` are torch's bit for bit (float64 and float32, each with its kernel's
  arithmetic);
* ``computable(avail)`` is the largest count of leading output rows whose needs lie in ``[0, avail)``.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrcnn.models import ops
from lrcnn.models.geometry import (HGeom, ResizeGeom, RowGraph, TransposeGeom, cumulative_strides, input_rows,
                                   propagate_heights, propagate_rows, receptive_fields, resize_taps,
                                   segment_stride)

pytestmark = pytest.mark.usefixtures("one_thread")

BIG = 1e12
W = 3


def _moved_rows(layer, x: torch.Tensor, a: int, b: int):
    """Brute force: the hull of input rows whose perturbation moves output rows [a, b), or None."""
    h = x.shape[2]
    xs = x.repeat(h + 1, 1, 1, 1)
    for r in range(h):
        xs[1 + r, :, r] += BIG
    ys = layer(xs)[:, :, a:b]
    moved = (ys[1:] - ys[:1]).abs().amax(dim=(1, 2, 3))
    assert bool(((moved == 0) | (moved > 1e3)).all()), moved  # sharp: moved by the perturbation or not at all
    hit = [r for r in range(h) if moved[r] > 0]
    return (min(hit), max(hit) + 1) if hit else None


def _bands(h: int, gen: torch.Generator, n: int = 6):
    """Every one-row band of a small map, the whole map, and a few random bands."""
    out = [(a, a + 1) for a in range(h)] + [(0, h)]
    for _ in range(n):
        a = int(torch.randint(0, h, (1,), generator=gen))
        b = int(torch.randint(a + 1, h + 1, (1,), generator=gen))
        out.append((a, b))
    return out


def check_geometry(layer, geom, in_h: int, cin: int, gen: torch.Generator, slack: int = 0):
    """Heights, soundness, minimality (up to ``slack`` rows at either end) and computable()."""
    x = torch.randn(1, cin, in_h, W, generator=gen, dtype=torch.float64)
    y = layer(x)
    out_h = y.shape[2]
    assert geom.out_size(in_h) == out_h, (geom, in_h)
    for a, b in _bands(out_h, gen):
        ir = input_rows(geom, a, b, in_h)
        assert ir.pad_top == ir.pad_bottom == 0 and 0 <= ir.lo <= ir.hi <= in_h
        outside = [r for r in range(in_h) if not ir.lo <= r < ir.hi]
        if outside:
            xp = x.clone()
            xp[:, :, outside] = torch.randn(xp[:, :, outside].shape, generator=gen, dtype=torch.float64) * 1e9
            assert torch.equal(layer(xp)[:, :, a:b], y[:, :, a:b]), (geom, in_h, (a, b), (ir.lo, ir.hi))
        brute = _moved_rows(layer, x, a, b)
        if brute is None:  # (rows fed by nothing: a transposed conv's bias-only rows)
            continue
        assert ir.lo <= brute[0] and brute[1] <= ir.hi, (geom, in_h, (a, b), brute, (ir.lo, ir.hi))
        assert brute[0] - ir.lo <= slack and ir.hi - brute[1] <= slack, (geom, in_h, (a, b), brute, (ir.lo, ir.hi))
    # computable(): the leading rows whose inputs lie in [0, avail), as needs() says
    for avail in range(in_h + 1):
        c = geom.computable(avail, in_h, out_h)
        assert 0 <= c <= out_h
        assert c == 0 or input_rows(geom, 0, c, in_h).hi <= avail, (geom, in_h, avail, c)
        assert c == out_h or input_rows(geom, c, c + 1, in_h).hi > avail, (geom, in_h, avail, c)
    return out_h


# -- interpolation --------------------------------------------------------------------------------

RESIZE = [
    dict(mode="nearest", scale_factor=2.0),
    dict(mode="nearest", scale_factor=1.5),
    dict(mode="nearest", scale_factor=0.6),
    dict(mode="nearest", size=(13, 4)),
    dict(mode="nearest-exact", scale_factor=1.7),
    dict(mode="nearest-exact", size=(11, 4)),
    dict(mode="bilinear", align_corners=False, scale_factor=2.0),
    dict(mode="bilinear", align_corners=True, scale_factor=2.0),
    dict(mode="bilinear", align_corners=False, scale_factor=0.7),
    dict(mode="bilinear", align_corners=False, size=(13, 5)),
    dict(mode="bilinear", align_corners=True, size=(13, 5)),
    dict(mode="bilinear", align_corners=False, scale_factor=1.3, recompute_scale_factor=True),
    dict(mode="bilinear", align_corners=True, scale_factor=(2.5, 2.0)),
]


@pytest.mark.parametrize("kw", RESIZE, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_resize_geometry_matches_brute_force(kw):
    gen = torch.Generator().manual_seed(0)
    up = nn.Upsample(**kw)
    info = ops.classify_module(up)
    assert info.rowwise and info.kind == ops.SPATIAL and isinstance(info.geom, ResizeGeom)
    for in_h in (1, 2, 5, 7, 12):
        if info.geom.out_size(in_h) < 1:
            continue
        check_geometry(up, info.geom, in_h, 2, gen, slack=1 if kw["mode"] == "bilinear" else 0)
    # the same call spelled as a function gives the same geometry
    fn = ops.classify_function(F.interpolate, (None,), dict(kw, align_corners=kw.get("align_corners")))
    assert fn.geom == info.geom


@pytest.mark.parametrize("kw", RESIZE[:2] + RESIZE[4:5] + RESIZE[6:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resize_taps_are_torch_bit_for_bit(kw, dtype):
    """The weight of every input row in every output row, from the taps alone, is torch's bit for
    bit, in each dtype with its kernel's arithmetic (CPU here): torch interpolates one-hot rows
    (the weight times 1 plus the other weight times 0, exact however it is summed)."""
    geom = ops.classify_module(nn.Upsample(**kw)).geom
    variant = "cpu64" if dtype == torch.float64 else "f32"
    for in_h in (2, 5, 9, 31, 97, 200):
        out_h = geom.out_size(in_h)
        if out_h < 1:
            continue
        onehot = torch.eye(in_h, dtype=dtype).view(in_h, 1, in_h, 1)
        args = dict(kw)
        if "size" in args:
            args["size"] = (args["size"][0], 1)
        else:
            f = args["scale_factor"]
            args["scale_factor"] = (f[0] if isinstance(f, tuple) else f, 1.0)
        ref = F.interpolate(onehot, **args)[:, 0, :, 0]  # [input row, output row]
        assert ref.shape[1] == out_h
        got = torch.zeros(in_h, out_h, dtype=dtype)
        for o in range(out_h):
            i0, i1, l1 = resize_taps(geom, o, in_h, out_h, variant)
            l1 = torch.tensor(l1, dtype=dtype)
            got[i0, o] += 1 - l1
            got[i1, o] += l1
        assert torch.equal(got, ref), (kw, in_h, dtype, (got - ref).abs().max())


def test_resize_refused_without_geometry():
    """Modes and options with no row geometry stay out of rows, saying why."""
    for m in (nn.Upsample(scale_factor=2, mode="bicubic"), nn.Upsample(scale_factor=2, mode="area")):
        info = ops.classify_module(m)
        assert not info.rowwise and "no row geometry" in info.reason
    info = ops.classify_function(F.interpolate, (None,), dict(scale_factor=2.0, mode="bilinear", antialias=True))
    assert not info.rowwise and "antialias" in info.reason
    # a size read at run time: a geometry whose size the capture fills in from the captured map
    g = ops.resize_geom(["not", "literal"], None, "nearest", None)
    assert g.dynamic and g.size is None
    info = ops.refine(ops.OpInfo("interpolate", ops.SPATIAL, g, True), [(1, 2, 5, 5)], (1, 2, 11, 11))
    assert info.rowwise and info.geom.size == 11 and info.geom.out_size(5) == 11


# -- transposed convolutions, pixel (un)shuffle ---------------------------------------------------

TRANSPOSE = [  # kernel, stride, padding, dilation, output_padding, groups
    (2, 2, 0, 1, 0, 1), (3, 2, 1, 1, 1, 1), (4, 2, 1, 1, 0, 2), (3, 1, 1, 1, 0, 1), (1, 3, 0, 1, 2, 1),
    (3, 3, 0, 2, 1, 1), (5, 2, 3, 2, 1, 2), (3, 2, 2, 3, 2, 1), (2, 4, 1, 1, 3, 1),
]


@pytest.mark.parametrize("k,s,p,d,op,groups", TRANSPOSE)
def test_conv_transpose_geometry_matches_brute_force(k, s, p, d, op, groups):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    m = nn.ConvTranspose2d(2, 2, (k, 1), (s, 1), (p, 0), (op, 0), groups=groups, dilation=(d, 1)).double()
    info = ops.classify_module(m)
    assert info.rowwise and info.geom == TransposeGeom(k, s, p, d, op)
    for in_h in (1, 2, 3, 6, 9):
        if info.geom.out_size(in_h) < 1:
            continue
        # without dilation the rows that can feed a band all do: exactly minimal
        check_geometry(m, info.geom, in_h, 2, gen, slack=0 if d == 1 else d * (k - 1))


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle_geometry_matches_brute_force(r):
    gen = torch.Generator().manual_seed(3)
    shuffle, unshuffle = nn.PixelShuffle(r), nn.PixelUnshuffle(r)
    gs, gu = ops.classify_module(shuffle).geom, ops.classify_module(unshuffle).geom
    assert gs == TransposeGeom(r, r) and gu == HGeom(r, r)
    assert ops.classify_function(torch.pixel_shuffle, (None, r), {}).geom == gs
    assert ops.classify_function(torch.pixel_unshuffle, (None, r), {}).geom == gu
    for in_h in (1, 2, 5):
        check_geometry(shuffle, gs, in_h, r * r, gen)
    for in_h in (r, 2 * r, 5 * r):
        x = torch.randn(1, 2, in_h, W * r, generator=gen, dtype=torch.float64)
        y = unshuffle(x)
        assert gu.out_size(in_h) == y.shape[2]
        for a, b in _bands(y.shape[2], gen):
            ir = input_rows(gu, a, b, in_h)
            assert (ir.lo, ir.hi, ir.pad_top, ir.pad_bottom) == (a * r, b * r, 0, 0)
            assert _moved_rows(unshuffle, x, a, b) == (a * r, b * r)


# -- composed: down, up, joins --------------------------------------------------------------------

class UpDown(nn.Module):
    """x -> conv s2 -> conv s2 -> convT (to the middle scale) + skip -> bilinear to a size -> cat x."""

    def __init__(self):
        super().__init__()
        self.d1 = nn.Conv2d(1, 2, 3, 2, 1)
        self.d2 = nn.Conv2d(2, 2, 3, 2, 1, dilation=1)
        self.up = nn.ConvTranspose2d(2, 2, 3, 2, 1)
        self.rs = nn.Upsample(size=(17, W), mode="bilinear", align_corners=False)
        self.out = nn.Conv2d(3, 1, 3, 1, 2, dilation=2)

    def forward(self, x):
        a = self.d1(x)
        b = self.up(self.d2(a)) + a
        return self.out(torch.cat([self.rs(b), x], 1))


def test_down_up_composition_sound_and_strides():
    """propagate_rows through down- and up-sampling and a join of maps reached by two paths is
    sound (rows outside the propagated input range never move the band); cumulative strides
    are fractions, the segment stride is the bottleneck's."""
    torch.manual_seed(4)
    net = UpDown().double()
    order = ["x", "d1", "d2", "up", "add", "rs", "cat", "out"]
    inputs = {"d1": ["x"], "d2": ["d1"], "up": ["d2"], "add": ["up", "d1"], "rs": ["add"], "cat": ["rs", "x"],
              "out": ["cat"]}
    geom = {"d1": HGeom(3, 2, 1), "d2": HGeom(3, 2, 1), "up": TransposeGeom(3, 2, 1),
            "rs": ops.classify_module(net.rs).geom, "out": HGeom(3, 1, 2, 2)}
    g = RowGraph(order, inputs, geom, {})
    g.height = propagate_heights(g, {"x": 17})
    assert [g.height[n] for n in order] == [17, 9, 5, 9, 9, 17, 17, 17]
    cs = cumulative_strides(g)
    # (the resize to 17 rows from 9 spans 9/17 of a row per row: rational scales)
    assert (cs["d2"], cs["up"], cs["rs"], cs["out"]) == (4, 2, Fraction(18, 17), Fraction(18, 17))
    assert segment_stride(g, "x", "out") == 4 and segment_stride(g, "d2", "out") == 1
    assert receptive_fields(g)["out"] >= receptive_fields(g)["rs"] > 1
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 17, W, generator=gen, dtype=torch.float64)
    y = net(x)
    for a, b in _bands(17, gen, 8):
        lo, hi = propagate_rows(g, order, "out", (a, b))["x"]
        xp = x.clone()
        out = [r for r in range(17) if not lo <= r < hi]
        xp[:, :, out] = torch.randn(xp[:, :, out].shape, generator=gen, dtype=torch.float64) * 1e9
        assert torch.equal(net(xp)[:, :, a:b], y[:, :, a:b]), ((a, b), (lo, hi))
