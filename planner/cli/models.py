"""``planner models``: the model zoo, one line a model."""
from __future__ import annotations


from lrcnn.models import default_resolution, get_model, list_models
from lrcnn.models.zoo import model_task
from lrcnn.planner.cli.args import EXIT_OK
from lrcnn.planner.units import format_table


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models planner knows",
                       description="List the model zoo: name, default input resolution, parameters, source "
                                   "and task (classification, or segmentation: a class per pixel).")
    p.set_defaults(func=command)


def command(args) -> int:
    """``planner models``: one line per zoo model (built on the meta device: no memory)."""

    rows = []
    for name in list_models():
        model = get_model(name, device="meta")
        params = sum(p.numel() for p in model.parameters())
        r = default_resolution(name)
        source = "test net" if name.startswith("tiny_") else "lrcnn" if name == "unet" else "torchvision"
        rows.append([name, f"{r}x{r}", f"{params:,}", source, model_task(name)])
    print(format_table(["model", "resolution", "params", "source", "task"], rows, "lrrll"))
    return EXIT_OK
