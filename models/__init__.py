"""Model zoo, graph capture, row geometry and memory accounting (the bottom layer above lrcnn.errors)."""
from lrcnn.models.capture import capture, trace, LayerGraph, Node, CaptureError, AMP_DTYPES
from lrcnn.models.geometry import HGeom, input_rows, propagate_rows, strip_schedule, even_bounds, StripSchedule
from lrcnn.models.zoo import get_model, list_models, default_resolution, load_weights, set_bn_mode, ModelError, model_task

__all__ = [
    "get_model", "list_models", "default_resolution", "load_weights", "set_bn_mode", "ModelError", "model_task",
    "capture", "trace", "LayerGraph", "Node", "CaptureError", "AMP_DTYPES",
    "HGeom", "input_rows", "propagate_rows", "strip_schedule", "even_bounds", "StripSchedule",
]
