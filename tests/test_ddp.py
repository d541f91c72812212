"""Plans under torch.distributed DistributedDataParallel (gloo on the CPU) and under torchrun.

Exactness: 2 processes with half the batch each, 3 SGD+momentum steps, default DDP settings
(no ``static_graph``, no ``find_unused_parameters``).  With eval BN and mean-reduced
cross-entropy, DDP's average of the two half-batch gradients *is* the full-batch gradient, so
the planned DDP run must match one plain process on the full batch.  With train BN each rank
normalises with its own half-batch statistics (no SyncBatchNorm), so the reference is plain DDP
of the unplanned model on the same shards (train BN inside row segments included).

Tolerances (norm-wise relative, on final parameters and on the parameter updates): float64 1e-10,
float32 1e-5.  Small on purpose (CI has 2 CPU cores): tiny_resnet, 4x3x32x32 split in two; all
plans run in one spawn of two processes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lrcnn.planner.plan import Plan, Segment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
FULL = (4, 3, 32, 32)
STEPS = 3
LR = 0.05

STORE = Segment("layer2", "layer2", "store", recompute=["layer2_0_bn1", "layer2_0_relu"])
CASES = {
    # name: (bn mode, segments)
    "rows_2ps": ("eval", [Segment("conv1", "layer1", "rows", policy="2ps", strips=4),
                          Segment("layer2", "layer2", "checkpoint")]),
    "rows_overl": ("eval", [Segment("conv1", "layer2", "rows", policy="overl", strips=3)]),
    "checkpoint_store": ("eval", [Segment("conv1", "layer1", "checkpoint"), STORE]),
    "train_bn_checkpoint_store": ("train", [Segment("conv1", "layer1", "checkpoint"), STORE]),
    "train_bn_rows": ("train", [Segment("conv1", "layer1", "rows", policy="2ps", strips=3),
                                Segment("layer2", "layer2", "rows", policy="overl", strips=2)]),
    "float32_rows": ("eval", [Segment("conv1", "layer1", "rows", policy="2ps", strips=4),
                              Segment("layer2", "layer2", "rows", policy="overl", strips=2)]),
}
DTYPE = {c: (torch.float32 if c.startswith("float32") else torch.float64) for c in CASES}
TOLS = {torch.float64: 1e-10, torch.float32: 1e-5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(bn: str, dtype=torch.float64):
    """tiny_resnet, weights from seed 0; eval BN with calibrated running statistics (one
    cumulative pass over a random batch keeps activations O(1))."""
    from lrcnn.models import get_model, set_bn_mode

    torch.manual_seed(0)
    m = get_model("tiny_resnet").double()
    if bn == "eval":
        bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        for b in bns:
            b.momentum = None
        with torch.no_grad():
            m(torch.randn(8, 3, 32, 32, dtype=torch.float64))
        for b in bns:
            b.momentum = 0.1
    return set_bn_mode(m.to(dtype), bn)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*FULL, generator=g, dtype=torch.float64), torch.randint(0, 10, (FULL[0],), generator=g)
    return x.to(dtype), y


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    inner = getattr(model, "module", model)
    return ({k: v.detach().clone() for k, v in inner.named_parameters()},
            {k: v.detach().clone() for k, v in inner.named_buffers()})


def _worker(rank, world, port, outdir, cases):
    """One rank: every case planned + DDP; train-BN cases also plain DDP (the reference)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lrcnn.executor import apply_plan
    from lrcnn.models import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = FULL[0] // world
        graphs = {}
        res = {}
        for name in cases:
            (bn, segs), dt = CASES[name], DTYPE[name]
            x, y = _data(dt)
            xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            m = _model(bn, dt)
            if (bn, dt) not in graphs:
                graphs[bn, dt] = capture(m, (n,) + FULL[1:], dt, model_name="tiny_resnet")
            g = graphs[bn, dt]
            plan = Plan.build(g, segs, training={"optimizer": "momentum", "bn": bn})
            res[name] = _train(DDP(apply_plan(m, plan, g)), xs, ys)  # default DDP settings
            if bn == "train":
                res[name + "/plain_ddp"] = _train(DDP(_model(bn, dt)), xs, ys)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rel(a, b) -> float:
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb else float(a.norm())


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out), list(CASES)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _initial(bn, dtype):
    return {k: v.detach().clone() for k, v in _model(bn, dtype).named_parameters()}


def _compare(got, ref, p0, what, tol):
    """Final parameters and the parameter *updates* (final - initial: far more sensitive)."""
    (gp, gb), (rp, rb) = got, ref
    assert set(gp) == set(rp)
    for k in rp:
        assert _rel(gp[k], rp[k]) <= tol, f"{what}: parameter {k} differs"
        assert _rel(gp[k] - p0[k], rp[k] - p0[k]) <= tol, f"{what}: update of {k} differs"
    for k in rb:
        if rb[k].is_floating_point():
            assert _rel(gb[k], rb[k]) <= tol, f"{what}: buffer {k} differs"


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] == "eval"])
def test_ddp_eval_bn_matches_single_process_full_batch(case, ddp_results):
    dt = DTYPE[case]
    ref = _train(_model("eval", dt), *_data(dt))
    for r in range(WORLD):
        _compare(ddp_results[r][case], ref, _initial("eval", dt), f"{case} rank {r}", TOLS[dt])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] == "train"])
def test_ddp_train_bn_matches_plain_ddp(case, ddp_results):
    dt = DTYPE[case]
    for r in range(WORLD):
        ref = ddp_results[r][case + "/plain_ddp"]
        _compare(ddp_results[r][case], ref, _initial("train", dt), f"{case} rank {r}", TOLS[dt])
    # the ranks really saw different statistics: rank 1's running stats are its own
    rm = "bn1.running_mean"
    assert _rel(ddp_results[0][case + "/plain_ddp"][1][rm], ddp_results[1][case + "/plain_ddp"][1][rm]) > 1e-6


# ------------------------------------------------------------------------------------------------
# torchrun end to end
# ------------------------------------------------------------------------------------------------

def test_torchrun_records_of_both_ranks(tmp_path):
    from lrcnn.models import capture, get_model

    m = get_model("tiny_resnet", device="meta").train()
    g = capture(m, (1, 3, 32, 32), torch.float32, model_name="tiny_resnet")
    plan = Plan.build(g, [Segment("conv1", "layer1", "rows", policy="2ps", strips=2)],
                      training={"optimizer": "momentum", "bn": "eval"})
    plan.training["world_size"] = WORLD
    pp = tmp_path / "plan.json"
    plan.save(str(pp))
    out = tmp_path / "rec.csv"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-port", str(free_port()), "-m", "lrcnn", "run", str(pp), "--steps", "2",
           "--warmup", "0", "--device", "cpu", "--out", str(out), "--quiet"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    df = pd.read_csv(out)
    assert sorted(df["rank"].unique()) == list(range(WORLD))
    assert (df["world_size"] == WORLD).all()
    assert df["run_id"].nunique() == WORLD  # one run per rank, shared prefix
    steps = df[df.scope == "step"]
    assert len(steps) == 2 * WORLD
    assert steps["actual_peak_bytes"].notna().sum() == WORLD  # memory measured on every rank
    # different data per rank: different losses
    l0 = steps[steps["rank"] == 0].sort_values("step")["loss"].to_numpy()
    l1 = steps[steps["rank"] == 1].sort_values("step")["loss"].to_numpy()
    assert (l0 != l1).any()
    for r in range(WORLD):
        assert (tmp_path / f"rec.rank{r}.csv").exists()
    assert p.stdout.count("wrote") == 1  # only rank 0 reports


# ------------------------------------------------------------------------------------------------
# The plan records the world size
# ------------------------------------------------------------------------------------------------

def _plan_dict(**training):
    return {"schema": "lrcnn.plan/1", "model": "tiny_resnet", "fingerprint": "x", "input_shape": [2, 3, 32, 32],
            "dtype": "float32", "training": dict({"optimizer": "sgd", "bn": "eval"}, **training), "segments": []}


def test_plan_world_size_round_trip_and_validation():
    from lrcnn.planner.plan import PlanError

    assert Plan.from_dict(_plan_dict(world_size=8)).training["world_size"] == 8
    assert Plan.from_dict(_plan_dict(world_size=8)).to_dict()["training"]["world_size"] == 8
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(PlanError, match="training.world_size"):
            Plan.from_dict(_plan_dict(world_size=bad))


# ------------------------------------------------------------------------------------------------
# planner run --nproc N (torchrun --standalone underneath)
# ------------------------------------------------------------------------------------------------

def test_nproc_command_line_and_bad_input(tmp_path, capfd, monkeypatch):
    from lrcnn.planner.cli import run as runmod
    from lrcnn.planner.cli import build_parser, main

    args = build_parser().parse_args(["run", "p.json", "--nproc", "3", "--steps", "4", "--lr", "0.5",
                                      "--out", "r.csv", "--quiet"])
    cmd = runmod.launch_argv(args)
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1: i + 4] == ["--standalone", "--nproc-per-node", "3"]
    tail = cmd[cmd.index("lrcnn") + 2:]
    assert cmd[cmd.index("lrcnn") + 1] == "run"
    assert tail[0] == "p.json" and "--nproc" not in tail
    assert tail[tail.index("--steps") + 1] == "4" and tail[tail.index("--lr") + 1] == "0.5"
    assert tail[tail.index("--out") + 1] == "r.csv" and "--quiet" in tail and "--check-grads" not in tail
    # bad input is refused before anything is launched: one line, exit 2
    monkeypatch.setattr("subprocess.call", lambda *a, **k: pytest.fail("launched"))
    assert main(["run", str(tmp_path / "missing.json"), "--nproc", "2", "--device", "cpu"]) == 2
    assert main(["run", str(tmp_path / "missing.json"), "--nproc", "2", "--out", "r.txt"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["run", str(tmp_path / "missing.json"), "--nproc", "2"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("planner: error:") for e in err)
    assert "already one rank" in err[2]


# ------------------------------------------------------------------------------------------------
# planner solve --world-size
# ------------------------------------------------------------------------------------------------

def test_solve_world_size_plans_per_process(tmp_path, capfd):
    from lrcnn.planner.cli import main

    out = tmp_path / "p.json"
    rc = main(["solve", "--model", "tiny_resnet", "--budget", "300MB", "--batch", "4", "--resolution", "32",
               "--bn", "eval", "--world-size", "2", "--device-profile", "cpu", "-o", str(out)])
    so, se = capfd.readouterr()
    assert rc == 0, se
    assert "world size 2: batch 2 per process, global batch 4" in so
    plan = Plan.load(str(out))
    assert plan.input_shape[0] == 2 and plan.training["world_size"] == 2
    assert plan.budget_bytes == 300 * 10**6
    assert plan.solver["ddp_bucket_bytes"] > 0  # DDP's gradient buckets, reserved from the budget
    rc = main(["solve", "--model", "tiny_resnet", "--budget", "300MB", "--batch", "3", "--world-size", "2"])
    so, se = capfd.readouterr()
    assert rc == 2 and se.strip().splitlines() == [
        "planner: error: --batch 3 does not split evenly over --world-size 2; give a multiple of 2"]
