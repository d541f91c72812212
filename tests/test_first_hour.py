"""Issue 25, first items: what a new user's first solve/simulate prints and refuses."""
from __future__ import annotations

import os

import pytest

from lrcnn.planner.cli import main
from lrcnn.planner.units import parse_bytes


def run(capfd, *argv):
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,needle", [
    (["--budget", "0.5"], "less than one byte"),
    (["--budget", "1e30GB"], "beyond any device"),
    (["--budget", "8GB", "--gap", "-1"], "--gap"),
    (["--budget", "8GB", "--gap", "1.5"], "--gap"),
    (["--budget", "8GB", "-o", ""], "path is empty"),
])
def test_solve_bad_input_before_any_work(capfd, tmp_path, argv, needle):
    os.chdir(tmp_path)
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_parse_bytes_bounds():
    assert parse_bytes("1B") == 1 and parse_bytes("8GB") == 8 * 10**9
    with pytest.raises(ValueError, match="less than one byte"):
        parse_bytes("0.5")
    with pytest.raises(ValueError, match="beyond any device"):
        parse_bytes("1e30GB")


def test_solve_prints_the_budget_the_smallest_plan_needs(capfd, tmp_path):
    """The summary's smallest plan is the budget to pass (its peak plus the headroom), and a plan
    solves at exactly that budget."""
    from lrcnn.planner.solve import Solver, capture_model

    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget", "1.2MB",
                       "--device-profile", "cpu")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("smallest plan"))
    assert "needs --budget" in line and "kept free" in line, line
    s = Solver(capture_model("tiny_resnet", (8, 3, 64, 64))[1], device_profile="cpu")
    need = s.smallest_budget()
    assert need == s.budget_for(s.min_peak()) > s.min_peak()
    assert s.solve(need).predicted["peak_bytes"] <= need


def test_simulate_uses_the_plans_profile_like_with_like(capfd, tmp_path):
    """A plan solved for h100 is simulated against the h100 prediction without its workspace
    reserve (fake tensors allocate none): the error is the cost model's, not the profile's."""
    plan = str(tmp_path / "p.json")
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget", "1GB",
                       "-o", plan)
    assert rc == 0, err
    rc, out, err = run(capfd, "simulate", plan)
    assert rc == 0, err
    assert "profile h100" in out and "workspace reserve" in out
    peak = next(l for l in out.splitlines() if l.startswith("peak"))
    assert abs(float(peak.split()[-1].rstrip("%"))) < 1.0, out


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["training"].__setitem__("optimizer", "lion"), "training.optimizer"),
    (lambda d: d["training"].__setitem__("lr", "fast"), "training.lr"),
    (lambda d: d["training"].__setitem__("lr", -1), "training.lr"),
    (lambda d: d["training"].__setitem__("momentum", 1.5), "training.momentum"),
    (lambda d: d["segments"][0].__setitem__("strips", True), "strips"),
    (lambda d: d["segments"][0].__setitem__("recompute", "layer1_0_relu"), "recompute"),
])
def test_check_plan_refuses_hand_edited_training_fields(capfd, tmp_path, edit, needle):
    """A hand-edited plan that run would misread is refused by check-plan (and run), one line."""
    import json

    plan = str(tmp_path / "p.json")
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget", "1.2MB",
                       "--device-profile", "cpu", "-o", plan)
    assert rc == 0, err
    with open(plan) as f:
        d = json.load(f)
    d["segments"] = [s for s in d["segments"] if s["mode"] == "rows"] or d["segments"]
    edit(d)
    with open(plan, "w") as f:
        json.dump(d, f)
    for verb in (["check-plan", plan], ["run", plan, "--steps", "1", "--quiet"]):
        rc, out, err = run(capfd, *verb)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (verb, err)


def test_infeasible_names_the_levers_and_the_floor(capfd):
    """No plan fits: the message names what else to try and what no plan goes under (here the
    h100 profile's workspace is almost all of the smallest plan)."""
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "50KB", "--batch", 2)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    for needle in ("--optimizer sgd", "--bn eval", "--amp bf16", "less workspace (h100 reserves 256 MiB)",
                   "every plan keeps parameters", "workspace 256 MiB"):
        assert needle in lines[0], lines[0]
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "50KB", "--batch", 2, "--optimizer", "sgd",
                       "--bn", "eval", "--device-profile", "cpu")
    assert rc == 2 and "--optimizer sgd" not in err and "--bn eval" not in err and "workspace" not in err


# ------------------------------------------------------------------------------------------------
# files a user hands over: device profiles, plans, records, folders

@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    """A tiny_resnet plan solved on the cpu profile (rows segments), shared by the file probes."""
    path = str(tmp_path_factory.mktemp("plan") / "p.json")
    assert main(["solve", "--model", "tiny_resnet", "--batch", "8", "--resolution", "64", "--budget", "1.2MB",
                 "--device-profile", "cpu", "-o", path]) == 0
    return path


def one_error_line(capfd, tmp_path, *argv, needles=()):
    """Run ``planner ARGV`` in a folder of its own: exit 2, one line on stderr holding every needle,
    no traceback, and nothing written beside the inputs."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(out_dir)
    try:
        rc, out, err = run(capfd, *argv)
    finally:
        os.chdir(cwd)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert os.listdir(out_dir) == [] and set(os.listdir(tmp_path)) == before, os.listdir(out_dir)
    return lines[0]


def _profile_file(tmp_path, name, **fields):
    import json

    from lrcnn.planner.cost import PROFILES

    d = PROFILES["cpu"].to_dict()
    for k, v in fields.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path = tmp_path / name
    path.write_text(json.dumps(d))  # (NaN written as NaN, as Python's json does)
    return str(path)


@pytest.mark.parametrize("fields,needle", [
    ({"bandwidth": 0}, "'bandwidth'"),
    ({"bandwidth": -1.0}, "'bandwidth'"),
    ({"bandwidth": float("nan")}, "'bandwidth'"),
    ({"bandwidth": "fast"}, "'bandwidth'"),
    ({"flops": "lots"}, "'flops'"),
    ({"flops": {"float32": 0}}, "'flops.float32'"),
    ({"flops": {}}, "'flops'"),
    ({"memory": "24GB"}, "'memory'"),
    ({"memory": None}, "missing memory"),
    ({"efficiency": 2}, "'efficiency'"),
    ({"kind": "tpu"}, "'kind'"),
    ({"op_costs": [1, 2]}, "'op_costs'"),
    ({"op_costs": {"conv": {"fwd": [1, 2]}}}, "'op_costs.conv.fwd'"),
])
def test_a_malformed_device_profile_is_one_line_naming_file_and_field(capfd, tmp_path, fields, needle):
    prof = _profile_file(tmp_path, "prof.json", **fields)
    one_error_line(capfd, tmp_path, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget",
                   "1.2MB", "--device-profile", prof, "-o", "p.json", needles=(prof, needle, "planner calibrate"))


def test_device_profile_fields_checked_in_python_too():
    from lrcnn.planner.cost import CostError, DeviceProfile, PROFILES, load_profile

    with pytest.raises(CostError, match="'bandwidth' must be a positive number"):
        DeviceProfile("x", {"float32": 1e12}, 0, 2**30)
    with pytest.raises(CostError, match="'measured' must be true or false"):
        DeviceProfile("x", {"float32": 1e12}, 1e11, 2**30, measured="yes")
    for p in PROFILES.values():  # the built-in ones pass as they are
        assert DeviceProfile.from_dict(p.to_dict()) == p
    with pytest.raises(CostError, match="does not exist"):
        load_profile("no/such/profile.json")


def test_non_utf8_plan_and_profile_name_the_file_in_every_verb(capfd, tmp_path, small_plan):
    import json

    with open(small_plan) as f:
        text = json.dumps(json.load(f))
    bad_plan = tmp_path / "latin1_plan.json"
    bad_plan.write_bytes(text.replace('"tiny_resnet"', '"tiny_resn\xe9t"', 1).encode("latin-1"))
    bad_prof = tmp_path / "latin1_prof.json"
    bad_prof.write_bytes(open(_profile_file(tmp_path, "ok.json")).read().replace('"cpu"', '"cp\xe9"', 1)
                         .encode("latin-1"))
    bad_rec = tmp_path / "latin1_records.csv"
    bad_rec.write_bytes(b"run_id,step\n\xe9,1\n")
    plan, prof = str(bad_plan), str(bad_prof)
    for argv in (["check-plan", plan], ["run", plan, "--steps", 1, "--quiet", "--out", "r.csv"],
                 ["simulate", plan, "--csv", "s.csv"]):
        one_error_line(capfd, tmp_path, *argv, needles=(f"plan {plan!r}", "not a text file"))
    for argv in (["solve", "--model", "tiny_resnet", "--budget", "1GB", "--device-profile", prof, "-o", "p.json"],
                 ["simulate", small_plan, "--device-profile", prof, "--csv", "s.csv"],
                 ["validate", "--model", "tiny_resnet", "--device-profile", prof, "--csv", "v.csv"]):
        one_error_line(capfd, tmp_path, *argv, needles=(f"device profile {prof!r}", "not UTF-8 text"))
    one_error_line(capfd, tmp_path, "report", str(bad_rec), "--csv", "r.csv",
                   needles=(f"records file {str(bad_rec)!r}", "not UTF-8 text"))


def test_a_folder_where_a_file_is_expected_is_called_a_folder(capfd, tmp_path, small_plan):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    d = str(folder)
    for argv, what in ((["check-plan", d], "plan"), (["run", d, "--steps", 1, "--quiet"], "plan"),
                       (["simulate", d], "plan"),
                       (["solve", "--model", "tiny_resnet", "--budget", "1GB", "--device-profile", d, "-o", "p.json"],
                        "device profile"),
                       (["report", d, "--csv", "r.csv"], "records file"),
                       (["inspect", "--model", "tiny_resnet", "--weights", d, "--csv", "i.csv"], "weights file")):
        line = one_error_line(capfd, tmp_path, *argv, needles=(f"{what} {d!r} is a folder, not a file",))
        assert "does not exist" not in line
    # and the other way round: --data takes a folder
    one_error_line(capfd, tmp_path, "run", small_plan, "--steps", 1, "--quiet", "--data", small_plan, "--out", "r.csv",
                   needles=("--data", "is a file, not a folder"))
    one_error_line(capfd, tmp_path, "run", small_plan, "--steps", 1, "--quiet", "--data", d + "/missing",
                   needles=("--data", "does not exist"))


def test_strips_beyond_every_segments_rows_names_strips(capfd, tmp_path):
    """--strips more than any row segment has rows: say so and the largest count that works, not
    "infeasible"; a count some segments allow that still leaves no plan names --strips as a lever."""
    line = one_error_line(capfd, tmp_path, "solve", "--model", "tiny_resnet", "--batch", 2, "--budget", "100KB",
                          "--device-profile", "cpu", "--strips", 64, "-o", "p.json",
                          needles=("--strips 64", "has 64 rows at input size 32x32", "largest usable count is 32",
                                   "--strips 32 or less"))
    assert "infeasible" not in line
    one_error_line(capfd, tmp_path, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget",
                   "1.2MB", "--device-profile", "cpu", "--strips", 64, "-o", "p.json",
                   needles=("infeasible", "without --strips 64"))
    from lrcnn.errors import UsageError
    from lrcnn.planner import solve

    with pytest.raises(UsageError, match="largest usable count is 32"):
        solve("tiny_resnet", (2, 3, 32, 32), "100KB", device_profile="cpu", strips=33)


def test_a_typod_keyword_is_refused_at_once_with_the_valid_ones():
    from lrcnn.errors import UsageTypeError
    from lrcnn.planner import solve
    from lrcnn.planner.solve import Solver

    # a budget the plain step fits (where the keyword used to be ignored) and one it does not (a
    # TypeError from deep inside the search, after the capture)
    for budget in ("1GB", "150KB"):
        with pytest.raises(UsageTypeError, match=r"solve\(\) got an unknown keyword argument 'strip' "
                                                 r"\(did you mean strips=\?\); it takes model, .*strips.*max_strips"):
            solve("tiny_resnet", (2, 3, 32, 32), budget, device_profile="cpu", strip=64)
    with pytest.raises(TypeError, match="unknown keyword arguments 'time_limt', 'zzz'"):
        solve("tiny_resnet", (2, 3, 32, 32), "1GB", time_limt=3, zzz=1)
    with pytest.raises(UsageTypeError, match=r"Solver\(\) got an unknown keyword argument 'strip'"):
        Solver(None, strip=3)


class _TwoInputs(__import__("torch").nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = __import__("torch").nn.Conv2d(3, 4, 3)

    def forward(self, x, y):
        return self.conv(x) + y


def _capture_failures():
    import torch.nn as nn

    return [
        ("wrong input channels", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), (2, 3, 32, 32),
         "takes 1 input channel(s) and the input shape has 3: give an input shape (2, 1, H, W)"),
        ("layers that do not fit", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(8, 4, 3)), (2, 3, 32, 32),
         "a layer takes 8 channels where the one before it makes 4"),
        ("two inputs", _TwoInputs(), (2, 3, 32, 32), "_TwoInputs.forward takes 2 inputs (x, y)"),
        ("a fixed Linear", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(100, 10)), (2, 3, 32, 32),
         "use the input size the model was built for"),
        ("a map too small", nn.Sequential(nn.Conv2d(3, 4, 7), nn.MaxPool2d(2), nn.Conv2d(4, 4, 7)), (2, 3, 12, 12),
         "use a larger --resolution"),
    ]


@pytest.mark.parametrize("case", _capture_failures(), ids=lambda c: c[0])
def test_capture_failure_advice_matches_its_cause(case):
    """Only a map too small for the network asks for a larger resolution."""
    from lrcnn.models import CaptureError, capture
    from lrcnn.planner import solve

    _, model, shape, advice = case
    for call in (lambda: capture(model, shape), lambda: solve(model, shape, "1GB")):
        with pytest.raises(CaptureError) as e:
            call()
        msg = str(e.value)
        assert advice in msg and len(msg.splitlines()) == 1, msg
        assert ("larger --resolution" in msg) == (advice == "use a larger --resolution"), msg


def test_a_custom_module_plan_in_the_cli_shows_the_python_path(capfd, tmp_path):
    """A plan made by solve(my_module, ...) names the module's class; check-plan, run and simulate
    cannot rebuild it (whatever its channels) and say how to use it instead."""
    import torch.nn as nn

    from lrcnn.planner import solve

    for c in (3, 1):
        m = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
        plan = str(tmp_path / f"custom{c}.json")
        solve(m, (4, c, 32, 32), "1GB", device_profile="cpu").save(plan)
        for argv in (["check-plan", plan], ["run", plan, "--steps", 1, "--quiet", "--out", "r.csv"],
                     ["simulate", plan, "--csv", "s.csv"]):
            line = one_error_line(capfd, tmp_path, *argv,
                                  needles=("'Sequential' is not one of 'planner models'", "custom nn.Module",
                                           "cannot rebuild", "apply_plan(your_model, Plan.load('plan.json'))"))
            assert "channel" not in line


def test_a_model_in_another_dtype_than_its_plan_warns():
    """The plan runs (it captures the model in its own dtype) but its memory prediction is for the
    plan's dtype: apply_plan says so, and how to re-plan; a model in the plan's dtype is quiet."""
    import warnings

    import torch
    import torch.nn as nn

    from lrcnn import apply_plan, solve
    from lrcnn.executor import PlanDtypeWarning

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 10))

    plan = solve(net(), (4, 3, 32, 32), "1GB", device_profile="cpu")
    assert plan.dtype == "float32" and issubclass(PlanDtypeWarning, UserWarning)
    with pytest.warns(PlanDtypeWarning) as w:
        pm = apply_plan(net().double(), plan)
    msg = str(w[0].message)
    for needle in ("parameters are float64", "made for float32", "memory prediction", "dtype='float64'",
                   "planner solve --dtype float64", "model.to(torch.float32)"):
        assert needle in msg, msg
    assert w[0].filename == __file__  # pointed at the caller's line
    assert pm(torch.randn(4, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64  # (it still runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanDtypeWarning)
        apply_plan(net(), plan)


# ------------------------------------------------------------------------------------------------
# --check-grads at low precision

def test_check_grads_passes_a_correct_low_precision_plan(capfd, tmp_path):
    """A float32, bfloat16 or float16 plan with row segments is judged against plain's own spread at
    that precision: plain bfloat16 is ~0.15-0.2 from float32 and so is the correct planned step from
    plain (it failed at 0.2-0.34 > 0.05 before); plain float32 is ~1e-4 from float64 on BN-heavy
    nets at small batches, and correct float32 plans failed a fixed 1e-4 at 2e-4..2e-3."""
    for dtype, budget in (("float32", "1.2MB"), ("bfloat16", "600KB"), ("float16", "600KB")):
        plan = str(tmp_path / f"{dtype}.json")
        rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--batch", 8, "--resolution", 64, "--budget",
                           budget, "--dtype", dtype, "--device-profile", "cpu", "-o", plan)
        assert rc == 0 and " rows " in out, err
        rc, out, err = run(capfd, "run", plan, "--steps", 1, "--warmup", 0, "--device", "cpu", "--check-grads",
                           "--quiet")
        assert rc == 0 and "check-grads OK" in out, err
        line = next(l for l in out.splitlines() if l.startswith("check-grads OK"))
        more = "float64" if dtype == "float32" else "float32"
        assert f"from plain {dtype}" in line and f"own distance from {more}" in line, line


def test_check_grads_low_precision_still_finds_a_wrong_gradient():
    """The spread rule is no blank cheque: a planned step with one conv gradient doubled fails, one
    scaled by 1.25 fails at float16, one scaled by 1.001 fails at float32 (its spread is ~1e-5 here);
    identical passes."""
    import copy

    import torch

    from lrcnn.executor.exactness import within_plain_spread
    from lrcnn.executor.run import check_grads
    from lrcnn.models import get_model

    for dtype, scale, ok in (("bfloat16", 1.0, True), ("bfloat16", 2.0, False), ("float16", 2.0, False),
                             ("float16", 1.25, False), ("float32", 1.0, True), ("float32", 1.001, False)):
        torch.manual_seed(0)
        plain = get_model("tiny_resnet").to(getattr(torch, dtype))
        planned = copy.deepcopy(plain)
        if scale != 1.0:
            planned.layer1[0].conv1.weight.register_hook(lambda g, s=scale: g * s)
        x = torch.randn(8, 3, 32, 32).to(getattr(torch, dtype))
        y = torch.randint(0, 10, (8,))
        got, msg = check_grads(plain, planned, x, y, dtype)
        assert got == ok, (dtype, scale, msg)
        if not ok:
            assert "'layer1.0.conv1.weight'" in msg, msg
    # the rule itself: a quantity may move by factor x plain's spread (there, or its largest)
    t = torch.tensor
    ref = {"loss": t(1.0), "a": t([1.0, 0.0]), "b": t([0.0, 1.0])}
    plain = {"loss": t(1.0), "a": t([1.1, 0.0]), "b": t([0.0, 1.0])}
    assert within_plain_spread({"loss": t(1.0), "a": t([1.25, 0.0]), "b": t([0.0, 1.0])}, plain, ref)[0]
    ok, worst = within_plain_spread({"loss": t(1.0), "a": t([1.1, 0.0]), "b": t([0.0, 1.3])}, plain, ref)
    assert not ok and worst[0] == "b" and worst[2] == pytest.approx(2 * 0.1)



# -- the graph at other batch sizes (solve --batch max captures twice) -------------------------------

def _graph_fields(g):
    import dataclasses

    nodes = [dataclasses.asdict(n) for n in g.nodes]
    return nodes, tuple(g.input_shape), g.dtype, g.amp, g.buffer_bytes, g.saved_input_bytes, g.memory_timeline


@pytest.mark.parametrize("model,res,bn,dtype,amp,base", [
    ("tiny_resnet", 32, "train", "float32", None, 2),
    ("tiny_vgg_bn", 32, "train", "float64", None, 2),
    # under autocast the classifier's backward peaks at another tensor above batch 5: a peak is
    # the largest of the live bytes after each op (each affine in the batch), not itself affine
    ("tiny_mobilenet", 32, "eval", "float32", "bf16", 3),
    ("resnet18", 64, "train", "float32", None, 6),
])
def test_graph_at_batch_equals_a_capture(model, res, bn, dtype, amp, base):
    """A graph derived from captures at two batches equals a real capture at any other batch in
    every field (bytes, FLOPs, shapes, the memory profile and its timeline), odd batches and
    batches below the base included."""
    from lrcnn.models.capture import BatchGraphs, build_and_capture

    def cap(n):
        return build_and_capture(model, n, (res, res), dtype, bn, None, None, amp=amp)[1]

    graphs = BatchGraphs(cap, base)
    for n in (1, 2, 5, 17, 33, 255):
        assert _graph_fields(graphs(n)) == _graph_fields(cap(n)), (model, n)
    assert graphs.captures == 3  # the base, the base + 1 and batch 1


def test_graph_at_batch_refuses_unrelated_graphs():
    from lrcnn.models.capture import CaptureError, build_and_capture, graph_at_batch

    a = build_and_capture("tiny_resnet", 2, (32, 32))[1]
    with pytest.raises(CaptureError, match="consecutive"):
        graph_at_batch(a, build_and_capture("tiny_resnet", 4, (32, 32))[1], 9)
    with pytest.raises(CaptureError, match="differ|different|consecutive"):
        graph_at_batch(a, build_and_capture("tiny_vgg", 3, (32, 32))[1], 9)


# -- solve --batch max, --max-slowdown, what a budget buys, warnings ---------------------------------

def _captured_solver(model, n, res, bn="train", profile="cpu"):
    from lrcnn.planner.solve import Solver, capture_model

    return Solver(capture_model(model, (n, 3, res, res), bn=bn)[1], model, bn=bn, device_profile=profile)


def _plain_fits(s, budget):
    return s.baseline()["peak"] <= budget - int(budget * s.headroom)


@pytest.mark.parametrize("model,res,budget", [
    ("tiny_resnet", 32, "400MB"),
    pytest.param("resnet18", 64, "1.5GB", marks=pytest.mark.full),  # (a capture per batch tried: ~40 s here)
])
def test_batch_max_same_batch_as_capturing_every_batch(capfd, model, res, budget):
    """--batch max prices few batches on derived graphs; the answer is the one the search gave
    before, with a capture and a full pricing per batch tried (planner.solve.max_batch)."""
    from lrcnn.planner.solve import max_batch

    rc, out, err = run(capfd, "solve", "--model", model, "--budget", budget, "--batch", "max", "--resolution", res,
                       "--device-profile", "cpu")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("largest batch that fits"))
    n = int(line.split(":")[1].split()[0])
    b = parse_bytes(budget)

    def fits_at(k):
        s = _captured_solver(model, k, res)
        return s.fits(b), s.min_peak()

    assert max_batch(fits_at, b) == n
    # samples/s beside the batch, and the plain step's at its own largest batch
    plain = int(line.split("the plain step fits up to batch ")[1].split()[0])
    assert "samples/s" in line and "ms a sample" in line and "x the plain step's" in line
    assert _plain_fits(_captured_solver(model, plain, res), b) and not _plain_fits(_captured_solver(model, plain + 1, res), b)
    search = next(l for l in out.splitlines() if l.startswith("search:"))
    assert "batches priced" in search and "captures" in search


def test_max_slowdown_is_the_largest_batch_within_it(capfd, tmp_path):
    os.chdir(tmp_path)
    b = 400 * 10**6
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "400MB", "--max-slowdown", "2",
                       "--resolution", 32, "--device-profile", "cpu", "--bn", "eval", "-o", "p.json")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("largest batch within 2x the plain step's time per sample"))
    n = int(line.split(":")[1].split()[0])
    plain = int(line.split("the plain step fits up to batch ")[1].split()[0])
    ref = _captured_solver("tiny_resnet", plain, 32, "eval").baseline()["time_s"] / plain

    def per_sample(k):
        s = _captured_solver("tiny_resnet", k, 32, "eval")
        return s.solve(b).predicted["time_s"] / k if s.fits(b) else float("inf")

    assert per_sample(n) <= 2 * ref < per_sample(n + 1)
    assert n > plain and os.path.exists("p.json")


@pytest.mark.parametrize("argv,needle", [
    (["--max-slowdown", "0"], "--max-slowdown"),
    (["--max-slowdown", "-1"], "--max-slowdown"),
    (["--max-slowdown", "fast"], "--max-slowdown"),
    (["--max-slowdown", "2", "--batch", "8"], "--max-slowdown"),
    (["--max-slowdown", "0.5", "--resolution", "32", "--device-profile", "cpu"], "give 1 or more"),
])
def test_bad_max_slowdown_is_one_line(capfd, tmp_path, argv, needle):
    os.chdir(tmp_path)
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "400MB", "-o", "p.json", *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_plain_fits_says_what_the_budget_buys(capfd):
    """Nothing to search: one more line, the plain step's largest batch against a batch lrcnn fits,
    each with its time per sample."""
    b = 300 * 10**6
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "300MB", "--batch", 2, "--resolution", 32,
                       "--device-profile", "cpu")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("what 300 MB (286 MiB) buys: the plain step up to batch"))
    plain = int(line.split("up to batch ")[1].split()[0])
    n = int(line.split("lrcnn at least batch ")[1].split()[0])
    assert line.count("ms a sample") == 2 and "--batch max finds lrcnn's largest" in line
    assert _plain_fits(_captured_solver("tiny_resnet", plain, 32), b)
    assert not _plain_fits(_captured_solver("tiny_resnet", plain + 1, 32), b)
    assert n > plain and _captured_solver("tiny_resnet", n, 32).fits(b)
    # and at the plan's batch, the largest input: guessed by scaling, confirmed by a capture there
    line = next(l for l in out.splitlines() if l.startswith("at batch 2: the plain step up to input "))
    hp = int(line.split("up to input ")[1].split("x")[0])
    hl = int(line.split("lrcnn at least ")[1].split("x")[0])
    assert line.count(" a step") == 2 and "x the plain step's time per pixel" in line, line
    assert hp > 32 and hp % 8 == 0 and _plain_fits(_captured_solver("tiny_resnet", 2, hp), b), line
    assert hl > hp and hl % 8 == 0, line
    big = _captured_solver("tiny_resnet", 2, hl)
    assert big.fits(b) and not _plain_fits(big, b), line


def test_budget_line_help_and_datasheet_note(capfd):
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "1GB", "--batch", 2)
    assert rc == 0 and err == "", err
    line = next(l for l in out.splitlines() if l.startswith("budget "))
    assert line.startswith("budget 1.00 GB (954 MiB) of reserved bytes (the CUDA caching allocator's"), line
    assert line.endswith("of the h100's 85.9 GB (80.0 GiB) it leaves 84.9 GB (79.1 GiB) for the CUDA context "
                         "(about 0.5-1 GiB): budget at most 84.8 GB (79.0 GiB) there"), line
    step = next(l for l in out.splitlines() if l.startswith("predicted step"))
    assert step.endswith("h100 datasheet estimates, never calibrated on a GPU"), step
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "1GB", "--batch", 2,
                       "--device-profile", "cpu")
    assert rc == 0 and "datasheet" not in out and "CUDA context" not in out and "of allocated bytes" in out
    rc, out, err = run(capfd, "solve", "--help")
    assert rc == 0
    text = " ".join(out.split())
    assert "covers the bytes the CUDA caching allocator reserves for the training step" in text
    assert "the CUDA context is not in it: leave about 1 GiB of the device free" in text
    assert "With the cpu profile it covers the bytes the step allocates" in text


def test_budget_over_device_memory_warns(capfd, tmp_path):
    """A budget above the profile's memory, or a plan predicted above it: one warning line each
    on stderr, and the command still succeeds; a profile that does not know its memory: none."""
    import json

    from lrcnn.planner.cost import PROFILES

    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "200GB", "--batch", 2)
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 1, err
    assert lines[0].startswith("planner: warning: the budget 200 GB (186 GiB) is more than the h100 profile's "
                               "device memory 85.9 GB (80.0 GiB)")
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "200GB", "--batch", 1_500_000)
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and all(l.startswith("planner: warning: ") for l in lines), err
    assert "the plan's predicted peak" in lines[1] and "85.9 GB (80.0 GiB)" in lines[1]
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "85.5GB", "--batch", 2)
    lines = err.strip().splitlines()  # within the device, but not leaving the CUDA context its room
    assert rc == 0 and len(lines) == 1 and "leaves 399 MB (381 MiB) of the h100's 85.9 GB (80.0 GiB) for the CUDA " \
        "context, which takes about 0.5-1 GiB: budget at most 84.8 GB (79.0 GiB) there" in lines[0], err
    prof = tmp_path / "gpu.json"
    prof.write_text(json.dumps(dict(PROFILES["h100"].to_dict(), name="mygpu", memory=0)))
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "200GB", "--batch", 2,
                       "--device-profile", prof)
    assert rc == 0 and err == "", err


def test_batch_max_captures_every_batch_when_a_derived_graph_differs(capfd, monkeypatch):
    """The answer's derived graph is compared with a capture; were they ever to differ, the
    search runs again on captures only (the same answer here, where they do not differ)."""
    from lrcnn.models.capture import BatchGraphs

    argv = ["solve", "--model", "tiny_resnet", "--budget", "400MB", "--batch", "max", "--resolution", 32,
            "--device-profile", "cpu", "--bn", "eval"]
    rc, out, err = run(capfd, *argv)
    assert rc == 0, err
    monkeypatch.setattr(BatchGraphs, "check", lambda self, n: False)
    rc, again, err = run(capfd, *argv)
    assert rc == 0, err
    first = [l for l in out.splitlines() if l.startswith("largest batch that fits")]
    assert first == [l for l in again.splitlines() if l.startswith("largest batch that fits")]
    assert "a derived graph differed from its capture" in again
