"""``planner inspect``: the per-layer table of a captured model."""
from __future__ import annotations


from lrcnn.models.capture import build_and_capture
from lrcnn.planner.cli.args import EXIT_OK, add_model_args, gflop_text, mib_text, shape_text
from lrcnn.planner.files import write_csv_atomic
from lrcnn.planner.plan import precision
from lrcnn.planner.units import format_table

INSPECT_COLUMNS = ["name", "op", "target", "shape", "out_MiB", "saved_MiB", "GFLOPs_fwd", "GFLOPs_bwd",
                   "rf", "stride", "cut"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per-layer table of a model: shapes, memory, FLOPs, receptive field",
        description="Capture a model (no real memory: meta device + fake tensors) and print one row "
                    "per layer: output shape, output MiB, MiB saved for backward, GFLOPs, receptive "
                    "field (input rows one output row sees), cumulative stride, and whether the "
                    "layer is a cut point (a legal segment end); then totals.")
    add_model_args(p)
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV (exact bytes and FLOPs)")
    p.set_defaults(func=command)


def inspect_frame(graph):
    """The inspect table as a pandas DataFrame with exact integer bytes/FLOPs (the CSV)."""
    import pandas as pd

    cuts = set(graph.cut_points())
    rows = []
    for n in graph.nodes:
        if n.kind in ("input", "output"):
            continue
        rows.append({
            "name": n.name, "op": n.op, "kind": n.kind, "module": n.target, "shape": shape_text(n.shape),
            "out_bytes": n.out_bytes, "out_MiB": n.out_bytes / 2**20,
            "saved_bytes": n.saved_bytes, "saved_MiB": n.saved_bytes / 2**20,
            "flops_fwd": n.flops_fwd, "flops_bwd": n.flops_bwd,
            "GFLOPs_fwd": n.flops_fwd / 1e9, "GFLOPs_bwd": n.flops_bwd / 1e9,
            "receptive_field": n.receptive_field, "cum_stride": n.cum_stride,
            "rowwise": bool(n.rowwise), "cut_point": n.name in cuts,
        })
    return pd.DataFrame(rows)


def command(args) -> int:
    """``planner inspect``: aligned per-layer table and totals, optional CSV."""
    model, graph = build_and_capture(args.model, args.batch, args.resolution, args.dtype, args.bn,
                                     args.weights, args.num_classes, amp=args.amp)
    df = inspect_frame(graph)
    if args.csv:
        write_csv_atomic(df, args.csv)
    cuts = graph.cut_points()
    cutset = set(cuts)
    rows = [[n.name, n.op, n.target, shape_text(n.shape), mib_text(n.out_bytes), mib_text(n.saved_bytes),
             gflop_text(n.flops_fwd), gflop_text(n.flops_bwd), n.receptive_field, n.cum_stride,
             "yes" if n.name in cutset else ""]
            for n in graph.nodes if n.kind not in ("input", "output")]
    nparams = sum(p.numel() for p in model.parameters())
    saved = graph.total_saved_bytes
    inp = graph.input_node.out_bytes
    print(f"{args.model}: input {shape_text(graph.input_shape)} {precision(graph.dtype, graph.amp)}, BatchNorm {args.bn} mode, "
          f"{len(rows)} layers")
    print()
    print(format_table(INSPECT_COLUMNS, rows, "llllrrrrrrl"))
    print()
    print("Totals")
    print(format_table(["quantity", "value"], [
        ["saved for backward", f"{saved / 2**20:.2f} MiB ({saved / 2**30:.3f} GiB, {saved:,} bytes)"],
        ["input batch", f"{inp / 2**20:.2f} MiB ({inp:,} bytes)"],
        ["parameters", f"{graph.param_bytes / 2**20:.2f} MiB ({nparams:,} parameters, {graph.dtype})"],
        ["GFLOPs forward", f"{graph.total_flops_fwd / 1e9:.3f}"],
        ["GFLOPs backward", f"{graph.total_flops_bwd / 1e9:.3f}"],
        ["cut points", f"{len(cuts)}"],
    ], "ll"))
    if args.csv:
        print(f"\nwrote {args.csv} ({len(df)} rows)")
    return EXIT_OK
