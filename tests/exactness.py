"""Shared helpers for exactness tests: plain vs planned training from the same weights."""
from __future__ import annotations

import copy
import gc
from typing import Dict, Sequence

import torch
import torch.nn as nn

from lrcnn.models import capture
from lrcnn.planner import Plan, Segment
from lrcnn.executor import apply_plan
from lrcnn.executor.exactness import GRAD_FLOOR, compare, rel, train_step  # noqa: F401 (rel: for the tests)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-4,
                owner: nn.Module = None):
    """Run ``steps`` SGD+momentum steps (:func:`executor.exactness.train_step`); return per-step
    records of everything exactness covers (the gradients autograd made) and the final parameters
    and buffers.  ``owner``: the module whose parameter and buffer names label the records, if
    ``model`` (a wrapper sharing its tensors) names them otherwise."""
    rec = train_step(model, model if owner is None else owner, x, y, lr=lr, steps=steps)
    for r in rec["steps"]:
        assert torch.isfinite(r["loss"]), "training diverged: the comparison would prove nothing"
        assert r["xgrad"] is not None
        r["grads"] = {k: g for k, g in r["grads"].items() if g is not None}
    return rec["steps"], {"params": rec["params"], "buffers": rec["buffers"]}


class Reference:
    """Plain-PyTorch results for one model/input, computed once and compared against many plans."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1):
        self.model0 = copy.deepcopy(model)
        self.x, self.y, self.steps = x, y, steps
        self.records, self.final = train_steps(copy.deepcopy(model), x, y, steps)
        self.graph = capture(model, tuple(x.shape), x.dtype)

    def check(self, segments: Sequence[Segment], tol: float = None, execute=None) -> Dict[str, float]:
        """Train a copy of the model with the plan; assert every compared quantity within tol.
        ``execute(model, plan, graph)``: the module that runs the plan (default ``apply_plan``)."""
        model = copy.deepcopy(self.model0)
        plan = Plan.build(self.graph, segments)
        pm = (execute or apply_plan)(model, plan, self.graph)
        assert list(pm.state_dict().keys()) == list(model.state_dict().keys())
        assert [id(p) for p in pm.parameters()] == [id(p) for p in model.parameters()]
        records, final = train_steps(pm, self.x, self.y, self.steps, owner=model)
        tol = tol if tol is not None else TOL[self.x.dtype]
        for r, p in zip(self.records, records):
            assert set(p["grads"]) == set(r["grads"]), "parameter gradient sets differ"
        # (a quantity zero by the maths, e.g. the running mean of a BN after a 1x1 conv of a BN's
        # output, is rounding noise on both sides: measured against the floor of its kind)
        errs = compare({"steps": records, **final}, {"steps": self.records, **self.final},
                       GRAD_FLOOR[self.x.dtype])
        del pm, model, records, final
        gc.collect()  # large float64 copies: free them before the next plan is checked
        worst = max(errs, key=errs.get)
        assert errs[worst] <= tol, f"{worst}: relative error {errs[worst]:.3e} > {tol:g} " \
                                   f"(plan {[s.to_dict() for s in plan.segments]})"
        return errs


def seg_rows(first: str, last: str, policy: str, strips: int) -> Segment:
    return Segment(first, last, "rows", policy=policy, strips=strips)


class TruthReference:
    """float32 exactness where plain float32 itself is not exact to 1e-5.

    Some gradients are sums with heavy cancellation (BN biases of a batch-1 ResNet; every gradient
    of a small random MobileNet-V2): plain float32 PyTorch differs from float64 there by 1e-3..1e-2,
    and oneDNN from native convolution by as much, so a plan whose strips get other kernels cannot
    match plain's rounding to 1e-5.  Then the honest test is against the float64 truth: every
    quantity of the planned float32 step is within ``factor`` x plain float32's own error (or
    1e-5).  The truth, the plain step and the capture are made once; ``check`` runs one plan.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model0, self.x, self.y = copy.deepcopy(model), x, y
        self.truth = train_steps(copy.deepcopy(model).double(), x.double(), y, 1)[0][0]
        self.plain = train_steps(copy.deepcopy(model), x, y, 1)[0][0]
        self.graph = capture(model, tuple(x.shape), x.dtype)

    def check(self, segments: Sequence[Segment], factor: float = 2.0) -> Dict[str, float]:
        pm = apply_plan(copy.deepcopy(self.model0), Plan.build(self.graph, segments), self.graph)
        o, p, t = train_steps(pm, self.x, self.y, 1)[0][0], self.plain, self.truth
        pairs = [(k, o[k], p[k], t[k]) for k in ("out", "loss", "xgrad")]
        pairs += [(f"grad:{k}", o["grads"][k], p["grads"][k], t["grads"][k]) for k in t["grads"]]
        report = {}
        for name, a, b, ref in pairs:
            e_ours, e_plain = rel(a, ref), rel(b, ref)
            report[name] = e_ours
            assert e_ours <= max(TOL[torch.float32], factor * e_plain), \
                f"{name}: float32 error vs float64 {e_ours:.3e}, plain float32's {e_plain:.3e}"
        return report
