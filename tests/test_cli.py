"""The ``planner`` command line: tables, CSV, and one-line errors (exit 2, no traceback, no file)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lrcnn.models import get_model, list_models
from lrcnn.planner.units import format_table
from lrcnn.planner.cli import main
from lrcnn.planner.cli.args import parse_resolution
from lrcnn.planner.plan import Plan, Segment


def run(capfd, *argv):
    """Run ``planner argv`` in-process; fd-level capture also sees what torch logs to stderr."""
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("planner"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def parse_table(lines):
    """Cells of an aligned table (header, dashed rule, rows), checking the alignment on the way."""
    header, rule, *rows = lines
    assert set(rule) <= {"-", " "}, rule
    cols = [m.span() for m in re.finditer(r"-+", rule)]
    assert all(rule[e:s2] == "  " for (_, e), (s2, _) in zip(cols, cols[1:])), rule
    cells = []
    for line in [header] + rows:
        assert len(line) <= cols[-1][1]
        for (s, e), (s2, _) in zip(cols, cols[1:]):
            assert line[e:s2].strip() == "", (line, s, e)  # the gap between columns is blank
        cells.append([line[s:e].strip() for s, e in cols])
    return cols, cells[0], cells[1:]


# ------------------------------------------------------------------------------------------------
# Parsing helpers
# ------------------------------------------------------------------------------------------------

def test_parse_resolution():
    assert parse_resolution("224") == (224, 224)
    assert parse_resolution("512x384") == (512, 384)
    assert parse_resolution("512X384") == (512, 384)
    assert parse_resolution(" 193x251 ") == (193, 251)
    for bad in ["22x", "abc", "", "x5", "224x224x3", "2.5", "-3", "5x-5"]:
        with pytest.raises(ValueError, match=r"^cannot read resolution .*: use H or HxW with positive integers, e\.g\. 224 or 512x384$"):
            parse_resolution(bad)
    for bad in ["0x5", "5x0", "0"]:
        with pytest.raises(ValueError, match=r"must have positive height and width"):
            parse_resolution(bad)


def test_format_table_aligns():
    text = format_table(["a", "bb", "n"], [["x", "yyy", 1], ["long", "z", 1234]])
    assert text.splitlines() == [
        "a     bb      n",
        "----  ---  ----",
        "x     yyy     1",
        "long  z    1234",
    ]


# ------------------------------------------------------------------------------------------------
# Help and models
# ------------------------------------------------------------------------------------------------

def test_help_lists_subcommands(capfd):
    rc, out, err = run(capfd, "--help")
    assert rc == 0 and err == ""
    assert out.startswith("usage: planner ")
    for verb in ("models", "inspect", "check-plan"):
        assert verb in out
    for verb in ("models", "inspect", "check-plan"):
        rc, out, err = run(capfd, verb, "--help")
        assert rc == 0 and out.startswith(f"usage: planner {verb}") and err == ""


def test_models(capfd):
    rc, out, err = run(capfd, "models")
    assert rc == 0 and err == ""
    cols, header, rows = parse_table(out.splitlines())
    assert header == ["model", "resolution", "params", "source", "task"]
    assert [r[0] for r in rows] == list_models()
    by = {r[0]: r for r in rows}
    assert by["resnet50"] == ["resnet50", "224x224", "25,557,032", "torchvision", "classification"]
    assert by["vgg16"] == ["vgg16", "224x224", "138,357,544", "torchvision", "classification"]
    assert by["regnet_y_400mf"][2] == "4,344,144"
    assert by["tiny_resnet"] == ["tiny_resnet", "32x32", "6,770", "test net", "classification"]
    assert by["unet"] == ["unet", "512x512", "31,037,698", "lrcnn", "segmentation"]
    assert by["fcn_resnet50"] == ["fcn_resnet50", "520x520", "32,957,013", "torchvision", "segmentation"]


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------

def expected_rows(graph):
    cuts = set(graph.cut_points())
    return [[n.name, n.op, n.target, "x".join(map(str, n.shape)), f"{n.out_bytes / 2**20:.3f}",
             f"{n.saved_bytes / 2**20:.3f}", f"{n.flops_fwd / 1e9:.3f}", f"{n.flops_bwd / 1e9:.3f}",
             str(n.receptive_field), str(n.cum_stride), "yes" if n.name in cuts else ""]
            for n in graph.nodes if n.kind not in ("input", "output")]


def split_output(out):
    lines = out.splitlines()
    t = lines.index("Totals")
    return lines[0], lines[2:t - 1], lines[t + 1:]


def test_inspect_resnet50_table_and_totals(capfd, captured):
    rc, out, err = run(capfd, "inspect", "--model", "resnet50", "--batch", "2")
    assert rc == 0 and err == ""
    g = captured("resnet50", (2, 3, 224, 224))
    head, table, totals = split_output(out)
    assert head == "resnet50: input 2x3x224x224 float32, BatchNorm train mode, 175 layers"
    cols, header, rows = parse_table(table)
    assert header == ["name", "op", "target", "shape", "out_MiB", "saved_MiB", "GFLOPs_fwd", "GFLOPs_bwd",
                      "rf", "stride", "cut"]
    assert rows == expected_rows(g)
    # numbers are right-aligned, names left-aligned
    for line in table[2:]:
        assert line[cols[4][1] - 1] != " " and line[cols[0][0]] != " "
    assert rows[0] == ["conv1", "conv2d", "conv1", "2x64x112x112", "6.125", "0.000", "0.472", "0.944", "7", "2", "yes"]
    _, theader, trows = parse_table(totals)
    assert theader == ["quantity", "value"]
    saved = g.total_saved_bytes
    assert trows == [
        ["saved for backward", f"{saved / 2**20:.2f} MiB ({saved / 2**30:.3f} GiB, {saved:,} bytes)"],
        ["input batch", "1.15 MiB (1,204,224 bytes)"],
        ["parameters", "97.49 MiB (25,557,032 parameters, float32)"],
        ["GFLOPs forward", f"{g.total_flops_fwd / 1e9:.3f}"],
        ["GFLOPs backward", f"{g.total_flops_bwd / 1e9:.3f}"],
        ["cut points", "40"],
    ]


def test_inspect_options(capfd, captured):
    rc, out, err = run(capfd, "inspect", "--model", "tiny_resnet", "--batch", "3", "--resolution", "64x48",
                       "--dtype", "float64", "--bn", "eval", "--num-classes", "5")
    assert rc == 0 and err == ""
    head, table, totals = split_output(out)
    assert head == "tiny_resnet: input 3x3x64x48 float64, BatchNorm eval mode, 28 layers"
    g = captured("tiny_resnet", (3, 3, 64, 48), "float64", training=False, num_classes=5)
    _, _, rows = parse_table(table)
    assert rows == expected_rows(g)
    assert rows[-1][:4] == ["fc", "linear", "fc", "3x5"]
    assert ["parameters", f"{g.param_bytes / 2**20:.2f} MiB (6,685 parameters, float64)"] in parse_table(totals)[2]


def test_inspect_default_resolution(capfd):
    rc, out, err = run(capfd, "inspect", "--model", "tiny_vgg")
    assert rc == 0 and out.splitlines()[0] == "tiny_vgg: input 32x3x32x32 float32, BatchNorm train mode, 14 layers"


def test_inspect_csv(capfd, captured, tmp_path):
    path = tmp_path / "layers.csv"
    path.write_text("old\n")
    rc, out, err = run(capfd, "inspect", "--model", "resnet18", "--batch", "2", "--resolution", "193x251",
                       "--csv", path)
    assert rc == 0 and err == ""
    assert out.splitlines()[-1] == f"wrote {path} (69 rows)"
    assert sorted(os.listdir(tmp_path)) == ["layers.csv"]  # replaced, no temporary left
    df = pd.read_csv(path, keep_default_na=False)
    assert list(df.columns) == ["name", "op", "kind", "module", "shape", "out_bytes", "out_MiB", "saved_bytes",
                                "saved_MiB", "flops_fwd", "flops_bwd", "GFLOPs_fwd", "GFLOPs_bwd",
                                "receptive_field", "cum_stride", "rowwise", "cut_point"]
    g = captured("resnet18", (2, 3, 193, 251))
    nodes = [n for n in g.nodes if n.kind not in ("input", "output")]
    assert list(df["name"]) == [n.name for n in nodes]
    assert list(df["shape"]) == ["x".join(map(str, n.shape)) for n in nodes]
    assert list(df["out_bytes"]) == [n.out_bytes for n in nodes]
    assert list(df["saved_bytes"]) == [n.saved_bytes for n in nodes]
    assert list(df["flops_fwd"]) == [n.flops_fwd for n in nodes]
    assert list(df["flops_bwd"]) == [n.flops_bwd for n in nodes]
    assert list(df["receptive_field"]) == [n.receptive_field for n in nodes]
    assert list(df["cum_stride"]) == [n.cum_stride for n in nodes]
    assert list(df["rowwise"]) == [n.rowwise for n in nodes]
    assert list(df["cut_point"]) == [n.name in set(g.cut_points()) for n in nodes]
    assert df["saved_bytes"].sum() == g.total_saved_bytes
    assert list(df["out_MiB"]) == [n.out_bytes / 2**20 for n in nodes]


def test_inspect_with_weights(capfd, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_vgg.pt"
    torch.save(get_model("tiny_vgg").state_dict(), path)
    rc, out, err = run(capfd, "inspect", "--model", "tiny_vgg", "--batch", "2", "--weights", path)
    assert rc == 0 and err == "" and out.startswith("tiny_vgg: input 2x3x32x32 float32")
    # a state dict of another model: one line naming the mismatch
    torch.save(get_model("tiny_resnet").state_dict(), path)
    rc, out, err = run(capfd, "inspect", "--model", "tiny_vgg", "--weights", path)
    assert_one_line_error(rc, out, err, "does not match the model")


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, no traceback, no output file
# ------------------------------------------------------------------------------------------------

def _garbage(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(bytes(range(256)) * 8)
    return p


INSPECT_ERRORS = [
    (["--model", "resnt50"], ["planner: error: unknown model 'resnt50' (did you mean resnet50"]),
    (["--model", "vgg16", "--resolution", "16", "--batch", "1"],
     ["planner: error: input shape 1x3x16x16 does not fit vgg16", "use a larger --resolution"]),
    (["--model", "vgg16", "--resolution", "31x40"], ["input shape 32x3x31x40 does not fit vgg16"]),
    (["--model", "resnet50", "--resolution", "4", "--batch", "1"], ["does not fit resnet50"]),
    (["--model", "vgg16", "--resolution", "22x"],
     ["planner inspect: error: argument --resolution: cannot read resolution '22x'", "e.g. 224 or 512x384"]),
    (["--model", "vgg16", "--resolution", "abc"], ["cannot read resolution 'abc'"]),
    (["--model", "vgg16", "--resolution", "0x5"], ["resolution '0x5' must have positive height and width"]),
    (["--model", "vgg16", "--weights", "{tmp}/missing.pt"], ["weights file", "missing.pt' does not exist"]),
    (["--model", "tiny_vgg", "--weights", "{garbage}"], ["garbage.pt' is not a readable torch state dict"]),
    (["--model", "tiny_vgg", "--batch", "0"], ["argument --batch: '0' must be a positive integer"]),
    (["--model", "tiny_vgg", "--batch", "two"], ["argument --batch: 'two' is not a whole number"]),
    (["--model", "tiny_vgg", "--num-classes", "-1"], ["argument --num-classes"]),
    (["--model", "tiny_vgg", "--dtype", "int8"], ["argument --dtype: invalid choice: 'int8'"]),
    (["--model", "tiny_vgg", "--bn", "frozen"], ["argument --bn: invalid choice: 'frozen'"]),
    (["--model", "tiny_vgg", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ([], ["the following arguments are required: --model", "(see 'planner inspect --help')"]),
]


@pytest.mark.parametrize("args,needles", INSPECT_ERRORS, ids=[" ".join(a) or "no-args" for a, _ in INSPECT_ERRORS])
def test_inspect_bad_input(capfd, tmp_path, args, needles):
    garbage = _garbage(tmp_path)
    args = [a.format(tmp=tmp_path, garbage=garbage) for a in args]
    csv = tmp_path / "out.csv"
    rc, out, err = run(capfd, "inspect", *args, "--csv", csv)
    assert_one_line_error(rc, out, err, *needles)
    assert not csv.exists()
    assert sorted(os.listdir(tmp_path)) == ["garbage.pt"]  # no output file, no temporary


def test_failed_inspect_keeps_existing_csv(capfd, tmp_path):
    csv = tmp_path / "out.csv"
    csv.write_text("previous\n")
    rc, out, err = run(capfd, "inspect", "--model", "vgg16", "--resolution", "16", "--csv", csv)
    assert_one_line_error(rc, out, err, "does not fit vgg16")
    assert csv.read_text() == "previous\n" and os.listdir(tmp_path) == ["out.csv"]


def test_unwritable_csv(capfd, tmp_path):
    rc, out, err = run(capfd, "inspect", "--model", "tiny_vgg", "--csv", tmp_path / "nodir" / "x.csv")
    assert_one_line_error(rc, out, err, "cannot write CSV", "No such file or directory; choose a writable file path")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,needle", [
    ([], "planner: error: the following arguments are required: COMMAND (see 'planner --help')"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["models", "extra"], "unrecognized arguments: extra"),
    (["check-plan"], "the following arguments are required: PLAN.json"),
])
def test_usage_errors(capfd, argv, needle):
    assert_one_line_error(*run(capfd, *argv), needle)


# ------------------------------------------------------------------------------------------------
# check-plan
# ------------------------------------------------------------------------------------------------

@pytest.fixture()
def plan_file(tmp_path, captured):
    g = captured("tiny_resnet", (2, 3, 32, 32))
    plan = Plan.build(g, [Segment("conv1", "layer1", "rows", policy="2ps", strips=2),
                          Segment("layer2", "layer2", "checkpoint")])
    path = tmp_path / "plan.json"
    plan.save(str(path))
    return path, plan


def test_check_plan_ok(capfd, plan_file):
    path, plan = plan_file
    rc, out, err = run(capfd, "check-plan", path)
    assert rc == 0 and err == ""
    assert out == (f"OK: {path}: lrcnn.plan/1 plan for tiny_resnet at 2x3x32x32 float32, fingerprint "
                   f"{plan.fingerprint} matches; 2 segment(s) (checkpoint 1, rows 1)\n")


def test_check_plan_num_classes(capfd, tmp_path, captured):
    g = captured("tiny_resnet", (2, 3, 32, 32), num_classes=7)
    path = tmp_path / "plan.json"
    plan = Plan.build(g, [])
    assert plan.training["num_classes"] == 7  # recorded by Plan.build
    del plan.training["num_classes"]
    plan.save(str(path))
    assert_one_line_error(*run(capfd, "check-plan", path), "does not match the model's graph")
    rc, out, err = run(capfd, "check-plan", path, "--num-classes", "7")
    assert rc == 0 and out.startswith("OK: ")
    doc = Plan.load(str(path))
    doc.training["num_classes"] = 7
    doc.save(str(path))
    rc, out, err = run(capfd, "check-plan", path)
    assert rc == 0 and out.startswith("OK: ")


def _edit(path, **changes):
    import json

    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("change,needle", [
    (dict(schema="lrcnn.plan/0"), "planner: error: plan schema 'lrcnn.plan/0' is not 'lrcnn.plan/1'; re-create"),
    (dict(fingerprint="0123456789abcdef"), "plan fingerprint 0123456789abcdef does not match the model's graph"),
    (dict(input_shape=[2, 3, 48, 32]), "plan fingerprint"),
    (dict(model="vgg16", input_shape=[1, 3, 16, 16]), "input shape 1x3x16x16 does not fit vgg16"),
    (dict(input_shape="big"), "must be four positive integers [N, C, H, W]"),
    (dict(input_shape=[2, 3, 32]), "must be four positive integers"),
    (dict(input_shape=[2, 1, 32, 32]), "plan input_shape [2, 1, 32, 32] has 1 channel(s), tiny_resnet takes 3"),
    (dict(dtype="int8"), "plan dtype 'int8' is not one of float32, float64, bfloat16, float16"),
    (dict(model="resnt50"), "unknown model 'resnt50'"),
    (dict(model=None), "plan model None must be a model name"),
    (dict(training={"bn": "frozen"}), "plan training.bn 'frozen' is not one of train, eval"),
    (dict(training={"num_classes": "ten"}), "plan training.num_classes 'ten' must be a positive integer"),
    (dict(segments=[{"first": "conv1", "last": "layer1_0_conv1", "mode": "checkpoint"}]),
     "more than one tensor leaves the segment after 'layer1_0_conv1'"),
    (dict(segments=[{"first": "conv1", "last": "nope", "mode": "checkpoint"}]), "node 'nope' is not in the graph"),
    (dict(segments=[{"first": "conv1"}]), "a segment needs 'first' and 'last' node names"),
])
def test_check_plan_bad_plan(capfd, plan_file, change, needle):
    path, _ = plan_file
    _edit(path, **change)
    assert_one_line_error(*run(capfd, "check-plan", path), needle)


def test_check_plan_not_json(capfd, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("this is not JSON\n")
    assert_one_line_error(*run(capfd, "check-plan", path), "is not valid JSON (line 1:")
    path.write_text("[1, 2, 3]")
    assert_one_line_error(*run(capfd, "check-plan", path), "a plan must be a JSON object")
    assert_one_line_error(*run(capfd, "check-plan", tmp_path / "missing.json"),
                          "missing.json' does not exist", "give a JSON plan")


# ------------------------------------------------------------------------------------------------
# The real command, as a user runs it
# ------------------------------------------------------------------------------------------------

def test_subprocess_inspect_resnet50(repo_root):
    proc = subprocess.run([sys.executable, "-m", "lrcnn", "inspect", "--model", "resnet50", "--batch", "2"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "resnet50: input 2x3x224x224 float32, BatchNorm train mode, 175 layers"
    assert lines[2].split() == ["name", "op", "target", "shape", "out_MiB", "saved_MiB", "GFLOPs_fwd",
                                "GFLOPs_bwd", "rf", "stride", "cut"]
    assert lines[4].split() == ["conv1", "conv2d", "conv1", "2x64x112x112", "6.125", "0.000", "0.472",
                                "0.944", "7", "2", "yes"]
    assert "Totals" in lines
    assert lines[-1].split()[:2] == ["cut", "points"] and lines[-1].split()[-1] == "40"
    assert any(l.startswith("saved for backward") and l.endswith("bytes)") for l in lines)
