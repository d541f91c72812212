"""``planner calibrate``: measure this machine into a device profile."""
from __future__ import annotations

import sys

from lrcnn.executor.calibrate import calibrate, save_profile
from lrcnn.models.zoo import DTYPES
from lrcnn.planner.cli.args import EXIT_OK
from lrcnn.planner.files import check_output_path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="measure this machine and write a device profile for the cost model",
        description="Time convolutions (FLOP/s), large element-wise ops (bandwidth) and tiny ops "
                    "(per-call cost) on the device and save a profile JSON that '--device-profile FILE' uses.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to measure (default cpu)")
    p.add_argument("--dtype", action="append", choices=DTYPES, default=None,
                   help="data type(s) to time convolutions in (repeatable; default float32)")
    p.add_argument("--quick", action="store_true", help="smaller, fewer measurements (seconds)")
    p.add_argument("-o", "--output", default="profile.json", metavar="FILE",
                   help="where to write the profile (default profile.json)")
    p.set_defaults(func=command)


def command(args) -> int:
    check_output_path(args.output, "device profile")
    prof = calibrate(args.device, tuple(args.dtype or ("float32",)), args.quick,
                     progress=lambda s: print(f"calibrate: {s} ...", file=sys.stderr))
    save_profile(prof, args.output)
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in prof.flops.items())
    print(f"wrote {args.output}: {prof.name}: {rates}, bandwidth {prof.bandwidth / 1e9:.1f} GB/s, "
          f"{prof.launch_s * 1e6:.1f} us per op")
    return EXIT_OK
