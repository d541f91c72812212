"""How much the CUDA caching allocator reserves above a plan's allocated peak (modeled).

    python -m lrcnn.analysis.bench.reserve                       # the default cases (several minutes)
    python -m lrcnn.analysis.bench.reserve --cases resnet50:32:224 --points 4 --md out.md

Per case (model, batch, resolution) plans are solved for the ``h100`` profile across the budget
range (as ``planner validate`` picks them: the plain step's budget, then evenly down to the
smallest plan); each plan's whole training step (parameters, optimizer state, batch, activations,
gradients) is simulated at full size with fake tensors and its allocation sequence replayed
through :mod:`lrcnn.models.allocator`, with PyTorch's default allocator and with expandable
segments.  The table gives the requested peak (storage bytes), the allocator's allocated and
reserved peaks, the reserved bytes the planner keeps for the plan
(:meth:`~lrcnn.planner.cost.DeviceProfile.reserved_for` of the predicted peak without the
profile's workspace, which a fake step does not allocate) and whether the modeled reserved peak
stays within them.  This is what :data:`lrcnn.planner.cost.ALLOCATOR_RESERVE` and
``ALLOCATOR_RESERVE_BYTES`` are derived from; a GPU measures the real thing
(``planner validate --device cuda``: ``max_memory_reserved``).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import train_step_memory
from lrcnn.executor.validate import budget_points, plan_text
from lrcnn.models.allocator import replay
from lrcnn.planner.cost import ALLOCATOR_RESERVE, ALLOCATOR_RESERVE_BYTES
from lrcnn.planner.files import write_text_atomic
from lrcnn.planner.plan import plan_model
from lrcnn.planner.solve import capture_model, Solver

#: model:batch:resolution
CASES = ("resnet50:32:224", "vgg16:32:224", "resnet18:8:224", "mobilenet_v2:16:224")
MiB = 2**20


def measure_case(model: str, batch: int, res: int, points: int = 4, profile: str = "h100") -> List[dict]:
    """One row per plan of ``model`` across its budget range (see the module docstring)."""
    _, graph = capture_model(model, (batch, 3, res, res))
    solver = Solver(graph, model, device_profile=profile)
    prof = solver.cm.profile
    ws = int(solver.cm.fixed_breakdown().get("workspace", 0))
    budgets = budget_points(solver.smallest_budget(), solver.budget_for(solver.baseline()["peak"]), points)
    rows = []
    for k, b in enumerate(budgets):
        plan = solver.solve(b)
        m, g = plan_model(plan)
        t0 = time.perf_counter()
        rep = train_step_memory(apply_plan(m, plan, g), plan.input_shape, plan.training.get("optimizer", "momentum"),
                                fake=True, reserved=True)
        default = replay(rep.events, rep.existing_events)
        exp = replay(rep.events, rep.existing_events, expandable_segments=True)
        kept = prof.reserved_for(plan.predicted["peak_bytes"] - ws)
        rows.append({
            "model": model, "batch": batch, "resolution": res, "point": k, "budget_bytes": b, "plan": plan_text(plan),
            "predicted_bytes": plan.predicted["peak_bytes"] - ws, "requested_bytes": exp.requested,
            "allocated_bytes": exp.allocated, "reserved_default_bytes": default.reserved,
            "reserved_expandable_bytes": exp.reserved, "kept_bytes": kept,
            "default_over_allocated": default.reserved / default.allocated - 1,
            "expandable_over_allocated": exp.reserved / exp.allocated - 1,
            "expandable_share_needed": (exp.reserved - ALLOCATOR_RESERVE_BYTES) / exp.allocated - 1,
            "within_kept": exp.reserved <= kept, "events": len(rep.events), "sim_s": time.perf_counter() - t0,
        })
    return rows


def markdown(df) -> str:
    """The table (MiB, percentages) and a one-line verdict."""
    head = ("| model | batch | res | # | plan | predicted MiB | requested | allocated | reserved default | "
            "(+%) | reserved expandable | (+%) | kept by the planner | within |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in df.itertuples():
        lines.append(f"| {r.model} | {r.batch} | {r.resolution} | {r.point} | {r.plan} | {r.predicted_bytes / MiB:.0f} | "
                     f"{r.requested_bytes / MiB:.0f} | {r.allocated_bytes / MiB:.0f} | {r.reserved_default_bytes / MiB:.0f} | "
                     f"{r.default_over_allocated:+.1%} | {r.reserved_expandable_bytes / MiB:.0f} | "
                     f"{r.expandable_over_allocated:+.1%} | {r.kept_bytes / MiB:.0f} | {'yes' if r.within_kept else 'NO'} |")
    lines += ["", f"Kept by the planner: predicted peak x (1 + {ALLOCATOR_RESERVE:.0%}) + "
              f"{ALLOCATOR_RESERVE_BYTES // MiB} MiB.  Reserved above allocated, default allocator: median "
              f"{df.default_over_allocated.median():+.1%}, worst {df.default_over_allocated.max():+.1%}; expandable "
              f"segments: median {df.expandable_over_allocated.median():+.1%}, worst {df.expandable_over_allocated.max():+.1%} "
              f"(share needed beside the {ALLOCATOR_RESERVE_BYTES // MiB} MiB: worst "
              f"{df.expandable_share_needed.max():+.1%}); {int(df.within_kept.sum())}/{len(df)} plans within what "
              f"the planner keeps."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrcnn.analysis.bench.reserve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), metavar="MODEL:BATCH:RES")
    ap.add_argument("--points", type=int, default=4, help="plans per case (default 4)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--md", default=None, help="write the markdown table")
    args = ap.parse_args(argv)
    import pandas as pd

    rows = []
    for case in args.cases:
        model, batch, res = case.split(":")
        for r in measure_case(model, int(batch), int(res), args.points):
            rows.append(r)
            print(f"{model} b{batch} {res} #{r['point']} {r['plan']}: allocated {r['allocated_bytes'] / MiB:.0f} MiB, "
                  f"reserved {r['reserved_default_bytes'] / MiB:.0f} (default) / {r['reserved_expandable_bytes'] / MiB:.0f} "
                  f"(expandable), kept {r['kept_bytes'] / MiB:.0f} [{r['sim_s']:.1f} s]", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    text = markdown(df)
    print(text)
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.md:
        write_text_atomic(text + "\n", args.md, "table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
