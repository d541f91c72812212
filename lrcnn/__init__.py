"""lrcnn: train CNNs that do not fit in memory by running their convolutional trunk in row strips,
with exactly the maths of plain PyTorch.

The pipeline, bottom to top (each layer imports only the ones before it):

* :mod:`lrcnn.models` -- the model zoo, capture into a layer graph (shapes, bytes, FLOPs), row
  geometry and memory accounting;
* :mod:`lrcnn.planner` -- byte units, files, device profiles, the plan format, the cost model and
  the ILP (:func:`solve`): pure planning, never a training step;
* :mod:`lrcnn.executor` -- a plan carried out (:func:`apply_plan`, :func:`compile_plan`), measured,
  run, simulated, calibrated and validated;
* :mod:`lrcnn.analysis` -- records as pandas tables, reports, plots and the benchmarks;
* ``planner`` (:mod:`lrcnn.planner.cli`, also ``python -m lrcnn``) -- the command line on top.

The main names are here::

    from lrcnn import solve, apply_plan
    plan = solve(model, (8, 3, 512, 512), budget="4GB")
    model = apply_plan(model, plan)
"""
from lrcnn.errors import LrcnnError, UsageError
from lrcnn.executor import CompilablePlan, PlannedModule, RowSegmentError, apply_plan, compile_plan
from lrcnn.models import CaptureError, ModelError, capture, get_model, list_models
from lrcnn.planner import Plan, PlanError, Segment, fmt_bytes, parse_bytes, solve

__version__ = "0.1.0"

__all__ = ["solve", "apply_plan", "compile_plan", "capture", "get_model", "list_models", "Plan", "Segment",
           "PlannedModule", "CompilablePlan", "parse_bytes", "fmt_bytes", "LrcnnError", "UsageError",
           "ModelError", "CaptureError", "PlanError", "RowSegmentError", "__version__"]
