"""``planner run``: train with a plan for real, record predicted vs actual (also one torchrun rank)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List

import torch

from lrcnn.analysis.report import summarize
from lrcnn.executor import distributed as D
from lrcnn.executor.run import check_out, plan_precision, resolve_device, run_plan, RunError
from lrcnn.models.allocator import prefer_expandable_segments
from lrcnn.planner.cli.args import argtype, nonneg_int, positive_int, positive_number
from lrcnn.planner.plan import AMP_DTYPES, Plan


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="train with a plan for real; record predicted vs actual memory and time",
        description="Build the plan's model (random weights), apply the plan and run real training "
                    "steps (cross-entropy, per pixel for a dense model; the plan's optimizer).  Records per step, phase and segment "
                    "predicted and actual peak bytes and time.  Memory is measured on the first "
                    "recorded step (absolute live bytes: parameters, optimizer state, batch, "
                    "gradients, activations), time on the others, with the CUDA caching allocator's "
                    "reserved peak (CUDA: measured, max_memory_reserved; CPU: modeled on the step's "
                    "allocations).  Exit 1 when the measured peak exceeds the plan's budget (a plan solved "
                    "for a GPU profile: its reserved peak too) or --check-grads finds a mismatch.  Under torchrun "
                    "every process is one DDP rank (torchrun --nproc-per-node N -m lrcnn run PLAN.json ...).")
    add_run_args(p)
    p.set_defaults(func=command)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``planner run`` (also what each torchrun rank is given)."""
    p.add_argument("plan", metavar="PLAN.json", help="plan file (lrcnn.plan/1)")
    p.add_argument("--steps", type=positive_int, default=20, metavar="N", help="recorded steps (default 20)")
    p.add_argument("--warmup", type=argtype(nonneg_int), default=2, metavar="N",
                   help="unrecorded steps first (default 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda, cpu or auto (cuda when available; default)")
    p.add_argument("--data", default="synthetic", metavar="synthetic|DIR",
                   help="'synthetic' (random tensors and labels, random masks for a dense model; default), an "
                        "ImageFolder root (one folder per class), or for a dense (segmentation) model a folder "
                        "with DIR/images/*.png|jpg and DIR/masks/*.png (class indices, same names)")
    p.add_argument("--lr", type=positive_number("a positive learning rate such as 0.01"), default=None, metavar="LR",
                   help="learning rate (default: the plan's training.lr, else 0.01 for sgd/momentum, "
                        "1e-3 for adam/adamw)")
    p.add_argument("--check-grads", action="store_true",
                   help="first compare one step's loss and gradients with the plain model (exit 1 on mismatch)")
    p.add_argument("--amp", choices=AMP_DTYPES, default=None,
                   help="mixed precision to run; the plan's own (planner solve --amp) is used either way, "
                        "and a plan solved for another precision is refused (default: the plan's)")
    p.add_argument("--loss-in-rows", action="store_true",
                   help="a dense model whose plan ends in a rows segment at its logits: evaluate the per-pixel "
                        "cross-entropy inside that segment's strips, so the full-resolution logits never exist "
                        "(predicted so; the plan's training.loss_in_rows does the same)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    p.add_argument("--out", default=None, metavar="RECORDS.parquet",
                   help="write the records (.parquet, or .csv by the name's extension)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="run as N DistributedDataParallel processes on this machine (launches torchrun "
                        "--standalone; one GPU each on CUDA); the plan's batch is each process's (default 1)")


def command(args) -> int:
    """``planner run``: run the plan, print the summary; exit 1 on a failed run.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this process joins the process group first and
    is one rank of a distributed run; only rank 0 prints."""
    dev = resolve_device(args.device)
    if dev.type == "cuda":  # before anything starts CUDA (the process group may): the ranks inherit it
        prefer_expandable_segments()
    if getattr(args, "nproc", 1) > 1:
        return launch(args)
    info = D.init(dev)
    try:
        res = run_plan(args.plan, steps=args.steps, warmup=args.warmup, device=args.device, data=args.data,
                       lr=args.lr, check=args.check_grads, out=args.out, seed=args.seed,
                       progress=not args.quiet, dist_info=info, amp=getattr(args, "amp", None),
                       loss_in_rows=getattr(args, "loss_in_rows", False))
    finally:
        D.shutdown(info)
    if res.records is not None and info.is_main:
        print(summarize(res.records))
        if args.out:
            extra = f"; per rank: {D.rank_path(args.out, 'N')}" if info.enabled else ""
            print(f"wrote {args.out} ({len(res.records)} records{extra})")
    for f in res.failures:
        where = f"rank {info.rank}: " if info.enabled and not info.is_main else ""
        print(f"planner: FAILED: {where}{f}", file=sys.stderr)
    return 1 if res.failures else 0


def launch_argv(args) -> List[str]:
    """The torchrun command line ``planner run --nproc N`` starts: N processes on this machine,
    each running ``python -m lrcnn run`` with the same arguments (without ``--nproc``)."""
    argv = [args.plan, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
            "--data", args.data, "--seed", str(args.seed)]
    if args.lr is not None:
        argv += ["--lr", repr(args.lr)]
    if args.out is not None:
        argv += ["--out", args.out]
    argv += ["--check-grads"] * bool(args.check_grads) + ["--quiet"] * bool(args.quiet)
    argv += ["--loss-in-rows"] * bool(getattr(args, "loss_in_rows", False))
    if getattr(args, "amp", None):
        argv += ["--amp", args.amp]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
            "-m", "lrcnn", "run", *argv]


def launch(args) -> int:
    """``--nproc N``: check the input here (bad input: exit 2, one line), then run torchrun."""
    if D.env_info() is not None:
        raise RunError("--nproc: this process is already one rank of a torchrun launch; drop --nproc")
    dev = resolve_device(args.device)
    if dev.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise RunError(f"--nproc {args.nproc}: only {torch.cuda.device_count()} CUDA GPU(s); one process per GPU")
    check_out(args.out)
    plan_precision(Plan.load(args.plan), getattr(args, "amp", None))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(launch_argv(args), env=env)
