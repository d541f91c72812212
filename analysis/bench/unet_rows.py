"""The smallest plan of an encoder-decoder against its plain step, predicted and simulated.

    python -m lrcnn.analysis.bench.unet_rows                   # U-Net, 4096x4096, batch 1 (minutes)
    python -m lrcnn.analysis.bench.unet_rows --size 1024 --channels 32

The planner's smallest plan (``Solver.min_peak``'s path) is applied to the model and one training
step (forward, dense cross-entropy, backward, momentum SGD) runs under ``FakeTensorMode``
(:func:`lrcnn.executor.measure.train_step_memory`): the executor's own code, the peak of its live
tensors at full size without the memory.  Both peaks
count everything a step holds (parameters, optimizer state, input and labels, activations,
gradients); the predictions are shown without the device profile's workspace (cuDNN/cuBLAS
reserve), which no simulation allocates.

The model is the zoo's U-Net (:class:`lrcnn.models.zoo.UNet`: two 3x3 conv + BN + ReLU per level,
max-pool down, 2x2 transposed convolutions up, skips concatenated), ``--channels`` wide.
"""
from __future__ import annotations

import argparse
import time

import torch

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import train_step_memory
from lrcnn.models import capture
from lrcnn.models.zoo import UNet
from lrcnn.planner import Plan
from lrcnn.planner.solve import Solver
from lrcnn.planner.units import fmt_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="input height and width (default 4096)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=64, help="the U-Net's first-level channels (default 64)")
    args = ap.parse_args(argv)
    model = UNet(width=args.channels).to("meta")
    shape = (args.batch, 3, args.size, args.size)
    graph = capture(model, shape, torch.float32, model_name="unet")
    s = Solver(graph, "unet")
    ws = s.cm.fixed_breakdown()["workspace"]
    plain_pred, min_pred = s.baseline()["peak"] - ws, s.min_peak() - ws
    segs = s.smallest_segments()
    print("smallest plan:", [sg.to_dict() for sg in segs if sg.mode != "store"])
    t0 = time.perf_counter()
    plain = train_step_memory(model, shape, "momentum", logits_shape=graph.output_node.shape).absolute_peak
    small = train_step_memory(apply_plan(model, Plan.build(graph, segs), graph), shape, "momentum").absolute_peak
    print(f"{'x'.join(map(str, shape))} float32, momentum SGD (simulated in {time.perf_counter() - t0:.0f} s)")
    print(f"plain step:    simulated {fmt_bytes(plain):>10}  predicted {fmt_bytes(plain_pred):>10}")
    print(f"smallest plan: simulated {fmt_bytes(small):>10}  predicted {fmt_bytes(min_pred):>10}")
    print(f"ratio:         simulated {small / plain:10.3f}  predicted {min_pred / plain_pred:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
