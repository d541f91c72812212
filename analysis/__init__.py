"""Reports of predicted vs actual (pandas tables, matplotlib plots); filled in by the run/report issue."""
