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


@pytest.mark.parametrize("model,res,budget", [("tiny_resnet", 32, "400MB"), ("resnet18", 64, "1.5GB")])
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


def test_budget_line_help_and_datasheet_note(capfd):
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "1GB", "--batch", 2)
    assert rc == 0 and err == "", err
    assert "budget 1.00 GB (954 MiB) of allocated bytes (the training step's); the h100's 85.9 GB (80.0 GiB) also hold " \
           "the CUDA context and the allocator's reserve: budget at most 76.3 GB (71.1 GiB) there" in out
    step = next(l for l in out.splitlines() if l.startswith("predicted step"))
    assert step.endswith("h100 datasheet estimates, never calibrated on a GPU"), step
    rc, out, err = run(capfd, "solve", "--model", "tiny_resnet", "--budget", "1GB", "--batch", 2,
                       "--device-profile", "cpu")
    assert rc == 0 and "datasheet" not in out and "CUDA context" not in out
    rc, out, err = run(capfd, "solve", "--help")
    assert rc == 0
    text = " ".join(out.split())
    assert "covers the bytes the training step allocates" in text and "CUDA context" in text
    assert "leave about 1 GiB plus 10% of the rest free" in text


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
