"""Executor: carry out a plan exactly (row strips, checkpoint and store segments) and measure it."""
from .program import apply_plan, PlannedModule
from .strips import RowSegmentError
from .compiled import compile_plan, CompilablePlan

__all__ = ["apply_plan", "PlannedModule", "RowSegmentError", "compile_plan", "CompilablePlan"]
