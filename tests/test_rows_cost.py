"""Cost and memory of row plans: forward convolution work counted by torch's FlopCounterMode, and
full-size peak memory from the fake-tensor simulator (same executor code, no real memory)."""
from __future__ import annotations

import pytest
import torch.nn as nn

from lrcnn.analysis.bench.memory_rows import conv_flops, resnet50_plan, vgg16_plan
from lrcnn.models import capture, get_model
from lrcnn.planner import Plan, Segment
from lrcnn.executor import apply_plan
from lrcnn.executor.measure import step_memory

GiB = 2**30


def _eval_bn(m):
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    return m


def _predicted_conv_flops(pm, graph) -> float:
    """Conv FLOPs the row geometry predicts: each conv's FLOPs per output row x rows computed."""
    total = 0.0
    covered = set()
    for seg in pm.row_segments:
        sched = seg.schedule(graph[seg.source].height)
        for n in seg.nodes:
            node = graph[n]
            if node.op == "conv2d":
                covered.add(n)
                per_row = node.flops_fwd / node.height
                total += per_row * sched.computed_rows(n)
    total += sum(n.flops_fwd for n in graph.nodes if n.op == "conv2d" and n.name not in covered)
    return total


@pytest.mark.parametrize("policy,strips", [("2ps", 4), ("2ps", 37), ("overl", 3), ("overl", 7)])
def test_forward_conv_work(policy, strips):
    model = _eval_bn(get_model("resnet50"))
    shape = (2, 3, 211, 150)
    graph = capture(model, shape)
    plan = Plan.build(graph, [Segment("conv1", "layer2", "rows", policy=policy, strips=strips),
                              Segment("layer3", "layer4", "rows", policy=policy, strips=2)])
    pm = apply_plan(model, plan, graph)
    plain = conv_flops(model, shape)
    counted = conv_flops(pm, shape)
    predicted = _predicted_conv_flops(pm, graph)
    # the analytic per-conv FLOPs (bias excluded: resnet convs have none) match torch's count
    assert sum(n.flops_fwd for n in graph.nodes if n.op == "conv2d") == plain
    assert counted == pytest.approx(predicted, rel=1e-12)
    if policy == "2ps":
        assert counted == plain  # every row of every conv computed exactly once
    else:
        assert counted > plain


def test_full_size_memory_resnet50_b8_eval_bn():
    model = _eval_bn(get_model("resnet50", device="meta"))
    shape = (8, 3, 224, 224)
    graph = capture(model, shape)
    plain = step_memory(model, shape, fake=True)
    pm = apply_plan(model, Plan.build(graph, resnet50_plan()), graph)
    planned = step_memory(pm, shape, fake=True)
    assert plain.peak_bytes / GiB == pytest.approx(0.682, abs=0.005)
    assert planned.peak_bytes <= 0.20 * GiB


def test_full_size_memory_vgg16_b32():
    model = get_model("vgg16", device="meta")
    shape = (32, 3, 224, 224)
    graph = capture(model, shape)
    pm = apply_plan(model, Plan.build(graph, vgg16_plan()), graph)
    planned = step_memory(pm, shape, fake=True)
    assert planned.peak_bytes <= 0.75 * GiB


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_store_recompute_set_drops_saved_outputs(bn):
    """A store segment's recompute set (BN, ReLU, add outputs) really is not kept for backward."""
    model = get_model("resnet18", device="meta")
    model.train() if bn == "train" else _eval_bn(model)
    shape = (4, 3, 112, 112)
    graph = capture(model, shape)
    first, last = graph.resolve("layer1", "first"), graph.resolve("layer4", "last")
    cheap = [n.name for n in graph.span(first, last) if n.op in ("batchnorm2d", "relu", "add")]
    plain = step_memory(apply_plan(model, Plan.build(graph, [Segment(first, last, "store")]), graph),
                        shape, fake=True)
    dropped = step_memory(apply_plan(model, Plan.build(graph, [Segment(first, last, "store", recompute=cheap)]),
                                     graph), shape, fake=True)
    # the plain store segment is plain PyTorch
    assert plain.peak_bytes == step_memory(model, shape, fake=True).peak_bytes
    # After forward, plain autograd holds every ReLU output (saved by the ReLU and by the conv or
    # add after it; ReLU runs in place on the BN/add output).  With the recompute set, none of
    # them is held: exactly their bytes are gone (BN inputs, the conv outputs, stay: BN needs them).
    live = lambda rep: dict((label, b) for label, b, _ in rep.timeline)["forward"]  # noqa: E731
    relu_out = sum(graph[n].out_bytes for n in cheap if graph[n].op == "relu")
    assert live(plain) - live(dropped) == relu_out


def test_backward_strips_leave_nothing_behind():
    """Train-mode BN rows (OverL): after each strip of every backward sweep (gradient-constant
    sweeps included) only the input gradient map and the parameter-gradient sums remain; no band
    of the strip (and with it the strip's graph, which a constants sweep does not traverse)
    outlives it."""
    from lrcnn.models import set_bn_mode
    from lrcnn.executor.measure import train_step_memory

    model = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "train")
    shape = (2, 3, 128, 128)
    graph = capture(model, shape)
    first, last = graph.resolve("layer1", "first"), graph.resolve("layer2", "last")
    plan = Plan.build(graph, [Segment(first, last, "rows", policy="overl", strips=4)])
    rep = train_step_memory(apply_plan(model, plan, graph), shape, "momentum", fake=True)
    live = [b for label, b, _ in rep.timeline if "backward strip" in label]
    begin = dict((label, b) for label, b, _ in rep.timeline)["segment 0 backward begin"]
    nodes = graph.span(first, last)
    bound = sum(n.param_bytes for n in nodes) + graph.nodes[graph.index(first) - 1].out_bytes
    assert len(live) > 8 and max(live) - begin <= 1.05 * bound, (begin, bound, live)
