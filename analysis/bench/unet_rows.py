"""The smallest plan of an encoder-decoder against its plain step, predicted and simulated.

    python -m lrcnn.analysis.bench.unet_rows                   # U-Net, 4096x4096, batch 1 (minutes)
    python -m lrcnn.analysis.bench.unet_rows --size 1024 --channels 32

The planner's smallest plan (``Solver.min_peak``'s path) is applied to the model and one training
step (forward, dense cross-entropy, backward, momentum SGD) runs under ``FakeTensorMode``: the
executor's own code, the peak of its live tensors at full size without the memory.  Both peaks
count everything a step holds (parameters, optimizer state, input and labels, activations,
gradients); the predictions are shown without the device profile's workspace (cuDNN/cuBLAS
reserve), which no simulation allocates.

The model is the zoo's ``unet`` when the zoo has one, else :class:`UNet` below (Ronneberger's
shape: two 3x3 conv + BN + ReLU per level, max-pool down, 2x2 transposed convolutions up, skips
concatenated).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrcnn.executor import apply_plan
from lrcnn.executor.measure import make_optimizer, opt_state
from lrcnn.models import capture, memory
from lrcnn.models.zoo import get_model, list_models
from lrcnn.planner import Plan
from lrcnn.planner.solve import Solver
from lrcnn.planner.units import fmt_bytes


def _double_conv(ci: int, co: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True),
                         nn.Conv2d(co, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A U-Net of ``levels`` down-samplings from ``channels`` (doubling per level) to ``classes``
    output maps (input sides divisible by 2**levels)."""

    def __init__(self, channels: int = 64, classes: int = 2, levels: int = 4):
        super().__init__()
        ch = [channels * 2 ** i for i in range(levels + 1)]
        self.inc = _double_conv(3, ch[0])
        self.downs = nn.ModuleList([nn.Sequential(nn.MaxPool2d(2), _double_conv(ch[i], ch[i + 1]))
                                    for i in range(levels)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in reversed(range(levels))])
        self.decs = nn.ModuleList([_double_conv(2 * ch[i], ch[i]) for i in reversed(range(levels))])
        self.head = nn.Conv2d(channels, classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.ups, self.decs):
            y = dec(torch.cat([skips.pop(), up(y)], 1))
        return self.head(y)


def simulate_step(model: nn.Module, shape, classes: int) -> memory.MemoryReport:
    """Peak bytes of one momentum-SGD training step with dense cross-entropy, under fake tensors."""
    with memory.fake_mode():
        state = memory.fake_state(model)
        params = [v for v in state.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        opt = make_optimizer(params, "momentum")
        x = torch.randn(*shape, device="meta")
        y = torch.randint(0, classes, (shape[0],) + tuple(shape[2:]), device="meta")

        def step():
            loss = F.cross_entropy(torch.func.functional_call(model, state, (x,)), y)
            memory.mark("forward")
            loss.backward()
            memory.mark("backward")
            opt.step()
            opt.zero_grad(set_to_none=True)
            memory.mark("optimizer")

        step()  # (the optimizer state exists from the second step on)
        return memory.measure_step(step, device="meta", track_existing=list(state.values()) + [x, y] + opt_state(opt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="input height and width (default 4096)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=64, help="the local U-Net's first-level channels")
    args = ap.parse_args(argv)
    classes = 2
    if "unet" in list_models():
        model = get_model("unet", device="meta")
        classes = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    else:
        model = UNet(args.channels, classes).to("meta")
    shape = (args.batch, 3, args.size, args.size)
    graph = capture(model, shape, torch.float32, model_name="unet")
    s = Solver(graph, "unet")
    ws = s.cm.fixed_breakdown()["workspace"]
    plain_pred, min_pred = s.baseline()["peak"] - ws, s.min_peak() - ws
    segs = [c.seg for c in s.problem.min_peak_path()]
    print("smallest plan:", [sg.to_dict() for sg in segs if sg.mode != "store"])
    t0 = time.perf_counter()
    plain = simulate_step(model, shape, classes).peak_bytes
    small = simulate_step(apply_plan(model, Plan.build(graph, segs), graph), shape, classes).peak_bytes
    print(f"{'x'.join(map(str, shape))} float32, momentum SGD (simulated in {time.perf_counter() - t0:.0f} s)")
    print(f"plain step:    simulated {fmt_bytes(plain):>10}  predicted {fmt_bytes(plain_pred):>10}")
    print(f"smallest plan: simulated {fmt_bytes(small):>10}  predicted {fmt_bytes(min_pred):>10}")
    print(f"ratio:         simulated {small / plain:10.3f}  predicted {min_pred / plain_pred:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
