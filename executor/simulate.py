"""``planner simulate``: the cost model's predicted peak next to a simulated training step.

The simulation is the executor itself: the plan's model (built on the meta device) with the plan
applied runs one whole training step (zero_grad, forward, loss, backward, optimizer step) under
``FakeTensorMode`` with storage accounting (:func:`lrcnn.executor.measure.train_step_memory`), so a
full-size plan is checked in seconds without the memory.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import torch
from lrcnn.executor import apply_plan
from lrcnn.executor.measure import train_step_memory
from lrcnn.models.allocator import expandable_segments, replay
from lrcnn.models.loss import pixel_cross_entropy
from lrcnn.planner.cost import CostModel, CostError, load_profile
from lrcnn.planner.plan import plan_model, Plan

__all__ = ["simulate_plan"]


def simulate_plan(path, profile: Optional[str] = None, optimizer: Optional[str] = None) -> Tuple["object", dict]:
    """Predicted vs simulated absolute peak per phase.  Returns (DataFrame, info).

    ``profile``: the cost model's device profile; default the one the plan was solved with
    (``solver.device_profile``), else ``cpu``.  A profile's workspace reserve (cuDNN/cuBLAS
    scratch on a GPU profile) is left out of the predicted side: the simulated step does not
    allocate it, so like is compared with like (``info['workspace']`` says how much).

    With a GPU profile a ``reserved`` row compares the bytes the plan keeps for the CUDA caching
    allocator (:meth:`lrcnn.planner.cost.DeviceProfile.reserved_for`) with the allocator model's
    reserved peak on the simulated step's allocations (:mod:`lrcnn.models.allocator`, with
    expandable segments as lrcnn's CUDA runs use them unless ``PYTORCH_ALLOC_CONF`` says
    otherwise; ``info['modeled_reserved_other_bytes']``: the other setting's)."""
    import pandas as pd

    plan = Plan.load(path) if isinstance(path, str) else path
    optimizer = optimizer or plan.training.get("optimizer", "sgd")
    model, graph = plan_model(plan)
    if profile is None:

        profile = (plan.solver or {}).get("device_profile") or "cpu"
        try:
            load_profile(profile)
        except (CostError, ValueError, OSError):
            profile = "cpu"  # (a profile file that is gone: the CPU's)
    cm = CostModel(graph, optimizer=optimizer, profile=profile)
    pred = cm.predict(plan)
    ws = int(cm.fixed_breakdown().get("workspace", 0))
    # (a plan priced with the loss inside its last row segment is stepped so: model(x, target))
    planned = apply_plan(model, plan, graph, loss=pixel_cross_entropy if plan.training.get("loss_in_rows") else None)
    t0 = time.perf_counter()
    rep = train_step_memory(planned, plan.input_shape, optimizer, fake=True, dtype=getattr(torch, plan.dtype),
                            amp=plan.training.get("amp"), reserved=True)
    sim_s = time.perf_counter() - t0
    sim = rep.absolute_phase_peaks()
    rows = []
    for ph in ("forward", "backward", "optimizer"):
        rows.append((ph, pred["phases"][ph] - ws, sim.get(ph, 0)))
    rows.append(("peak", pred["peak_bytes"] - ws, rep.absolute_peak))
    expandable = expandable_segments()
    other = replay(rep.events, rep.existing_events, expandable_segments=not expandable).reserved
    if cm.profile.kind == "cuda":  # the budget is reserved bytes there: the allocator model's peak
        rows.append(("reserved", cm.profile.reserved_for(pred["peak_bytes"] - ws), rep.modeled_reserved_bytes))
    df = pd.DataFrame(rows, columns=["phase", "predicted_bytes", "simulated_bytes"])
    df["error_pct"] = (df.predicted_bytes - df.simulated_bytes) / df.simulated_bytes * 100
    info = {"model": plan.model, "shape": "x".join(map(str, plan.input_shape)), "dtype": plan.dtype + (f" + autocast {plan.training['amp']}" if plan.training.get("amp") else ""),
            "optimizer": optimizer, "profile": cm.profile.name, "sim_s": sim_s, "workspace": ws,
            "expandable_segments": expandable, "modeled_reserved_bytes": rep.modeled_reserved_bytes,
            "modeled_reserved_other_bytes": other}
    return df, info
