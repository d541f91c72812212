"""``planner check-plan``: a plan JSON checked against its model."""
from __future__ import annotations


from lrcnn.planner.cli.args import EXIT_OK, positive_int, shape_text
from lrcnn.planner.plan import Plan, plan_model, precision


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check-plan", help="validate a plan JSON against its model",
        description="Load a plan (lrcnn.plan/1), build the plan's model at the plan's input shape and "
                    "dtype on the meta device, capture it and check schema, fingerprint and segments.")
    p.add_argument("plan", metavar="PLAN.json", help="plan file to check")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="classifier outputs the plan was made with (default: the plan's "
                        "training.num_classes, else the model's default)")
    p.set_defaults(func=command)


def command(args) -> int:
    """``planner check-plan PLAN.json``: one OK line, or one error line and exit 2."""

    plan = Plan.load(args.plan)  # schema and field types
    _, graph = plan_model(plan, num_classes=args.num_classes)
    modes = {}
    for s in plan.segments:
        modes[s.mode] = modes.get(s.mode, 0) + 1
    seg = ", ".join(f"{k} {v}" for k, v in sorted(modes.items())) or "none"
    print(f"OK: {args.plan}: {plan.schema} plan for {plan.model} at {shape_text(graph.input_shape)} {precision(graph.dtype, graph.amp)}, "
          f"fingerprint {plan.fingerprint} matches; {len(plan.segments)} segment(s) ({seg})")
    return EXIT_OK
