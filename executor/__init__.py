"""Executor: carry out a plan exactly (row strips, checkpoint and store segments) and measure it."""
from .program import apply_plan, PlannedModule
from .strips import RowSegmentError

__all__ = ["apply_plan", "PlannedModule", "RowSegmentError"]
