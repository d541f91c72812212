"""Row segments over the ops of dense (encoder-decoder) networks, exactly plain PyTorch (issue 27,
items 1-2): transposed convolutions, interpolations, pixel (un)shuffle, dilated ASPP-style
branches and joins of maps reached through different paths, alone and in small U-Nets whose
row segment spans the whole encoder-decoder (multi-scale 2PS: rows stream down the encoder and up
the decoder, a skip map is carried only for the rows the decoder still needs; OverL: halos
through down- and up-sampling), training-mode BatchNorm included, at odd sizes, float64 within
1e-10 of plain (outputs, loss, input and parameter gradients, parameters and BN running
statistics after the step)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from exactness import Reference, rel
from lrcnn.executor import apply_plan
from lrcnn.executor.strips import RowSegmentError
from lrcnn.models import capture
from lrcnn.planner import Plan, Segment
from lrcnn.planner.cost import CostModel

pytestmark = pytest.mark.usefixtures("one_thread")


def cbr(ci, co, **kw):
    """conv 3x3 (no bias: a training-mode BN follows) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=kw.pop("padding", 1), bias=False, **kw), nn.BatchNorm2d(co),
                         nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Parallel dilated 3x3 branches of one input, concatenated, projected (no image pooling)."""

    def __init__(self, c):
        super().__init__()
        self.b = nn.ModuleList([nn.Conv2d(c, c, 3, padding=d, dilation=d) for d in (1, 2, 3)])
        self.p = nn.Conv2d(3 * c, c, 1)

    def forward(self, x):
        return self.p(torch.cat([b(x) for b in self.b], 1))


class TinyUNet(nn.Module):
    """Two levels down (strided conv; ceil-mode max-pool) to an ASPP bottleneck and up again:
    a transposed convolution (25 -> 49 rows), a bilinear resize to the input's size (49 -> 97, a
    non-integer ratio), each joined to its encoder map by a channel concat."""

    def __init__(self, size, c=2, classes=3):
        super().__init__()
        self.enc0 = cbr(3, c)
        self.enc1 = cbr(c, 2 * c, stride=2)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.mid = ASPP(2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, 2 * c, 3, 2, 1)
        self.dec1 = cbr(4 * c, 2 * c)
        self.up0 = nn.Upsample(size=size, mode="bilinear", align_corners=False)
        self.dec0 = cbr(3 * c, c)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        m = self.mid(self.pool(e1))
        d1 = self.dec1(torch.cat([self.up1(m), e1], 1))
        d0 = self.dec0(torch.cat([self.up0(d1), e0], 1))
        return self.head(d0)


class ShuffleUNet(nn.Module):
    """Down by PixelUnshuffle and a dilated conv, up by nearest-exact at a non-integer factor and
    PixelShuffle, an align_corners bilinear by scale; joins by add and concat of maps reached
    through different paths."""

    def __init__(self, c=2, classes=2):
        super().__init__()
        self.enc0 = cbr(3, c)
        self.down = nn.PixelUnshuffle(2)                        # 36 -> 18 rows, 4c channels
        self.mid = cbr(4 * c, 4 * c, padding=2, dilation=2)
        self.shuf = nn.PixelShuffle(2)                          # 18 -> 36 rows, c channels
        self.near = nn.Upsample(scale_factor=1.5, mode="nearest-exact")    # 18 -> 27
        self.back = nn.Conv2d(4 * c, c, (10, 4))                # 27 -> 18 rows (9 -> 6 columns)
        self.bil = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)  # 18 -> 36
        self.dec0 = cbr(3 * c, c)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        e0 = self.enc0(x)
        m = self.mid(self.down(e0))
        a = self.shuf(m) + e0                                   # add: two paths at full scale
        b = self.bil(self.back(self.near(m)))
        return self.head(self.dec0(torch.cat([a, b, e0], 1)))


def _whole(graph):
    names = [n.name for n in graph.nodes if n.kind not in ("input", "output")]
    return names[0], names[-1]


def rows(first, last, policy, strips, bn="sweeps"):
    return Segment(first, last, "rows", policy=policy, strips=strips, options={"bn": bn})


# -- one op at a time -----------------------------------------------------------------------------

class Sandwich(nn.Module):
    def __init__(self, op, mid):
        super().__init__()
        self.a, self.op, self.b = nn.Conv2d(2, 4, 3, 1, 1), op, nn.Conv2d(mid, 2, 3, 1, 1)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


OPS = [
    (lambda: nn.ConvTranspose2d(4, 3, 3, 2, 1, 1), 3),
    (lambda: nn.ConvTranspose2d(4, 3, (5, 3), (2, 1), (3, 1), (1, 0), dilation=(2, 1)), 3),
    (lambda: nn.ConvTranspose2d(4, 4, 1, 3, 0, 2, groups=2), 4),     # rows fed by nothing: bias only
    (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), 4),
    (lambda: nn.Upsample(scale_factor=1.5, mode="nearest"), 4),
    (lambda: nn.Upsample(size=(23, 9), mode="bilinear", align_corners=True), 4),
    (lambda: nn.Upsample(scale_factor=0.6, mode="nearest-exact"), 4),
    (lambda: nn.PixelShuffle(2), 1),
    (lambda: nn.PixelUnshuffle(2), 16),
]


@pytest.mark.parametrize("make,mid", OPS, ids=[f"op{i}" for i in range(len(OPS))])
@pytest.mark.parametrize("policy", ["2ps", "overl"])
def test_resampling_op_in_rows_exact(make, mid, policy):
    torch.manual_seed(0)
    model = Sandwich(make(), mid).double()
    shape = (2, 2, 14, 6)
    graph = capture(model, shape, torch.float64)
    first, last = _whole(graph)
    x = torch.randn(shape, dtype=torch.float64)
    for strips in (2, 5):
        plan = Plan.build(graph, [Segment(first, last, "rows", policy=policy, strips=strips)])
        ref, pm = copy.deepcopy(model), apply_plan(copy.deepcopy(model), plan, graph)
        xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yp = ref(xr), pm(xp)
        w = torch.randn(yr.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (yr * w).sum().backward()
        (yp * w).sum().backward()
        assert rel(yp, yr) <= 1e-10 and rel(xp.grad, xr.grad) <= 1e-10
        for (k, a), (_, b) in zip(pm.named_parameters(), ref.named_parameters()):
            assert rel(a.grad, b.grad) <= 1e-10, k
        if policy == "2ps":  # every row of every node computed once
            sched = pm.row_segments[0].schedule(shape[2])
            for n in graph.span(first, last):
                assert sched.computed_rows(n.name) == n.height, n.name


# -- whole encoder-decoders in one row segment, training-mode BN ------------------------------------

def unet_batch():
    """The tiny U-Net (train-mode BN, float64) at 97x129 with a batch of 2 and its per-pixel mask."""
    torch.manual_seed(0)
    h, w = 97, 129
    model = TinyUNet((h, w)).double().train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, h, w), generator=g)
    return model, x, y


@pytest.fixture(scope="module")
def unet_ref():
    return Reference(*unet_batch(), steps=1)


@pytest.mark.parametrize("policy,strips,bn", [("2ps", 4, "sweeps"), ("2ps", 9, "layerwise"),
                                              ("overl", 3, "sweeps"), ("overl", 6, "layerwise")])
def test_unet_one_row_segment_exact(unet_ref, policy, strips, bn):
    first, last = _whole(unet_ref.graph)
    unet_ref.check([rows(first, last, policy, strips, bn)])


def test_unet_2ps_streams_down_and_up(unet_ref):
    """Multi-scale 2PS: every row of every map computed once; the encoder maps the skips join
    later are carried only for the rows the decoder still needs (their lag), never whole; the
    planner's schedule is the executor's."""
    graph = unet_ref.graph
    first, last = _whole(graph)
    seg = Segment(first, last, "rows", policy="2ps", strips=8)
    pm = apply_plan(copy.deepcopy(unet_ref.model0), Plan.build(graph, [seg]), graph)
    rs = pm.row_segments[0]
    sched = rs.schedule(graph.input_shape[2])
    for n in graph.span(first, last):
        assert sched.computed_rows(n.name) == n.height, n.name
    skips = [n for n in ("enc0_2", "enc1_2") if n in graph.by_name]
    assert skips
    for n in skips:
        carried = [r[n].carried[1] - r[n].carried[0] for r in sched.rows]
        # (the decoder lags the encoder by about half the receptive field; a strip holds that)
        assert 0 < max(carried) <= graph[n].height // 2, (n, carried)
    cm = CostModel(graph)
    mine = cm._row_schedule(seg, [n.name for n in graph.span(first, last)], rs._cover(rs.batch_bns()))
    assert mine.bounds == sched.bounds and mine.out == sched.out


def test_shuffle_unet_exact():
    torch.manual_seed(1)
    model = ShuffleUNet().double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 36, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (1, 36, 12), generator=g)
    ref = Reference(model, x, y, steps=1)
    first, last = _whole(ref.graph)
    for policy, strips in (("2ps", 5), ("overl", 4)):
        ref.check([rows(first, last, policy, strips)])


# -- ops with no row geometry keep their segment out of rows ---------------------------------------

def test_no_row_geometry_stays_out_of_rows():
    torch.manual_seed(0)
    model = Sandwich(nn.Upsample(scale_factor=2, mode="bicubic"), 4).double()
    graph = capture(model, (1, 2, 8, 8), torch.float64)
    first, last = _whole(graph)
    node = graph["op"]
    assert not node.rowwise and "no row geometry" in node.reason
    cost = CostModel(graph).segment(Segment(first, last, "rows", policy="2ps", strips=2))
    assert not cost.supported and node.name in cost.why
    with pytest.raises(RowSegmentError, match="no row geometry"):
        apply_plan(model, Plan.build(graph, [Segment(first, last, "rows", policy="2ps", strips=2)]), graph)


# -- the planner ---------------------------------------------------------------------------------

def test_planner_runs_a_unet_in_rows():
    """planner solve on a U-Net whose plain step does not fit the budget: the smallest plan and the
    plan at half the plain step's activations run the encoder-decoder in row strips (down to the
    bottleneck and up through the skip joins), and the smallest keeps a fraction of the plain step's activations
    (what every plan keeps besides, parameters, optimizer state, the device profile's workspace,
    set apart)."""
    from lrcnn.planner.solve import Solver

    model = TinyUNet((193, 161), c=8).to("meta")
    graph = capture(model, (1, 3, 193, 161), torch.float32)
    s = Solver(graph, "tiny-unet")
    fixed, plain = s.cm.fixed_bytes(), s.baseline()["peak"]
    assert s.min_peak() - fixed <= 0.25 * (plain - fixed)
    smallest = s.smallest_segments()
    plan = s.solve(s.budget_for(int(fixed + 0.5 * (plain - fixed))))  # (the solver keeps its headroom free)
    for segs in (smallest, plan.segments):
        spans = [(sg.first, sg.last) for sg in segs if sg.mode == "rows"]
        # (down to the bottleneck and up through both skip joins; the top skip may be the input)
        assert any(graph.index(a) <= graph.index("enc1_0") and graph.index(b) >= graph.index("cat_2")
                   for a, b in spans), [sg.to_dict() for sg in segs]


def test_size_read_at_run_time_runs_at_the_planned_height_only():
    """An interpolation to a size read from a tensor at run time has the captured size as its
    geometry (models.ops.refine): exact at the planned height, refused at another."""
    import dataclasses

    torch.manual_seed(0)
    model = Sandwich(nn.Upsample(size=(23, 9), mode="bilinear"), 4).double()
    graph = capture(model, (1, 2, 14, 6), torch.float64)
    node = graph["op"]
    node.geom = dataclasses.replace(node.geom, dynamic=True)  # (as the capture records such a size)
    first, last = _whole(graph)
    pm = apply_plan(copy.deepcopy(model), Plan.build(graph, [Segment(first, last, "rows", policy="2ps",
                                                                     strips=3)]), graph)
    x = torch.randn(1, 2, 14, 6, dtype=torch.float64)
    assert rel(pm(x), model(x)) <= 1e-10
    with pytest.raises(RowSegmentError, match="read from a tensor at run time"):
        pm(torch.randn(1, 2, 16, 6, dtype=torch.float64))
