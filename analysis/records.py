"""Load run records (``planner run --out``) into pandas DataFrames."""
from __future__ import annotations

import os
from typing import Iterable, Union

from lrcnn.errors import LrcnnError
from lrcnn.planner.files import check_input_file, read_table

#: columns a records file must have for the report (``executor.run.COLUMNS`` has more)
REQUIRED = ["run_id", "step", "tracked", "scope", "name", "phase", "segment", "predicted_peak_bytes",
            "actual_peak_bytes", "predicted_s", "actual_s", "loss", "model", "device"]


class RecordsError(LrcnnError, ValueError):
    """A records file that cannot be read (one line: the problem and the fix)."""


def load_records(paths: Union[str, Iterable[str]]):
    """One DataFrame from one or more records files (.parquet, or .csv by extension)."""
    import pandas as pd

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = []
    for p in paths:
        p = os.fspath(p)
        check_input_file(p, "records file", "give files written by 'planner run --out'", RecordsError)
        df = read_table(p, REQUIRED, "records file", "give a .parquet or .csv file written by 'planner run --out'",
                        RecordsError)
        if df.empty:
            raise RecordsError(f"records file {p!r} has no rows; re-run 'planner run --out'")
        df["source"] = p
        frames.append(df)
    if not frames:
        raise RecordsError("no records files given; pass files written by 'planner run --out'")
    df = pd.concat(frames, ignore_index=True)
    df["tracked"] = df["tracked"].astype(str).str.lower().isin(["true", "1"])
    for c in ("predicted_peak_bytes", "actual_peak_bytes", "predicted_s", "actual_s", "loss"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
