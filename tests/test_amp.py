"""Mixed precision planned as it runs (``--amp bf16|fp16``): the capture under autocast, the plan
that records it, the cost model against the simulator and a real CPU step, and ``planner run``.

Exactness under autocast (every recompute in the forward's dtypes, checkpoint and store
bit-identical to plain autocast) is in tests/test_dropin.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import grad_scaler, train_step, train_step_memory
from lrcnn.models import AMP_DTYPES, capture, get_model, set_bn_mode
from lrcnn.planner import Plan, PlanError, Segment
from lrcnn.planner.cli import main
from lrcnn.planner.cost import CostModel
from lrcnn.planner.plan import AMP_DTYPES as PLAN_AMP

SHAPE = (2, 3, 64, 64)


def _model(name="resnet18", bn="train", device=None):
    return set_bn_mode(get_model(name, num_classes=10, device=device), bn)


def test_one_list_of_amp_dtypes():
    assert tuple(AMP_DTYPES) == PLAN_AMP


def test_capture_under_autocast_prices_half_precision_activations():
    model = _model(device="meta")
    g32 = capture(model, SHAPE)
    g16 = capture(model, SHAPE, amp="bf16")
    assert g16.amp == "bf16" and g32.amp is None and g16.dtype == "float32"
    assert g16.fingerprint() != g32.fingerprint() != capture(model, SHAPE, amp="fp16").fingerprint()
    for a, b in zip(g32.nodes, g16.nodes):
        assert a.shape == b.shape
        if a.op in ("conv2d", "batchnorm2d", "relu", "maxpool2d"):  # autocast makes them bf16
            assert 2 * b.out_bytes == a.out_bytes, a.name
    assert g16.input_node.out_bytes == g32.input_node.out_bytes  # the batch stays float32
    assert g16.param_bytes == g32.param_bytes and g16.grad_bytes == g32.grad_bytes  # float32 weights
    conv = next(n for n in g16.nodes if n.op == "conv2d" and n.name != "conv1")
    # autocast's bfloat16 copy of the weight is saved for backward, whole in every strip
    assert conv.extra_fixed == conv.param_bytes // 2 and conv.extra_saved >= conv.extra_fixed
    # planning never changes the model
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_amp_needs_float32_parameters_and_a_known_dtype():
    model = _model(device="meta")
    with pytest.raises(ValueError, match="--dtype float32"):
        capture(model.to(torch.float64), SHAPE, torch.float64, amp="bf16")
    with pytest.raises(ValueError, match="bf16, fp16"):
        capture(_model(device="meta"), SHAPE, amp="int8")


def test_plan_records_amp_and_refuses_another_precision():
    model = _model(device="meta")
    g16 = capture(model, SHAPE, amp="bf16")
    plan = Plan.build(g16, [Segment("conv1", "layer1", "rows", policy="2ps", strips=2)])
    assert plan.training["amp"] == "bf16"
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    again.validate(g16)
    with pytest.raises(PlanError, match="--amp bf16"):
        again.validate(capture(model, SHAPE))
    bad = plan.to_dict()
    bad["training"]["amp"] = "fp8"
    with pytest.raises(PlanError, match="training.amp"):
        Plan.from_dict(bad)
    bad["training"]["amp"], bad["dtype"] = "bf16", "float64"
    with pytest.raises(PlanError, match="float32"):
        Plan.from_dict(bad)


PLANS = {
    "store": [],
    "checkpoint": [Segment("layer1", "layer2", "checkpoint"), Segment("layer4", "layer4", "checkpoint")],
    "rows-2ps": [Segment("conv1", "layer1", "rows", policy="2ps", strips=3)],
    "rows-overl": [Segment("conv1", "layer2", "rows", policy="overl", strips=4)],
    "mixed": [Segment("conv1", "layer1", "rows", policy="overl", strips=4),
              Segment("layer2", "layer3", "rows", policy="2ps", strips=2), Segment("layer4", "layer4", "checkpoint")],
}


@pytest.mark.parametrize("kind,amp", [(k, "bf16") for k in PLANS] + [("mixed", "fp16")])
def test_cost_model_prices_autocast_steps(kind, amp):
    """Predicted whole-step peak against the simulated step under autocast (train-mode BN, in
    rows by strip sweeps): within the solver's headroom, and never more than 1% below."""
    from lrcnn.planner.solve import HEADROOM

    model = _model(device="meta")
    graph = capture(model, SHAPE, amp=amp)
    plan = Plan.build(graph, PLANS[kind], training={"optimizer": "momentum", "bn": "train", "amp_rows": True})
    pred = CostModel(graph, optimizer="momentum", profile="cpu").predict(plan)
    sim = train_step_memory(apply_plan(model, plan, graph), SHAPE, "momentum", fake=True, amp=amp)
    err = (pred["peak_bytes"] - sim.absolute_peak) / sim.absolute_peak
    assert -0.01 <= err <= HEADROOM, f"{kind}: predicted {pred['peak_bytes']} vs simulated {sim.absolute_peak}"


def test_simulated_autocast_step_is_the_real_one():
    """The simulator's autocast step allocates what the real CPU step does (storage accounting),
    checkpoint segments included: they keep no autocast weight copies after their forward."""
    torch.manual_seed(0)
    model = _model("resnet18", bn="eval")
    graph = capture(model, SHAPE, amp="bf16")
    plan = Plan.build(graph, [Segment("conv1", "maxpool", "rows", policy="overl", strips=2)] + PLANS["checkpoint"],
                      training={"optimizer": "sgd", "bn": "eval", "amp_rows": True})
    planned = apply_plan(model, plan, graph)
    sim = train_step_memory(planned, SHAPE, "sgd", fake=True, amp="bf16")
    real = train_step_memory(planned, SHAPE, "sgd", fake=False, amp="bf16")
    assert sim.absolute_peak == real.absolute_peak
    pred = CostModel(graph, optimizer="sgd", profile="cpu").predict(plan)
    assert abs(pred["peak_bytes"] - real.absolute_peak) <= 0.01 * real.absolute_peak


def test_fp16_step_with_grad_scaler_trains():
    """float16 autocast with a GradScaler (CPU here, CUDA on a GPU): the planned step's scaled
    gradients, unscaled, are plain PyTorch's; the optimizer moves the weights."""
    torch.manual_seed(0)
    model = _model("tiny_resnet").double().float()
    graph = capture(model, SHAPE, amp="fp16")
    plan = Plan.build(graph, [Segment("conv1", "layer1", "checkpoint")], training={"optimizer": "sgd", "bn": "train"})
    planned = apply_plan(model, plan, graph)
    opt = torch.optim.SGD(planned.parameters(), lr=0.1)
    scaler = grad_scaler("cpu", "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and grad_scaler("cpu", "bf16") is None
    before = [p.detach().clone() for p in planned.parameters()]
    x, y = torch.randn(SHAPE), torch.randint(0, 10, (SHAPE[0],))
    loss = train_step(planned, opt, x, y, "fp16", scaler)
    assert torch.isfinite(loss) and scaler.get_scale() > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, planned.parameters()))


def test_cli_solve_and_run_with_amp(tmp_path, capsys):
    path = str(tmp_path / "p.json")
    rc = main(["solve", "--model", "tiny_resnet", "--batch", "8", "--resolution", "64", "--budget", "1.2MB",
               "--amp", "bf16", "--amp-rows", "--device-profile", "cpu", "-o", path])
    out = capsys.readouterr().out
    assert rc == 0 and "autocast bf16" in out
    with open(path) as f:
        plan = json.load(f)
    assert plan["training"]["amp"] == "bf16" and plan["training"]["amp_rows"] is True
    assert any(s["mode"] == "rows" for s in plan["segments"])
    rc = main(["run", path, "--steps", "1", "--warmup", "0", "--device", "cpu", "--check-grads", "--quiet",
               "--out", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "check-grads OK" in out and "autocast bf16" in out
    import pandas as pd
    rec = pd.read_csv(tmp_path / "r.csv")
    assert set(rec["amp"]) == {"bf16"}
    step = rec[(rec.scope == "step") & rec.tracked]
    assert (step.actual_peak_bytes <= step.budget_bytes).all()


@pytest.mark.parametrize("argv,msg", [
    (["solve", "--model", "tiny_resnet", "--budget", "1GB", "--amp", "bf16", "--dtype", "float64"], "--dtype float32"),
    (["solve", "--model", "tiny_resnet", "--budget", "1GB", "--amp", "fp8"], "invalid choice"),
])
def test_cli_amp_bad_input(argv, msg, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and "Traceback" not in err[0]


def test_cli_run_refuses_another_precision(tmp_path, capsys):
    path = str(tmp_path / "p.json")
    assert main(["solve", "--model", "tiny_resnet", "--batch", "2", "--resolution", "32", "--budget", "1GB",
                 "--device-profile", "cpu", "-o", path]) == 0
    capsys.readouterr()
    rc = main(["run", path, "--amp", "bf16", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "solve again with --amp bf16" in err[0]


def test_solve_plans_rows_under_amp_only_when_accepted():
    """Under --amp, row segments (gradients at half-precision rounding) are planned only with
    amp_rows; without it the planner says so where rows would have fitted the budget."""
    from lrcnn.planner.ilp import InfeasibleError
    from lrcnn.planner.solve import Solver, capture_model

    _, graph = capture_model("resnet18", (8, 3, 160, 160), amp="bf16")
    with_rows = Solver(graph, amp_rows=True, device_profile="cpu")
    without = Solver(graph, device_profile="cpu")
    lo_rows, lo = with_rows.smallest_budget(), without.smallest_budget()
    assert lo_rows < lo
    budget = (lo_rows + lo) // 2
    plan = with_rows.solve(budget)
    assert plan.training["amp_rows"] is True and plan.training["amp"] == "bf16"
    assert any(s.mode == "rows" for s in plan.segments)
    with pytest.raises(InfeasibleError, match="--amp-rows"):
        without.solve(budget)
    plan = without.solve(lo)
    assert "amp_rows" not in plan.training and all(s.mode != "rows" for s in plan.segments)
    with pytest.raises(ValueError, match="--amp-rows"):
        Solver(graph, policy="2ps", device_profile="cpu")


def test_rows_refused_under_autocast_unless_the_plan_accepts():
    """A row segment trained under autocast is refused with the project's error (its gradients
    differ from plain autocast at half-precision rounding), whatever plan it came from; no-grad
    forwards run (bit-identical)."""
    from lrcnn.executor import RowSegmentError

    torch.manual_seed(0)
    model = _model("tiny_resnet")
    graph = capture(model, SHAPE)  # a float32 plan, then trained under the user's own autocast
    plan = Plan.build(graph, [Segment("conv1", "relu", "rows", policy="2ps", strips=2)])
    planned = apply_plan(model, plan, graph)
    x = torch.randn(SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RowSegmentError, match=r"conv1..relu runs under torch.autocast.*--amp-rows"):
            planned(x)
        with torch.no_grad():
            planned.eval(), model.eval()
            assert torch.equal(planned(x), model(x))
