"""Planning only (never a training step): byte units, files, the plan format, the cost model and the ILP (solve)."""
from lrcnn.planner.plan import Plan, Segment, PlanError, SCHEMA
from lrcnn.planner.solve import solve  # noqa: E402  (the function; the module stays importable as planner.solve)
from lrcnn.planner.units import parse_bytes, fmt_bytes, fmt_both

__all__ = ["Plan", "Segment", "PlanError", "SCHEMA", "parse_bytes", "fmt_bytes", "fmt_both", "solve"]
