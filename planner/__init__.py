"""Planning: plan format, byte units, the cost model (planner.cost) and the ILP planner (solve)."""
from .plan import Plan, Segment, PlanError, SCHEMA
from .units import parse_bytes, fmt_bytes, fmt_both
from .solve import solve  # noqa: E402  (the function; the module stays importable as planner.solve)

__all__ = ["Plan", "Segment", "PlanError", "SCHEMA", "parse_bytes", "fmt_bytes", "fmt_both", "solve"]
