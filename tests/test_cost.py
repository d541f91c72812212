"""The cost model against real and simulated training steps, device profiles, and the
``simulate`` / ``calibrate`` commands (one-line errors, exit 2)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from lrcnn.analysis.bench.cost_grid import KINDS, grid_plan, run_case
from lrcnn.models import capture, get_model, set_bn_mode
from lrcnn.planner import Plan, Segment
from lrcnn.models.ops import TIME_CLASSES, time_class
from lrcnn.planner.cost import PROFILES, CostError, CostModel, DeviceProfile, load_profile
from tests.exactness import Reference
from tests.test_cli import assert_one_line_error, run


# ------------------------------------------------------------------------------------------------
# predicted vs measured (real CPU step, storage accounting) vs simulated (fake tensors)
# ------------------------------------------------------------------------------------------------

def test_grid_predicted_vs_measured():
    """A CI-sized grid (resnet18: every plan kind; mobilenet_v2: the row kinds), whole-step
    absolute peak: median |error| <= 2 %, worst <= 5 %; the simulator equals the real step within
    1 % (the full grid: python -m lrcnn.analysis.bench.cost_grid)."""
    cases = [("resnet18", k) for k in KINDS] + [("mobilenet_v2", "2ps"), ("mobilenet_v2", "overl")]
    rows = [run_case(name, kind, "small", "cpu", real=True, timing=False) for name, kind in cases]
    errs = [abs(r["err_meas_%"]) for r in rows]
    assert statistics.median(errs) <= 2.0, rows
    assert max(errs) <= 5.0, rows
    for r in rows:
        assert abs(r["sim_vs_meas_%"]) <= 1.0, r
        assert r["segments"] != "-" or r["plan"] == "plain"


def test_full_size_predicted_vs_simulated():
    """A full-size plan (ResNet-50, batch 8, 224x224, rows + checkpoint) is simulated on a
    meta-device model in seconds and predicted within 5 %."""
    r = run_case("resnet50", "mixed", "large", "cpu", real=False)
    assert abs(r["err_sim_%"]) <= 5.0, r
    # 2PS backward followed strip by strip (gradient carry, carried rows' gradients), no margin
    r = run_case("resnet18", "2ps", "large", "cpu", real=False)
    assert -2.0 <= r["err_sim_%"] <= 2.0, r


def test_store_and_checkpoint_bytes_compose_exactly():
    """Plain and checkpoint plans on resnet18: the per-node profile composes to the simulated
    phases within 0.5 %."""
    m = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "eval")
    g = capture(m, (4, 3, 96, 96))
    cm = CostModel(g, optimizer="adam")
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory

    for segs in ([], [Segment("layer1", "layer2", "checkpoint"), Segment("layer3", "layer4", "checkpoint")]):
        plan = Plan.build(g, segs, training={"optimizer": "adam", "bn": "eval"})
        pred = cm.predict(plan)
        sim = train_step_memory(apply_plan(m, plan, g), g.input_shape, "adam", fake=True).absolute_phase_peaks()
        for ph in ("forward", "backward", "optimizer"):
            assert abs(pred["phases"][ph] - sim[ph]) <= 0.005 * sim[ph], (segs, ph, pred["phases"][ph], sim[ph])


def test_frozen_parameters_cost_no_gradient_or_optimizer_bytes():
    """Fine-tuning: the stem and layer1 of resnet18 frozen (requires_grad False).  The capture
    counts no gradient bytes for them, so the optimizer state and the parameter gradients the
    cost model prices shrink by exactly their size, and the prediction still composes to the
    simulated step (plain, checkpoint and row plans) within 0.5 % per phase."""
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory

    def model(frozen: bool):
        m = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "eval")
        if frozen:
            for p in list(m.conv1.parameters()) + list(m.bn1.parameters()) + list(m.layer1.parameters()):
                p.requires_grad_(False)
        return m

    full, tuned = capture(model(False), (4, 3, 96, 96)), capture(model(True), (4, 3, 96, 96))
    m = model(True)
    frozen_bytes = sum(p.numel() * 4 for p in m.parameters() if not p.requires_grad)
    assert tuned.param_bytes == full.param_bytes and tuned.grad_bytes == full.grad_bytes - frozen_bytes
    a, b = CostModel(full, optimizer="adam"), CostModel(tuned, optimizer="adam")
    assert a.fixed_breakdown()["optimizer"] - b.fixed_breakdown()["optimizer"] == 2 * frozen_bytes
    for segs in ([], [Segment("layer1", "layer2", "checkpoint")],
                 [Segment("conv1", "layer1", "rows", policy="2ps", strips=3)]):
        plan = Plan.build(tuned, segs, training={"optimizer": "adam", "bn": "eval"})
        pred = b.predict(plan)
        assert pred["peak_bytes"] < a.predict(Plan.build(full, segs, training={"optimizer": "adam", "bn": "eval"}))["peak_bytes"]
        sim = train_step_memory(apply_plan(m, plan, tuned), tuned.input_shape, "adam", fake=True).absolute_phase_peaks()
        for ph in ("forward", "backward", "optimizer"):
            assert abs(pred["phases"][ph] - sim[ph]) <= 0.005 * sim[ph], (segs, ph, pred["phases"][ph], sim[ph])


def test_store_recompute_sets_priced_as_run():
    """Store segments with recompute sets (ResNet-50 layer3, train-mode BN): the executor
    replaces each saved value of a recomputed node by a recipe and recomputes it when a backward
    unpacks it; the cost model prices what that keeps, frees and makes in backward.  Every set
    (none, the whole cheap set, single nodes, a BN + ReLU pair) never below the simulated step
    and within 3 % of it, per phase and on the segment's own backward; the whole set lowers the
    simulated backward peak (recipes are let go with their savers, not at the end of the
    segment's backward: holding them cost more than the set saved)."""
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory
    from lrcnn.models.ops import recomputable

    m = set_bn_mode(get_model("resnet50", num_classes=10, device="meta"), "train")
    g = capture(m, (1, 3, 512, 512))
    cm = CostModel(g, optimizer="momentum")
    first, last = "layer3_0_conv1", "layer3_5_relu_2"
    nodes = g.span(first, last)
    cheap = [n.name for n in nodes[:-1] if recomputable(n)]
    sets = {"none": [], "all": cheap, "pair": ["layer3_1_bn1", "layer3_1_relu"]}
    sets.update({r: [r] for r in ("layer3_0_bn1", "layer3_0_relu", "layer3_0_downsample_1",
                                  "layer3_5_bn2", "layer3_5_bn3")})
    sim_bwd = {}
    for name, rec in sets.items():
        plan = Plan.build(g, [Segment(first, last, "store", recompute=rec)],
                          training={"optimizer": "momentum", "bn": "train"})
        pred = cm.predict(plan)
        rep = train_step_memory(apply_plan(m, plan, g), g.input_shape, "momentum", fake=True)
        sim = rep.absolute_phase_peaks()
        for ph in ("forward", "backward"):
            assert sim[ph] <= pred["phases"][ph] <= 1.03 * sim[ph], (name, ph, pred["phases"][ph], sim[ph])
        # the segment's own backward (timeline marks), against its predicted backward peak
        seg = {lab: pk for lab, _, pk in rep.timeline}["segment 0 backward"] + rep.baseline_bytes
        p_seg = pred["segments"][0]["backward_peak"]
        assert seg <= p_seg <= 1.03 * seg, (name, p_seg, seg)
        sim_bwd[name] = seg
    assert sim_bwd["all"] < sim_bwd["none"], sim_bwd


def test_rows_cost_prices_redundancy_and_memory():
    """More OverL strips: less memory per strip, more recomputed rows (time); 2PS carries grow
    with strips; an unsupported segment is flagged, not priced."""
    m = set_bn_mode(get_model("vgg11", num_classes=10, device="meta"), "eval")
    g = capture(m, (8, 3, 128, 128))
    cm = CostModel(g)
    a = cm.segment(Segment("features_0", "features_9", "rows", policy="overl", strips=2))
    b = cm.segment(Segment("features_0", "features_9", "rows", policy="overl", strips=16))
    assert b.bwd_peak < a.bwd_peak and b.fwd_s > a.fwd_s
    c2 = cm.segment(Segment("features_0", "features_9", "rows", policy="2ps", strips=2))
    c8 = cm.segment(Segment("features_0", "features_9", "rows", policy="2ps", strips=8))
    assert c8.detail["carries"] > c2.detail["carries"] > 0
    bad = cm.segment(Segment("features_0", "classifier_0", "rows", policy="overl", strips=2))
    assert not bad.supported and "cannot run in rows" in bad.why


def test_train_bn_rows_flagged_until_supported():
    m = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "train")
    g = capture(m, (2, 3, 64, 64))
    cm = CostModel(g)
    a, b = g.resolve("layer1", "first"), g.resolve("layer1", "last")
    c = cm.segment(Segment(a, b, "rows", policy="overl", strips=2))
    from lrcnn.planner import cost
    if not cost.ROWS_BATCH_STATS:
        assert not c.supported and "BatchNorm" in c.why
    assert cm.segment(Segment(a, b, "checkpoint")).supported


def test_grid_plan_kinds_are_valid_everywhere():
    for name in ("vgg16", "resnet50", "mobilenet_v2"):
        m = set_bn_mode(get_model(name, num_classes=10, device="meta"), "eval")
        g = capture(m, (2, 3, 96, 96))
        cm = CostModel(g)
        for kind in KINDS:
            Plan.build(g, grid_plan(cm, kind))  # validates cut points and strip counts


def test_checkpoint_segment_starting_with_inplace_relu_is_exact():
    """A checkpoint segment whose first node is an in-place ReLU must not overwrite the input
    the checkpoint saved (float64, every gradient and buffer)."""
    torch.manual_seed(0)
    m = set_bn_mode(get_model("resnet18", num_classes=10), "eval").double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    y = torch.randint(0, 10, (2,))
    ref = Reference(m, x, y, steps=2)
    ref.check([Segment("relu", "layer1", "checkpoint")])
    ref.check([Segment("relu", "relu", "checkpoint"), Segment("maxpool", "layer2", "checkpoint")])


# ------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------

def test_builtin_profiles_and_files(tmp_path):
    for name in ("cpu", "v100", "a100", "h100", "h200", "rtx4090"):
        p = load_profile(name)
        assert p.flops_for("float32") > 0 and p.bandwidth > 0 and p.memory > 0
    assert PROFILES["h100"].alloc_round == 512
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PROFILES["a100"].to_dict()))
    assert load_profile(str(f)) == PROFILES["a100"]
    with pytest.raises(CostError, match="unknown device profile"):
        load_profile("tpu9")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CostError, match="cannot read device profile"):
        load_profile(str(tmp_path / "bad.json"))
    with pytest.raises(CostError, match="needs the fields"):
        DeviceProfile.from_dict({"name": "x"})


def test_cuda_rounding_changes_prediction():
    m = set_bn_mode(get_model("tiny_resnet", device="meta"), "eval")
    g = capture(m, (2, 3, 33, 33))
    cpu = CostModel(g, profile="cpu").predict([])["peak_bytes"]
    h100 = CostModel(g, profile="h100").predict([])["peak_bytes"]
    assert h100 >= cpu + PROFILES["h100"].workspace


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    m = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "eval")
    g = capture(m, (2, 3, 64, 64), model_name="resnet18")
    plan = Plan.build(g, [Segment("conv1", "layer1", "rows", policy="overl", strips=4),
                          Segment("layer2", "layer3", "checkpoint")],
                      training={"optimizer": "momentum", "bn": "eval"})
    path = tmp_path_factory.mktemp("plans") / "r18.json"
    plan.save(str(path))
    return path


def test_simulate_prints_phases_and_csv(capfd, plan_file, tmp_path):
    import pandas as pd

    rc, out, err = run(capfd, "simulate", plan_file, "--csv", tmp_path / "s.csv")
    assert rc == 0, err
    assert "predicted MiB" in out and "simulated MiB" in out
    df = pd.read_csv(tmp_path / "s.csv")
    assert list(df.phase) == ["forward", "backward", "optimizer", "peak"]
    assert (df.error_pct.abs() <= 5).all(), df


def test_simulate_bad_input(capfd, plan_file, tmp_path):
    assert_one_line_error(*run(capfd, "simulate", tmp_path / "missing.json"), "does not exist")
    (tmp_path / "corrupt.json").write_text("{oops")
    assert_one_line_error(*run(capfd, "simulate", tmp_path / "corrupt.json"), "not valid JSON")
    d = json.loads(plan_file.read_text())
    d["model"] = "vgg11"
    (tmp_path / "other.json").write_text(json.dumps(d))
    assert_one_line_error(*run(capfd, "simulate", tmp_path / "other.json"), "fingerprint")
    assert_one_line_error(*run(capfd, "simulate", plan_file, "--device-profile", "tpu9"),
                          "unknown device profile")
    assert_one_line_error(*run(capfd, "simulate", plan_file, "--csv", tmp_path / "no" / "x.csv"), "cannot write")
    assert not (tmp_path / "no").exists()


def test_calibrate_writes_a_usable_profile(capfd, tmp_path):
    out = tmp_path / "prof.json"
    rc, o, err = run(capfd, "calibrate", "--quick", "-o", out)
    assert rc == 0, err
    p = load_profile(str(out))
    assert p.measured and p.kind == "cpu" and p.flops["float32"] > 1e8 and p.bandwidth > 1e8
    for cls in TIME_CLASSES:  # every time class, cold and warm, forward and backward
        assert set(p.op_costs[cls]) == {"fwd", "bwd", "fwd_warm", "bwd_warm"}, cls
        assert all(len(v) == 3 and min(v) >= 0 for v in p.op_costs[cls].values())
    assert set(p.op_costs["optimizer"]) == {"sgd", "momentum", "adam", "adamw"}
    m = set_bn_mode(get_model("tiny_resnet", device="meta"), "eval")
    g = capture(m, (2, 3, 32, 32))
    assert CostModel(g, profile=str(out)).predict([])["time_s"] > 0


def _class_profile() -> DeviceProfile:
    """A profile whose fitted costs are pure per-call constants that name the class."""
    costs = {c: {"fwd": [float(k + 1), 0.0, 0.0], "bwd": [10.0 * (k + 1), 0.0, 0.0],
                 "fwd_warm": [0.5 * (k + 1), 0.0, 0.0], "bwd_warm": [5.0 * (k + 1), 0.0, 0.0]}
             for k, c in enumerate(TIME_CLASSES)}
    costs["optimizer"] = {"momentum": [100.0, 1.0, 0.0]}
    return DeviceProfile("test", {"float32": 1e12}, 1e11, 2**34, efficiency=1.0, kind="cpu",
                         measured=True, op_costs=costs)


def test_time_model_prices_each_class_and_warm_strips():
    """Calibrated time: each node by its class's fit (depthwise convolutions apart from dense
    ones), the optimizer by parameter tensors, row strips after the first with the warm fits."""
    m = set_bn_mode(get_model("mobilenet_v2", num_classes=10, device="meta"), "eval")
    g = capture(m, (2, 3, 64, 64))
    cm = CostModel(g, optimizer="momentum", profile=_class_profile())
    timed = [n for n in g.nodes if cm._time(n) > 0]
    k = {c: i + 1 for i, c in enumerate(TIME_CLASSES)}
    classes = [time_class(n.op, n.groups) for n in timed]
    assert "dwconv" in classes and "conv" in classes and "linear" in classes
    assert sum(n.groups > 1 for n in g.nodes if n.op == "conv2d") == 17  # MobileNet-V2's depthwise
    tensors = sum(1 for _ in m.parameters())
    assert sum(n.param_tensors for n in g.nodes) == tensors
    want = sum(11 * k[c] for c in classes) + 100 + tensors
    assert cm.predict([])["time_s"] == pytest.approx(want)
    # a rows segment of s strips: every node computes rows in every strip (OverL), the first
    # strip cold and the rest warm; backward recomputes each strip's forward, then its backward
    units = cm.units()
    seg = Segment(units[0][0], units[3][1], "rows", policy="overl", strips=3)
    nodes = [n for n in g.span(seg.first, seg.last) if cm._time(n) > 0]
    c = cm.segment(seg)
    launch = cm.profile.launch_s * 3
    fwd = sum(k[time_class(n.op, n.groups)] * (1 + 2 * 0.5) for n in nodes)
    assert c.fwd_s == pytest.approx(fwd + launch)
    assert c.bwd_s == pytest.approx(fwd + 10 * fwd + launch)


def test_batch_statistics_bn_priced_where_it_computes_them():
    """A train-mode BN computes its batch statistics when it runs plainly or checkpointed (the
    ``bn_stats`` fit; roofline: the input read once more) and applies the statistics its forward
    saved when a store segment recomputes it (the ``bn`` fit: executor.program)."""
    m = set_bn_mode(get_model("tiny_resnet", num_classes=10, device="meta"), "train")
    g = capture(m, (2, 3, 32, 32))
    cm = CostModel(g, optimizer="momentum", profile=_class_profile())
    k = {c: i + 1 for i, c in enumerate(TIME_CLASSES)}
    first, last = "layer1_0_conv1", "layer1_0_relu_2"
    nodes = [n for n in g.span(first, last) if cm._time(n) > 0]
    bns = [n.name for n in nodes if n.op == "batchnorm2d"]
    assert bns and all(g[b].batch_stats for b in bns)

    def cls(n, stats=True):
        return k[time_class(n.op, n.groups, stats and n.batch_stats)]

    fwd = sum(cls(n) for n in nodes)
    assert fwd - sum(cls(n, False) for n in nodes) == len(bns) * (k["bn_stats"] - k["bn"])
    plain = cm.segment(Segment(first, last, "store"))
    assert plain.fwd_s == pytest.approx(fwd) and plain.bwd_s == pytest.approx(10 * fwd)
    ck = cm.segment(Segment(first, last, "checkpoint"))
    assert ck.bwd_s == pytest.approx(fwd + 10 * fwd)  # the recompute computes the statistics again
    pair = [bns[0], next(n.name for n in nodes if bns[0] in n.inputs)]  # a BN and its reader (a ReLU)
    times = cm._recompute_effect(g.span(first, last), set(pair))[4]
    assert times.get(bns[0], 0) >= 1
    rec = cm.segment(Segment(first, last, "store", recompute=pair))
    again = sum(t * k[time_class(g[r].op, g[r].groups)] for r, t in times.items())
    assert rec.bwd_s == pytest.approx(10 * fwd + again)  # ... a store recompute does not
    # a profile calibrated before bn_stats prices a BN computing its statistics by its bn fit
    old = _class_profile()
    del old.op_costs["bn_stats"]
    assert CostModel(g, optimizer="momentum", profile=old).segment(Segment(first, last, "store")).fwd_s == \
        pytest.approx(sum(cls(n, False) for n in nodes))
    # roofline: the statistics read the input once more (a bandwidth-bound BN)
    roof = CostModel(g, optimizer="momentum")
    n = g[bns[0]]
    ins = sum(g[u].out_bytes for u in n.inputs)
    extra = roof._time(n, batch_stats=True) - roof._time(n)
    assert extra == pytest.approx(ins / roof.profile.bandwidth)


def test_calibrate_bad_input(capfd, tmp_path):
    if not torch.cuda.is_available():
        assert_one_line_error(*run(capfd, "calibrate", "--device", "cuda", "-o", tmp_path / "p.json"), "no CUDA")
    assert_one_line_error(*run(capfd, "calibrate", "-o", tmp_path / "nodir" / "p.json"), "cannot write")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("policy", ["overl", "2ps"])
def test_train_bn_rows_priced_safely(policy):
    """Training-mode BN inside row segments (strip sweeps for statistics and gradient constants,
    followed strip by strip, no margin): within 3% of the simulated step, never more than 1% low."""
    from lrcnn.executor import apply_plan
    from lrcnn.executor.measure import train_step_memory

    m = set_bn_mode(get_model("resnet18", num_classes=10, device="meta"), "train")
    g = capture(m, (4, 3, 160, 160))
    cm = CostModel(g, optimizer="momentum")
    units = cm.units()
    plan = Plan.build(g, [Segment(units[0][0], units[4][1], "rows", policy=policy, strips=4)],
                      training={"optimizer": "momentum", "bn": "train"})
    pred = cm.predict(plan)["peak_bytes"]
    sim = train_step_memory(apply_plan(m, plan, g), g.input_shape, "momentum", fake=True).absolute_peak
    assert 0.99 * sim <= pred <= 1.03 * sim, (pred, sim)


def test_compiled_pricing_makes_store_recompute_free():
    """``CostModel(compiled=True)`` (plans for executor.compile_plan): a store segment's recomputed
    BN / ReLU run inside the backward's fused kernels, so the recompute adds no time; the memory
    prediction and every other segment are priced as for eager execution."""
    m = set_bn_mode(get_model("tiny_resnet", num_classes=10, device="meta"), "train")
    g = capture(m, (2, 3, 32, 32))
    eager, comp = CostModel(g, optimizer="momentum"), CostModel(g, optimizer="momentum", compiled=True)
    first, last = "layer1_0_conv1", "layer1_0_relu_2"
    rec = [n.name for n in g.span(first, last)[:-1] if n.op in ("batchnorm2d", "relu")]
    store = Segment(first, last, "store")
    dropped = Segment(first, last, "store", recompute=rec)
    e, c = eager.segment(dropped), comp.segment(dropped)
    assert e.bwd_s > eager.segment(store).bwd_s  # eager: the recompute is paid
    assert c.bwd_s == pytest.approx(comp.segment(store).bwd_s)  # compiled: fused, free
    assert (c.keep, c.fwd_peak, c.bwd_peak) == (e.keep, e.fwd_peak, e.bwd_peak)
    assert c.keep < comp.segment(store).keep
    for seg in (store, Segment(first, last, "checkpoint")):
        assert comp.segment(seg).bwd_s == pytest.approx(eager.segment(seg).bwd_s)
