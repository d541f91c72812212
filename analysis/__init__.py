"""Reports of predicted vs actual: records of ``planner run`` as pandas tables and matplotlib plots.

* :func:`load_records` -- one DataFrame from records files (.parquet / .csv);
* :func:`compare`, :func:`segment_table`, :func:`phase_table`, :func:`runs_summary`,
  :func:`timeline` -- predicted vs actual with absolute and relative errors;
* :func:`report_figure` -- the report's matplotlib figure (per run: header, memory timeline with
  phases and segment passes, per-segment peak and time); :func:`draw_report` writes it as a PNG;
* :func:`report` -- what ``planner report`` prints.
"""
from lrcnn.analysis.compare import compare, phase_table, runs_summary, segment_table, timeline
from lrcnn.analysis.plot import draw_report, report_figure
from lrcnn.analysis.records import RecordsError, load_records
from lrcnn.analysis.report import report

__all__ = ["load_records", "RecordsError", "compare", "segment_table", "phase_table", "runs_summary",
           "timeline", "report_figure", "draw_report", "report"]
