"""Exactness of a planned module against plain PyTorch: one training step's records and their
norm-wise relative errors (used by the test suite and ``bench.timm_sweep``).

A quantity that is zero by the maths (the gradient of a conv bias before a train-mode BatchNorm)
is rounding noise in both runs, about the dtype's epsilon x the norm of the step's whole
gradient: it is measured against a floor, ``GRAD_FLOOR[dtype]`` x the norm of all quantities of its
kind, never skipped.  The float64 floor, 1e-2, is where plain PyTorch agrees with itself with room
to spare: the noise scales with the input gradients summed (which can exceed the whole parameter
gradient many times), and on a small net (1x1 convs, BN over 64 values; tests/test_dropin_fuzz.py)
the same float64 step in channels_last moves a conv bias gradient that is zero by the maths by
6e-10 of a 1e-4 floor (6e-11 of 1e-3); a real error is many orders above either.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from lrcnn.models.loss import cross_entropy, logits_of

GRAD_FLOOR = {torch.float64: 1e-2, torch.float32: 1e-1}
#: A half-precision step (bfloat16 or float16 parameters) is itself far from the maths: plain bfloat16
#: gradients are 0.06-0.16 (whole gradient) and up to ~0.2 (one parameter, against 0.1 x the whole
#: gradient's norm) from a float32 step of the same weights, float16 about a third of that, and a
#: planned step, which sums in another order, is about as far from plain as plain is from float32.
#: It passes within this factor of plain's own distance (row plans of tiny_resnet, tiny_vgg_bn and
#: tiny_mobilenet at 8x3x64x64, bfloat16 and float16, 4 seeds each: at most 1.35 x).
SPREAD_FACTOR = 2.0


def train_step(module, owner, x, y, lr: float = 0.1, seed: int = 1234, steps: int = 1) -> Dict[str, Any]:
    """``steps`` SGD+momentum steps of ``module`` on the batch ``(x, y)`` (``owner``: the module
    holding the parameters and buffers, whose names label the record; the input requires grad):
    ``{"steps": [{"out", "loss", "xgrad", "grads"}, ...], "params", "buffers"}`` (a gradient autograd
    did not make is None; parameters and buffers after the last step)."""
    opt = torch.optim.SGD(owner.parameters(), lr=lr, momentum=0.9)
    torch.manual_seed(seed)  # same dropout / drop-path draws in the plain and the planned step
    recs = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_(True)
        out = logits_of(module(xin))
        loss = cross_entropy(out, y)
        loss.backward()
        recs.append({"out": out.detach().clone(), "loss": loss.detach().clone(),
                     "xgrad": None if xin.grad is None else xin.grad.clone(),
                     "grads": {k: (None if p.grad is None else p.grad.clone()) for k, p in owner.named_parameters()}})
        opt.step()
    return {"steps": recs, "params": {k: p.detach().clone() for k, p in owner.named_parameters()},
            "buffers": {k: b.detach().clone() for k, b in owner.named_buffers()}}


def _norm(t) -> float:
    return float(torch.linalg.vector_norm(t.detach().double())) if t.numel() else 0.0


def rel(a, b, floor: float = 0.0) -> float:
    """Norm-wise relative difference of ``a`` from the reference ``b``: ``|a - b| / max(|b|,
    floor)`` (``floor`` 0 and ``b`` zero: the absolute difference); None against a tensor, or
    different shapes: infinite."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    d = _norm(a.double() - b.double())
    s = max(_norm(b), floor)
    if d == 0.0:
        return 0.0
    return d / s if s > 0 else d


def compare(got: Dict[str, Any], ref: Dict[str, Any], floor: float = GRAD_FLOOR[torch.float64]) -> Dict[str, float]:
    """Every compared quantity's relative error, records of :func:`train_step`.  Keys: ``out``,
    ``loss``, ``xgrad``, ``grad:<p>`` (``@<i>`` appended from the second step on), ``param:<p>``,
    ``buffer:<b>`` (after the last step).  Gradients, parameters and floating buffers are measured
    against at least ``floor`` x the norm of all of their kind (that step's gradients, all
    parameters, all floating buffers); integer buffers (counters) exactly."""
    def whole(ts) -> float:
        return math.sqrt(sum(_norm(t) ** 2 for t in ts if t is not None and t.is_floating_point()))

    errs: Dict[str, float] = {}
    if len(got["steps"]) != len(ref["steps"]):
        errs["steps"] = math.inf
    for i, (g, r) in enumerate(zip(got["steps"], ref["steps"])):
        at = f"@{i}" if i else ""
        for q in ("out", "loss", "xgrad"):
            errs[q + at] = rel(g[q], r[q])
        fl = floor * whole(r["grads"].values())
        for k in sorted(set(r["grads"]) | set(g["grads"])):
            errs[f"grad:{k}{at}"] = rel(g["grads"].get(k), r["grads"].get(k), fl)
    fl = floor * whole(ref["params"].values())
    for k in sorted(set(ref["params"]) | set(got["params"])):
        errs[f"param:{k}"] = rel(got["params"].get(k), ref["params"].get(k), fl)
    fl = floor * whole(ref["buffers"].values())
    for k in sorted(set(ref["buffers"]) | set(got["buffers"])):
        a, b = got["buffers"].get(k), ref["buffers"].get(k)
        if a is not None and b is not None and not b.is_floating_point():
            errs[f"buffer:{k}"] = rel(a.to(torch.float64), b.to(torch.float64))  # counters: no floor
        else:
            errs[f"buffer:{k}"] = rel(a, b, fl)
    return errs


def within_plain_spread(got: Dict[str, torch.Tensor], plain: Dict[str, torch.Tensor],
                        reference: Dict[str, torch.Tensor], factor: float = SPREAD_FACTOR,
                        floor: float = GRAD_FLOOR[torch.float32], tol: float = 0.0
                        ) -> Tuple[bool, Optional[Tuple[str, float, float, float, float]]]:
    """Judge a low-precision step by plain PyTorch's own spread at that precision.

    ``got`` (the planned step), ``plain`` (plain PyTorch, same precision, same weights and batch)
    and ``reference`` (plain at a higher precision): quantities by name (the loss, every parameter
    gradient; None where autograd made none).  Per quantity, ``got`` may differ from ``plain`` by
    ``factor`` times plain's distance from ``reference``: that quantity's, or plain's largest over
    all gradients if larger (rounding that cancellation amplifies lands on whichever parameter it
    lands on: plain may be lucky on one that the planned step, summing in another order, is not),
    at least ``tol``; every distance norm-wise, against at least ``floor`` x the whole reference
    gradient (a gradient that is zero by the maths is rounding noise).  Returns ``(ok, worst)``,
    ``worst`` as ``(name, difference, limit, plain's spread there, plain's largest spread)`` for
    the quantity nearest its limit (None: nothing to compare)."""
    grads = [k for k, t in reference.items() if k != "loss" and t is not None]
    ref_norm = math.sqrt(sum(_norm(reference[k]) ** 2 for k in grads))
    fl = floor * ref_norm
    largest = max((rel(plain.get(k), reference[k], fl) for k in grads), default=0.0)
    worst, ok = None, True
    for k in sorted(set(reference) | set(plain) | set(got)):
        f = 0.0 if k == "loss" else fl
        d, spread = rel(got.get(k), plain.get(k), f), rel(plain.get(k), reference.get(k), f)
        limit = max(tol, factor * max(spread, largest))
        if not d <= limit:  # NaN fails
            ok = False
        if worst is None or not _ratio(d, limit) <= _ratio(worst[1], worst[2]):
            worst = (k, d, limit, spread, largest)
    return ok, worst


def _ratio(d: float, limit: float) -> float:
    return d / limit if limit > 0 else (0.0 if d == 0 else math.inf)
