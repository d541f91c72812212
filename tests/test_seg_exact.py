"""The torchvision segmentation models in row strips, exactly plain PyTorch (issue 27).

Each model at an odd input size (2x3x97x129: no stride divides it; the zoo's U-Net at 80x112, the
smallest multiple of 16 it takes that is not a power of two), float64, training-mode
BatchNorm, dict output, per-pixel cross-entropy: the planner's smallest plan for a row policy
(row segments over the high-resolution stem and blocks, checkpoint and store segments over the
rest, the folded ``x.shape[-2:]`` of the final interpolate included) trains one step to within
1e-10 of plain PyTorch on the loss, the logits, the input gradient, every parameter gradient and
parameter, and the BN running statistics.

These models hold 3-61 M float64 parameters and several use dilated (and dilated depthwise)
convolutions, which PyTorch's CPU kernels run slowly in float64: a case takes 30 s to several
minutes here.  CI runs LR-ASPP with OverL; ``pytest --full tests/test_seg_exact.py`` runs every
model with both policies (marker ``full``).
"""
from __future__ import annotations

import pytest
import torch

from exactness import Reference
from lrcnn.models import get_model
from lrcnn.planner import Segment
from lrcnn.planner.solve import Solver

MODELS = ["unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "fcn_resnet101",
          "deeplabv3_resnet50", "deeplabv3_resnet101"]
# the zoo's U-Net: one row segment over the whole encoder-decoder (multi-scale: rows down to the
# bottleneck and up through every skip join; at this size its smallest plan is checkpoint only)
WHOLE = {"unet": {"2ps": (5, "layerwise"), "overl": (3, "sweeps")}}  # (strips, options.bn)
SIZE = {"unet": (80, 112)}  # (the zoo's U-Net joins its skips by concatenation: 16 must divide H and W)
IN_CI = {("lraspp_mobilenet_v3_large", "overl")}
CASES = [pytest.param(m, p, marks=() if (m, p) in IN_CI else pytest.mark.full)
         for m in MODELS for p in ("overl", "2ps")]

_refs: dict = {}


def _reference(name: str) -> Reference:
    """Plain float64 training of ``name`` for one step (made once per model; the last one only:
    these models are large)."""
    if name not in _refs:
        _refs.clear()
        torch.manual_seed(0)
        model = get_model(name, num_classes=3).double().train()
        g = torch.Generator().manual_seed(0)
        h, w = SIZE.get(name, (97, 129))
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (2, h, w), generator=g)
        _refs[name] = Reference(model, x, y, steps=1)
    return _refs[name]


@pytest.mark.parametrize("name,policy", CASES)
def test_segmentation_model_in_rows_exact(name, policy):
    ref = _reference(name)
    if name in WHOLE:
        g = ref.graph
        strips, bn = WHOLE[name][policy]
        segments = [Segment(g.nodes[1].name, g.nodes[-2].name, "rows", policy=policy, strips=strips,
                            options={"bn": bn})]
    else:
        solver = Solver(ref.graph, name, policy=policy, bn="train")
        segments = solver.smallest_segments()
    rows = [s for s in segments if s.mode == "rows"]
    assert rows and all(s.policy == policy for s in rows), [s.to_dict() for s in segments]
    errs = ref.check(segments)
    assert any(k.startswith("buffer:") and "running_var" in k for k in errs)
