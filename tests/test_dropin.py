"""Drop-in exactness: PyTorch training features crossed with every segment mode.

Each cell of the matrix (feature x mode) is either *exact* (float64: output, loss, input gradient,
every parameter gradient, parameters after an SGD step and every buffer within 1e-10 of plain
PyTorch; a gradient that is zero by the maths is compared against 1e-10 of the whole gradient
vector's norm) or *refused* with the project's own error naming the module.  ``EXPECTED`` is the
matrix; README's "Compatibility" table is checked against it (``test_readme_table``).
"""
from __future__ import annotations

import copy
import io
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, prune

from exactness import GRAD_FLOOR, rel
from lrcnn.executor import RowSegmentError, apply_plan
from lrcnn.models import capture
from lrcnn.models.ops import recomputable
from lrcnn.planner import Plan, Segment

TOL = 1e-10


class Net(nn.Module):
    """conv-BN-ReLU stem, a strided conv-BN-ReLU, a residual conv-BN block, a classifier head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(6, 6, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        y = torch.relu(self.bn3(self.conv3(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class EmaScale(nn.Module):
    """A user's stateful layer: scales by an exponential moving average it updates in forward."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("ema", torch.ones(1, c, 1, 1))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * x.mean((0, 2, 3), keepdim=True))
        return x * self.ema


class BNAct(nn.BatchNorm2d):
    """A fused norm+activation layer as timm writes it: a BatchNorm2d subclass with its own forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


SHAPE = (2, 3, 12, 10)

# -- segment modes -------------------------------------------------------------------------------
# rows over the whole trunk (train-mode or eval-mode BN), checkpoint, store recomputing BN/ReLU/add
MODES = {
    "rows 2PS": ([Segment("conv1", "relu", "rows", policy="2ps", strips=2)], "train"),
    "rows OverL": ([Segment("conv1", "relu", "rows", policy="overl", strips=3)], "train"),
    "rows eval-BN": ([Segment("conv1", "relu", "rows", policy="2ps", strips=3)], "eval"),
    "checkpoint": ([Segment("conv1", "relu", "checkpoint")], "train"),
    # (recompute: every node but the last that may be recomputed, as the model's graph has them)
    "store+recompute": ([Segment("conv1", "relu", "store", recompute=["*"])], "train"),
}


# -- features: (prepare(model) -> model, step kind) -----------------------------------------------
def _freeze(m):
    for p in list(m.conv1.parameters()) + list(m.bn1.parameters()) + [m.conv3.weight]:
        p.requires_grad_(False)
    return m


def _fwd_hook(m):
    m.conv2.register_forward_hook(lambda mod, inp, out: out * 1.5)
    return m


def _pre_hook(m):
    m.bn2.register_forward_pre_hook(lambda mod, inp: (inp[0] + 0.25,))
    return m


def _bwd_hook(m):
    m.conv2.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.5,))
    return m


def _weight_norm(m):
    parametrizations.weight_norm(m.conv2)
    return m


def _spectral_norm(m):
    parametrizations.spectral_norm(m.conv3)
    return m


def _orthogonal(m):
    parametrizations.orthogonal(m.conv1)
    return m


def _prune(m):
    prune.l1_unstructured(m.conv2, "weight", amount=0.3)
    return m


def _qat(m):
    qat = torch.ao.nn.qat.Conv2d(6, 6, 3, 2, 1, qconfig=torch.ao.quantization.get_default_qat_qconfig("x86"))
    with torch.no_grad():
        qat.weight.copy_(m.conv2.weight)
        qat.bias.copy_(m.conv2.bias)
    m.conv2 = qat
    return m


def _ema(m):
    m.relu1 = nn.Sequential(nn.ReLU(), EmaScale(6))
    return m


def _bnact(m):
    new = BNAct(6)
    new.load_state_dict(m.bn2.state_dict())
    m.bn2, m.relu2 = new, nn.Identity()
    return m


FEATURES = {
    "plain training": (None, "step"),
    "frozen parameters": (_freeze, "step"),
    "input without grad": (None, "step-nograd-input"),
    "forward hook": (_fwd_hook, "step"),
    "forward pre-hook": (_pre_hook, "step"),
    "full backward hook": (_bwd_hook, "step"),
    "weight_norm (parametrization)": (_weight_norm, "step"),
    "spectral_norm": (_spectral_norm, "step"),
    "orthogonal": (_orthogonal, "step"),
    "pruning mask": (_prune, "step"),
    "torch.ao QAT conv": (_qat, "step"),
    "stateful custom layer (EMA buffer)": (_ema, "step"),
    "BatchNorm2d subclass (norm+act)": (_bnact, "step"),
    "double backward (gradient penalty)": (None, "penalty"),
    "backward twice (retain_graph=True)": (None, "twice"),
    "no_grad inference": (None, "no_grad"),
    "eval() inference": (None, "eval"),
    "copy.deepcopy": (None, "deepcopy"),
    "swa_utils.AveragedModel": (None, "averaged"),
    "torch.save / torch.load": (None, "save"),
    "state_dict round trip": (None, "state_dict"),
}

# PyTorch's fake quantization runs in float32 only: the QAT cells compare in float32, where the
# same ops in the same order must agree to float32 rounding of the few BN values a store
# recompute renormalises
DTYPE = {f: torch.float32 if f == "torch.ao QAT conv" else torch.float64 for f in FEATURES}
TOLS = {torch.float64: TOL, torch.float32: 1e-6}

# what each cell must do: "exact" or "refused"
ROWS = ("rows 2PS", "rows OverL", "rows eval-BN")
_ROWS_REFUSE = {"backward twice (retain_graph=True)", "forward hook", "forward pre-hook", "full backward hook", "weight_norm (parametrization)",
                "spectral_norm", "orthogonal", "pruning mask", "torch.ao QAT conv",
                "stateful custom layer (EMA buffer)", "BatchNorm2d subclass (norm+act)"}
# what the refusal says (RowSegmentError: the node, its module class, this, and what to do)
REASON = {
    "backward twice (retain_graph=True)": "a second backward through the same forward (retain_graph=True) is not supported",
    "forward hook": "has a forward hook, which row strips cannot run",
    "forward pre-hook": "has a forward pre-hook, which row strips cannot run",
    "full backward hook": "has a backward hook, which row strips cannot run",
    "weight_norm (parametrization)": "has a parametrization of weight, which row strips cannot run",
    "spectral_norm": "has a parametrization of weight, which row strips cannot run",
    "orthogonal": "has a parametrization of weight, which row strips cannot run",
    "pruning mask": "has a forward pre-hook, which row strips cannot run",
    "torch.ao QAT conv": "subclasses Conv2d with its own forward(), which row strips cannot reproduce",
    "stateful custom layer (EMA buffer)": "module type EmaScale is not supported in row segments",
    "BatchNorm2d subclass (norm+act)": "subclasses _BatchNorm with its own forward(), which row strips cannot reproduce",
}
assert set(REASON) == _ROWS_REFUSE
EXPECTED = {(f, m): (f"refused: {REASON[f]}" if m in ROWS and f in _ROWS_REFUSE else "exact")
            for f in FEATURES for m in MODES}


def _net(feature: str, bn: str, prep=None) -> nn.Module:
    torch.manual_seed(0)
    m = Net()
    prep = prep or FEATURES.get(feature, (None,))[0]
    if prep is not None:
        m = prep(m)
    m.to(DTYPE.get(feature, torch.float64)).train()
    with torch.no_grad():  # running statistics away from 0/1, so eval BN is not the identity
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5) if mod.weight.requires_grad else None
    if bn == "eval":
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
    return m


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*SHAPE, generator=g, dtype=dtype), torch.randint(0, 5, (SHAPE[0],), generator=g)


def _loss(model, x, y, kind):
    out = model(x)
    loss = F.cross_entropy(out, y)
    if kind == "penalty":  # gradient penalty on the input: needs a backward that is differentiable
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        loss = loss + 0.3 * g.pow(2).sum()
    return out, loss


def _step(model, owner, kind):
    """One SGD+momentum step (or an inference pass); everything exactness covers."""
    x, y = _data(next(owner.parameters()).dtype)
    opt = torch.optim.SGD([p for p in owner.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    if kind == "no_grad":
        with torch.no_grad():
            return {"out": model(x)}, {}
    if kind == "eval":
        model.eval()
        return {"out": model(x)}, {}
    if kind != "step-nograd-input":
        x.requires_grad_(True)
    rec = {}
    for it in range(2):  # two steps: the second sees the first's state (running statistics, EMA)
        opt.zero_grad(set_to_none=True)
        out, loss = _loss(model, x, y, kind)
        if kind == "twice":
            loss.backward(retain_graph=True)
        loss.backward()
        rec[f"out@{it}"], rec[f"loss@{it}"] = out.detach().clone(), loss.detach().clone()
        if x.requires_grad:
            rec[f"xgrad@{it}"] = x.grad.clone()
            x.grad = None
        for k, p in owner.named_parameters():
            if p.grad is not None:
                rec[f"grad:{k}@{it}"] = p.grad.clone()
        opt.step()
    state = {f"param:{k}": p.detach().clone() for k, p in owner.named_parameters()}
    state.update({f"buffer:{k}": b.detach().clone() for k, b in owner.named_buffers()})
    return rec, state


def _compare(ours: dict, ref: dict) -> dict:
    """Relative error of every quantity; gradients against max(own norm, GRAD_FLOOR x the norm of
    that step's whole gradient)."""
    assert set(ours) == set(ref), f"different quantities: {sorted(set(ours) ^ set(ref))}"
    whole = {}
    for k, r in ref.items():
        if k.startswith("grad:"):
            step = k.rpartition("@")[2]
            whole[step] = whole.get(step, 0.0) + r.double().norm().item() ** 2
    errs = {}
    for k, r in ref.items():
        a = ours[k]
        if not r.is_floating_point():
            assert torch.equal(a, r), f"{k} differs: {a} vs {r}"
            continue
        floor = GRAD_FLOOR[r.dtype] * whole[k.rpartition("@")[2]] ** 0.5 if k.startswith("grad:") else 0.0
        errs[k] = rel(a, r, floor)
    return errs


def _planned(model, segments, training=None):
    g = capture(model, SHAPE, next(model.parameters()).dtype)
    segs = []
    for s in segments:
        if s.recompute == ["*"]:
            span = g.span(g.resolve(s.first), g.resolve(s.last, "last"))
            s = Segment(s.first, s.last, "store", recompute=[n.name for n in span[:-1] if recomputable(n)])
        segs.append(s)
    return apply_plan(model, Plan.build(g, segs, training=training), g)


def _run_cell(feature: str, mode: str, prep=None) -> dict:
    segments, bn = MODES[mode]
    kind = FEATURES[feature][1] if prep is None else "step"
    plain = _net(feature, bn, prep)
    ref = _step(plain, plain, "step" if kind in ("deepcopy", "averaged", "save", "state_dict") else kind)
    model = _net(feature, bn, prep)
    before = copy.deepcopy(model.state_dict())
    pm = _planned(model, segments)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "planning changed the model's state"
    owner = model
    if kind == "deepcopy":
        pm = copy.deepcopy(pm)
        owner = pm
    elif kind == "averaged":
        avg = torch.optim.swa_utils.AveragedModel(pm)
        ours = _step(avg.module, avg.module, "step")
        assert all(p.grad is None for p in model.parameters()), "the averaged copy trained the original"
        avg.update_parameters(avg.module)
        return _compare(_flat(ours), _flat(ref))
    elif kind == "save":
        buf = io.BytesIO()
        torch.save(pm, buf)
        buf.seek(0)
        pm = torch.load(buf, weights_only=False)
        owner = pm
    elif kind == "state_dict":
        sd = copy.deepcopy(pm.state_dict())
        fresh = _net(feature, bn)
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)
        pm2 = _planned(fresh, segments)
        pm2.load_state_dict(sd)
        pm, owner = pm2, fresh
    ours = _step(pm, owner, "step" if kind in ("deepcopy", "save", "state_dict") else kind)
    if kind == "deepcopy":
        assert all(p.grad is None for p in model.parameters()), "the copy trained the original's parameters"
    return _compare(_flat(ours), _flat(ref))


def _flat(pair):
    rec, state = pair
    return {**rec, **state}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_in_mode(feature, mode):
    if EXPECTED[(feature, mode)].startswith("refused"):
        with pytest.raises(RowSegmentError) as e:
            _run_cell(feature, mode)
        msg = str(e.value)
        assert REASON[feature] in msg and "checkpoint/store" in msg, msg
        return
    errs = _run_cell(feature, mode)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOLS[DTYPE[feature]], f"{worst}: relative error {errs[worst]:.3e}"


# -- autocast (CPU bfloat16 here) ----------------------------------------------------------------
def _amp_step(model, autocast=True):
    x, y = _data(torch.float32)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    rec = {"out": out.detach().float(), "loss": loss.detach().float(), "xgrad": x.grad}
    rec.update({f"grad:{k}@0": p.grad for k, p in model.named_parameters()})
    return rec


def _amp_net(bn):
    torch.manual_seed(0)
    m = Net().train()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.train(bn == "train")
    return m


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_recompute_runs_the_forwards_dtypes(mode):
    """Under torch.autocast every recompute runs each op in the dtype its forward used: the
    forward (output, loss) is bit-identical to plain autocast in every mode, and so is every
    gradient of checkpoint and store segments.  Row strips sum gradients from per-strip half
    precision partials (PyTorch's kernels round each strip's weight gradient to bfloat16), so a
    row segment's training forward under autocast is refused, naming the fix, unless the plan
    accepts that (training.amp_rows, ``planner solve --amp-rows``); its no-grad forward is
    bit-identical.  Accepted, they stay as accurate against the float32 step as plain autocast
    is (within 20x its error on a quantity, measured up to 17x on a bias that is zero by the
    maths)."""
    segments, bn = MODES[mode]
    ref = _amp_step(_amp_net(bn))
    model = _amp_net(bn)
    if mode in ROWS:
        pm = _planned(model, segments)
        with pytest.raises(RowSegmentError, match=r"under torch.autocast.*checkpoint/store.*--amp-rows"):
            _amp_step(pm)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            x, _ = _data(torch.float32)
            assert torch.equal(pm(x), _amp_net(bn)(x))
        pm = _planned(_amp_net(bn), segments, {"optimizer": "sgd", "bn": bn, "amp_rows": True})
    else:
        pm = _planned(model, segments)
    ours = _amp_step(pm)
    assert torch.equal(ours["out"], ref["out"]) and torch.equal(ours["loss"], ref["loss"])
    if mode not in ROWS:
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
        return
    truth = _amp_step(_amp_net(bn), autocast=False)
    whole = sum(v.double().norm().item() ** 2 for k, v in truth.items() if k.startswith("grad:")) ** 0.5
    for k in truth:
        floor = GRAD_FLOOR[torch.float32] * whole if k.startswith("grad:") else 0.0
        e_ours, e_plain = rel(ours[k], truth[k], floor), rel(ref[k], truth[k], floor)
        assert e_ours <= max(20 * e_plain, 1e-6), f"{k}: {e_ours:.2e} vs plain autocast's {e_plain:.2e}"


# -- README: the compatibility table is this matrix ----------------------------------------------
AMP_CELLS = {m: ("refused in training: under torch.autocast ... plan this part as checkpoint/store or accept the "
                 "difference with --amp-rows (then gradients at half-precision rounding); forward bit-identical"
                 if m in ROWS else "exact (bit-identical to plain autocast)") for m in MODES}


def compat_table() -> str:
    """The README's compatibility table, made from EXPECTED (and AMP_CELLS for autocast)."""
    lines = ["| feature | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for f in FEATURES:
        lines.append(f"| {f} | " + " | ".join(EXPECTED[(f, m)] for m in MODES) + " |")
    lines.append("| torch.autocast (bfloat16 on CPU) | " + " | ".join(AMP_CELLS[m] for m in MODES) + " |")
    return "\n".join(lines)


def test_readme_table(repo_root):
    """README's Compatibility table is generated from this file's matrix: print it with
    ``python -c 'import sys; sys.path[:0] = ["tests", "."]; import test_dropin; print(test_dropin.compat_table())'``."""
    text = open(os.path.join(repo_root, "README.md")).read()
    block = re.search(r"<!-- compat-table -->\n(.*?)\n<!-- /compat-table -->", text, re.S)
    assert block, "README.md has no <!-- compat-table --> block"
    assert block.group(1).strip() == compat_table(), "README's compatibility table is out of date: regenerate it"


class Branchy(Net):
    """Traced code that branches on self.training (fx keeps the branch taken at trace time)."""

    def forward(self, x):
        y = super().forward(x)
        return y * 0.5 if self.training else y + 1.0


@pytest.mark.parametrize("mode", ["rows 2PS", "checkpoint"])
def test_eval_runs_the_code_of_the_eval_mode(mode):
    """A planned module switched to eval() runs the model's eval-mode code (here a different
    branch), not the training branch the plan was traced with; back in train() the plan runs."""
    torch.manual_seed(0)
    model = Branchy().double()
    pm = _planned(model, MODES[mode][0])
    x, _ = _data(torch.float64)
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x), model(x))
    pm.train()
    ref = copy.deepcopy(model).train()
    assert rel(pm(x), ref(x), 0.0) <= TOL


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("act", ["ReLU", "SiLU", "Identity"])
def test_timm_batchnorm_act_runs_in_every_mode(mode, act):
    """timm's fused BatchNormAct2d (a BatchNorm2d subclass whose forward is BN, then its ``drop``
    and ``act`` modules) runs in row strips as a BN followed by its activation, and exactly in
    every mode: two SGD steps, float64, buffers included."""
    timm_layers = pytest.importorskip("timm.layers")

    def prep(m):
        new = timm_layers.BatchNormAct2d(6, act_layer=getattr(nn, act))
        new.load_state_dict(m.bn2.state_dict())
        m.bn2, m.relu2 = new, nn.Identity()
        return m

    errs = _run_cell("timm BatchNormAct2d", mode, prep)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{worst}: relative error {errs[worst]:.3e}"


def test_solve_never_proposes_what_apply_plan_refuses():
    """The capture marks modules row strips cannot run (a hook, a parametrization, a QAT-style
    subclass) as not row-wise, so every plan planner.solve makes for such a model, from the
    smallest feasible budget to the plain step's, is accepted by apply_plan, keeps those modules
    out of row segments, and trains exactly."""
    from lrcnn.planner.solve import Solver, capture_model

    torch.manual_seed(0)
    model = _spectral_norm(_fwd_hook(Net())).double().train()
    name, g = capture_model(model, (2, 3, 48, 40), dtype="float64", bn="train")
    s = Solver(g, name, bn="train", device_profile="cpu", headroom=0.0)
    lo, hi = s.smallest_budget(), s.baseline()["peak"]
    kinds = set()
    for budget in (lo, (lo + hi) // 2, hi):
        plan = s.solve(budget)
        kinds |= {seg.mode for seg in plan.segments}
        for seg in plan.segments:
            if seg.mode == "rows":
                assert not {"conv2", "conv3"} & {n.name for n in g.span(seg.first, seg.last)}, seg
        x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
        y = torch.randint(0, 5, (2,))
        ref = copy.deepcopy(model)
        pm = apply_plan(copy.deepcopy(model), plan, g)
        a, b = F.cross_entropy(pm(x), y), F.cross_entropy(ref(x), y)
        a.backward()
        b.backward()
        assert rel(a, b, 0.0) <= TOL
        grads = {k: p.grad for k, p in ref.named_parameters()}
        whole = sum(v.norm().item() ** 2 for v in grads.values()) ** 0.5
        for (k, p), q in zip(pm.named_parameters(), grads.values()):
            assert rel(p.grad, q, GRAD_FLOOR[torch.float64] * whole) <= TOL, k
    assert "rows" in kinds  # (the stem is still planned in rows)
