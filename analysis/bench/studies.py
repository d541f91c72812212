"""The max-batch and max-resolution study: the largest batch (input side) each method fits in a
budget, simulated under FakeTensorMode."""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch


from lrcnn.analysis.bench.cases import CLASSES, OPTIMIZER
from lrcnn.analysis.bench.methods import CheckpointBlocks, CheckpointSqrt
from lrcnn.executor.measure import make_optimizer, opt_state, train_step
from lrcnn.executor.simulate import simulate_plan
from lrcnn.models import get_model, memory, set_bn_mode
from lrcnn.models.capture import build_and_capture
from lrcnn.models.loss import logits_of, synthetic_target
from lrcnn.models.zoo import model_task
from lrcnn.planner.solve import max_batch, Solver


def simulated_peak(model_name: str, wrapper: Optional[type], shape: Sequence[int]) -> int:
    """Absolute peak of one training step of the (wrapped) model, simulated under FakeTensorMode
    (a dense model's target: a class index per pixel of its logits, as the bench's cases)."""
    dense = model_task(model_name) == "segmentation"
    with memory.fake_mode():
        torch.manual_seed(0)
        model = get_model(model_name, num_classes=None if dense else CLASSES)
        set_bn_mode(model, "train")
        fwd = wrapper(model) if wrapper else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, OPTIMIZER)
        x = torch.randn(*shape)
        if dense:
            with torch.no_grad():
                y = synthetic_target(logits_of(model(x)).shape)
        else:
            y = torch.randint(0, CLASSES, (shape[0],))
        train_step(fwd, opt, x, y)  # optimizer state
        state = opt_state(opt)
        rep = memory.measure_step(lambda: train_step(fwd, opt, x, y), track_existing=[model, state, x, y])
    return rep.absolute_peak


def size_study(budget: int, profile: str, model_name: str = "resnet50", resolution: int = 224,
               progress: bool = True, which: str = "both", step: int = 32, limit: int = 1 << 9,
               simulate: bool = True) -> List[Dict]:
    """Largest batch at ``resolution`` and largest square input at batch 1 within ``budget``
    (sides in multiples of ``step``, up to ``step * limit``; a U-Net's side must be a multiple of
    16).  Resolution rows carry ``x_pixels_checkpoint_blocks``: their pixels over those
    checkpointing per block reaches.  ``simulate``: lrcnn's plan at its answer is also simulated
    (the executor's step under FakeTensorMode; minutes for a plan of many strips), else its peak
    is the planner's prediction."""
    from tqdm import tqdm

    rows = []
    alts = [("plain", None), ("checkpoint-blocks", CheckpointBlocks), ("checkpoint-sqrt", CheckpointSqrt)]
    bar = tqdm(desc="study", unit="size", disable=not progress, file=sys.stderr)

    peaks: Dict[Tuple, int] = {}

    def alt_fits(wrapper, shape_of):
        def fits(n):
            key = (wrapper, shape_of(n))
            if key not in peaks:
                bar.set_postfix_str(f"{getattr(wrapper, '__name__', 'plain')} {'x'.join(map(str, shape_of(n)))}")
                peaks[key] = simulated_peak(model_name, wrapper, shape_of(n))
                bar.update(1)
            return peaks[key] <= budget, peaks[key]
        return fits

    solvers = {}

    def lr_fits(shape_of):
        def fits(n):
            shape = shape_of(n)
            bar.set_postfix_str(f"lrcnn {'x'.join(map(str, shape))}")
            _, g = build_and_capture(model_name, shape[0], (shape[2], shape[3]), "float32", "train")
            s = Solver(g, model_name, bn="train", optimizer=OPTIMIZER, device_profile=profile)
            solvers[shape] = s
            bar.update(1)
            return s.fits(budget), s.min_peak()
        return fits

    # (study, what is fixed, input shape of step n, the size reported for step n, largest n tried);
    # resolutions start at 64: at 32x32 and batch 1, train-mode BN of ResNet's last stage sees one
    # value per channel, which PyTorch refuses
    studies = [("max batch", f"{resolution}x{resolution}", lambda n: (n, 3, resolution, resolution), lambda n: n, 1 << 12),
               ("max resolution", "batch 1", lambda n: (1, 3, step * (n + 1), step * (n + 1)), lambda n: step * (n + 1),
                limit)]
    studies = [s for s in studies if which == "both" or s[0] == f"max {which}"]
    for what, fixed, shape_of, size_of, limit in studies:
        best_n = 0
        for name, wrapper in alts:
            fits = alt_fits(wrapper, shape_of)
            n = max_batch(fits, budget, limit, start=best_n or None)
            best_n = max(best_n, n)
            pk = fits(n)[1] if n else math.nan
            rows.append(dict(study=what, fixed=fixed, method=name, largest=size_of(n) if n else 0, peak_bytes=pk,
                             how="simulated (FakeTensorMode step)"))
        # from the best alternative's answer: a capture and solve far past the answer (a 16k image)
        # would take longer than the whole study
        n = max_batch(lr_fits(shape_of), budget, limit, start=best_n or None)
        sim = math.nan
        if n:
            shape = shape_of(n)
            plan = solvers[shape].solve(budget)
            if simulate:
                df, _ = simulate_plan(plan)
                sim = float(df[df.phase == "peak"].simulated_bytes.iloc[0])
            else:
                sim = float(plan.predicted["peak_bytes"])
        how = "planner prediction" + ("; plan simulated (FakeTensorMode executor step)" if simulate else "")
        rows.append(dict(study=what, fixed=fixed, method="lrcnn", largest=size_of(n) if n else 0, peak_bytes=sim,
                         how=how))
    bar.close()
    best = {}
    for r in rows:
        if r["method"] != "lrcnn":
            best[r["study"]] = max(best.get(r["study"], 0), r["largest"])
    for r in rows:
        r["x_best_alternative"] = r["largest"] / best[r["study"]] if best.get(r["study"]) else math.nan
    ckb = {r["study"]: r["largest"] for r in rows if r["method"] == "checkpoint-blocks"}
    for r in rows:
        if r["study"] == "max resolution":
            r["x_pixels_checkpoint_blocks"] = (r["largest"] / ckb[r["study"]]) ** 2 if ckb.get(r["study"]) else math.nan
    return rows
