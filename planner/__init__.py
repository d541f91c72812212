"""Planning: plan format, byte units (cost model and ILP solver arrive with their issues)."""
from .plan import Plan, Segment, PlanError, SCHEMA
from .units import parse_bytes, fmt_bytes, fmt_both

__all__ = ["Plan", "Segment", "PlanError", "SCHEMA", "parse_bytes", "fmt_bytes", "fmt_both"]
