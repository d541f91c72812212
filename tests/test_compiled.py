"""Plans executed through torch.compile (executor.compiled): the same maths as plain PyTorch.

float64, so rounding cannot hide a wrong recompute: output, loss, input gradient, every parameter
gradient, parameters after the optimizer steps and BN running statistics (updated once per step,
also where a checkpoint region recomputes a training-mode BN) within 1e-10.  AOTAutograd with the
eager backend checks the program (partitioning, recompute, graph breaks at row segments) quickly;
one test runs the same plan through Inductor, the backend users get.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from exactness import Reference, seg_rows
from lrcnn.executor.compiled import CompilablePlan, compile_plan
from lrcnn.planner import Plan, Segment
from test_executor import _data, _model

MIXED = [seg_rows("conv1", "maxpool", "2ps", 2),
         Segment("layer1", "layer1", "store", recompute=["layer1_0_bn1", "layer1_0_relu"]),
         Segment("layer2", "layer2", "checkpoint")]


def _backend(name):
    def execute(model, plan, graph):
        torch._dynamo.reset()
        return compile_plan(model, plan, graph, backend=name)
    return execute


@pytest.fixture(scope="module")
def tiny_train_bn():
    m = _model("tiny_resnet", torch.float64, bn="train")
    return Reference(m, *_data(3, 45, 33, torch.float64, 10), steps=2)


@pytest.mark.parametrize("segments", [
    [Segment("conv1", "layer1", "checkpoint"),
     Segment("layer2", "layer2", "store", recompute=["layer2_0_bn1", "layer2_0_relu"])],
    MIXED,
    [seg_rows("conv1", "layer1", "overl", 3), Segment("layer2", "layer2", "checkpoint")],
], ids=["checkpoint+store", "rows+store+checkpoint", "overl+checkpoint"])
def test_compiled_plan_is_exact(tiny_train_bn, segments):
    errs = tiny_train_bn.check(segments, execute=_backend("aot_eager"))
    assert any(k.startswith("buffer:") and "running_var" in k for k in errs)
    assert any(k.startswith("xgrad") for k in errs)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor needs a C++ compiler")
def test_compiled_plan_through_inductor_is_exact(tiny_train_bn):
    tiny_train_bn.check(MIXED, execute=_backend("inductor"))


def test_compiled_plan_program_and_refusals(tiny_train_bn):
    model = _model("tiny_resnet", torch.float64, bn="train")
    plan = Plan.build(tiny_train_bn.graph, MIXED)
    cp = compile_plan(model, plan, tiny_train_bn.graph, backend="aot_eager")
    assert isinstance(cp, CompilablePlan)
    calls = [n for n in cp.program.graph.nodes if n.op == "call_function" and n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == 2  # the checkpoint segment and the store segment's run bn1 -> relu
    stats = [n for n in cp.program.graph.nodes if n.op == "call_module" and type(cp.program.get_submodule(n.target)).__name__ == "_BNStats"]
    assert len(stats) == 1  # layer1_0_bn1's statistics, computed before the region
    rows = [n for n in cp.program.graph.nodes if n.op == "call_module" and type(cp.program.get_submodule(n.target)).__name__ == "_EagerRows"]
    assert len(rows) == 1
    # shares the model's tensors: the user's optimizer keeps working
    assert list(cp.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(cp.parameters(), model.parameters()))
    with pytest.raises(RuntimeError, match="only through torch.compile"):
        cp.program(tiny_train_bn.x)  # the program run eagerly


def test_many_compiled_plans_in_one_process(tiny_train_bn):
    """Each plan's program is its own code: more plans than Dynamo's recompile limit (8 per code
    object) all compile, none falls back to eager (which the program would refuse)."""
    torch._dynamo.reset()
    model = _model("tiny_resnet", torch.float64, bn="train")
    plans = [Plan.build(tiny_train_bn.graph, [Segment("conv1", "layer1", "checkpoint")]),
             Plan.build(tiny_train_bn.graph, MIXED)]
    limit = torch._dynamo.config.recompile_limit
    for k in range(limit + 2):
        out = compile_plan(model, plans[k % 2], tiny_train_bn.graph, backend="aot_eager")(tiny_train_bn.x)
        assert out.shape == (3, 10)


def test_compiled_store_runs_exact_with_eval_bn_and_cumulative_momentum():
    """BatchNorms in evaluation mode (a store recompute applies the running statistics) and in
    training mode with ``momentum=None`` (the cumulative average; nn.BatchNorm reads its step count
    as a Python float, which inside a checkpoint region broke the graph, ran the region eagerly and
    counted the step twice) are as exact, in checkpoint regions and store recomputes alike."""
    plan = [Segment("conv1", "layer1", "checkpoint"),
            Segment("layer2", "layer2", "store", recompute=["layer2_0_bn1", "layer2_0_relu", "layer2_0_bn2"])]
    ev = _model("tiny_resnet", torch.float64, bn="eval")
    Reference(ev, *_data(3, 45, 33, torch.float64, 10), steps=2).check(plan, execute=_backend("aot_eager"))
    cum = _model("tiny_resnet", torch.float64, bn="train")
    for m in cum.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    errs = Reference(cum, *_data(3, 45, 33, torch.float64, 10), steps=2).check(plan, execute=_backend("aot_eager"))
    assert any("num_batches_tracked" in k or "running_mean" in k for k in errs)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor needs a C++ compiler")
def test_compiled_checkpoint_region_replays_dropout():
    """MobileNetV2's classifier dropout inside a checkpoint region, through Inductor with eager's
    generator (``fallback_random``, as the bench compiles): the region's backward recompute uses
    the forward's mask, so the step matches plain PyTorch in float64 (``bench.compare.rel_errs``:
    the gradient of a BN bias the next train-mode BN cancels is rounding and compared as such)."""
    from lrcnn.analysis.bench.methods import _budget_setup, compile_settings
    from lrcnn.analysis.bench.cases import is_exact, make_case, rel_errs
    from lrcnn.models.capture import build_and_capture

    case = make_case("t", "mobilenet_v2", 2, 64, torch.device("cpu"), "float64")
    _, g = build_and_capture("mobilenet_v2", 2, (64, 64), "float64", "train")
    plan = Plan.build(g, [Segment("flatten", "classifier_1", "checkpoint")])
    with compile_settings():
        _budget_setup(1.0)()
        errs = rel_errs(case, compile_plan(case.model, plan, g))
    assert is_exact(case, errs) and max(errs.values()) <= 1e-10, max(errs.items(), key=lambda kv: kv[1])
