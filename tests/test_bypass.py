"""Bypass segments: a segment reads one tensor made before it (its input) and leaves one (its last
node's); older tensors, and its input itself, may pass over it (a U-Net skip over the levels below
it, LR-ASPP's stride-8 feature over the stride-16 backbone).  The rule (accepted and refused
segments), checkpoint / store / row segments with a passing tensor exactly plain PyTorch (float64,
train-mode BN), the cost model against the simulated and the measured step (LR-ASPP's units:
tests/test_dense.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.exactness import Reference
from lrcnn.executor import apply_plan
from lrcnn.executor.measure import train_step_memory
from lrcnn.models import capture, get_model, set_bn_mode
from lrcnn.planner import Plan, PlanError, Segment
from lrcnn.planner.cost import CostModel

pytestmark = pytest.mark.usefixtures("one_thread")


class LongSkip(nn.Module):
    """A stem map kept across a down-sampled middle (three conv + BN + ReLU) and joined to it after
    an upsample: the stem passes over the whole middle.  ``inplace``: the middle starts with an
    in-place ReLU of the stem map that the join reads again (a segment there is refused)."""

    def __init__(self, c=3, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.mid = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.head = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(s, inplace=True) if self.inplace else s
        y = F.relu(self.bn1(self.down(y)))
        y = F.relu(self.bn2(self.mid(y)))
        return self.head(torch.cat([self.up(y), s], 1))


def _unet(dtype=torch.float64):
    torch.manual_seed(0)
    return set_bn_mode(get_model("tiny_unet").to(dtype), "train")


@pytest.fixture(scope="module")
def unet_ref():
    """Plain float64 training of the zoo's tiny_unet (train-mode BN, 2x3x32x32) for one step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 32, 32), generator=g)
    return Reference(_unet(), x, y, steps=1)


# ------------------------------------------------------------------------------------------------
# the rule

def test_passing_tensors_accepted_where_one_tensor_enters_and_one_leaves(unet_ref):
    g = unet_ref.graph
    cases = {  # segment -> the tensors that pass over it
        ("down_0_1_0", "down_0_1_5"): ["inc_5"],                  # the top skip over level 1's convs
        ("down_1_0", "up_0"): ["inc_5", "down_0_1_5"],            # its input passes too (read by cat)
        ("down_1_0", "dec_0_5"): ["inc_5"],                       # the level-1 join inside
        ("dec_0_0", "up_1"): ["inc_5"],
        ("down_0_0", "dec_1_5"): [],                              # between two cut points
    }
    for (a, b), passing in cases.items():
        assert g.segment_refusal(a, b) is None, (a, b)
        assert g.passing(a, b) == passing, (a, b)
    for mode in ("checkpoint", "store"):
        Plan.build(g, [Segment(a, b, mode) for a, b in list(cases)[0:3:2]])


def test_segments_reading_or_leaving_two_tensors_refused(unet_ref):
    g = unet_ref.graph
    with pytest.raises(PlanError) as e:
        Plan.build(g, [Segment("up_0", "cat", "checkpoint")])
    assert str(e.value) == ("segment 0 (up_0..cat): more than one tensor enters the segment before 'up_0' ('cat' "
                            "reads 'down_0_1_5' besides the segment input 'down_1_1_5'); start it at a block "
                            "boundary (one of the graph's cut points) or where it reads nothing made before its input")
    with pytest.raises(PlanError) as e:
        Plan.build(g, [Segment("inc_0", "down_0_0", "store")])
    assert str(e.value) == ("segment 0 (inc_0..down_0_0): more than one tensor leaves the segment after 'down_0_0' "
                            "('inc_5' is read by 'cat_1' too); end it at a block boundary (one of the graph's cut "
                            "points) or where only its last node's output is read after it")
    # an in-place ReLU of the stem map that the join reads again: the capture names the join's
    # read by the ReLU, so a segment from the ReLU on leaves two tensors; after it, the ReLU's
    # output passes over the middle
    gi = capture(LongSkip(inplace=True), (1, 3, 8, 8))
    assert gi["relu"].alias and gi["cat"].inputs[1] == "relu"
    with pytest.raises(PlanError, match=r"^segment 0 \(relu\.\.bn2\): more than one tensor leaves the segment "
                                        r"after 'bn2' \('relu' is read by 'cat' too\)"):
        Plan.build(gi, [Segment("relu", "bn2", "checkpoint")])
    assert gi.segment_refusal("down", "up") is None and gi.passing("down", "up") == ["relu"]


# ------------------------------------------------------------------------------------------------
# exactness (float64, train-mode BN)

@pytest.mark.parametrize("segs", [
    # checkpoint with a tensor passing over it, with its input passing too, two in a row
    [("down_0_1_0", "down_0_1_5", "checkpoint"), ("down_1_0", "up_0", "checkpoint"),
     ("dec_0_0", "up_1", "checkpoint")],
    # store with recompute sets under the skip, one whose input passes over it too, a store unit
    [("down_0_1_0", "down_0_1_5", "store+"), ("down_1_0", "up_0", "store+"), ("dec_0_0", "up_1", "checkpoint"),
     ("dec_1_0", "dec_1_5", "store")],
    # rows (2PS, OverL) under a passing skip, and with their input passing
    [("down_0_1_0", "down_0_1_5", "2ps"), ("down_1_0", "up_0", "overl"), ("dec_0_0", "up_1", "2ps")],
], ids=["checkpoint", "store", "rows"])
def test_bypass_segments_exact(unet_ref, segs):
    g = unet_ref.graph
    out = []
    for a, b, mode in segs:
        if mode == "store+":
            out.append(Segment(a, b, "store", recompute=[n.name for n in g.span(a, b)[:-1]
                                                         if n.op in ("batchnorm2d", "relu")]))
        elif mode in ("2ps", "overl"):
            out.append(Segment(a, b, "rows", policy=mode, strips=2))
        else:
            out.append(Segment(a, b, mode))
    unet_ref.check(out)


@pytest.mark.parametrize("inplace", [False, True])
def test_long_skip_checkpoint_exact(inplace):
    """A hand-written net whose stem map (or its in-place ReLU) passes over a checkpointed middle."""
    torch.manual_seed(0)
    m = set_bn_mode(LongSkip(inplace=inplace).double(), "train")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 10, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 10, 12), generator=gen)
    ref = Reference(m, x, y)
    assert ref.graph.passing("down", "up") == ["relu" if inplace else "stem"]
    ref.check([Segment("down", "up", "checkpoint")])
    relu = "relu_2" if inplace else "relu_1"
    ref.check([Segment("down", "bn2", "store", recompute=["bn1"]), Segment(relu, "up", "checkpoint")])


# ------------------------------------------------------------------------------------------------
# the cost model against the step

BYPASS_PLANS = {
    # three checkpoints under the top skip, the middle one's input passing over it to the join
    "checkpoint": [Segment("down_0_1_0", "down_0_1_5", "checkpoint"), Segment("down_1_0", "up_0", "checkpoint"),
                   Segment("dec_0_0", "up_1", "checkpoint")],
    # store segments with recompute sets under the skip (the second one's input passing over it
    # to the join), a checkpoint after the join
    "store": [Segment("down_0_1_0", "down_0_1_5", "store", recompute=["down_0_1_1", "down_0_1_4"]),
              Segment("down_1_0", "up_0", "store", recompute=["down_1_1_1", "down_1_1_2"]),
              Segment("dec_0_0", "up_1", "checkpoint")],
}


@pytest.mark.parametrize("kind", list(BYPASS_PLANS))
def test_bypass_segments_priced_as_measured(kind):
    """tiny_unet (train-mode BN, 2x3x64x64 float32), segments with tensors passing over them (the
    passing gradients: a join's gradient held whole while a slice of it waits; an up-sampled map
    freed by the join that reads it): each segment's predicted forward and backward peak is the
    real CPU step's (storage accounting) and the simulated step's within 1 %.  The whole step is
    never below them and within 3.5 % (the store tail that reads the skip again, priced as before:
    the plain step's own backward is 2.4 % high on this model)."""
    m = _unet(torch.float32)
    g = capture(m, (2, 3, 64, 64))
    plan = Plan.build(g, BYPASS_PLANS[kind], training={"optimizer": "momentum", "bn": "train", "num_classes": 3})
    cm = CostModel(g, optimizer="momentum")
    assert all(cm.segment(s).detail.get("passing_grad") for s in plan.segments)
    pred = cm.predict(plan)
    for fake in (False, True):
        rep = train_step_memory(apply_plan(m, plan, g), g.input_shape, "momentum", fake=fake)
        window = {lab: pk + rep.baseline_bytes for lab, _, pk in rep.timeline}
        for r in pred["segments"]:
            for ph in ("forward", "backward"):
                got = window[f"segment {r['index']} {ph}"]
                assert abs(r[f"{ph}_peak"] - got) <= 0.01 * got, (kind, fake, r["index"], ph, r[f"{ph}_peak"], got)
        got = rep.absolute_phase_peaks()
        for ph in ("forward", "backward", "optimizer"):
            assert got[ph] <= pred["phases"][ph] <= 1.035 * got[ph], (kind, fake, ph, pred["phases"][ph], got[ph])


# ------------------------------------------------------------------------------------------------
# units and the plan search

def test_planner_forms_only_legal_segments():
    """The hand-written long skip: its run from the stem to the join holds most of the saved bytes
    and is split where only the stem passes; the join, which reads the stem again, is a unit no
    segment but a plain store one covers (and the planned step leaves it out).  Every candidate
    the ILP prices is a legal segment, and the plans it solves run exactly."""
    from lrcnn.planner.ilp import Problem
    from lrcnn.planner.solve import Solver

    torch.manual_seed(0)
    m = set_bn_mode(LongSkip().double(), "train")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 16, 16), generator=gen)
    ref = Reference(m, x, y)
    g = ref.graph
    cm = CostModel(g)
    units = cm.units()
    assert len(units) > len(g.cut_points()) and ("cat", "cat") in units
    assert g.segment_refusal("cat", "cat") is not None  # (it reads the stem)
    p = Problem(cm, g, policy="auto")
    plain = [c for c in p.cands if c.seg.mode == "store" and not c.seg.recompute]
    assert any(g.segment_refusal(c.seg.first, c.seg.last) for c in plain)
    others = [c for c in p.cands if c not in plain]
    assert any(c.seg.first == "down" and c.seg.last != "cat" for c in others)  # bypass segments priced
    assert all(g.segment_refusal(c.seg.first, c.seg.last) is None for c in others)
    s = Solver(g, policy="checkpoint", device_profile="cpu")
    lo, hi = s.smallest_budget(), s.baseline()["peak"]
    bypass = 0
    for k in (4, 5):  # budgets where the middle is checkpointed with the stem passing over it
        plan = s.solve(lo + (hi - lo) * k // 8)
        assert all(seg.first != "cat" for seg in plan.segments)
        bypass += sum(seg.mode == "checkpoint" and g.passing(seg.first, seg.last) == ["stem"]
                      for seg in plan.segments)
        ref.check(plan.segments)
    assert bypass
