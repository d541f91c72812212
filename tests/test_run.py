"""``planner run``: real steps with a plan, records of predicted vs actual, failures and bad input.

Small on purpose (CI has 2 CPU cores): resnet18 at batch 2, 64x64 for the end-to-end case,
tiny_resnet for the rest.
"""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lrcnn.executor import apply_plan
from lrcnn.models import memory
from lrcnn.executor import run as runmod
from lrcnn.models import capture, get_model
from lrcnn.planner.cli import main
from lrcnn.planner.plan import Plan, Segment

from test_cli import assert_one_line_error

TRAIN = {"optimizer": "momentum", "bn": "eval"}  # row strips need BN in eval mode (for now)


def make_plan(path, name="tiny_resnet", shape=(2, 3, 32, 32), dtype="float32", budget=None,
              predicted=None, training=TRAIN):
    m = get_model(name, device="meta")
    m.train()
    g = capture(m, shape, getattr(torch, dtype), model_name=name)
    resnet = name.startswith("resnet")  # resnet18: layer1..layer4; tiny_resnet: layer1, layer2
    segs = [Segment("conv1", "layer1", "rows", policy="2ps", strips=4),
            Segment("layer3" if resnet else "layer2", "layer4" if resnet else "layer2", "checkpoint")]
    plan = Plan.build(g, segs, training=dict(training), budget_bytes=budget)
    if predicted is not None:
        plan.predicted = predicted
    plan.save(str(path))
    return plan


def run(capfd, *argv):
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    p = tmp_path_factory.mktemp("plans") / "tiny.json"
    make_plan(p)
    return p


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

def test_resnet18_run_then_report(tmp_path, capfd):
    plan = tmp_path / "plan.json"
    make_plan(plan, "resnet18", (2, 3, 64, 64))
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", plan, "--steps", 2, "--warmup", 1, "--device", "cpu",
                       "--check-grads", "--out", rec)
    assert rc == 0, err
    assert "check-grads OK" in out and "wrote" in out
    df = pd.read_parquet(rec)
    assert list(df.columns) == runmod.COLUMNS
    steps = df[df.scope == "step"]
    assert sorted(steps.step) == [1, 2]
    assert steps.tracked.tolist() == [True, False]
    # per step: 1 step + 3 phases + 2 segments x 2 directions; the tracked step adds its timeline
    assert (df[df.scope != "timeline"].groupby("step").size() == 8).all()
    assert len(df[df.scope == "timeline"]) > 8 and set(df[df.scope == "timeline"].step) == {1}
    tracked = df[df.tracked & (df.scope != "timeline")]
    assert tracked.actual_peak_bytes.notna().all()
    assert df[~df.tracked].actual_peak_bytes.isna().all()
    assert df[~df.tracked].actual_s.gt(0).all()  # time: untracked steps (the tracker slows a step)
    assert steps.actual_s.gt(0).all()
    # the cost model's prediction, per step, phase and segment, within the cost-model bounds
    pred = df[df.tracked & (df.scope.isin(["step", "phase"]))]
    rel = ((pred.predicted_peak_bytes - pred.actual_peak_bytes) / pred.actual_peak_bytes).abs()
    assert pred.predicted_peak_bytes.notna().all() and rel.max() <= 0.05, pred
    first = df.iloc[0]
    assert first.plan_fingerprint == Plan.load(str(plan)).fingerprint
    assert first.model == "resnet18" and first.batch == 2 and first.resolution == "64x64"
    assert first.device == "cpu" and first.torch_version == torch.__version__ and first["dtype"] == "float32"
    # absolute peak: at least parameters + momentum buffers + gradients + batch
    nparam = sum(p.numel() for p in get_model("resnet18", num_classes=1000, device="meta").parameters())
    peak = steps[steps.tracked].actual_peak_bytes.iloc[0]
    assert peak >= 3 * 4 * nparam
    ph = df[(df.scope == "phase") & df.tracked].set_index("name").actual_peak_bytes
    assert ph.max() == peak and ph["forward"] < ph["backward"]
    seg = df[(df.scope == "segment") & df.tracked]
    assert (seg.actual_peak_bytes <= peak).all()

    png, csv = tmp_path / "p.png", tmp_path / "s.csv"
    rc, out, err = run(capfd, "report", rec, "--png", png, "--csv", csv)
    assert rc == 0, err
    assert "Per phase and segment" in out and "resnet18" in out
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    s = pd.read_csv(csv)
    assert len(s) == 8 and {"peak_abs_err_bytes", "peak_rel_err", "time_rel_err"} <= set(s.columns)


def test_predictions_csv_records_and_budget_failure(tmp_path, capfd, tiny_plan):
    """Predictions are carried into the records; a measured peak over the budget is a failure
    (exit 1) and the records are still written."""
    d = json.loads(tiny_plan.read_text())
    d["budget_bytes"] = 1000
    d["predicted"] = {"peak_bytes": 10**6, "time_s": 0.01, "device_profile": "cpu",
                      "phases": {"forward": 5 * 10**5, "backward": 10**6, "optimizer": 9 * 10**5},
                      "segments": [{"index": 0, "forward_peak": 1000, "backward_peak": 2000,
                                    "forward_s": 0.001, "backward_s": 0.002},
                                   {"index": 1, "forward_peak": 3000, "backward_peak": 4000,
                                    "forward_s": 0.003, "backward_s": 0.004}]}
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(d))
    rec = tmp_path / "r.csv"
    rc, out, err = run(capfd, "run", p, "--steps", 2, "--warmup", 0, "--device", "cpu", "--quiet", "--out", rec)
    assert rc == 1
    assert "FAILED" in err and "exceeds the plan's budget of 1,000 bytes" in err
    df = pd.read_csv(rec)  # the evidence is kept
    assert (df.budget_bytes == 1000).all()
    one = df[df.step == 1].set_index(["scope", "name", "phase"])
    assert one.loc[("step", "step", "step"), "predicted_peak_bytes"] == 10**6
    assert one.loc[("phase", "backward", "backward"), "predicted_peak_bytes"] == 10**6
    segs = df[(df.scope == "segment") & (df.step == 1)].sort_values(["segment", "phase"], ascending=[True, False])
    assert segs.predicted_peak_bytes.tolist() == [1000, 2000, 3000, 4000]
    assert segs.predicted_s.tolist() == [0.001, 0.002, 0.003, 0.004]
    rc, out, err = run(capfd, "report", rec)
    assert rc == 0 and "%" in out and "OVER" in out


def test_image_folder(tmp_path, capfd, tiny_plan):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            a = (torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(a).save(tmp_path / "img" / cls / f"{i}.png")
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", tiny_plan, "--data", tmp_path / "img", "--steps", 2, "--warmup", 0,
                       "--device", "cpu", "--quiet", "--out", rec)
    assert rc == 0, err
    df = pd.read_parquet(rec)
    assert df.data.iloc[0] == str(tmp_path / "img")
    assert df[df.scope == "step"].loss.notna().all()


def test_check_grads_mismatch_fails_loudly(tmp_path, capfd, tiny_plan, monkeypatch):
    # no room at all: the planned sums differ from plain's in the last bits
    monkeypatch.setitem(runmod.GRAD_TOL, "float32", 0.0)
    monkeypatch.setattr(runmod, "SPREAD_FACTOR", 0.0)
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", tiny_plan, "--check-grads", "--steps", 1, "--device", "cpu", "--out", rec)
    assert rc == 1
    assert "FAILED: --check-grads" in err and "(limit 0: 0 x plain float32's own distance from float64" in err
    assert not rec.exists()


def test_optimizers(tiny_plan):
    plan = Plan.load(str(tiny_plan))
    ps = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in [("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD),
                      ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]:
        plan.training["optimizer"] = name
        opt, n, lr = runmod.make_optimizer(plan, ps)
        assert isinstance(opt, cls) and lr == runmod.DEFAULT_LR[name]
    assert runmod.make_optimizer(plan, ps, lr=0.5)[2] == 0.5
    plan.training["optimizer"] = "lion"
    with pytest.raises(runmod.RunError, match="not one of sgd, momentum, adam, adamw"):
        runmod.make_optimizer(plan, ps)


def test_predicted_for_prefers_the_plan(tiny_plan):
    plan = Plan.load(str(tiny_plan))
    plan.predicted = {"peak_bytes": 5, "device_profile": "cpu"}
    assert runmod.predicted_for(plan, None) == plan.predicted
    m = get_model("tiny_resnet", device="meta")
    m.train()
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.eval()
    g = capture(m, tuple(plan.input_shape))
    plan.predicted = {"peak_bytes": 5, "device_profile": "h100"}  # made for a GPU: re-predicted
    fresh = runmod.predicted_for(plan, g, "cpu")
    assert fresh["device_profile"] == "cpu" and fresh["peak_bytes"] > 10**5
    plan.predicted = {}
    assert runmod.predicted_for(plan, g, "cpu")["peak_bytes"] == fresh["peak_bytes"]


# ------------------------------------------------------------------------------------------------
# Segment marks in the executor
# ------------------------------------------------------------------------------------------------

def _tiny(plan):
    torch.manual_seed(0)
    m = get_model("tiny_resnet")
    m.train()
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.eval()
    return m, apply_plan(m, plan)


def test_segment_marks_order_and_numerics(tiny_plan):
    plan = Plan.load(str(tiny_plan))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    grads = []
    for measured in (False, True):
        _, pm = _tiny(plan)

        def step():
            loss = F.cross_entropy(pm(x), y)
            memory.mark("forward")
            loss.backward()
            memory.mark("backward")

        if measured:
            rep = memory.measure_step(step, track_existing=[pm, x, y])
        else:
            step()
        grads.append([p.grad.clone() for p in pm.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # the hooks change nothing
    labels = [e[0] for e in rep.timeline if e[0].startswith("segment") or e[0] in ("forward", "backward")]
    assert labels == ["segment 0 forward begin", "segment 0 forward", "segment 1 forward begin",
                      "segment 1 forward", "forward", "segment 1 backward begin", "segment 1 backward",
                      "segment 0 backward begin", "backward"]  # seg 0's input needs no grad


def test_segment_marks_fake_and_no_grad(tiny_plan):
    plan = Plan.load(str(tiny_plan))
    m = get_model("tiny_resnet", device="meta")
    m.train()
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.eval()
    pm = apply_plan(m, plan)
    from lrcnn.executor.measure import step_memory
    rep = step_memory(pm, plan.input_shape, fake=True)
    assert "segment 1 backward" in [e[0] for e in rep.timeline]
    _, pm = _tiny(plan)
    tr = memory.StorageTracker()
    with torch.no_grad(), tr:
        pm(torch.randn(2, 3, 32, 32))
    assert [e[0] for e in tr.timeline if e[0].startswith("segment")] == [
        "segment 0 forward begin", "segment 0 forward", "segment 1 forward begin", "segment 1 forward"]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, no file
# ------------------------------------------------------------------------------------------------

def _bad(capfd, tmp_path, *argv, needles=()):
    rec = tmp_path / "out.parquet"
    rc, out, err = run(capfd, "run", *argv, "--device", "cpu", "--quiet", "--out", rec)
    assert_one_line_error(rc, out, err, *needles)
    assert not rec.exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_bad_plan_inputs(tmp_path, capfd, tiny_plan):
    _bad(capfd, tmp_path, tmp_path / "missing.json", needles=["missing.json' does not exist"])
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "lrcnn.plan/1", "model": ')
    _bad(capfd, tmp_path, corrupt, needles=["not valid JSON"])
    d = json.loads(tiny_plan.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(d, model="tiny_mobilenet")))
    _bad(capfd, tmp_path, other, needles=["fingerprint", "different model"])
    fp = tmp_path / "fp.json"
    fp.write_text(json.dumps(dict(d, fingerprint="0123456789abcdef")))
    _bad(capfd, tmp_path, fp, needles=["fingerprint 0123456789abcdef does not match"])


def test_bad_data_and_device(tmp_path, capfd, tiny_plan):
    (tmp_path / "empty").mkdir()
    _bad(capfd, tmp_path, tiny_plan, "--data", tmp_path / "empty", needles=["no usable images"])
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    _bad(capfd, tmp_path, tiny_plan, "--data", tmp_path / "noimg", needles=["no usable images"])
    _bad(capfd, tmp_path, tiny_plan, "--data", tmp_path / "nowhere", needles=["does not exist"])
    rc, out, err = run(capfd, "run", tiny_plan, "--out", tmp_path / "r.txt")
    assert_one_line_error(rc, out, err, ".parquet or .csv")
    if not torch.cuda.is_available():
        rec = tmp_path / "cuda.parquet"
        rc, out, err = run(capfd, "run", tiny_plan, "--device", "cuda", "--out", rec)
        assert_one_line_error(rc, out, err, "no CUDA GPU", "--device cpu")
        assert not rec.exists()


def test_solve_run_report_chain(tmp_path, capfd):
    """The user's loop on CPU: ``planner solve`` (a budget that needs a plan), ``planner run
    --steps 3``, ``planner report``: the measured peak stays within the budget and the predicted
    peak per phase is within the cost model's bounds of the measured one."""
    from lrcnn.planner.solve import Solver, capture_model

    _, g = capture_model("resnet18", (4, 3, 128, 128), bn="eval")  # activations matter at this size
    s = Solver(g, "resnet18", bn="eval", device_profile="cpu")
    budget = (s.smallest_budget() + s.baseline()["peak"]) // 2
    plan = tmp_path / "plan.json"
    rc, out, err = run(capfd, "solve", "--model", "resnet18", "--batch", 4, "--resolution", 128,
                       "--bn", "eval", "--device-profile", "cpu", "--budget", f"{budget}B", "-o", plan)
    assert rc == 0, err
    assert any(x.mode != "store" for x in Plan.load(str(plan)).segments)
    rec = tmp_path / "r.parquet"
    rc, out, err = run(capfd, "run", plan, "--steps", 3, "--warmup", 1, "--device", "cpu", "--out", rec)
    assert rc == 0, err
    df = pd.read_parquet(rec)
    t = df[df.tracked & df.scope.isin(["step", "phase"])]
    assert (t.actual_peak_bytes <= budget).all()
    rel = ((t.predicted_peak_bytes - t.actual_peak_bytes) / t.actual_peak_bytes).abs()
    assert rel.max() <= 0.05, t[["name", "predicted_peak_bytes", "actual_peak_bytes"]]
    png = tmp_path / "p.png"
    rc, out, err = run(capfd, "report", rec, "--png", png)
    assert rc == 0, err
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
    # the figure reads the executor's own marks: every segment pass found on the timeline, named in full
    import matplotlib.text
    from lrcnn.analysis import load_records, report_figure, timeline
    from lrcnn.analysis.compare import timeline_spans
    df = load_records(rec)
    n_seg = len(Plan.load(str(plan)).segments)
    passes = timeline_spans(timeline(df))["segments"]
    assert sorted((s["segment"], s["direction"]) for s in passes) == sorted(
        (i, d) for i in range(n_seg) for d in ("forward", "backward"))
    fig = report_figure(df)
    fig.draw_without_rendering()
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert {"forward", "backward", "optimizer step"} <= set(texts)
    for name in df.loc[df.scope == "segment", "name"].unique():
        assert sum(name in t for t in texts) >= 4, name


# ------------------------------------------------------------------------------------------------
# Your own model and your own data (run_plan(model=..., data=loader)), then the report
# ------------------------------------------------------------------------------------------------

def _own_model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))


def test_run_plan_trains_your_own_model_on_your_own_data_and_reports_it(tmp_path):
    import lrcnn
    from torch.utils.data import DataLoader, TensorDataset

    from lrcnn.analysis import load_records, report
    from lrcnn.executor.run import run_plan

    model = _own_model()
    shape = (4, 3, 96, 96)
    smallest = lrcnn.solve(model, shape, "1GB", device_profile="cpu", policy="2ps")  # (the plain step fits 1 GB)
    plan = lrcnn.solve(model, shape, int(0.25 * smallest.solver["baseline_peak_bytes"]), device_profile="cpu")
    assert any(s.mode == "rows" for s in plan.segments), [s.mode for s in plan.segments]
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(12, 3, 96, 96), torch.randint(0, 5, (12,)))
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    before = [p.detach().clone() for p in model.parameters()]
    out = str(tmp_path / "own.parquet")
    res = run_plan(plan, steps=4, warmup=1, device="cpu", data=loader, check=True, out=out, progress=False,
                   model=model)
    assert res.failures == []
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # trained in place
    df = load_records(out)
    steps = df[df.scope == "step"]
    assert len(steps) == 4 and (steps["model"] == "Sequential").all() and (steps["data"] == "DataLoader").all()
    assert steps["actual_peak_bytes"].notna().sum() == 1
    assert steps["actual_peak_bytes"].max() <= plan.budget_bytes
    text = report([out], png=str(tmp_path / "own.png"))
    assert "Sequential" in text and (tmp_path / "own.png").exists()


def test_run_plan_refuses_another_model_and_data_that_runs_dry(tmp_path):
    import lrcnn
    from lrcnn.executor.run import RunError, run_plan
    from lrcnn.planner.plan import PlanError

    model = _own_model()
    plan = lrcnn.solve(model, (2, 3, 32, 32), "1GB", device_profile="cpu")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    with pytest.raises(PlanError):
        run_plan(plan, steps=1, warmup=0, device="cpu", model=other, progress=False)
    one_shot = iter([(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)))])
    with pytest.raises(RunError, match="gave no batch"):
        run_plan(plan, steps=3, warmup=0, device="cpu", model=model, data=one_shot, progress=False)
    assert not list(tmp_path.iterdir())
