"""Cost and memory of row plans: forward convolution work counted by torch's FlopCounterMode, and
full-size peak memory from the fake-tensor simulator (same executor code, no real memory)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bench.memory_rows import conv_flops, resnet50_plan, vgg16_plan
from models import capture, get_model
from planner import Plan, Segment
from executor import apply_plan
from executor.measure import step_memory

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
