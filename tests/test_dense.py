"""Dense (per-pixel) models: shape reads folded out of the graph, dict outputs, the segmentation zoo,
the per-pixel cross-entropy priced and run, and image / mask folders for ``planner run``.

Small on purpose: tiny_fcn (written as torchvision writes its segmentation models: it reads
``x.shape[-2:]`` first and upsamples its logits back to it, returning ``{"out": logits}``) at
20x24 in float64 for exactness; the big zoo models only at small inputs on the meta device.
"""
from __future__ import annotations

import copy
import json
import time

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import train_step_memory
from lrcnn.models import capture, get_model, list_models, set_bn_mode
from lrcnn.models.capture import CaptureError
from lrcnn.models.loss import LossError, cross_entropy, logits_of, target_shape
from lrcnn.planner import Plan, Segment
from lrcnn.planner.cost import SPLIT_SHARE, CostModel
from tests.exactness import Reference
from tests.test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def fcn_ref():
    """Plain float64 training of tiny_fcn (train-mode BN) for one step, and its capture."""
    torch.manual_seed(0)
    m = get_model("tiny_fcn").double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 20, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 20, 24), generator=g)
    return Reference(m, x, y, steps=1)


def test_shape_reads_do_not_block_cut_points(fcn_ref):
    """``x.shape`` and ``x.shape[-2:]`` are numbers, not live tensors: the capture folds them out
    of the graph (``graph.values``), so the map is cut after every layer, not only at the input
    and the final interpolate; the output node holds the dict's logits."""
    g = fcn_ref.graph
    assert g.values == {"getattr_1": (2, 3, 20, 24), "getitem": (20, 24)}
    assert not any(n.name in g.values or n.op in ("getattr", "getitem") for n in g.nodes)
    names = [n.name for n in g.nodes[1:-1]]
    assert names[-1] == "interpolate" and g["interpolate"].inputs == ["classifier_3"]
    cuts = g.cut_points()
    assert cuts == [n.name for n in g.nodes[:-1]]  # a chain: a cut after every node
    assert g.output_node.shape == (2, 3, 20, 24) and g.output_node.inputs == ["interpolate"]


def test_checkpoint_and_store_over_shape_reads_exact(fcn_ref):
    """A checkpoint and a store segment (with recompute) across the model, the interpolate that
    reads the folded size included: loss, output, every gradient, parameters and BN running
    statistics equal plain PyTorch in float64."""
    g = fcn_ref.graph
    names = [n.name for n in g.nodes[1:-1]]
    rec = [n for n in names[6:] if g[n].op in ("batchnorm2d", "relu")]
    assert len(rec) == 4
    fcn_ref.check([Segment("backbone_0", "backbone_5", "checkpoint"),
                   Segment("backbone_6", "interpolate", "store", recompute=rec)])


def test_planned_model_at_other_shapes(fcn_ref):
    """A batch of another shape runs a program folded for its own shape values (exactly plain),
    the plan's program again where they are the plan's (another batch size, same H x W)."""
    m = copy.deepcopy(fcn_ref.model0)
    plan = Plan.build(fcn_ref.graph, [Segment("backbone_0", "backbone_8", "checkpoint")])
    pm = apply_plan(copy.deepcopy(m), plan, fcn_ref.graph)
    for shape in [(1, 3, 16, 20), (3, 3, 20, 24), (2, 3, 20, 24)]:
        x = torch.randn(*shape, dtype=torch.float64)
        got, want = pm(x)["out"], m(x)["out"]
        assert got.shape == (shape[0], 3) + shape[2:] and torch.equal(got, want), shape
    assert list(pm._by_shape) == [(1, 3, 16, 20), (3, 3, 20, 24)]
    assert pm._by_shape[(3, 3, 20, 24)][0] is pm._steps  # same values: the planned program


class _TwoHeads(nn.Module):
    def __init__(self, out="dict"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 4, 1)
        self.kind = out

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "dict":
            return {"aux": self.aux(y), "out": y}
        return y, self.aux(y)


def test_dict_output_and_the_loss_it_trains():
    """A dict output is trained on its ``"out"`` entry (the loss and its target follow the logits'
    shape); an output with no single logits tensor is one clear error, at capture."""
    g = capture(_TwoHeads("dict"), (2, 3, 8, 8))
    assert g.output_node.shape == (2, 4, 8, 8) and set(g.output_node.inputs) == {"aux", "conv"}
    assert target_shape((2, 4, 8, 8)) == (2, 8, 8) and target_shape((5, 10)) == (5,)
    t = torch.randn(2, 4, 8, 8)
    y = torch.randint(0, 4, (2, 8, 8))
    assert torch.equal(cross_entropy({"out": t}, y), F.cross_entropy(t, y))
    assert logits_of((t,)) is t and logits_of({"logits": t}) is t
    with pytest.raises(LossError, match=r"target has shape \(2,\).*need class indices of shape \(2, 8, 8\)"):
        cross_entropy(t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(LossError, match="returns a tuple of 2; lrcnn trains a cross-entropy on one logits tensor"):
        capture(_TwoHeads("tuple"), (2, 3, 8, 8))


def test_segmentation_zoo():
    """The dense zoo: a U-Net (4 levels down and up, BN, transposed convolutions; tiny_unet: the
    same with 2) and torchvision's segmentation models, random weights (backbones too), no
    auxiliary head, logits per pixel."""
    dense = list_models("segmentation")
    assert {"unet", "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
            "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"} <= set(dense)
    for name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large"):
        m = get_model(name, device="meta")
        assert m.aux_classifier is None and m.classifier[-1].out_channels == 21
    unet = get_model("unet", num_classes=5, device="meta")
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in unet.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unet.modules()) == 18
    assert sum(p.numel() for p in unet.parameters()) == 31_037_893
    g = capture(set_bn_mode(get_model("tiny_unet", device="meta"), "train"), (1, 3, 32, 48))
    assert g.output_node.shape == (1, 3, 32, 48) and not g.values
    assert [n.op for n in g.nodes].count("conv_transpose2d") == 2


def test_torchvision_segmentation_capture():
    """One small capture of a torchvision segmentation model (LR-ASPP at 64x64, meta device): its
    shape reads are folded out, so the graph has cut points all through the backbone."""
    t0 = time.perf_counter()
    m = set_bn_mode(get_model("lraspp_mobilenet_v3_large", device="meta"), "train")
    g = capture(m, (2, 3, 64, 64), model_name="lraspp_mobilenet_v3_large")
    took = time.perf_counter() - t0
    assert g.output_node.shape == (2, 21, 64, 64)
    assert set(g.values) == {"getattr_1", "getitem", "getattr_2", "getitem_1"}  # x.shape and low.shape reads
    assert len(g.cut_points()) >= 20  # (before: 2, the input and the last node)
    print(f"lraspp 2x3x64x64 capture: {took:.2f} s")
    # the run from the stride-8 feature to the head holds most of the step's saved bytes and has
    # no cut point: the planner's units split it where only that feature passes; the pieces it
    # passes over are legal segments, the one that reads it again (the residual of block 5) is not
    low = "backbone_4_block_3_1"
    cm = CostModel(g)
    units = cm.units()
    assert len(units) > 60  # (24 between cut points)
    inside = [(a, b) for a, b in units if g.index(low) < g.index(a) and g.index(b) < g.index("add_10")]
    assert len(inside) > 40 and any(a.startswith("backbone_14") for a, _ in inside)
    for a, b in inside:
        assert low in g.passing(a, b)
        assert (g.segment_refusal(a, b) is None) == (a != "add_2"), (a, b)
    saved = sum(n.saved_bytes for n in g.nodes)
    assert max(sum(n.saved_bytes for n in g.span(a, b)) for a, b in units) < SPLIT_SHARE * saved
    # the stride-16 backbone in two checkpoints; the head, which reads the feature again, runs stored
    plan = Plan.build(g, [Segment("backbone_5_block_0_0", "add_7", "checkpoint"),
                          Segment("backbone_13_block_0_0", "interpolate", "checkpoint")])
    assert cm.segment(plan.segments[0]).detail["passing_grad"] == g[low].out_bytes


def test_u_net_needs_a_multiple_of_2_to_its_levels():
    with pytest.raises(CaptureError, match=r"a multiple of 2\^n \(16 for the zoo.s unet\)"):
        capture(get_model("tiny_unet", device="meta"), (1, 3, 42, 40))


def test_dense_loss_priced_and_simulated(fcn_ref):
    """The per-pixel cross-entropy in the cost model: its int64 target map in the fixed bytes,
    its log-softmax map while the loss lives (not in the optimizer step); the prediction of a
    dense plan is the simulated step's (fake tensors, the executor itself) within 0.5 %."""
    m = set_bn_mode(get_model("tiny_fcn", device="meta"), "train")
    g = capture(m, (2, 3, 64, 64))
    cm = CostModel(g, optimizer="sgd", profile="cpu")
    assert cm.fixed_breakdown()["input"] == 2 * 3 * 64 * 64 * 4 + 2 * 64 * 64 * 8 + 2 * 4  # batch, masks, loss
    assert 0 <= cm.loss_bytes() - 2 * 3 * 64 * 64 * 4 <= 64  # the log-softmax map (and a scalar)
    for segs in ([], [Segment("backbone_0", "backbone_8", "checkpoint")]):
        plan = Plan.build(g, segs)
        pred = cm.predict(plan)["phases"]
        sim = train_step_memory(apply_plan(m, plan, g), g.input_shape, "sgd", fake=True).absolute_phase_peaks()
        assert 0 <= pred["optimizer"] - sim["optimizer"] <= 4  # (the loss's gradient, counted throughout)
        for ph in ("forward", "backward"):
            assert abs(pred[ph] - sim[ph]) <= 0.005 * sim[ph], (segs, ph, pred[ph], sim[ph])


# ------------------------------------------------------------------------------------------------
# planner solve / run on a dense model
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_plan(tmp_path_factory):
    """``planner solve --model tiny_fcn`` in float64 at a budget that needs a plan."""
    from lrcnn.planner.cli import main

    p = tmp_path_factory.mktemp("dense") / "plan.json"
    rc = main(["solve", "--model", "tiny_fcn", "--batch", "2", "--resolution", "32", "--dtype", "float64",
               "--optimizer", "sgd", "--device-profile", "cpu", "--budget", "300KiB", "--policy", "checkpoint",
               "-o", str(p)])
    assert rc == 0
    return p


def test_solve_and_run_dense_with_synthetic_masks(dense_plan, tmp_path, capfd):
    """A dense plan trains a per-pixel cross-entropy on synthetic masks; --check-grads against the
    plain model passes at float64's tolerance; the loss is finite."""
    plan = Plan.load(str(dense_plan))
    assert plan.segments and plan.training["num_classes"] == 3
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", dense_plan, "--steps", 1, "--warmup", 0, "--device", "cpu", "--quiet",
                       "--check-grads", "--out", rec)
    assert rc == 0, err
    assert "check-grads OK" in out
    df = pd.read_parquet(rec)
    steps = df[df.scope == "step"]
    assert steps.data.iloc[0] == "synthetic" and steps.loss.notna().all()


def _pairs(root, sizes, mask_sizes=None, classes=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        a = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(root / "images" / f"{i}.{'png' if i % 2 else 'jpg'}")
        mh, mw = (mask_sizes or sizes)[i]
        k = torch.randint(0, classes, (mh, mw), generator=g).to(torch.uint8).numpy()
        Image.fromarray(k).save(root / "masks" / f"{i}.png")


def test_run_reads_image_mask_pairs(dense_plan, tmp_path, capfd):
    """--data DIR: DIR/images/*.png|jpg and DIR/masks/*.png of the same names, brought to the plan's
    resolution (the mask by nearest neighbour); a missing or mismatched mask, a class index the
    model does not have, or a folder without images/ and masks/ is one line on stderr, exit 2."""
    _pairs(tmp_path / "ok", [(40, 48), (36, 36), (50, 40)])
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", dense_plan, "--data", tmp_path / "ok", "--steps", 1, "--warmup", 0,
                       "--device", "cpu", "--quiet", "--out", rec)
    assert rc == 0, err
    df = pd.read_parquet(rec)
    assert df.data.iloc[0] == str(tmp_path / "ok") and df[df.scope == "step"].loss.notna().all()

    def bad(data, *needles):
        out_file = tmp_path / "bad.parquet"
        rc, out, err = run(capfd, "run", dense_plan, "--data", data, "--steps", 1, "--device", "cpu",
                           "--out", out_file)
        assert_one_line_error(rc, out, err, *needles)
        assert not out_file.exists()

    _pairs(tmp_path / "missing", [(40, 48), (36, 36)])
    (tmp_path / "missing" / "masks" / "1.png").unlink()
    bad(tmp_path / "missing", "image images/1.png has no mask masks/1.png")
    _pairs(tmp_path / "size", [(40, 48), (36, 36)], mask_sizes=[(40, 48), (36, 30)])
    bad(tmp_path / "size", "mask masks/1.png is 30x36 (WxH), its image images/1.png 36x36")
    _pairs(tmp_path / "classes", [(40, 48), (36, 36)], classes=9)
    bad(tmp_path / "classes", "holds class index", "outside 0..2")
    (tmp_path / "flat").mkdir()
    bad(tmp_path / "flat", "has no images/ folder", "DIR/masks/*.png")
    _pairs(tmp_path / "one", [(40, 48)])
    bad(tmp_path / "one", "has 1 image(s), fewer than the plan's batch of 2")


def test_check_grads_draws_the_same_dropout_masks():
    """--check-grads runs the plain and the planned step under one seed: a dense head with dropout
    (DeepLabV3's ASPP has one) compares equal in float64, and the caller's random state is untouched."""
    from lrcnn.executor.run import check_grads

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                      nn.Conv2d(6, 4, 1)).double().train()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 12, 10))
    g = capture(m, tuple(x.shape), torch.float64)
    names = [n.name for n in g.nodes[1:-1]]
    planned = apply_plan(copy.deepcopy(m), Plan.build(g, [Segment(names[0], names[-1], "checkpoint")]), g)
    state = torch.get_rng_state()
    ok, msg = check_grads(m, planned, x, y, "float64")
    assert ok, msg
    assert torch.equal(torch.get_rng_state(), state)


def test_simulated_row_interpolation_is_the_real_step():
    """A row segment through the bilinear upsampling of the logits is simulated on the meta device
    (the interpolation's row indices and weights made fake like the map they index: a real constant
    beside fake tensors is refused) and its simulated peak is the real step's."""
    peaks = []
    for device, fake in (("cpu", False), ("meta", True)):
        torch.manual_seed(0)
        m = get_model("tiny_fcn", device=device).train()
        g = capture(m, (2, 3, 20, 24), torch.float32)
        names = [n.name for n in g.nodes]
        assert names[-2] == "interpolate"
        plan = Plan.build(g, [Segment(names[1], names[-2], "rows", policy="overl", strips=3)])
        pm = apply_plan(m, plan, g)
        peaks.append(train_step_memory(pm, (2, 3, 20, 24), "sgd", fake=fake, dtype=torch.float32).absolute_peak)
    assert abs(peaks[1] - peaks[0]) <= 0.01 * peaks[0], peaks
