"""``planner bench``: lrcnn against the alternatives, measured side by side (and the max-batch /
max-resolution study): the options here, the work in :func:`lrcnn.analysis.bench.compare.bench`."""
from __future__ import annotations

import argparse
import sys
from typing import List

from lrcnn.analysis.bench import ALL_CASES, BENCH_BN, CASES, DENSE_CASES, METHODS
from lrcnn.analysis.bench.compare import bench
from lrcnn.analysis.bench.dense import SIM_SIZES
from lrcnn.planner.cli.args import EXIT_OK, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark lrcnn against plain PyTorch, checkpointing, torch.compile, Rockmate and lightstream",
        description="Peak memory, step time and exactness of lrcnn plans and the alternatives, measured "
                    "side by side in one run.")
    add_compare_arguments(p)
    p.set_defaults(func=command)


def _methods(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad) or '(none)'}: give a comma list of "
                                         f"{', '.join(METHODS)}")
    return names


def _fractions(text: str) -> List[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        vals = []
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of numbers in [0, 1], e.g. 0.5,0.1")
    return vals


def _sizes(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of positive pixel sizes, e.g. 1280,1024")
    return vals


def _sim_sizes(text: str) -> List[int]:
    return [] if text.strip().lower() == "none" else _sizes(text)


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench compare`` / ``planner bench``."""
    p.add_argument("--case", action="append", choices=sorted(ALL_CASES), metavar="CASE",
                   help=f"a case to run (repeatable): {', '.join(CASES)} (the default: all of these), or the "
                        f"dense (segmentation) cases, run only when named: {', '.join(DENSE_CASES)} (per-pixel "
                        f"target; into seg-<device>.*, and every method at --sim-sizes into seg-sim-<device>.*); "
                        f"or a custom case with --model")
    p.add_argument("--model", help="custom case: a torchvision ResNet, VGG or MobileNetV2 name, or a dense "
                                   "unet, tiny_unet, fcn_resnet50/101 or deeplabv3_resnet50/101 "
                                   "(with --batch and --resolution); with --study, the model studied "
                                   "(default resnet50; a dense model's study goes into seg-study-<device>.*)")
    p.add_argument("--batch", type=positive_int, help="custom case: batch size")
    p.add_argument("--resolution", type=positive_int, help="custom case: square input size")
    p.add_argument("--bn", choices=BENCH_BN, default=None,
                   help="custom case: BatchNorm in training mode (train, the default) or frozen (eval mode, "
                        "affine parameters frozen: what lightstream trains)")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help=f"comma list of methods (default: all: {','.join(METHODS)})")
    p.add_argument("--compile-budgets", type=_fractions, default=[0.5, 0.1], metavar="B,B",
                   help="torch._functorch.config.activation_memory_budget values for torch.compile; "
                        "1.0 (compiled plain) always runs (default: 0.5,0.1)")
    p.add_argument("--points", type=positive_int, default=4,
                   help="lrcnn budgets swept from the smallest feasible to the plain peak (default: 4)")
    p.add_argument("--lightstream-tiles", type=_sizes, default=None, metavar="N,N",
                   help="lightstream's square tile sizes in pixels, one row each (default: 5/6 of the input, "
                        "a multiple of the trunk's output stride)")
    p.add_argument("--warmup", type=positive_int, default=1, help="untimed steps per method (default: 1)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed steps per method, median (default: 5)")
    p.add_argument("--unpaired", action="store_true",
                   help="time each method alone; by default each timed step of an eager method follows a "
                        "timed plain step and its time ratio is the median ratio of the pairs (robust to "
                        "the machine's speed drifting during a long run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="training dtype; exactness bar 1e-5 (float32) or 1e-10 (float64) (default: float32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: cuda when available)")
    p.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help="device profile for the planner (built-in name or planner calibrate JSON; "
                        "default: cpu on CPU, h100 on CUDA)")
    p.add_argument("--out-dir", default="bench/results", metavar="DIR",
                   help="folder for compare-<device>.csv/.png/.md (default: bench/results)")
    p.add_argument("--fresh", action="store_true",
                   help="start compare-<device>.csv (study-<device>.csv) anew (default: rows of cases, or "
                        "studies, not run now are kept from the existing file, so they can be run one at a "
                        "time into one table)")
    p.add_argument("--sim-sizes", type=_sim_sizes, default=list(SIM_SIZES), metavar="N,N",
                   help=f"dense cases: the square sizes every method is simulated at (batch 1; the time target "
                        f"is judged at the first), or 'none' (default: {','.join(map(str, SIM_SIZES))})")
    p.add_argument("--study", nargs="?", const="both", choices=["batch", "resolution", "both"],
                   help="run the max-batch and/or max-resolution study (--model, default ResNet-50) under --study-budget "
                        "instead (simulated; default when given without a value: both)")
    p.add_argument("--study-budget", default="8GiB", metavar="SIZE", help="budget of the study (default: 8GiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def command(args) -> int:
    text = bench(case=args.case, model=args.model, batch=args.batch, resolution=args.resolution,
                 methods=args.methods, compile_budgets=args.compile_budgets, points=args.points,
                 warmup=args.warmup, repeats=args.repeats, unpaired=args.unpaired, dtype=args.dtype,
                 device=args.device, profile=args.profile, out_dir=args.out_dir, fresh=args.fresh,
                 study=args.study, study_budget=args.study_budget, progress=not args.no_progress, bn=args.bn,
                 lightstream_tiles=args.lightstream_tiles, sim_sizes=args.sim_sizes)
    print(text)
    if not args.study:
        print(f"wrote compare-<device>.csv, .png and .md into {args.out_dir}", file=sys.stderr)
    return EXIT_OK
