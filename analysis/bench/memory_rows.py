"""Peak memory and forward convolution work of hand-written row plans vs plain PyTorch.

    python -m lrcnn.analysis.bench.memory_rows            # real CPU steps, storage accounting (VGG-16 b32: minutes)
    python -m lrcnn.analysis.bench.memory_rows --fake     # the same code under FakeTensorMode (seconds)
    python -m lrcnn.analysis.bench.memory_rows --csv out.csv

Peak = new live tensor bytes during one training step (forward, cross-entropy, backward):
activations, parameter gradients and transients; parameters and the input batch are excluded
(the measure used for the original LR-CNN numbers in ``shared/docs/lrcnn-paper-notes.md``).
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import step_memory
from lrcnn.models import capture, get_model, memory
from lrcnn.planner import Plan, Segment
from lrcnn.planner.files import write_csv_atomic

GiB = 2**30


def _rows(first, last, policy, strips):
    return Segment(first, last, "rows", policy=policy, strips=strips)


def vgg16_plan() -> List[Segment]:
    """OverL per pair of stages at the top, then per stage: small halos, small boundary maps."""
    f = lambda a, b, st: _rows(f"features_{a}", f"features_{b}", "overl", st)  # noqa: E731
    return [f(0, 9, 56), f(10, 16, 28), f(17, 23, 14), f(24, 30, 7)]


def resnet50_plan() -> List[Segment]:
    """OverL through stem+layer1 and layer2, OverL per layer3 block, checkpointed layer4."""
    segs = [_rows("conv1", "layer1", "overl", 56), _rows("layer2", "layer2", "overl", 28)]
    segs += [_rows(f"layer3.{i}", f"layer3.{i}", "overl", 7) for i in range(6)]
    return segs + [Segment("layer4", "layer4", "checkpoint")]


def resnet50_2ps_plan() -> List[Segment]:
    return [_rows("conv1", "layer1", "2ps", 8), _rows("layer2", "layer3", "2ps", 4),
            Segment("layer4", "layer4", "checkpoint")]


CASES = [
    # name, model, batch, bn, plan, target GiB (issue), original LR-CNN best (GiB)
    ("VGG-16 b32", "vgg16", 32, "none", vgg16_plan, 0.75, 1.05),
    ("ResNet-50 b8 eval-BN", "resnet50", 8, "eval", resnet50_plan, 0.20, 0.203),
    ("ResNet-50 b8 eval-BN 2PS", "resnet50", 8, "eval", resnet50_2ps_plan, None, 0.393),
]


def _model(name, bn):
    m = get_model(name)
    m.train()
    if bn == "eval":
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
    return m


def conv_flops(model, shape) -> int:
    """Convolution FLOPs of one forward pass (counted by torch's FlopCounterMode, fake tensors)."""

    with memory.fake_mode():
        state = memory.fake_state(model)
        x = torch.randn(*shape)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            torch.func.functional_call(model, state, (x,))
    counts = fc.get_flop_counts()["Global"]  # (per-module entries repeat the same ops)
    return sum(v for op, v in counts.items() if "convolution" in str(op))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrcnn.analysis.bench.memory_rows", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake", action="store_true", help="simulate with fake tensors instead of real CPU steps")
    ap.add_argument("--only", help="run only cases whose name contains this text")
    ap.add_argument("--csv", help="also write the table as CSV")
    args = ap.parse_args(argv)
    import pandas as pd

    rows = []
    for label, name, batch, bn, plan_fn, target, original in CASES:
        if args.only and args.only.lower() not in label.lower():
            continue
        shape = (batch, 3, 224, 224)
        model = _model(name, bn)
        plain = step_memory(model, shape, fake=args.fake)
        graph = capture(model, shape, model_name=name)
        plan = Plan.build(graph, plan_fn())
        pm = apply_plan(model, plan, graph)
        planned = step_memory(pm, shape, fake=args.fake)
        work = conv_flops(pm, shape) / conv_flops(model, shape)
        rows.append({
            "case": label, "plain_GiB": plain.peak_bytes / GiB, "plan_GiB": planned.peak_bytes / GiB,
            "reduction": 1 - planned.peak_bytes / plain.peak_bytes,
            "target_GiB": target, "original_lrcnn_GiB": original,
            "meets_target": (planned.peak_bytes / GiB <= target) if target else None,
            "fwd_conv_work": work, "method": planned.method,
            "plan": "; ".join(f"{s.first}..{s.last}:{s.mode}" + (f"/{s.policy}x{s.strips}" if s.mode == "rows" else "")
                              for s in plan.segments),
        })
        print(f"{label}: plain {plain.peak_bytes / GiB:.3f} GiB, plan {planned.peak_bytes / GiB:.3f} GiB", file=sys.stderr)
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.3f}".format):
        print(df.drop(columns=["plan"]).to_string(index=False))
        for r in rows:
            print(f"  {r['case']}: {r['plan']}")
    print(f"torch {torch.__version__}, {'simulated (FakeTensorMode)' if args.fake else 'CPU storage accounting'}")
    if args.csv:
        write_csv_atomic(df, args.csv)
    return 0 if all(r["meets_target"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
