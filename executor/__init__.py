"""Executor: carry out a plan exactly (row strips, checkpoint and store segments) and measure it."""
from lrcnn.executor.compiled import compile_plan, CompilablePlan
from lrcnn.executor.program import apply_plan, PlanDtypeWarning, PlannedModule
from lrcnn.executor.strips import RowSegmentError

__all__ = ["apply_plan", "PlannedModule", "PlanDtypeWarning", "RowSegmentError", "compile_plan", "CompilablePlan"]
